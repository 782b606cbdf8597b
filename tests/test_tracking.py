"""--report-to (TensorBoard's event files hold the metrics records), the learning rates, skipped
updates, bytes and client memory in every step record, and hosl plot's figure and refusals."""

import json

import pytest

from hosl.cli import main
from hosl.training.tracking import check_report_to, scalars

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

TEXT = [{"text": f"the fox jumps over the dog {i}"} for i in range(10)]


def _lm_run(tmp_path, name, *extra):
    data = tmp_path / "text.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    out = tmp_path / name
    assert main(["train", "--model", "tiny-gpt2", "--task", "lm", "--train-file", str(data), "--steps", "3",
                 "--batch-size", "2", "--eval-size", "2", "--eval-every", "2", "--max-length", "16", "--cut", "1",
                 "--num-queries", "1", "--lr-client", "1e-3", "--lr-server", "1e-2", "--out", str(out),
                 "--no-progress", *extra]) == 0
    return out


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_loss_and_the_records_hold_rates_and_memory(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _lm_run(tmp_path, "tb", "--report-to", "tensorboard", "--lr-schedule", "linear")
    printed = json.loads(capsys.readouterr().out)
    assert "eval_perplexity" in printed and "eval_accuracy" not in printed  # --task lm: its perplexity
    steps = [r for r in _records(run) if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # linear decay over 3 steps: factors 1, 2/3, 1/3 of each half's base rate
    assert [r["lr_client"] for r in steps] == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3])
    assert [r["lr_server"] for r in steps] == pytest.approx([1e-2, 2e-2 / 3, 1e-2 / 3])
    for r in steps:
        assert r["skipped_updates"] == 0 and r["bytes_up"] > 0 and r["client_peak_bytes"] > 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps])
    perplexity = events.Scalars("eval/perplexity")
    assert [e.step for e in perplexity] == [0, 2, 3]
    # --overwrite starts the events afresh too (run_folder.TRACKER_DIRS are hosl's files)
    _lm_run(tmp_path, "tb", "--report-to", "tensorboard", "--overwrite", "--steps", "2")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_report_to_refuses_an_unknown_tracker_and_names_the_install_for_a_missing_one(monkeypatch):
    with pytest.raises(ValueError, match="--report-to must be one of none, tensorboard, wandb"):
        check_report_to("mlflow")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ImportError, match="pip install wandb"):
        check_report_to("wandb")


def test_scalars_tag_train_and_eval_numbers_only():
    assert scalars({"step": 3, "loss": 0.5, "note": "x", "flag": True}) == (3, {"train/loss": 0.5})
    assert scalars({"event": "eval", "step": 2, "eval_accuracy": 0.75, "eval_perplexity": None}) == (
        2, {"eval/accuracy": 0.75})


def test_plot_draws_two_runs_and_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from hosl.plot import read_run, run_labels

    first, second = _lm_run(tmp_path / "a", "s0"), _lm_run(tmp_path / "b", "s0")
    curves = read_run(first)
    assert curves.steps == [1, 2, 3] and curves.eval_metric == "perplexity" and curves.eval_steps == [0, 2, 3]
    assert run_labels([first, second]) == ["a/s0", "b/s0"]  # the same folder name: one more part of the path
    png = tmp_path / "curves.png"
    assert main(["plot", str(first), str(second), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert main(["plot", str(first), str(tmp_path / "notes"), "--out", str(tmp_path / "other.png")]) == 2
    assert "is not a hosl run folder" in capsys.readouterr().err
    assert not (tmp_path / "other.png").exists()


@pytest.mark.slow
def test_wandb_writes_an_offline_run_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # not installed by scripts/setup.sh: pip install wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _lm_run(tmp_path, "wb", "--report-to", "wandb")
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
