"""Checkpoints that a crash or Ctrl-C cannot corrupt.

A checkpoint is a folder ``RUNDIR/checkpoints/step-N`` with one ``NAME.safetensors`` per module
(``client`` and ``server`` in one process; only its own half on each side of a two-process run)
and ``state.pt`` (optimizer, RNG and data-order state). It is written under a temporary name and
renamed when complete; ``RUNDIR/checkpoints/latest`` (replaced atomically) names the newest. Older
checkpoints are deleted only after the new one is in place; ``keep`` say how many stay.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tensors(module: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, modules: Mapping[str, torch.nn.Module], state: dict,
                    keep: int = 1) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        save_file(_tensors(module), str(tmp / f"{name}.safetensors"))
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
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
    return state
