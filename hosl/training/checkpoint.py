"""Checkpoints that a crash or Ctrl-C cannot corrupt.

A checkpoint is a folder ``RUNDIR/checkpoints/step-N`` with ``client.safetensors``,
``server.safetensors`` and ``state.pt`` (optimizer, RNG and data-order state). It is written under a
temporary name and renamed when complete; ``RUNDIR/checkpoints/latest`` (replaced atomically) names
the newest. Older checkpoints are deleted only after the new one is in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tensors(module: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: Path, step: int, client, server, state: dict, keep: int = 1) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_tensors(client), str(tmp / "client.safetensors"))
    save_file(_tensors(server), str(tmp / "server.safetensors"))
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(root / LATEST, final.name)
    older = sorted((p for p in root.glob("step-*") if p != final), key=lambda p: int(p.name.split("-")[1]))
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


def load_checkpoint(path: Path, client, server) -> dict:
    """Load weights into ``client``/``server`` and return the saved state dict."""
    path = Path(path)
    missing = [f for f in ("client.safetensors", "server.safetensors", "state.pt") if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    state = torch.load(path / "state.pt", weights_only=False)
    client.load_state_dict(load_file(str(path / "client.safetensors")))
    server.load_state_dict(load_file(str(path / "server.safetensors")))
    return state
