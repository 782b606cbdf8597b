"""Try bad inputs and damaged run folders against ``hosl train`` and print what happened.

    python scripts/try_faults.py            # markdown table on stdout (the one in docs/reliability.md)
    python scripts/try_faults.py --json     # one JSON object per fault

Everything runs in one process on ``tiny-opt`` and a 24-row synthetic SST-2 folder in a temporary
directory (about a minute on 2 CPU cores). For each fault: the exit status, the error line, and
whether the run folder is byte-identical afterwards (``-`` where the fault involves no folder).
The two-process faults (strangers, dead peers, taken ports) are in docs/transport.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

WORDS = "good bad fine awful great dull lovely boring superb weak".split()


class Trial:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.rows: list[dict] = []
        _write_sst2(self.data / "sst2", [f"{' '.join(random.Random(i).choices(WORDS, k=5))}\t{i % 2}" for i in range(24)])
        self.base = root / "base"
        code, _ = self.call(self.args(self.base))
        assert code == 0, "the base run failed"

    def args(self, out, *extra, steps=2, data_dir: "Path | None | str" = "default"):
        data_dir = self.data if data_dir == "default" else data_dir
        argv = ["train", "--model", "tiny-opt", "--task", "sst2", "--mode", "hosl", "--cut", "1", "--steps", str(steps),
                "--batch-size", "4", "--train-size", "8", "--eval-size", "4", "--num-queries", "1", "--max-length", "16",
                "--lr-client", "1e-3", "--lr-server", "1e-2", "--eval-every", "2", "--checkpoint-every", "2",
                "--out", str(out), "--no-progress", *extra]
        return argv + (["--data-dir", str(data_dir)] if data_dir is not None else [])

    @staticmethod
    def call(argv) -> tuple[int, str]:
        from hosl.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code
        return code, err.getvalue()

    def copy(self, name: str) -> Path:
        return Path(shutil.copytree(self.base, self.root / name))

    def attempt(self, fault: str, argv, folder: Path | None = None, check=None) -> None:
        before = _snapshot(folder) if folder is not None else None
        code, err = self.call(argv)
        errors = [line for line in err.splitlines() if "error:" in line]
        message = (errors[-1] if errors else "").replace(str(self.root) + "/", "")
        outcome = check() if check is not None else ""
        self.rows.append({"fault": fault, "exit": code, "message": message, "traceback": "Traceback" in err,
                          "folder_unchanged": None if folder is None else _snapshot(folder) == before,
                          "outcome": outcome})


def _write_sst2(folder: Path, lines: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("text\tlabel\n" + "".join(line + "\n" for line in lines))


def _snapshot(folder: Path):
    if not folder.exists():
        return None
    if folder.is_file():
        return folder.read_bytes()
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_all(t: Trial) -> None:
    import torch

    from hosl.training import checkpoint as ckpt

    # -- resume -------------------------------------------------------------------------------------
    for flag, value in (("--lr-client", "5e-3"), ("--num-queries", "2"), ("--seed", "1"), ("--dtype", "bfloat16")):
        d = t.copy("changed" + flag)
        t.attempt(f"`--resume {flag} {value}`", t.args(d, "--resume", flag, value, steps=4), d)
    d = t.copy("mode")
    argv = t.args(d, "--resume", steps=4)
    argv[argv.index("--mode") + 1] = "fo-sl"
    t.attempt("`--resume --mode fo-sl` on a hosl run", argv, d)
    d = t.copy("override-seed")
    t.attempt("`--resume --seed 1 --override seed`", t.args(d, "--resume", "--seed", "1", "--override", "seed", steps=4), d)
    d = t.copy("override-lr")

    def lr_used():
        state = torch.load(d / "checkpoints" / "step-4" / "state.pt", weights_only=True)
        lr = state["server_half"]["optimizer"]["param_groups"][0]["lr"]
        kept = (d / "config.json").read_text() == (t.base / "config.json").read_text()
        return f"server trained at lr {lr}; config.json {'unchanged' if kept else 'CHANGED'}; resumes.jsonl records it"

    t.attempt("`--resume --lr-server 5e-2 --override lr_server`",
              t.args(d, "--resume", "--lr-server", "5e-2", "--override", "lr_server", steps=4), check=lr_used)
    for what, damage in (("missing", lambda p: p.unlink()), ("names step-9, which is not there", lambda p: p.write_text("step-9"))):
        d = t.copy("latest-" + what.split()[0])
        damage(d / "checkpoints" / "latest")

        def resumed_from(d=d):
            resume = [r for r in _records(d) if r.get("event") == "resume"]
            steps = [r["step"] for r in _records(d) if "loss" in r]
            return f"resumed from {resume[0]['checkpoint']}; step records {steps}"

        t.attempt(f"`checkpoints/latest` {what}", t.args(d, "--resume", steps=4), check=resumed_from)

    # -- checkpoints ----------------------------------------------------------------------------------
    damages = {"one byte flipped": lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:],
               "truncated to half": lambda b: b[: len(b) // 2], "zero bytes": lambda b: b""}
    for what, damage in damages.items():
        for name in ("client.safetensors", "state.pt"):
            d = t.copy(f"damaged-{name}-{what.split()[0]}")
            file = d / "checkpoints" / "step-2" / name
            file.write_bytes(damage(file.read_bytes()))
            t.attempt(f"`{name}` {what}, `--resume`", t.args(d, "--resume", steps=4), d)
    from safetensors.torch import load_file, save_file

    d = t.copy("nan")
    file = d / "checkpoints" / "step-2" / "server.safetensors"
    tensors = load_file(str(file))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(file), metadata={ckpt.CONTENTS_KEY: "full"})
    ckpt._write_checksums(file.parent)  # a NaN written by training itself: its checksum matches
    t.attempt("one NaN in `server.safetensors`, checksum matching", t.args(d, "--resume", steps=4), d)
    marker = t.root / "payload-ran"

    class Payload:  # unpickling it creates ``marker``: the file appears if the unpickler runs code
        def __reduce__(self):
            return open, (str(marker), "w")

    def payload_ran():
        return "the payload did not run" if not marker.exists() else "**the payload ran**"

    for command in ("--resume", "export"):
        d = t.copy(f"payload-{command.strip('-')}")
        file = d / "checkpoints" / "step-2" / "state.pt"
        torch.save({**torch.load(file, weights_only=True), "evals": Payload()}, file)
        ckpt._write_checksums(file.parent)  # anyone who can edit the folder can update the checksums
        argv = t.args(d, "--resume", steps=4) if command == "--resume" else ["export", str(d), "--out", str(d) + "-hf"]
        t.attempt(f"pickle payload in `state.pt`, checksums updated, `{command}`", argv, d, check=payload_ran)
    d = t.copy("export-no-latest")
    (d / "checkpoints" / "latest").unlink()
    t.attempt("`checkpoints/latest` missing, `export`", ["export", str(d), "--out", str(d) + "-hf"],
              check=lambda: f"exported step {json.loads(Path(str(d) + '-hf', 'hosl_export.json').read_text())['step']}")

    # -- run folders ----------------------------------------------------------------------------------
    user = t.root / "user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": 1}')
    (user / "summary.json").write_text('{"mine": 2}')
    t.attempt("`--out` holds a user's `config.json`, `summary.json`", t.args(user), user)
    d = t.copy("no-metrics")
    (d / "metrics.jsonl").unlink()
    t.attempt("`--out` holds a run without `metrics.jsonl`", t.args(d), d)
    d = t.copy("complete")
    t.attempt("`--out` holds a finished run, no `--resume`", t.args(d), d)
    file = t.root / "a-file"
    file.write_text("x")
    t.attempt("`--out` is a file", t.args(file), file)
    t.attempt("`--out` is below a file", t.args(file / "run"), file)
    d = t.copy("both")
    t.attempt("`--resume --overwrite`", t.args(d, "--resume", "--overwrite"), d)
    d, started = t.copy("config-target"), t.root / "started-with-overwrite"
    assert t.call(t.args(started, "--overwrite"))[0] == 0  # its config.json records "overwrite": true
    t.attempt("`--config` of a run started with `--overwrite`, `--out` another run", ["train", "--config",
              str(started / "config.json"), "--out", str(d), "--data-dir", str(t.data), "--no-progress"], d)
    t.attempt("`--max-length 1` (`--out` new)", t.args(t.root / "short", "--max-length", "1"), t.root / "short")

    # -- arguments ------------------------------------------------------------------------------------
    for flag in ("--lr-server", "--momentum", "--lr-client", "--eps", "--weight-decay", "--zo-momentum"):
        t.attempt(f"`{flag} inf` (and `nan`)", t.args(t.root / "never", f"{flag}=inf"))
    t.attempt("`--seed 2**70`", t.args(t.root / "never", f"--seed={2**70}"))

    # -- data -----------------------------------------------------------------------------------------
    bad = t.root / "bad"
    (bad / "sst2").mkdir(parents=True)
    for what, text in (("no `label` column", "text\tlabl\nfine\t1\n"),
                       ("a row with a field too many", "text\tlabel\nfine\t1\nbad\t0\textra\n"),
                       ("a label that is no class", "text\tlabel\nfine\tmaybe\n")):
        for name in ("train.tsv", "dev.tsv"):
            (bad / "sst2" / name).write_text(text)
        t.attempt(f"SST-2 TSV with {what}", t.args(t.root / "never", data_dir=bad))
    import datasets
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True  # as HF_HUB_OFFLINE=1
    t.attempt("no `--data-dir`, hub offline", t.args(t.root / "never", data_dir=None))


def markdown(rows: list[dict]) -> str:
    out = ["| fault | exit | what the user sees | run folder |", "|---|---|---|---|"]
    for r in rows:
        folder = "-" if r["folder_unchanged"] is None else ("unchanged" if r["folder_unchanged"] else "**changed**")
        said = "; ".join(text for text in (r["message"], r["outcome"]) if text)
        if r["traceback"]:
            said = "**traceback** " + said
        out.append(f"| {r['fault']} | {r['exit']} | {said.replace('|', '/')} | {folder} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object per fault instead of a markdown table")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        t = Trial(Path(tmp))
        run_all(t)
    if args.json:
        for row in t.rows:
            print(json.dumps(row))
    else:
        print(markdown(t.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
