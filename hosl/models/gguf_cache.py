"""Convert a GGUF checkpoint once into a cached Hugging Face folder (safetensors + tokenizer).

Loading a GGUF through transformers dequantises every tensor (~15-30 s for SmolLM2-135M); the
cached folder reloads in about a second. The cache lives under ``$HOSL_CACHE`` (default
``~/.cache/hosl``) in a folder named after the GGUF file and its size, so a different file gets a
fresh conversion. The folder is written under a temporary name and renamed into place, so a crashed
or concurrent conversion never leaves a half-written cache behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SOURCE_RECORD = "hosl_gguf_source.json"


def cache_root() -> Path:
    return Path(os.environ.get("HOSL_CACHE") or Path.home() / ".cache" / "hosl")


def cached_folder_for(gguf_path: Path, name: str) -> Path:
    size = gguf_path.stat().st_size
    return cache_root() / f"{name}-{gguf_path.stem}-{size}"


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise ``gguf_path`` (fp32) and save model + tokenizer as a HF folder at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    # The weights are plain fp32 now; without this the saved config would ask for the GGUF quantizer again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as a module; None drops the quantizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"gguf_file": str(gguf_path), "gguf_size": gguf_path.stat().st_size}
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=1))
        try:
            staging.rename(target)
        except OSError:
            if not (target / SOURCE_RECORD).exists():  # not a lost race with another converter
                raise RuntimeError(f"{target} exists but is not a complete hosl cache; delete it and retry") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def ensure_converted(gguf_path: Path, name: str) -> Path:
    """The cached HF folder for ``gguf_path``, converting it first if it is not there yet."""
    target = cached_folder_for(gguf_path, name)
    if not (target / SOURCE_RECORD).exists():
        convert_gguf(gguf_path, target)
    return target
