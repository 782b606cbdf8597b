"""``hosl.load_run(RUN)``: a trained run rebuilt in Python, as ``hosl export`` rebuilds it.

The run's model is loaded from its ``config.json`` exactly as training loaded it (model, task,
cut, LoRA, dtype), split, and its newest checkpoint (the one ``--resume`` would pick: both halves
of a one-process run, or ``client/`` and ``server/`` of a two-process ``--out``, whose server
checkpoints may be sharded: ``hosl/training/sharded_checkpoint.py``) is loaded into the halves.
The halves come back in eval mode; ``merged=True`` also returns them as one Hugging Face model
(``hosl.merge``), with the run's label names in its config.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from hosl.export import ExportError, merge

if TYPE_CHECKING:  # imported where used: hosl.training loads only when a run is
    from hosl.training.config import TrainConfig


def _config_of(folder: Path) -> TrainConfig:
    from hosl.training.config import TrainConfig

    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{folder} is not a hosl run folder: no config.json") from None
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
        raise ExportError(f"{path}: not readable as JSON ({exc})") from None
    if not isinstance(raw, dict) or "model" not in raw or "cut" not in raw:
        raise ExportError(f"{path} is not a hosl run configuration (no model/cut)")
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in raw.items() if k in known})
    if isinstance(cfg.zo_betas, list):
        cfg.zo_betas = tuple(cfg.zo_betas)
    return cfg


def _newest(folder: Path, names: list[str]) -> Path | None:
    """The checkpoint ``--resume`` would pick in ``folder``: ``latest``, or when that is missing or
    dangling the newest one that verifies (``find_resumable``; its notes are shown)."""
    from hosl.training import checkpoint as ckpt
    from hosl.training.run import say

    path, notes = ckpt.find_resumable(folder, names)
    for note in notes:
        say(note)
    return path


def find_checkpoints(run: Path) -> tuple[TrainConfig, dict[str, Path], int]:
    """(config, {"client": checkpoint folder, "server": checkpoint folder}, step) of the newest
    checkpoint of ``run`` (the one ``--resume`` would pick): a one-process run folder, or a
    two-process ``--out`` with ``client/`` and ``server/``."""
    from hosl.training import checkpoint as ckpt

    run = Path(run)
    if not run.is_dir():
        raise ExportError(f"run folder {run} does not exist or is not a folder")
    if (run / "client" / "config.json").exists() and (run / "server").is_dir():
        cfg = _config_of(run / "client")
        latest = _newest(run / "client", ["client"])
        if latest is None:
            raise ExportError(f"{run / 'client'} holds no checkpoint yet (one is written at each evaluation)")
        step = int(latest.name.split("-")[1])
        server = ckpt.checkpoint_at(run / "server", step)
        if server is None:
            raise ExportError(f"{run / 'server'} has no checkpoint for step {step}, the client's latest")
        return cfg, {"client": latest, "server": server}, step
    cfg = _config_of(run)
    latest = _newest(run, [])  # both halves are checked next, with a hint for a two-process run's client/
    if latest is None:
        raise ExportError(
            f"{run} holds no checkpoint yet (one is written at each evaluation; an interrupted run keeps its last one)"
        )
    for half in ("client", "server"):
        if not (latest / f"{half}.safetensors").exists():
            raise ExportError(
                f"{latest} has no {half}.safetensors (for a two-process run, export the --out folder "
                "that holds client/ and server/)"
            )
    return cfg, {"client": latest, "server": latest}, int(latest.name.split("-")[1])


@dataclass
class LoadedRun:
    """A run's model at its newest checkpoint."""

    config: TrainConfig  # the run's configuration
    step: int  # the checkpoint's step
    model_kind: str  # "classifier" or "causal_lm"
    tokenizer: Any  # a transformers tokenizer, or None
    client: nn.Module
    server: nn.Module
    labels: list[str] | None  # class names in label order (None: a causal LM's --task lm)
    merged: nn.Module | None = None  # with merged=True: hosl.merge(client, server)

    def __call__(self, input_ids, attention_mask=None):
        """The split model's output: ``server(client(ids, mask), mask)``."""
        return self.server(self.client(input_ids, attention_mask), attention_mask)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' load report ("newly initialized" head weights...) and its loading bar
    silenced: the checkpoint loaded next overwrites every weight they are about."""
    from transformers.utils import logging

    level, bars_off = logging.get_verbosity(), logging.is_progress_bar_enabled() is False
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # "Loading weights" of a model whose every weight is replaced next
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if not bars_off:
            logging.enable_progress_bar()


def set_label_names(model: nn.Module, labels: list[str] | None) -> None:
    """``config.id2label`` / ``label2id`` from the run's labels (a classifier's, for ``pipeline``)."""
    if labels is None or getattr(model.config, "num_labels", None) != len(labels):
        return
    config: Any = model.config  # a transformers PretrainedConfig
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}


def load_run(run, *, merged: bool = False, fold_lora: bool = True) -> LoadedRun:
    """The model of run folder ``run`` at its newest checkpoint (see the module docstring);
    ``merged=True`` adds the merged Hugging Face model (LoRA folded in unless ``fold_lora=False``).
    A folder that is not a run, or holds no checkpoint, is an ``ExportError`` saying which."""
    from hosl.tasks.custom import configured_label_names
    from hosl.training import checkpoint as ckpt
    from hosl.training import sharded_checkpoint
    from hosl.training.run import load_split_model

    cfg, paths, step = find_checkpoints(Path(run))
    with quiet_transformers():
        model_kind, tokenizer, client, server = load_split_model(cfg)
    for half, module in (("client", client), ("server", server)):
        if half == "server" and sharded_checkpoint.run_format(paths[half].parent.parent) == sharded_checkpoint.SHARDED:
            sharded_checkpoint.load_sharded(paths[half], module, None)  # its shards, in this one process
        else:
            ckpt.load_checkpoint(paths[half], {half: module})
    client.eval()
    server.eval()
    labels = configured_label_names(cfg) if model_kind == "classifier" else None
    loaded = LoadedRun(
        config=cfg, step=step, model_kind=model_kind, tokenizer=tokenizer, client=client, server=server, labels=labels
    )
    if merged:
        loaded.merged = merge(client, server, fold_lora=fold_lora)
        set_label_names(loaded.merged, labels)
    return loaded
