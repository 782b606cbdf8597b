"""Sharded server checkpoints: the server half's weights and optimizer state written with
``torch.distributed.checkpoint`` (DCP), each server rank its own shards, no gather.

A run's server checkpoints have one format, chosen when the server half starts and recorded in
``CHECKPOINT_DIR/checkpoints/format.json`` at its first save (:func:`run_format`):

* ``safetensors``: one server process's ``server.safetensors`` (``hosl/training/checkpoint.py``;
  with ``--server-parallel fsdp`` the shards gathered to rank 0). Runs without a record have it.
* ``dcp``: chosen by a run that starts with ``--server-procs P > 1 --server-parallel fsdp`` and has
  no checkpoint yet. The folder ``step-N`` holds DCP's ``.metadata`` and one ``__R_0.distcp`` per
  rank (the keys ``model.NAME`` and ``optimizer.state.NAME...``, as
  ``torch.distributed.checkpoint.state_dict.get_state_dict`` names them), beside ``state.pt``
  (step, RNG, the rest of the server half's state) and ``checksums.json``. Every rank writes
  into the staging folder of ``hosl/training/checkpoint.py`` and rank 0 commits it, so a
  half-written checkpoint is never ``latest``.

The run keeps its format whatever ``--server-procs`` and ``--server-parallel`` it resumes with:
DCP reshards on load, so a sharded checkpoint loads at the same P, at another P, and in one
process without a process group (``no_dist``; also ``hosl export``), and later checkpoints are
written in the same format (one rank's file at P = 1).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from hosl.training import checkpoint as ckpt
from hosl.training.server_group import ServerGroup

FORMAT_FILE = "format.json"
SHARDED = "dcp"
FULL = "safetensors"
METADATA = ".metadata"  # DCP's index of the shards (torch.distributed.checkpoint.FileSystemWriter)
WEIGHTS_KEY = "server_weights"  # in state.pt: "full" or "trainable" (LoRA: the adapters only)


def run_format(checkpoint_dir: Path) -> str | None:
    """The format recorded for the run's server checkpoints in ``checkpoint_dir``; None when none is."""
    path = Path(checkpoint_dir) / "checkpoints" / FORMAT_FILE
    if not path.is_file():
        return None
    try:
        fmt = json.loads(path.read_text())["server"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ckpt.CheckpointError(f"{path} is damaged ({exc.__class__.__name__}: {exc})") from None
    if fmt not in (SHARDED, FULL):
        raise ckpt.CheckpointError(f"{path} names server checkpoint format {fmt!r}; expected {SHARDED} or {FULL}")
    return fmt


def choose_format(checkpoint_dir: Path | None, sharded: bool) -> str:
    """The format of the run's server checkpoints: the recorded one; else ``safetensors`` when it
    has checkpoints already (written before formats were recorded); else ``dcp`` when ``sharded``
    (fsdp over several ranks), ``safetensors`` when not."""
    if checkpoint_dir is None:
        return FULL
    recorded = run_format(checkpoint_dir)
    if recorded is not None:
        return recorded
    if ckpt.list_checkpoints(checkpoint_dir):
        return FULL
    return SHARDED if sharded else FULL


def record_format(checkpoint_dir: Path, fmt: str) -> None:
    """Record ``fmt`` for the run (once: a recorded format is never changed)."""
    root = Path(checkpoint_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / FORMAT_FILE).is_file():
        ckpt.atomic_write_text(root / FORMAT_FILE, json.dumps({"server": fmt}))


def _states(server: nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool) -> dict:
    """This rank's model (and optimizer) state as DCP saves and loads it: FSDP2 parameters as
    DTensors (this rank's shards), a plain module's as tensors, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = get_model_state_dict(server)
    if trainable_only:
        trainable = {k for k, p in server.named_parameters() if p.requires_grad}
        model = {k: v for k, v in model.items() if k in trainable}
    states: dict = {"model": model}
    if optimizer is not None:
        states["optimizer"] = get_optimizer_state_dict(server, optimizer)
    return states


def save_sharded(
    checkpoint_dir: Path,
    step: int,
    server: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    group: ServerGroup,
    *,
    keep: int,
    trainable_only: bool,
) -> None:
    """Every rank: write this rank's shards of step ``step``'s checkpoint; rank 0 adds ``state``
    (without the optimizer, which is in the shards) and commits the folder."""
    import torch.distributed.checkpoint as dcp

    if group.rank == 0:
        record_format(checkpoint_dir, SHARDED)
        ckpt.begin_checkpoint(checkpoint_dir, step)
    group.barrier()  # the staging folder is there, and empty, before any rank writes into it
    tmp = ckpt.staging_folder(checkpoint_dir, step)
    # each rank's write is reported to rank 0 before dcp.save returns there, so rank 0 commits a
    # complete folder
    with _dcp_quiet(not group.distributed):
        dcp.save(_states(server, optimizer, trainable_only), checkpoint_id=str(tmp), no_dist=not group.distributed)
    if group.rank == 0:
        full_state = {**state, WEIGHTS_KEY: "trainable" if trainable_only else "full"}
        ckpt.commit_checkpoint(checkpoint_dir, step, tmp, full_state, keep)


def _copies(value):
    """``value`` (nested dicts and lists) with each tensor a copy: ``get_state_dict`` hands out the
    parameters themselves, and DCP loads in place, so a refused load must not read into them."""
    if isinstance(value, dict):
        return {k: _copies(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copies(v) for v in value]
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def _dcp_quiet(no_dist: bool):
    """DCP warns that it assumes one process whenever it runs without a process group: here that is
    meant (one server process, ``hosl export``)."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent")
        yield


def _local(value):
    """``value`` (nested dicts and lists of tensors) with each DTensor as this rank's shard."""
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_local(v) for v in value]
    return value.to_local() if hasattr(value, "to_local") else value


def load_sharded(
    path: Path, server: nn.Module, optimizer: torch.optim.Optimizer | None, group: ServerGroup | None = None
) -> dict:
    """Every rank: verify the sharded checkpoint folder ``path``, load its weights (and, given
    ``optimizer``, its optimizer state: the learning rates stay ``optimizer``'s) into this rank's
    parameters, whatever P wrote it, and return its ``state.pt``. DCP reads into a copy of this
    rank's shards (weights and optimizer state: their memory once more) and they are set only once
    all of it is read and finite. Raises ``CheckpointError`` (on every rank alike) before changing
    any weight when a file is damaged, the checkpoint does not fit ``server``, or it holds NaN or
    Inf (a fresh ``optimizer``'s state is created empty first, as ``get_optimizer_state_dict``
    does)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    group = group or ServerGroup()
    path = Path(path)
    ckpt.verify(path, files=[METADATA])
    state = ckpt.read_state(path)
    trainable_only = state.get(WEIGHTS_KEY, "full") == "trainable"
    target = _copies(_states(server, optimizer, trainable_only))  # this rank's shards, once more
    try:
        with _dcp_quiet(not group.distributed):
            dcp.load(target, checkpoint_id=str(path), no_dist=not group.distributed)
    except (CheckpointException, Exception) as exc:  # CheckpointException (a BaseException): every rank's failure
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ckpt.CheckpointError(
            f"{path} does not fit this server half ({first}); was the run started with another --model/--cut?"
        ) from None
    bad = list(ckpt.non_finite_tensors(_local(target)))
    if group.total(1.0 if bad else 0.0) > 0:  # every rank refuses when any rank's shards are bad
        where = f" (in {', '.join(bad[:3])})" if bad else " (in another rank's shards)"
        raise ckpt.CheckpointError(f"{path} holds NaN or Inf weights{where}; refusing to load it")
    set_model_state_dict(server, target["model"], options=StateDictOptions(strict=not trainable_only))
    if optimizer is not None:
        saved = ckpt.with_current_lr(optimizer, target["optimizer"])
        set_optimizer_state_dict(server, optimizer, saved)
    return state
