"""--server-optimizer and --lr-schedule/--warmup-steps: the step-number schedule, and a run that uses them."""

import math
import os
from pathlib import Path

import pytest
import torch

from hosl.cli import main
from hosl.training.schedule import lr_factor

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


def test_schedule_factors():
    # warmup 2 of 6 steps, then linear from 1 towards 0 over the remaining 4
    assert [lr_factor("linear", s, 2, 6) for s in range(1, 7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor("constant", s, 0, 6) for s in range(1, 7)] == [1.0] * 6
    cosine = [lr_factor("cosine", s, 0, 4) for s in range(1, 5)]
    assert cosine[0] == 1.0 and cosine[2] == pytest.approx(0.5) and cosine == sorted(cosine, reverse=True)
    assert lr_factor("cosine", 3, 0, 4) == pytest.approx((1 + math.cos(math.pi / 2)) / 2)
    with pytest.raises(ValueError, match="--lr-schedule must be one of constant, linear, cosine"):
        lr_factor("step", 1, 0, 4)


@needs_data
def test_a_run_uses_adamw_on_the_server_and_schedules_both_halves(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--cut", "1",
                 "--steps", "3", "--batch-size", "4", "--train-size", "8", "--eval-size", "4", "--num-queries", "2",
                 "--max-length", "40", "--lr-client", "1e-3", "--lr-server", "1e-2", "--server-optimizer", "adamw",
                 "--lr-schedule", "linear", "--warmup-steps", "1", "--no-progress", "--out", str(out)]) == 0
    state = torch.load(out / "checkpoints" / "step-3" / "state.pt", weights_only=False)
    factor = lr_factor("linear", 3, 1, 3)  # the rate the last step ran at
    server = state["server_half"]["optimizer"]
    assert "exp_avg" in next(iter(server["state"].values()))  # AdamW's state, not SGD's
    assert server["param_groups"][0]["lr"] == pytest.approx(1e-2 * factor)
    assert state["optimizers"]["hybrid"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * factor)


def test_bad_schedule_settings_are_refused(capsys):
    assert main(["train", "--warmup-steps", "-1", "--out", "/nonexistent/x"]) == 2
    assert "--warmup-steps must be an integer >= 0" in capsys.readouterr().err
