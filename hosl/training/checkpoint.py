"""Checkpoints that a crash or Ctrl-C cannot corrupt.

A checkpoint is a folder ``RUNDIR/checkpoints/step-N`` with one ``NAME.safetensors`` per module
(``client`` and ``server`` in one process; only its own half on each side of a two-process run)
and ``state.pt`` (optimizer, RNG and data-order state). It is written under a temporary name and
renamed when complete; ``RUNDIR/checkpoints/latest`` (replaced atomically) names the newest. Older
checkpoints are deleted only after the new one is in place; ``keep`` say how many stay.

LoRA runs save ``trainable_only``: each module's file holds its trainable parameters (the adapters,
and a classification head when it trains), not the frozen base weights, which every run rebuilds
from the model's source. The file's metadata says which kind it is, and loading one checks that it
covers every trainable parameter of the module.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LATEST = "latest"
CONTENTS_KEY = "hosl_contents"  # safetensors metadata: "full" (state_dict) or "trainable" (adapters)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tensors(module: torch.nn.Module, trainable_only: bool = False) -> dict:
    if trainable_only:
        items = {k: p for k, p in module.named_parameters() if p.requires_grad}
    else:
        items = module.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in items.items()}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, modules: Mapping[str, torch.nn.Module], state: dict,
                    keep: int = 1, *, trainable_only: bool = False) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        save_file(_tensors(module, trainable_only), str(tmp / f"{name}.safetensors"),
                  metadata={CONTENTS_KEY: "trainable" if trainable_only else "full"})
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(root / LATEST, final.name)
    older = [p for p in list_checkpoints(run_dir) if p != final]
    for p in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def checkpoint_at(run_dir: Path, step: int) -> Path | None:
    path = Path(run_dir) / "checkpoints" / f"step-{step}"
    return path if path.is_dir() else None


def load_checkpoint(path: Path, modules: Mapping[str, torch.nn.Module]) -> dict:
    """Load weights into ``modules`` (by name) and return the saved state dict."""
    path = Path(path)
    missing = [f for f in [*(f"{n}.safetensors" for n in modules), "state.pt"] if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    state = torch.load(path / "state.pt", weights_only=False)
    for name, module in modules.items():
        file = str(path / f"{name}.safetensors")
        with safe_open(file, framework="pt") as f:
            contents = (f.metadata() or {}).get(CONTENTS_KEY, "full")
        tensors = load_file(file)
        if contents != "trainable":
            module.load_state_dict(tensors)
            continue
        trainable = {k for k, p in module.named_parameters() if p.requires_grad}
        missing, unexpected = trainable - tensors.keys(), tensors.keys() - trainable
        if missing or unexpected:
            raise ValueError(f"{file} holds trainable parameters only, and they do not match this {name}'s: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} "
                             "(was the run started with other LoRA settings?)")
        module.load_state_dict(tensors, strict=False)
    return state
