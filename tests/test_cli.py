"""The training CLI end to end on a tiny model and real SST-2 rows."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hosl.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

DATA = Path(os.environ.get("HOSL_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


def _args(out, *extra, steps=4, mode="hosl"):
    return ["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--mode", mode,
            "--cut", "1", "--steps", str(steps), "--batch-size", "4", "--train-size", "16", "--eval-size", "8",
            "--num-queries", "2", "--max-length", "48", "--lr-client", "1e-3", "--lr-server", "1e-2",
            "--eval-every", "2", "--checkpoint-every", "2", "--out", str(out), "--no-progress", *extra]


def _start_halves(cut=1):
    """The untrained halves' weights of the runs below (tiny-opt, seed 0, as ``hosl train`` builds them)."""
    from hosl.models import load_model, split

    model, _ = load_model("tiny-opt", "causal_lm", seed=0)
    return [{k: v.clone() for k, v in half.state_dict().items()} for half in split(model, cut=cut)]


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@needs_data
@pytest.mark.slow
def test_train_writes_summary_metrics_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert main(_args(run)) == 0
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    assert summary["steps"] == 4 and summary["mode"] == "hosl"
    # the summary's accuracy is the last evaluation's, a count of right answers out of --eval-size 8
    assert [e["step"] for e in evals] == [0, 2, 4] and summary["eval_accuracy"] == evals[-1]["eval_accuracy"]
    assert summary["eval_accuracy"] * 8 == round(summary["eval_accuracy"] * 8)
    # each evaluation records the training seconds so far: the step record's at its step, 0 at step 0
    step_seconds = {r["step"]: r["seconds"] for r in records if "loss" in r}
    assert [e["seconds"] for e in evals] == [0.0, step_seconds[2], step_seconds[4]]
    assert summary["eval_history"][-1]["seconds"] == summary["seconds"] > step_seconds[2] > 0
    assert summary["client_peak_bytes"] > summary["client_weight_bytes"] > 0
    assert len(_losses(run)) == 4 and all(math.isfinite(loss) for loss in _losses(run))
    assert summary["skipped_updates"] == 0 and summary["skipped_server_steps"] == 0
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-4"
    # the checkpoint holds trained weights: both halves moved from the model's starting point
    for half, start in zip(("client", "server"), _start_halves()):
        saved = load_file(str(run / "checkpoints" / latest / f"{half}.safetensors"))
        assert saved.keys() == start.keys()
        assert any(not torch.equal(saved[k], start[k]) for k in saved), half


@needs_data
@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    straight, split_run = tmp_path / "straight", tmp_path / "split"
    assert main(_args(straight, steps=4)) == 0
    assert main(_args(split_run, steps=2)) == 0
    assert main(_args(split_run, "--resume", steps=4)) == 0
    assert _losses(split_run) == _losses(straight)
    a = load_file(str(straight / "checkpoints" / "step-4" / "client.safetensors"))
    b = load_file(str(split_run / "checkpoints" / "step-4" / "client.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_data
@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(run, steps=2)) == 0
    before = (run / "metrics.jsonl").read_bytes()
    assert main(_args(run, steps=2)) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before


@needs_data
@pytest.mark.parametrize("mode", ["fo-sl", "zo-sl", "fo", "zo"])
@pytest.mark.slow
def test_baseline_modes_train(tmp_path, mode):
    run = tmp_path / mode
    assert main(_args(run, steps=2, mode=mode)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == mode and summary["steps"] == 2 and summary["skipped_updates"] == 0
    passes = summary["forward_passes_per_step"]
    assert passes["client_backward"] == (1 if mode in ("fo-sl", "fo") else 0)
    # every mode trains both halves: each half's checkpoint differs from its starting weights
    for half, start in zip(("client", "server"), _start_halves()):
        saved = load_file(str(run / "checkpoints" / "step-2" / f"{half}.safetensors"))
        assert any(not torch.equal(saved[k], start[k]) for k in saved), (mode, half)


@needs_data
@pytest.mark.slow
def test_frozen_client_trains_the_server_alone_as_fo_sl_at_lr_zero_does(tmp_path):
    """frozen-client: the client's checkpoint is its starting weights, the server's is not, one
    client forward per step and no backward; and it is the control the grid used to spell as fo-sl
    with lr_client 0 (same batches, same server steps): the losses agree at every step."""
    frozen, fo_sl = tmp_path / "frozen", tmp_path / "fo-sl-lr0"
    assert main(_args(frozen, steps=3, mode="frozen-client")) == 0
    args = _args(fo_sl, steps=3, mode="fo-sl")
    args[args.index("--lr-client") + 1] = "0"
    assert main(args) == 0
    summary = json.loads((frozen / "summary.json").read_text())
    assert summary["mode"] == "frozen-client" and summary["lr_client"] == 0.0
    assert summary["forward_passes_per_step"] == dict(client_forward=1, server_forward=1, client_backward=0,
                                                      server_backward=1)
    start_client, start_server = _start_halves()
    step = max(int(p.name.split("-")[1]) for p in (frozen / "checkpoints").glob("step-*"))
    client = load_file(str(frozen / "checkpoints" / f"step-{step}" / "client.safetensors"))
    server = load_file(str(frozen / "checkpoints" / f"step-{step}" / "server.safetensors"))
    assert all(torch.equal(client[k], start_client[k]) for k in client)
    assert any(not torch.equal(server[k], start_server[k]) for k in server)
    assert _losses(frozen) == pytest.approx(_losses(fo_sl), rel=1e-6, abs=1e-7) and len(_losses(frozen)) == 3


@needs_data
@pytest.mark.slow
def test_a_tiny_run_lowers_its_training_loss(tmp_path):
    """Four examples, one batch of them per step: the training loss of the same batch must fall."""
    run = tmp_path / "run"
    args = _args(run, steps=8)
    for flag, value in (("--train-size", "4"), ("--lr-server", "5e-2")):
        args[args.index(flag) + 1] = value
    assert main(args) == 0
    losses = _losses(run)
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0], losses


@needs_data
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--cut", "9"], "cut"),
        (["--num-queries", "0"], "num-queries"),
        (["--eps", "0"], "eps"),
        (["--eps=-1e-3"], "eps"),
        (["--task", "mnli"], "mnli"),
        # the hub lookup of an unknown name waits on the offline hub's refusal (~10 s)
        pytest.param(["--model", "no-such-model-anywhere"], "no-such-model-anywhere", marks=pytest.mark.slow),
    ],
)
def test_bad_arguments_fail_clearly(tmp_path, capsys, extra, message):
    assert main(_args(tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert "hosl: error:" in err and message in err


@needs_data
@pytest.mark.slow
def test_crash_mid_run_keeps_last_checkpoint_and_resume_matches(tmp_path, monkeypatch):
    from hosl.training import modes

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(_args(straight, steps=4)) == 0

    real_step = modes.HOSLMode.step
    calls = {"n": 0}

    def failing_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in step 3")
        return real_step(self, batch)

    monkeypatch.setattr(modes.HOSLMode, "step", failing_step)
    assert main(_args(crashed, steps=4)) == 2
    assert (crashed / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert not list((crashed / "checkpoints").glob(".*partial"))
    monkeypatch.setattr(modes.HOSLMode, "step", real_step)
    assert main(_args(crashed, "--resume", steps=4)) == 0
    assert _losses(crashed) == _losses(straight)  # one line per step, none doubled
    a = load_file(str(straight / "checkpoints" / "step-4" / "server.safetensors"))
    b = load_file(str(crashed / "checkpoints" / "step-4" / "server.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _minilm_installed() -> bool:
    try:
        from hosl.models.registry import resolve_model

        resolve_model("minilm-l6")
        return True
    except Exception:
        return False


@needs_data
@pytest.mark.skipif(not _minilm_installed(), reason="minilm-l6 weights not installed (scripts/setup.sh installs them)")
@pytest.mark.slow
def test_demo_runs_the_three_modes_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data-dir", str(DATA), "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    rows = json.loads((out / "demo.json").read_text())
    assert [r["mode"] for r in rows] == ["hosl", "zo-sl", "fo-sl"]
    for r in rows:
        assert r["steps"] == 2 and [e["step"] for e in r["eval_history"]] == [0, 2]
        assert (out / r["mode"] / "summary.json").exists()
    # the same starting point for every mode: same seed, same head initialisation, same eval set
    assert len({r["eval_history"][0]["eval_accuracy"] for r in rows}) == 1
    table = capsys.readouterr().out
    assert all(f"{m} " in table for m in ("hosl", "zo-sl", "fo-sl")) and "->" in table


@needs_data
def test_resume_with_other_settings_is_refused_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(run, steps=2)) == 0
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert main(_args(run, "--resume", "--lr-client", "2e-3", steps=4)) == 2
    err = capsys.readouterr().err
    assert "--lr-client was 0.001, now 0.002" in err and "--override lr_client" in err
    assert main(_args(run, "--resume", "--seed", "7", steps=4)) == 2
    assert "--seed was 0, now 7" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
