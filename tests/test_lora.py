"""LoRA (peft) on the split: adapters only are perturbed, updated and checkpointed."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

import hosl  # noqa: E402
from hosl.cli import main  # noqa: E402
from hosl.directions.spec import randn_reference  # noqa: E402
from hosl.models import load_model, split  # noqa: E402
from hosl.models.lora import apply_lora, lora_layers  # noqa: E402
from hosl.forward.fused import FusedPerturber  # noqa: E402
from hosl.forward.layout import ParameterLayout  # noqa: E402
from hosl.forward.scratch import ModuleScratchPerturber  # noqa: E402
from hosl.training import checkpoint as ckpt  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels", "ignore::FutureWarning")

DATA = Path(os.environ.get("HOSL_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


def _lora_split(name="tiny-opt", kind="causal_lm", cut=2, **kw):
    model, _ = load_model(name, kind, num_labels=2 if kind != "causal_lm" else None)
    wrapped = apply_lora(model, train_head=kind != "causal_lm", **kw)
    # peft starts lora_B at zero; make the adapters matter so a wrong forward shows
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return wrapped, *split(wrapped, cut=cut)


def _batch():
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("name,kind", [("tiny-opt", "causal_lm"), ("tiny-llama", "causal_lm"),
                                       ("tiny-bert", "sequence_classification")])
def test_split_of_a_peft_model_equals_the_whole_and_trains_adapters_only(name, kind):
    wrapped, client, server = _lora_split(name, kind)
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(server(client(ids, mask), mask), wrapped(input_ids=ids, attention_mask=mask).logits)
    names = [s.name for s in ParameterLayout(client).slots]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    targets = ("query", "value") if kind != "causal_lm" else ("q_proj", "v_proj")
    assert {n.split(".")[-4] for n in names} == set(targets)
    server_trainable = {n for n, p in server.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("classifier.") for n in server_trainable)


def test_lora_on_one_half_only():
    model, _ = load_model("tiny-opt", "causal_lm")
    wrapped = apply_lora(model, layers=lora_layers(3, 1, "client"))
    client, server = split(wrapped, cut=1)
    assert any("lora_" in n for n, _ in client.named_parameters())
    assert not any("lora_" in n for n, _ in server.named_parameters())
    with pytest.raises(ValueError, match="no blocks"):
        lora_layers(3, 3, "server")


def _reference_grads(client, server_loss, ids, mask, seeds, eps):
    """Central differences with explicit w + eps*z copies of the adapter weights (frozen ones as they are)."""
    layout = ParameterLayout(client)
    total = layout.numel
    grads = []
    with torch.no_grad():
        for s in seeds:
            z = randn_reference(s, total)
            losses = []
            for sign in (1.0, -1.0):
                params = {sl.name: sl.param.detach() + (sign * eps) * z[sl.offset:sl.offset + sl.param.numel()]
                          .view_as(sl.param) for sl in layout.slots}
                losses.append(server_loss(torch.func.functional_call(client, params, (ids, mask))).item())
            grads.append((losses[0] - losses[1]) / (2 * eps))
    return grads


@pytest.mark.parametrize("perturbed_forward", ["scratch", "auto"])
def test_a_lora_hosl_step_equals_the_reference(perturbed_forward):
    _, client, server = _lora_split(cut=2)
    ref_client, ref_server = copy.deepcopy(client), copy.deepcopy(server)
    def named(client, server):
        return [*(("client." + n, p) for n, p in client.named_parameters()),
                *(("server." + n, p) for n, p in server.named_parameters())]

    base = {n: p.detach().clone() for n, p in named(client, server) if not p.requires_grad}
    ids, mask = _batch()
    target = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))

    def loss_of(srv):
        return lambda h: nn.functional.cross_entropy(srv(h, mask).flatten(0, 1), target.flatten())

    lr, eps, q, server_lr = 0.5, 5e-3, 3, 0.1
    server_opt = torch.optim.SGD([p for p in server.parameters() if p.requires_grad], lr=server_lr)
    opt = hosl.HybridOrderOptimizer(client, server_opt, lr=lr, eps=eps, num_queries=q, seed=4,
                                    perturbed_forward=perturbed_forward)
    # LoRA's lora_A / lora_B are plain nn.Linear submodules: the default path runs them fused
    expected = ModuleScratchPerturber if perturbed_forward == "scratch" else FusedPerturber
    assert type(opt.perturbers[0]) is expected
    if expected is FusedPerturber:
        assert len(opt.perturbers[0].fused) == 2 * 2 * 2 and not opt.perturbers[0].owners  # 2 blocks x (q, v) x (A, B)
    opt.step(lambda: client(ids, mask), loss_of(server))

    # the reference: grads from explicit copies, the update formula, the server's plain SGD step
    ref_loss = loss_of(ref_server)(ref_client(ids, mask).detach())
    ref_loss.backward()
    grads = _reference_grads(ref_client, loss_of(ref_server), ids, mask, opt.last_seeds, eps)
    assert opt.last_projected_grads == pytest.approx(grads, rel=1e-3, abs=1e-3)
    layout = ParameterLayout(ref_client)
    with torch.no_grad():
        for sl in layout.slots:
            est = sum(g / q * randn_reference(s, layout.numel)[sl.offset:sl.offset + sl.param.numel()]
                      for g, s in zip(opt.last_projected_grads, opt.last_seeds))
            sl.param.sub_(lr * est.view_as(sl.param))
        for p in ref_server.parameters():
            if p.requires_grad:
                p -= server_lr * p.grad
    for (n, p), r in zip([*client.named_parameters(), *server.named_parameters()],
                         [*ref_client.parameters(), *ref_server.parameters()]):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=n)

    opt.step(lambda: client(ids, mask), loss_of(server))
    # only adapter weights moved; every frozen base weight is bit-identical after the steps
    assert len(base) > len([n for n, p in named(client, server) if p.requires_grad]) > 0
    for n, p in named(client, server):
        if n in base:
            assert torch.equal(p.detach().view(torch.int32), base[n].view(torch.int32)), n


def test_lora_checkpoints_hold_adapters_only_and_reload(tmp_path):
    _, client, server = _lora_split(cut=1)
    ckpt.save_checkpoint(tmp_path, 1, {"client": client, "server": server}, {"step": 1}, trainable_only=True)
    from safetensors.torch import load_file

    for name, module in (("client", client), ("server", server)):
        saved = load_file(str(tmp_path / "checkpoints" / "step-1" / f"{name}.safetensors"))
        assert saved and all("lora_" in k for k in saved)
        assert set(saved) == {n for n, p in module.named_parameters() if p.requires_grad}
    _, client2, server2 = _lora_split(cut=1)
    with torch.no_grad():
        for p in client2.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-1", {"client": client2, "server": server2})
    assert all(torch.equal(a, b) for a, b in zip(client.parameters(), client2.parameters()))
    # a checkpoint of other adapters is refused, not half-loaded
    model, _ = load_model("tiny-opt", "causal_lm")
    other_client, other_server = split(apply_lora(model, targets=["k_proj"]), cut=1)
    with pytest.raises(ValueError, match="trainable parameters only"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "step-1", {"client": other_client, "server": other_server})


def _cli(out, *extra, steps=2):
    return ["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--cut", "1",
            "--steps", str(steps), "--batch-size", "4", "--train-size", "16", "--eval-size", "4", "--num-queries", "2",
            "--max-length", "32", "--eval-every", "2", "--checkpoint-every", "1", "--lora", "--zo-optimizer", "adam",
            "--lr-client", "1e-3", "--out", str(out), "--no-progress", *extra]


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@needs_data
@pytest.mark.slow
def test_cli_lora_with_zo_adam_end_to_end_and_resume(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_cli(straight)) == 0
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["lora"] and summary["zo_optimizer"] == "adam" and summary["eps"] == 5e-3
    # Adam's two float32 moments of the client's adapters are client memory, and are counted
    assert summary["client_optimizer_state_bytes"] == 2 * summary["client_trainable_bytes"] > 0
    assert summary["client_trainable_bytes"] < summary["client_weight_bytes"] / 10
    assert summary["client_peak_bytes"] > summary["client_weight_bytes"] + summary["client_optimizer_state_bytes"]
    step_dir = straight / "checkpoints" / (straight / "checkpoints" / "latest").read_text().strip()
    from safetensors.torch import load_file

    for half in ("client", "server"):
        assert all("lora_" in k for k in load_file(str(step_dir / f"{half}.safetensors")))
    config = json.loads((straight / "config.json").read_text())
    assert config["lora"] and config["zo_optimizer"] == "adam"

    assert main(_cli(resumed, steps=1)) == 0
    assert main(_cli(resumed, "--resume")) == 0
    assert _losses(resumed) == _losses(straight)
