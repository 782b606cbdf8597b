"""hosl train --config FILE (.json / .yaml): a run's config.json fed back reproduces the run;
flags on the command line win; bad files are one-line errors."""

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hosl.cli import build_parser, main
from hosl.cli_options import config_from, parse_with_config

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


def _config(argv):
    return config_from(parse_with_config(build_parser(), argv))


@needs_data
@pytest.mark.slow
def test_a_runs_config_json_reproduces_the_run(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--cut", "1",
                 "--steps", "2", "--batch-size", "4", "--train-size", "8", "--eval-size", "4", "--num-queries", "2",
                 "--max-length", "40", "--lr-client", "1e-3", "--lr-server", "1e-2", "--zo-optimizer", "momentum",
                 "--no-progress", "--out", str(first)]) == 0
    written = json.loads((first / "config.json").read_text())
    again = _config(["train", "--config", str(first / "config.json")]).to_dict()
    assert json.loads(json.dumps(again)) == written  # every setting comes back as it was
    assert main(["train", "--config", str(first / "config.json"), "--out", str(second)]) == 0
    losses = [[json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (first, second)]
    assert losses[0] == losses[1] and any(v is not None for v in losses[0])
    for half in ("client", "server"):
        a, b = (load_file(str(run / "checkpoints" / "step-2" / f"{half}.safetensors")) for run in (first, second))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_yaml_values_are_defaults_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-llama\ntask: rte\nlr_server: 1e-2\nsteps: 7\nzo_betas: [0.8, 0.99]\n")
    cfg = _config(["train", "--config", str(path), "--steps", "3"])
    assert (cfg.model, cfg.task, cfg.lr_server, cfg.steps) == ("tiny-llama", "rte", 1e-2, 3)
    cfg.validate()
    assert cfg.zo_betas == (0.8, 0.99)


@pytest.mark.parametrize("name,text,message", [
    ("run.yaml", "model: tiny-opt\nlearning_rate: 1\n", "unknown setting(s) 'learning_rate'"),
    ("run.json", "{not json", "not valid JSON"),
    ("run.yaml", "- a\n- b\n", "expected a mapping"),
    ("missing.json", None, "cannot read it"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_config_file_never_resumes_or_replaces_a_run(tmp_path, capsys):
    """A run started with --overwrite records "overwrite": true in its config.json; fed back with
    --config it must not replace another run (nor resume one, nor bring --override along)."""
    from hosl.training.config import TrainConfig

    config = tmp_path / "A" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TrainConfig(model="tiny-opt", overwrite=True, resume=True,
                                             overrides=["lr_server"]).to_dict()))
    cfg = _config(["train", "--config", str(config)])
    assert (cfg.overwrite, cfg.resume, cfg.overrides) == (False, False, [])
    assert "overwrite is not taken from a config file" in capsys.readouterr().err
    assert _config(["train", "--config", str(config), "--overwrite"]).overwrite  # the flag itself still works
    other = tmp_path / "B"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(TrainConfig(out=str(other)).to_dict()))
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    assert main(["train", "--config", str(config), "--out", str(other)]) == 2
    assert "already holds a hosl run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
