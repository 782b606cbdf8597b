"""--wire in the split protocol (hosl/training/protocol.py: ActivationWire): what each phase's
activation becomes on the wire, and training runs that upload fewer bytes with the same clean losses."""

import json
import os
from pathlib import Path

import pytest
import torch

from hosl.training.config import TrainConfig
from hosl.training.loop import train
from hosl.training.protocol import ActivationWire

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


def _activation(rows=3, seq=5, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 4.0 * torch.randn(rows, seq, hidden, generator=g)


def test_delta8_sends_the_clean_activation_as_is_and_copies_as_int8_differences():
    client, server = ActivationWire("delta8"), ActivationWire("delta8")
    h0 = _activation()
    parts = client.pack(h0, "clean")
    assert len(parts) == 1 and torch.equal(parts[0], h0)
    got, rest = server.unpack([*parts, torch.ones(2)], "clean", torch.float32)
    assert torch.equal(got, h0) and len(rest) == 1
    copies = torch.cat([h0 + 1e-3 * _activation(seed=s) for s in (1, 2)])
    parts = client.pack(copies, "copies")
    assert [p.dtype for p in parts] == [torch.int8, torch.float32]
    back, _ = server.unpack(parts, "copies", torch.float32)
    scale = parts[1].unsqueeze(-1)
    assert ((back - copies).abs() <= scale / 2 + 1e-6).all()
    # the differences survive: bfloat16 of the copies would round them away at this size
    diff_true = copies[:3] - copies[3:]
    assert ((back[:3] - back[3:]) - diff_true).norm() / diff_true.norm() < 0.02
    bf16 = copies.to(torch.bfloat16).float()
    assert ((bf16[:3] - bf16[3:]) - diff_true).norm() / diff_true.norm() > 0.5


def test_copies_without_a_clean_activation_travel_plain_and_a_new_step_forgets_the_reference():
    wire = ActivationWire("delta8")
    h = _activation()
    assert len(wire.pack(h, "copies")) == 1  # zo-sl: each point stands alone
    wire.pack(h, "clean")
    assert len(wire.pack(h, "copies")) == 2
    wire.end_step()
    assert wire.reference is None and len(wire.pack(h, "copies")) == 1


def test_float_codecs_cast_every_kind_and_native_is_the_same_tensor():
    h = _activation()
    assert ActivationWire("native").pack(h, "copies")[0] is not None
    assert torch.equal(ActivationWire("native").pack(h, "clean")[0], h)
    for codec, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        wire = ActivationWire(codec)
        for kind in ("clean", "copies", "difference", "plain"):
            (part,) = wire.pack(h, kind)
            assert part.dtype == dtype
    with pytest.raises(ValueError, match="--wire"):
        ActivationWire("int4")


def _run(tmp_path, wire, mode="hosl", steps=3):
    cfg = TrainConfig(model="tiny-opt", task="sst2", data_dir=str(DATA), mode=mode, cut=1, steps=steps, batch_size=4,
                      train_size=16, eval_size=8, num_queries=2, max_length=48, lr_client=1e-3, lr_server=1e-2,
                      eval_every=steps, out=str(tmp_path / f"{mode}-{wire}"), progress=False, wire=wire)
    summary = train(cfg)
    losses = [json.loads(x)["loss"] for x in (tmp_path / f"{mode}-{wire}" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x and "event" not in x]
    return summary, losses


@needs_data
@pytest.mark.slow
def test_training_with_each_codec_uploads_less_and_keeps_the_first_clean_loss(tmp_path):
    native, native_losses = _run(tmp_path, "native")
    delta8, delta8_losses = _run(tmp_path, "delta8")
    bf16, bf16_losses = _run(tmp_path, "bfloat16")
    # per step: 1 clean activation + 4 perturbed copies; delta8 sends the copies at ~1/4 of float32
    assert delta8["bytes_up_per_step"] < 0.45 * native["bytes_up_per_step"]
    assert 0.45 < bf16["bytes_up_per_step"] / native["bytes_up_per_step"] < 0.55
    assert delta8_losses[0] == native_losses[0]  # step 1's clean activation went as is
    assert abs(bf16_losses[0] - native_losses[0]) < 1e-2 * abs(native_losses[0])
    # later steps differ only by the codec's rounding of the projected gradients
    for losses in (delta8_losses, bf16_losses):
        assert all(abs(a - b) < 0.05 * abs(b) for a, b in zip(losses, native_losses))


@needs_data
@pytest.mark.slow
def test_zo_sl_and_fo_sl_run_with_delta8(tmp_path):
    for mode in ("zo-sl", "fo-sl"):
        native, _ = _run(tmp_path, "native", mode=mode, steps=2)
        delta8, _ = _run(tmp_path, "delta8", mode=mode, steps=2)
        # no clean activation to difference against: the activations go as they are
        assert delta8["bytes_up_per_step"] == native["bytes_up_per_step"]
        assert delta8["eval_accuracy"] == native["eval_accuracy"]
