"""The decoder families added to split(): Qwen2, Qwen3, Mistral, Gemma (decoder.py) and GPT-2
(gpt2.py), on the tiny random configs of the model registry. Export round trips are in
test_export.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hosl
from hosl.models import load_model, split
from hosl.models.decoder import SLIDING, block_mask_types
from hosl.models import MODEL_NAMES
from hosl.models.architectures import ARCHITECTURES
from hosl.models.lora import apply_lora
from hosl.models.registry import TINY_DECODER_CONFIGS

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

NEW_ARCHS = tuple(TINY_DECODER_CONFIGS)
KINDS = ("causal_lm", "sequence_classification")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


def test_every_registered_architecture_has_a_tiny_model():
    """tiny-<name> (hosl/models/registry.py) is how tests build each architecture offline."""
    assert {f"tiny-{name}" for name in ARCHITECTURES} <= set(MODEL_NAMES)


def _model(name, kind):
    return load_model(name, kind, num_labels=3 if kind != "causal_lm" else None)


def _batch(tokenizer, seq=12):
    """Rows of 12, 9 and 3 real tokens (longer than the 4-token sliding windows), pads where the mask is 0."""
    ids = torch.randint(4, 260, (3, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    return ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NEW_ARCHS)
def test_split_is_exact_for_every_cut(name, kind):
    model, tokenizer = _model(name, kind)
    ids, mask = _batch(tokenizer)
    reference = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    for cut in range(model.config.num_hidden_layers + 1):
        client, server = split(model, cut)
        assert torch.equal(server(client(ids, mask), mask), reference), cut
        # the halves partition the model's blocks
        assert client.num_blocks == cut and server.num_blocks == model.config.num_hidden_layers - cut


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-mistral"])
def test_sliding_window_blocks_get_the_sliding_mask(name):
    """Guards the exactness test above: the tiny configs really have sliding-window blocks, and
    giving them the full causal mask instead changes the output."""
    model, tokenizer = _model(name, "causal_lm")
    types = block_mask_types(model.config)
    assert SLIDING in types
    ids, mask = _batch(tokenizer)
    client, server = split(model, 1)
    exact = server(client(ids, mask), mask)
    server.mask_types = ["full_attention"] * server.num_blocks
    assert not torch.equal(server(client(ids, mask), mask), exact)


@pytest.mark.parametrize("name", NEW_ARCHS)
def test_tied_head_is_a_server_copy(name):
    model, _ = _model(name, "causal_lm")
    client, server = split(model, 1)
    embedding = model.get_input_embeddings().weight
    assert torch.equal(server.lm_head.weight, embedding)
    assert server.lm_head.weight.data_ptr() != embedding.data_ptr()


@pytest.mark.parametrize("name", NEW_ARCHS)
def test_hosl_step_leaves_client_weights_exact_after_its_perturbed_passes(name):
    """lr 0: 2Q perturbed client passes and a server step; the client's weights come back bit for
    bit, although the passes saw other weights. lr > 0 then moves them."""
    model, tokenizer = _model(name, "sequence_classification")
    client, server = split(model, 2)
    ids, mask = _batch(tokenizer)
    labels = torch.tensor([0, 1, 2])
    before = {n: p.detach().clone() for n, p in client.named_parameters()}
    outputs = []

    def client_fn():
        outputs.append(client(ids, mask))
        return outputs[-1]

    def loss_fn(h):
        return torch.nn.functional.cross_entropy(server(h, mask), labels)

    server_opt = torch.optim.SGD(server.parameters(), lr=1e-2)
    opt = hosl.HybridOrderOptimizer(client, server_opt, lr=0.0, eps=1e-2, num_queries=2)
    server_before = {n: p.detach().clone() for n, p in server.named_parameters()}
    opt.step(client_fn, loss_fn)
    assert all(torch.equal(before[n], p) for n, p in client.named_parameters())
    assert len(outputs) == 5 and not torch.equal(outputs[0], outputs[1])
    assert any(not torch.equal(server_before[n], p) for n, p in server.named_parameters())
    opt = hosl.HybridOrderOptimizer(client, None, lr=1e-2, eps=1e-2, num_queries=2)
    opt.step(client_fn, loss_fn)
    assert any(not torch.equal(before[n], p) for n, p in client.named_parameters())


@pytest.mark.parametrize("name", NEW_ARCHS)
def test_lora_has_default_targets_and_splits(name):
    model, tokenizer = _model(name, "causal_lm")
    ids, mask = _batch(tokenizer)
    wrapped = apply_lora(model, r=2, alpha=4)
    client, server = split(wrapped, 1)
    trainable = [n for n, p in [*client.named_parameters(), *server.named_parameters()] if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.equal(server(client(ids, mask), mask), wrapped(input_ids=ids, attention_mask=mask).logits)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_data
def test_two_process_qwen2_run_matches_one_process(tmp_path):
    args = ["--model", "tiny-qwen2", "--task", "sst2", "--data-dir", str(DATA), "--mode", "hosl", "--cut", "1",
            "--steps", "2", "--batch-size", "4", "--train-size", "8", "--eval-size", "4", "--num-queries", "2",
            "--max-length", "40", "--lr-client", "1e-3", "--lr-server", "1e-2", "--no-progress"]
    conn = ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--peer-timeout", "30"]
    cmd = [sys.executable, "-m", "hosl"]
    env = {**os.environ, "HOSL_SECRET": "architectures-test-secret"}  # both sides share it
    common = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    two = tmp_path / "two"
    server = subprocess.Popen([*cmd, "serve", "--rank", "1", *args, "--out", str(two), *conn], **common)
    client = subprocess.Popen([*cmd, "train", "--role", "client", "--rank", "0", *args, "--out", str(two), *conn],
                              **common)
    one = subprocess.run([*cmd, "train", *args, "--out", str(tmp_path / "one")], **common, timeout=240)
    out_c, _ = client.communicate(timeout=240)
    out_s, _ = server.communicate(timeout=120)
    assert one.returncode == 0 and client.returncode == 0 and server.returncode == 0, one.stdout + out_c + out_s

    def losses(run):
        return [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(two / "client") == losses(tmp_path / "one")
    for half, folder in (("client", two / "client"), ("server", two / "server")):
        a = load_file(str(tmp_path / "one" / "checkpoints/step-2" / f"{half}.safetensors"))
        b = load_file(str(folder / "checkpoints/step-2" / f"{half}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
