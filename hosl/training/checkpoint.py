"""Checkpoints that a crash or Ctrl-C cannot corrupt, and that a damaged file cannot fool.

A checkpoint is a folder ``RUNDIR/checkpoints/step-N`` with one ``NAME.safetensors`` per module
(``client`` and ``server`` in one process; only its own half on each side of a two-process run),
``state.pt`` (optimizer, RNG and data-order state) and ``checksums.json`` (the sha256 and size of
each of those files). It is written under a temporary name and renamed when complete, so the
checksums arrive with the files they describe; ``RUNDIR/checkpoints/latest`` (replaced
atomically) names the newest.

Loading verifies every checksum, then refuses weights or optimizer state holding NaN or Inf (a
checksum only proves the file is the one that was written), and only then touches the modules:
a refused checkpoint leaves them as they were. Every refusal is a ``CheckpointError`` naming the
file. Checkpoints written before checksums existed load without that check (with a note).

``latest`` missing or naming a folder that is gone: ``find_resumable`` falls back to the newest
intact checkpoint. Saving deletes older checkpoints only after the new one is on disk and hashed,
keeps ``keep`` of them, and never deletes a checkpoint of a later step than the one it writes
(a resume that skipped a damaged one leaves it for the user to look at).

LoRA runs save ``trainable_only``: each module's file holds its trainable parameters (the adapters,
and a classification head when it trains), not the frozen base weights, which every run rebuilds
from the model's source. The file's metadata says which kind it is, and loading one checks that it
covers every trainable parameter of the module.

A server half sharded over several processes (``--server-parallel fsdp``) writes its weights and
optimizer state with ``torch.distributed.checkpoint`` instead, each rank its own shards, into the
same staging folder (``begin_checkpoint``), which rank 0 then commits: see
``hosl/training/sharded_checkpoint.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LATEST = "latest"
CHECKSUMS = "checksums.json"
STATE = "state.pt"
CONTENTS_KEY = "hosl_contents"  # safetensors metadata: "full" (state_dict) or "trainable" (adapters)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensors(module: torch.nn.Module | dict, trainable_only: bool = False) -> dict:
    """A module's tensors to save; a dict is a module's state already (as the caller chose it)."""
    if isinstance(module, dict):
        items = module
    elif trainable_only:
        items = {k: p for k, p in module.named_parameters() if p.requires_grad}
    else:
        items = module.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in items.items()}


def _step_of(path: Path) -> int | None:
    head, _, number = path.name.partition("-")
    return int(number) if head == "step" and number.isdigit() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders (``step-N``), oldest first. Intact or not: see ``verify``."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)  # type: ignore[arg-type]  # step folders only (filtered above)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoint folders in ``run_dir``, oldest first."""
    return [_step_of(p) for p in list_checkpoints(run_dir)]  # type: ignore[misc]  # step folders only


def sha256_of(path: Path) -> str:
    """The file's sha256 (read in chunks; fsync'd first, so the hash is of what is on disk)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)
    table = {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in files}
    atomic_write_text(folder / CHECKSUMS, json.dumps({"format": 1, "files": table}, indent=2))


def staging_folder(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before ``commit`` renames it into place."""
    return Path(run_dir) / "checkpoints" / f".step-{step}.partial"


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """An empty staging folder for the checkpoint of ``step`` (a half-written one from before is
    removed): write the weights into it, then ``commit`` it."""
    tmp = staging_folder(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(run_dir: Path, step: int, tmp: Path, state: dict, keep: int = 1) -> Path:
    """Add ``state.pt`` and the checksums of every file to the staging folder ``tmp``, rename it
    to ``step-N``, point ``latest`` at it and prune older checkpoints (keeping ``keep``)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    torch.save(state, tmp / STATE)
    try:  # a state that read_state would refuse fails here, at the first save, not at the resume
        torch.load(tmp / STATE, weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TypeError(
            f"the checkpoint state holds {_refused(exc)}, which read_state would refuse; a state holds "
            "tensors, numbers, strings and containers of them only"
        ) from None
    _write_checksums(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name)
    # prune: only checkpoints of earlier steps, and only now that the new one is complete on disk
    older = [p for p in list_checkpoints(run_dir) if _step_of(p) < step]  # type: ignore[operator]  # step folders only
    for p in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def save_checkpoint(
    run_dir: Path,
    step: int,
    modules: Mapping[str, torch.nn.Module | dict],
    state: dict,
    keep: int = 1,
    *,
    trainable_only: bool = False,
) -> Path:
    tmp = begin_checkpoint(run_dir, step)
    for name, module in modules.items():
        save_file(
            _tensors(module, trainable_only),
            str(tmp / f"{name}.safetensors"),
            metadata={CONTENTS_KEY: "trainable" if trainable_only else "full"},
        )
    return commit_checkpoint(run_dir, step, tmp, state, keep)


def verify(path: Path, names: list[str] | None = None, files: list[str] | None = None) -> list[str]:
    """Check the checkpoint folder ``path`` against its ``checksums.json``; raise ``CheckpointError``
    naming the first bad file. ``names``: module files that must be there; ``files``: other files
    that must be there (a sharded checkpoint's metadata). Returns notes (e.g. a checkpoint older
    than checksums)."""
    path = Path(path)
    needed = [*(f"{n}.safetensors" for n in (names or [])), *(files or []), STATE]
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    manifest = path / CHECKSUMS
    if not manifest.is_file():
        return [f"{path} has no {CHECKSUMS} (written before checkpoints carried checksums): loaded unverified"]
    try:
        table = json.loads(manifest.read_text())["files"]
        expected = {name: (entry["sha256"], int(entry["bytes"])) for name, entry in table.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{manifest} is damaged ({exc.__class__.__name__}: {exc}); the checkpoint cannot be verified"
        ) from None
    for name in expected:
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{manifest} lists {name!r}, which is not a file of the checkpoint folder")
    for name in needed:
        if name not in expected:
            raise CheckpointError(f"{path / name} is not listed in {manifest}; the checkpoint cannot be verified")
    for name, (sha, size) in expected.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: missing {name}")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{file} is {actual} bytes, its checksum record says {size}: the file is truncated "
                "or was changed after it was written"
            )
        if sha256_of(file) != sha:
            raise CheckpointError(
                f"{file} does not match its sha256 in {CHECKSUMS}: the file is damaged or was "
                "changed after it was written"
            )
    return []


def non_finite_tensors(value, where: str = "") -> Iterator[str]:
    """Names (paths into ``value``) of floating tensors holding NaN or Inf, in nested dicts/lists."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            yield where or "tensor"
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from non_finite_tensors(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from non_finite_tensors(v, f"{where}[{i}]")


def _refused(exc: pickle.UnpicklingError) -> str:
    """What torch's restricted unpickler (``weights_only=True``) refused, from its message."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    return f"a reference to {found.group(1)}" if found else "objects other than tensors, numbers and strings"


def read_state(path: Path) -> dict:
    """``state.pt`` of checkpoint folder ``path`` (call ``verify`` first); refuses NaN/Inf in it.

    Loaded with ``weights_only=True``: torch's restricted unpickler builds tensors, numbers, strings
    and containers only, and refuses any other class or function, so a planted pickle payload runs
    nothing (a checksum does not stop it: anyone who can edit the folder can rewrite checksums.json).
    hosl's state holds nothing else (``save_checkpoint`` checks as it writes)."""
    file = Path(path) / STATE
    try:
        state = torch.load(file, weights_only=True)
    except pickle.UnpicklingError as exc:  # what the restricted unpickler raises for anything it refuses
        raise CheckpointError(
            f"{file} holds {_refused(exc)}, which a checkpoint state may not: loading it could run "
            "code, so it is refused (hosl writes tensors, numbers and strings only); move "
            f"{Path(path).name} away to fall back to an older checkpoint, or start the run again"
        ) from None
    except Exception as exc:  # zip errors of a damaged file come in many classes
        raise CheckpointError(f"{file} cannot be read ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a checkpoint state (found {type(state).__name__})")
    bad = list(non_finite_tensors({k: v for k, v in state.items() if k != "torch_rng"}))
    if bad:
        raise CheckpointError(f"{file} holds NaN or Inf values (in {', '.join(bad[:3])}); refusing to resume from it")
    return state


def _read_weights(file: Path) -> tuple[str, dict]:
    try:
        with safe_open(str(file), framework="pt") as f:
            contents = (f.metadata() or {}).get(CONTENTS_KEY, "full")
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error class for truncated or garbled files
        raise CheckpointError(f"{file} cannot be read as safetensors ({exc.__class__.__name__}: {exc})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{file} holds NaN or Inf weights (in {', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); refusing to load it"
        )
    return contents, tensors


def load_weights(path: Path, modules: Mapping[str, torch.nn.Module], load_state=None) -> None:
    """Load each module's weights from checkpoint folder ``path``; every file is read and checked
    before any module is changed. ``load_state(module, tensors, strict)``: how (default: the
    module's ``load_state_dict``; a sharded module loads through its group)."""
    path = Path(path)
    read = {name: (path / f"{name}.safetensors", *_read_weights(path / f"{name}.safetensors")) for name in modules}
    for name, module in modules.items():
        file, contents, tensors = read[name]
        if contents != "trainable":
            expected = set(module.state_dict())
            missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
            if missing or unexpected:
                raise CheckpointError(
                    f"{file} does not fit this {name}: missing {sorted(missing)[:5]}, unexpected "
                    f"{sorted(unexpected)[:5]} (was the run started with another --model/--cut?)"
                )
            continue
        trainable = {k for k, p in module.named_parameters() if p.requires_grad}
        missing, unexpected = trainable - tensors.keys(), tensors.keys() - trainable
        if missing or unexpected:
            raise CheckpointError(
                f"{file} holds trainable parameters only, and they do not match this {name}'s: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} "
                "(was the run started with other LoRA settings?)"
            )
    for name, module in modules.items():
        file, contents, tensors = read[name]
        try:
            if load_state is None:
                module.load_state_dict(tensors, strict=contents != "trainable")
            else:
                load_state(module, tensors, contents != "trainable")
        except RuntimeError as exc:  # shapes that differ
            raise CheckpointError(f"{file} does not fit this {name}: {str(exc).splitlines()[-1].strip()}") from None


def load_checkpoint(path: Path, modules: Mapping[str, torch.nn.Module], load_state=None) -> dict:
    """Verify checkpoint folder ``path``, load weights into ``modules`` (by name; ``load_state``: as
    in ``load_weights``) and return the saved state dict. Raises ``CheckpointError`` (naming the
    file) before changing any module."""
    path = Path(path)
    verify(path, list(modules))
    state = read_state(path)
    load_weights(path, modules, load_state)
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when it is missing or names nothing (see ``find_resumable``)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        path = root / pointer.read_text().strip()
        return path if path.is_dir() and _step_of(path) is not None else None
    except ValueError:  # not UTF-8 text, or a NUL byte in it: as if it named nothing
        return None


def find_resumable(run_dir: Path, names: list[str]) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and notes on how it was chosen.

    ``latest`` when it names a folder; a damaged one there is refused (``CheckpointError``), not
    skipped. When ``latest`` is missing or dangling, the newest checkpoint that verifies (older damaged
    ones are named in the notes); None when there is none."""
    root = Path(run_dir) / "checkpoints"
    pointed = latest_checkpoint(run_dir)
    if pointed is not None:
        return pointed, verify(pointed, names)
    candidates = list_checkpoints(run_dir)
    if not candidates:
        return None, []
    why = "is missing" if not (root / LATEST).exists() else "names a checkpoint that is not there"
    notes = [f"{root / LATEST} {why}; looking for the newest intact checkpoint"]
    for path in reversed(candidates):
        try:
            notes += verify(path, names)
        except CheckpointError as exc:
            notes.append(f"skipping {path.name}: {exc}")
            continue
        return path, notes
    raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(notes[1:]))


def checkpoint_at(run_dir: Path, step: int) -> Path | None:
    path = Path(run_dir) / "checkpoints" / f"step-{step}"
    return path if path.is_dir() else None


def with_current_lr(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """``saved`` (an optimizer state dict) with each param group's ``lr`` replaced by the one
    ``optimizer`` was built with: a resume takes its learning rates from the command line (which
    must match the run's unless overridden), not from the checkpoint."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not groups or len(groups) != len(optimizer.param_groups):
        return saved
    return {**saved, "param_groups": [{**g, "lr": cur["lr"]} for g, cur in zip(groups, optimizer.param_groups)]}


def with_lr(saved: dict, lr: float) -> dict:
    """``saved`` (an optimizer state dict) with every param group's ``lr`` set to ``lr``."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not groups:
        return saved
    return {**saved, "param_groups": [{**g, "lr": lr} for g in groups]}
