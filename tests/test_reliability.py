"""Nothing lost, nothing silent: resume that checks its settings and checkpoints, run folders that
are never clobbered, and bad input that ends in one clear line (exit 2) instead of a traceback.

Runs use ``tiny-opt`` on a small synthetic SST-2 folder, so no test needs the shared data."""

import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from hosl.cli import main
from hosl.training import checkpoint as ckpt
from hosl.training.config import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels", "ignore::FutureWarning")

WORDS = "good bad fine awful great dull lovely boring superb weak".split()


def _write_sst2(folder: Path, rows: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (folder / "sst2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        lines = ["text\tlabel"] + [f"{' '.join(rng.choices(WORDS, k=5))}\t{i % 2}" for i in range(rows)]
        (folder / "sst2" / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_sst2(tmp_path_factory.mktemp("data"))


def _args(out, data, *extra, steps=2, mode="hosl"):
    return ["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(data), "--mode", mode,
            "--cut", "1", "--steps", str(steps), "--batch-size", "4", "--train-size", "8", "--eval-size", "4",
            "--num-queries", "1", "--max-length", "16", "--lr-client", "1e-3", "--lr-server", "1e-2",
            "--eval-every", "2", "--checkpoint-every", "2", "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data) -> Path:
    """A finished 2-step hosl run (checkpoint at step 2); tests copy it before changing it."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(_args(run, data)) == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` by relative path -> bytes (folders as None)."""
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hosl: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 3. resume that checks --------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,named", [
    (["--lr-client", "5e-3"], "--lr-client"),
    (["--num-queries", "2"], "--num-queries"),
    (["--seed", "1"], "--seed"),
    (["--dtype", "bfloat16"], "--dtype"),
    (["--mode", "fo-sl"], "--mode"),
])
def test_resume_with_changed_settings_is_refused_naming_the_field(base_run, data, tmp_path, capsys, extra, named):
    run = _copy(base_run, tmp_path)
    before = _snapshot(run)
    args = _args(run, data, "--resume", steps=4)
    if extra[0] == "--mode":
        args[args.index("--mode") + 1] = extra[1]
    else:
        args += extra
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert named in line and "settings differ" in line
    assert _snapshot(run) == before


def test_override_lets_a_learning_rate_change_uses_it_and_records_it(base_run, data, tmp_path):
    run = _copy(base_run, tmp_path)
    config_before = (run / "config.json").read_bytes()
    assert main(_args(run, data, "--resume", "--lr-server", "5e-2", "--override", "lr-server", steps=4)) == 0
    assert (run / "config.json").read_bytes() == config_before  # the run's first settings, never rewritten
    state = torch.load(run / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    assert state["server_half"]["optimizer"]["param_groups"][0]["lr"] == 5e-2  # the new lr, not the checkpoint's
    assert state["config"]["lr_server"] == 5e-2
    (resume,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resume["step"] == 2 and resume["checkpoint"] == "step-2" and resume["overrides"] == ["lr-server"]
    assert resume["changes"]["lr_server"] == {"was": 1e-2, "now": 5e-2}
    assert resume in _records(run)


def test_override_of_lr_client_reaches_both_zo_halves_of_zo_sl(data, tmp_path):
    run = tmp_path / "run"
    assert main(_args(run, data, mode="zo-sl")) == 0
    assert main(_args(run, data, "--resume", "--lr-client", "4e-3", "--override", "lr_client", steps=4, mode="zo-sl")) == 0
    state = torch.load(run / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    assert [g["lr"] for g in state["optimizers"]["zo"]["param_groups"]] == [4e-3]
    assert [g["lr"] for g in state["server_half"]["zo"]["param_groups"]] == [4e-3]  # the server's ZO half too


def test_steps_may_change_freely_unless_a_schedule_runs_over_them():
    from dataclasses import fields

    from hosl.training.run_folder import RunFolderError, compare

    run = TrainConfig(steps=10).to_dict()
    assert compare(run, TrainConfig(steps=20))["steps"] == {"was": 10, "now": 20}
    if "lr_schedule" not in {f.name for f in fields(TrainConfig)}:
        pytest.skip("no --lr-schedule in this checkout")
    scheduled = TrainConfig(steps=10, lr_schedule="linear").to_dict()
    with pytest.raises(RunFolderError, match="--steps was 10, now 20.*--override steps"):
        compare(scheduled, TrainConfig(steps=20, lr_schedule="linear"))
    assert compare(scheduled, TrainConfig(steps=20, lr_schedule="linear", overrides=["steps"]))["steps"]["now"] == 20


def test_override_of_a_trajectory_setting_is_refused(base_run, data, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    before = _snapshot(run)
    assert main(_args(run, data, "--resume", "--seed", "1", "--override", "seed", steps=4)) == 2
    assert "--override seed" in _one_error_line(capsys)
    assert _snapshot(run) == before


@pytest.mark.slow
def test_resume_after_losing_latest_falls_back_and_leaves_no_duplicate_records(data, tmp_path, monkeypatch):
    from hosl.training import modes

    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(_args(straight, data, "--checkpoint-every", "3", steps=5)) == 0
    real_step, calls = modes.HOSLMode.step, {"n": 0}

    def crash_in_step_5(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real_step(self, batch)

    monkeypatch.setattr(modes.HOSLMode, "step", crash_in_step_5)
    assert main(_args(run, data, "--checkpoint-every", "3", steps=5)) == 2
    monkeypatch.setattr(modes.HOSLMode, "step", real_step)
    (run / "checkpoints" / "latest").unlink()  # the pointer is lost
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-3"]
    assert max(r["step"] for r in _records(run)) == 4  # step 4 was logged after the last checkpoint
    assert main(_args(run, data, "--checkpoint-every", "3", "--resume", steps=5)) == 0
    records = _records(run)
    steps = [r["step"] for r in records if "loss" in r]
    evals = [r["step"] for r in records if r.get("event") == "eval"]
    assert steps == [1, 2, 3, 4, 5] and evals == sorted(set(evals))
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses == [r["loss"] for r in _records(straight) if "loss" in r]
    assert [r for r in records if r.get("event") == "resume"][0]["checkpoint"] == "step-3"


def test_dangling_latest_skips_a_damaged_newer_checkpoint(base_run, data, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    good = run / "checkpoints" / "step-2"
    bad = run / "checkpoints" / "step-3"
    shutil.copytree(good, bad)
    (bad / "client.safetensors").write_bytes(b"")  # zero bytes
    (run / "checkpoints" / "latest").write_text("step-9\n")  # names nothing
    path, notes = ckpt.find_resumable(run, ["client", "server"])
    assert path == good and any("step-3" in n and "client.safetensors" in n for n in notes)


def test_latest_naming_a_damaged_checkpoint_is_refused_naming_the_file(base_run, data, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    file = run / "checkpoints" / "step-2" / "server.safetensors"
    blob = bytearray(file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    file.write_bytes(bytes(blob))
    before = _snapshot(run)
    assert main(_args(run, data, "--resume", steps=4)) == 2
    line = _one_error_line(capsys)
    assert str(file) in line and "sha256" in line
    assert _snapshot(run) == before


def test_saving_never_deletes_a_checkpoint_of_a_later_step(tmp_path):
    module = nn.Linear(3, 2)
    ckpt.save_checkpoint(tmp_path, 4, {"client": module}, {"step": 4})
    ckpt.save_checkpoint(tmp_path, 2, {"client": module}, {"step": 2})  # a resume from earlier
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-2", "step-4"]
    ckpt.save_checkpoint(tmp_path, 6, {"client": module}, {"step": 6})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-6"]


# -- checkpoint checksums and contents -------------------------------------------------------------------
def _saved(tmp_path, weight_fill=None):
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    if weight_fill is not None:
        with torch.no_grad():
            module.weight[0, 0] = weight_fill
    path = ckpt.save_checkpoint(tmp_path, 1, {"client": module}, {"step": 1, "m": torch.ones(2)})
    return path


def _fresh():
    torch.manual_seed(1)
    return nn.Linear(4, 3)


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero", "append"])
@pytest.mark.parametrize("name", ["client.safetensors", "state.pt"])
def test_damaged_checkpoint_file_is_refused_naming_it_and_leaves_the_module(tmp_path, damage, name):
    path = _saved(tmp_path)
    file = path / name
    blob = file.read_bytes()
    file.write_bytes({"flip": blob[:40] + bytes([blob[40] ^ 1]) + blob[41:], "truncate": blob[: len(blob) // 2],
                      "zero": b"", "append": blob + b"x"}[damage])
    module = _fresh()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError, match=str(file)):
        ckpt.load_checkpoint(path, {"client": module})
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_even_when_the_checksum_matches(tmp_path, value):
    path = _saved(tmp_path, weight_fill=value)
    ckpt.verify(path, ["client"])  # the file is the one that was written...
    module = _fresh()
    before = module.weight.clone()
    with pytest.raises(ckpt.CheckpointError, match=r"client\.safetensors.*NaN or Inf.*weight"):
        ckpt.load_checkpoint(path, {"client": module})  # ...but it is not loaded
    assert torch.equal(module.weight, before)


def test_non_finite_optimizer_state_is_refused(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"client": nn.Linear(2, 2)},
                                {"step": 1, "optimizers": {"client": {"state": {0: {"momentum_buffer": torch.tensor([float("nan")])}}}}})
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt.*optimizers\.client\.state\.0\.momentum_buffer"):
        ckpt.load_checkpoint(path, {"client": nn.Linear(2, 2)})


def test_checksums_are_written_with_the_checkpoint_and_checked(tmp_path):
    path = _saved(tmp_path)
    table = json.loads((path / "checksums.json").read_text())["files"]
    assert set(table) == {"client.safetensors", "state.pt"}
    assert table["state.pt"]["sha256"] == ckpt.sha256_of(path / "state.pt")
    module = _fresh()
    assert ckpt.load_checkpoint(path, {"client": module})["step"] == 1
    assert not torch.equal(module.weight, _fresh().weight)  # loaded


def test_a_checkpoint_without_checksums_still_loads_with_a_note(tmp_path):
    path = _saved(tmp_path)
    (path / "checksums.json").unlink()  # as written before checksums existed
    assert any("checksums" in note for note in ckpt.verify(path, ["client"]))
    assert ckpt.load_checkpoint(path, {"client": _fresh()})["step"] == 1


# -- 4. run folders ---------------------------------------------------------------------------------------
def _user_folder(tmp_path, _base=None):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "summary.json").write_text('{"my": "results"}')
    return out


def _run_missing_metrics(tmp_path, base_run):
    out = _copy(base_run, tmp_path)
    (out / "metrics.jsonl").unlink()
    return out


def _a_file(tmp_path, _base=None):
    out = tmp_path / "afile"
    out.write_text("not a folder")
    return out


@pytest.mark.parametrize("make,extra,message", [
    (_user_folder, [], "not a hosl configuration"),
    (_user_folder, ["--resume"], "not a hosl configuration"),
    (_run_missing_metrics, [], "no metrics.jsonl"),
    (_run_missing_metrics, ["--resume"], "no metrics.jsonl"),
    (lambda tmp, base: _copy(base, tmp), [], "already holds a hosl run"),
    (lambda tmp, base: _copy(base, tmp), ["--resume", "--overwrite"], "contradict"),
    (_a_file, [], "is a file"),
])
def test_refused_out_is_left_byte_identical(tmp_path, base_run, data, capsys, make, extra, message):
    out = make(tmp_path, base_run)
    before = _snapshot(out)
    assert main(_args(out, data, *extra)) == 2
    line = _one_error_line(capsys)
    assert message in line and (str(out) in line or "--overwrite" in extra)
    assert _snapshot(out) == before


def test_out_below_a_file_is_a_one_line_error(tmp_path, data, capsys):
    parent = _a_file(tmp_path)
    assert main(_args(parent / "run", data)) == 2
    assert "is a file" in _one_error_line(capsys)
    assert parent.read_text() == "not a folder"


def test_overwrite_replaces_a_run_and_keeps_other_files(base_run, data, tmp_path):
    run = _copy(base_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / "resumes.jsonl").write_text('{"old": 1}\n')
    assert main(_args(run, data, "--overwrite", "--seed", "3")) == 0
    assert json.loads((run / "config.json").read_text())["seed"] == 3
    assert not (run / "resumes.jsonl").exists() and (run / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_empty_folder_and_resume_of_nothing_start_a_new_run(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(empty, data)) == 0
    assert main(_args(tmp_path / "new", data, "--resume")) == 0
    assert (tmp_path / "new" / "summary.json").exists() and not (tmp_path / "new" / "resumes.jsonl").exists()


# -- 5. non-finite hyper-parameters refused at parse time -------------------------------------------------
@pytest.mark.parametrize("flag", ["--lr-client", "--lr-server", "--momentum", "--eps", "--weight-decay",
                                  "--zo-momentum", "--lora-alpha", "--zo-betas"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_float_arguments_are_refused_at_parse_time(tmp_path, data, capsys, flag, value):
    text = f"0.9,{value}" if flag == "--zo-betas" else value
    with pytest.raises(SystemExit) as exit_:
        main(_args(tmp_path / "run", data, f"{flag}={text}"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "finite" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field", ["lr_server", "lr_client", "momentum", "eps", "weight_decay"])
def test_config_refuses_non_finite_values(field):
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        TrainConfig(**{field: float("inf")}).validate()


@pytest.mark.parametrize("seed", [str(2**70), "-1"])
def test_seed_out_of_range_is_a_usage_error(tmp_path, data, capsys, seed):
    with pytest.raises(SystemExit) as exit_:
        main(_args(tmp_path / "run", data, f"--seed={seed}"))
    assert exit_.value.code == 2 and "--seed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--seed"):
        TrainConfig(seed=int(seed)).validate()


# -- 7. data errors and exit codes ------------------------------------------------------------------------
@pytest.mark.parametrize("header,row,named", [
    ("text\tlabl", "fine words\t1", "'label'"),  # no label column
    ("text\tlabel", "fine words\t1\textra", "Expected 2 fields"),  # a row with a field too many
    ("text\tlabel", "fine words\tmaybe", "maybe"),  # a label that is no class
])
def test_malformed_task_file_is_one_line_naming_file_and_column(tmp_path, capsys, header, row, named):
    folder = tmp_path / "data"
    (folder / "sst2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (folder / "sst2" / name).write_text(f"{header}\n{'fine words' + chr(9) + '0'}\n{row}\n")
    assert main(_args(tmp_path / "run", folder)) == 2
    line = _one_error_line(capsys)
    assert "sst2/dev.tsv" in line and named in line


def test_superglue_file_without_label_names_file_and_column(tmp_path, capsys):
    folder = tmp_path / "data" / "superglue" / "RTE"
    folder.mkdir(parents=True)
    for name in ("train.jsonl", "val.jsonl"):
        (folder / name).write_text(json.dumps({"premise": "a", "hypothesis": "b", "idx": 0}) + "\n")
    args = _args(tmp_path / "run", tmp_path / "data")
    args[args.index("--task") + 1] = "rte"
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "RTE/val.jsonl" in line and "'label'" in line


def test_no_data_dir_while_offline_hints_at_data_dir(tmp_path, capsys, monkeypatch):
    import datasets

    def offline(*args, **kwargs):  # what datasets raises with no network
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    args = _args(tmp_path / "run", "x")
    del args[args.index("--data-dir"): args.index("--data-dir") + 2]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "--data-dir" in line and "nyu-mll/glue" in line


def test_interrupt_exits_130_and_keeps_the_folder_resumable(data, tmp_path, monkeypatch, capsys):
    from hosl.training import modes

    real_step = modes.HOSLMode.step
    calls = {"n": 0}

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(modes.HOSLMode, "step", interrupted)
    run = tmp_path / "run"
    assert main(_args(run, data, steps=4)) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(modes.HOSLMode, "step", real_step)
    assert main(_args(run, data, "--resume", steps=4)) == 0
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2, 3, 4]


def test_server_resume_checks_its_config_and_never_rewrites_it(tmp_path):
    """The server process of a two-process run: --resume with a changed setting is refused naming it,
    and config.json stays byte-identical whether or not the resume is accepted."""
    from dataclasses import replace

    from hosl.training.config import TrainConfig
    from hosl.training.remote import write_or_check_server_config
    from hosl.training.run_folder import RunFolderError

    run_dir = tmp_path / "server"
    run_dir.mkdir()
    cfg = TrainConfig(model="tiny-opt", task="sst2", mode="hosl", num_queries=2, out=str(tmp_path))
    write_or_check_server_config(run_dir, cfg)
    before = (run_dir / "config.json").read_bytes()
    with pytest.raises(RunFolderError, match="--num-queries was 2, now 3"):
        write_or_check_server_config(run_dir, replace(cfg, resume=True, num_queries=3))
    assert (run_dir / "config.json").read_bytes() == before
    write_or_check_server_config(run_dir, replace(cfg, resume=True, steps=cfg.steps + 5))  # free to change
    assert (run_dir / "config.json").read_bytes() == before


@pytest.mark.parametrize("mode", ["hosl", "zo-sl"])
def test_server_process_resume_uses_this_processes_learning_rate(tmp_path, mode):
    """--override lr_server / lr_client reaches the server process of a two-process run: its resume
    takes the learning rates of its own settings, not the checkpoint's."""
    from hosl.training.config import TrainConfig
    from hosl.training.run import hyper, load_split_model, loss_fn
    from hosl.training.server_handler import ServerHandler

    def half_for(cfg):
        _, _, _, server = load_split_model(cfg)
        return ServerHandler(server, mode, hyper(cfg), loss_fn("causal_lm"), "causal_lm", train_dropout=False,
                             checkpoint_dir=tmp_path, resume_allowed=True)

    cfg = TrainConfig(model="tiny-opt", task="sst2", mode=mode, cut=1, lr_server=0.1, lr_client=1e-4)
    first = half_for(cfg)
    if mode == "zo-sl":
        first.zo_for(10)
    first.save(3)
    resumed = half_for(TrainConfig(model="tiny-opt", task="sst2", mode=mode, cut=1, lr_server=0.05, lr_client=2e-4))
    resumed.resume(3)
    if mode == "zo-sl":
        resumed.zo_for(10)
        assert [g["lr"] for g in resumed.zo.param_groups] == [2e-4]
    else:
        assert [g["lr"] for g in resumed.optimizer.param_groups] == [0.05]


# -- 8. files a run folder or a user hands hosl run no code ----------------------------------------------
class _Payload:
    """Unpickling this calls ``open(path, "w")``: the file appears if the unpickler runs code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# file of the run folder holding the payload -> exit status of (--resume, export)
PLANTED = {
    "checkpoints/step-2/state.pt": (2, 2),
    "checkpoints/step-2/client.safetensors": (2, 2),
    "checkpoints/step-2/checksums.json": (2, 2),
    "checkpoints/latest": (0, 0),  # names nothing, as if missing: the newest intact checkpoint is used
    "config.json": (2, 2),
    "metrics.jsonl": (2, 0),  # export does not read it
}


def _plant(run: Path, name: str, marker: Path) -> Path:
    """A pickle payload in the run folder's file ``name``; a checkpoint's checksums updated, as anyone
    who can edit the folder can."""
    file = run / name
    if file.name == ckpt.STATE:
        state = torch.load(file, weights_only=True)
        torch.save({**state, "evals": _Payload(marker)}, file)
    else:
        file.write_bytes(pickle.dumps(_Payload(marker)))
    if file.parent.name == "step-2" and file.name != ckpt.CHECKSUMS:
        ckpt._write_checksums(file.parent)
        ckpt.verify(file.parent, ["client", "server"])  # the checksums pass
    return file


@pytest.mark.parametrize("command", ["resume", "export"])
@pytest.mark.parametrize("name", list(PLANTED))
def test_a_pickle_payload_in_a_run_folder_never_runs(base_run, data, tmp_path, capsys, command, name):
    run, marker, exported = _copy(base_run, tmp_path), tmp_path / "payload-ran", tmp_path / "hf"
    file = _plant(run, name, marker)
    before = _snapshot(run)
    argv = _args(run, data, "--resume", steps=4) if command == "resume" else ["export", str(run), "--out", str(exported)]
    code = main(argv)
    assert code == PLANTED[name][command == "export"]
    assert not marker.exists()
    if code == 2:
        line = _one_error_line(capsys)
        named = "config.json is not a hosl configuration" if (name, command) == ("config.json", "resume") else str(file)
        assert named in line, line
        assert _snapshot(run) == before and not exported.exists()
    if file.name == ckpt.STATE:
        assert "io.open" in line
        torch.load(file, weights_only=False).get("evals").close()  # what hosl loaded before: the payload is real
        assert marker.exists()


def test_a_state_a_safe_load_would_refuse_is_refused_when_saved(tmp_path):
    from fractions import Fraction

    with pytest.raises(TypeError, match="fractions.Fraction"):
        ckpt.save_checkpoint(tmp_path, 1, {"client": nn.Linear(2, 2)}, {"step": 1, "seconds": Fraction(1, 2)})
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_yaml_config_with_a_python_tag_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny-opt\nnotes: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "not valid YAML" in _one_error_line(capsys)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_pickle_payload_in_the_fleet_update_log_is_refused_naming_it(tmp_path):
    from hosl.training.fleet_log import UpdateLog

    marker, log = tmp_path / "payload-ran", tmp_path / "fleet_log.jsonl"
    log.write_bytes(pickle.dumps(_Payload(marker)) + b"\n" + json.dumps({"step": 1, "updates": []}).encode() + b"\n")
    with pytest.raises(ValueError, match=str(log)):
        UpdateLog(log)
    assert not marker.exists()


def test_a_too_short_max_length_is_refused_before_out_is_written(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, data, "--max-length", "1")) == 2
    assert "--max-length 1" in _one_error_line(capsys)
    assert not out.exists()
    assert main(_args(out, data)) == 0  # the corrected command is not blocked by a stub


def test_export_without_latest_falls_back_to_the_newest_intact_checkpoint(base_run, tmp_path, capsys):
    run = _copy(base_run, tmp_path)
    good = run / "checkpoints" / "step-2"
    bad = run / "checkpoints" / "step-3"
    shutil.copytree(good, bad)
    (bad / "client.safetensors").write_bytes(b"")  # zero bytes
    (run / "checkpoints" / "latest").unlink()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "latest is missing" in err and "skipping step-3" in err
    assert json.loads((tmp_path / "hf" / "hosl_export.json").read_text())["step"] == 2
