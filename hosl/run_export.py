"""``export_run(run, out)`` (``hosl export RUN --out DIR``) rebuilds a run's model from its
``config.json`` exactly as training did, loads its latest checkpoint (the one ``--resume`` would
pick: ``checkpoints/latest``, or the newest intact one when that is missing; a two-process run's
``client/`` and ``server/`` halves at the same step), and writes:

* a full fine-tuning run: ``DIR`` is one model folder (``save_pretrained``, the tokenizer,
  ``hosl_export.json``) that ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification``
  (BERT-style encoders) ``.from_pretrained(DIR)`` loads;
* a LoRA run: ``DIR/base`` (model folder of the weights under the adapters), ``DIR/adapter`` (PEFT
  adapter folder: ``PeftModel.from_pretrained(base_model, DIR/adapter)``) and, with
  ``merge_lora``, ``DIR/merged`` (the folded model).

Everything is written under a temporary name next to ``DIR`` and renamed into place at the end,
so a failed export leaves no ``DIR`` behind.

A classifier's config gets the run's label names (``id2label`` / ``label2id``, so
``pipeline("text-classification", model=DIR)`` answers with them), and ``hosl_export.json``
records the labels, the template and the verbaliser the run was trained with.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hosl.export import EXPORT_RECORD, ExportError, _auto_class, adapter_model, merge


def check_tie(model) -> None:
    """Refuse (an ExportError saying why) a merged ``model`` whose embedding and head are not one
    matrix: the model does not tie them, or the client's embedding and the server's head copy
    trained apart (``merge`` then keeps both)."""
    if getattr(model, "hosl_tied_head", False):
        return
    apart = getattr(model, "hosl_head_apart", None)
    if apart is None:
        raise ExportError(
            f"--tie-head: {model.config.model_type} does not tie its input embedding and output head "
            "here (tie_word_embeddings is false, or the model has a classification head); nothing to tie"
        )
    differ, numel, largest = apart
    raise ExportError(
        f"--tie-head: the client's embedding and the server's head copy trained apart ({differ} of "
        f"{numel} elements differ, by up to {largest:.3g}); one matrix would drop one of them. "
        "Export without --tie-head to keep both"
    )


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose a new one")


def _save_model(model, tokenizer, folder: Path, record: dict) -> None:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=1))


def export_run(run, out, *, merge_lora: bool = False, tie_head: bool = False) -> dict:
    """Export the latest checkpoint of ``run`` to ``out`` (layout in the module docstring). Returns
    the export record (also written as ``hosl_export.json``). ``tie_head``: insist on one matrix for
    a tied embedding and head, refusing (before anything is written) when the two copies differ."""
    from hosl.run_loading import load_run, set_label_names
    from hosl.tasks.custom import configured_prompt

    out = Path(out)
    _check_out(out)
    loaded = load_run(run)
    cfg, step, tokenizer, client, server = loaded.config, loaded.step, loaded.tokenizer, loaded.client, loaded.server
    if tie_head:
        check_tie(merge(client, server, fold_lora=True))
    record = {
        "run": str(Path(run).resolve()),
        "step": step,
        "model": cfg.model,
        "task": cfg.task,
        "cut": cfg.cut,
        "lora": bool(cfg.lora),
        "auto_class": _auto_class(server).__name__,
        "labels": loaded.labels,
        **configured_prompt(cfg),
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if not cfg.lora:
            model = merge(client, server)
            set_label_names(model, loaded.labels)
            record["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
            _save_model(model, tokenizer, staging, record)
        else:
            base, peft_model = adapter_model(client, server)
            set_label_names(base, loaded.labels)
            record["tie_word_embeddings"] = bool(getattr(base.config, "tie_word_embeddings", False))
            record["layout"] = {"base": "base", "adapter": "adapter", **({"merged": "merged"} if merge_lora else {})}
            _save_model(base, tokenizer, staging / "base", record)
            peft_model.peft_config["default"].base_model_name_or_path = str((out / "base").resolve())
            peft_model.save_pretrained(staging / "adapter")
            if tokenizer is not None:
                tokenizer.save_pretrained(staging / "adapter")
            if merge_lora:
                merged = merge(client, server, fold_lora=True)
                set_label_names(merged, loaded.labels)
                _save_model(
                    merged,
                    tokenizer,
                    staging / "merged",
                    {**record, "tie_word_embeddings": bool(getattr(merged.config, "tie_word_embeddings", False))},
                )
            (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return record
