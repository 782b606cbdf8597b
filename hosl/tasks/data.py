"""Loading one split of one task through the ``datasets`` library, normalised to the hub schema.

``load_task(name, split)`` reads from the Hugging Face hub (what real users have);
``load_task(name, split, data_dir=...)`` reads local files laid out as the project's shared data:

    <data_dir>/sst2/train.tsv, dev.tsv                    (header ``text<TAB>label``)
    <data_dir>/superglue/<Task>/train.jsonl, val.jsonl    Task in CB, RTE, WSC, BoolQ, WiC, COPA, MultiRC

Files are read in place with datasets' "csv"/"json" builders; nothing is copied next to the code
(datasets keeps its usual Arrow cache under ~/.cache/huggingface).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from pathlib import Path

import datasets

from .registry import TaskSpec, canonical_split, get_task_spec

# Columns each task's rows must have once normalised (idx is made up when missing).
REQUIRED_COLUMNS = {
    "sst2": ("sentence", "label"),
    "rte": ("premise", "hypothesis", "label"),
    "cb": ("premise", "hypothesis", "label"),
    "boolq": ("question", "passage", "label"),
    "wsc": ("text", "span1_index", "span2_index", "span1_text", "span2_text", "label"),
    "wic": ("word", "sentence1", "sentence2", "label"),
    "copa": ("premise", "choice1", "choice2", "question", "label"),
    "multirc": ("paragraph", "question", "answer", "label"),
}


class DataError(ValueError):
    """Task data that cannot be used; the message names the file (or hub dataset) and the column."""


def _innermost(exc: BaseException) -> str:
    """The root cause's message on one line (datasets wraps pandas/pyarrow errors)."""
    inner: BaseException | None = exc
    while inner is not None:
        exc, inner = inner, inner.__cause__ or inner.__context__
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


EXPECTED_LAYOUT = (
    "expected layout: <data_dir>/sst2/{train,dev}.tsv (header 'text<TAB>label') and "
    "<data_dir>/superglue/<Task>/{train,val}.jsonl with Task in CB, RTE, WSC, BoolQ, WiC, COPA, MultiRC"
)


def load_task(name: str | TaskSpec, split: str, data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """One split ("train" or "validation"; "val"/"dev" accepted) of task ``name`` (or its already
    resolved spec) as a Dataset.

    Rows follow the hub schema documented in :mod:`hosl.tasks.registry`, labels are ints.
    """
    spec = name if isinstance(name, TaskSpec) else get_task_spec(name)
    split = canonical_split(split)
    if data_dir is None:
        source = f"{spec.hub_id} ({spec.hub_config}) on the Hugging Face hub"
        try:
            raw = datasets.load_dataset(spec.hub_id, spec.hub_config, split=split)
        except Exception as exc:  # offline, moved, or a hub error: all end the same way for the user
            cause = " ".join(f"{exc.__class__.__name__}: {exc}".split())
            raise DataError(
                f"task {spec.name!r}: could not load {source} ({cause}); without network, "
                f"pass --data-dir with local files ({EXPECTED_LAYOUT}), or train on your own "
                f"files with --task custom or --task lm and --train-file F"
            ) from exc
    else:
        source = str(Path(data_dir) / spec.local_files[split])
        raw = _load_local(spec, split, Path(data_dir))
    if "label" not in raw.column_names and not (spec.name == "multirc" and "passage" in raw.column_names):
        raise DataError(
            f"{source}: no column 'label' (task {spec.name} needs {', '.join(REQUIRED_COLUMNS[spec.name])}; "
            f"found {', '.join(raw.column_names)})"
        )
    try:
        rows = _normalise(spec, raw)
    except (KeyError, ValueError, TypeError) as exc:
        column = f"column {exc.args[0]!r} is missing" if isinstance(exc, KeyError) and exc.args else _innermost(exc)
        raise DataError(
            f"{source}: {column} (task {spec.name} needs {', '.join(REQUIRED_COLUMNS[spec.name])})"
        ) from None
    missing = [c for c in REQUIRED_COLUMNS[spec.name] if c not in rows.column_names]
    if missing:
        raise DataError(
            f"{source}: no column {', '.join(repr(c) for c in missing)} (task {spec.name} needs "
            f"{', '.join(REQUIRED_COLUMNS[spec.name])}; found {', '.join(raw.column_names)})"
        )
    return rows


def local_path(name: str, split: str, data_dir: str | os.PathLike) -> Path:
    """Where the local file of ``name``/``split`` is expected under ``data_dir``."""
    spec = get_task_spec(name)
    return Path(data_dir) / spec.local_files[canonical_split(split)]


def _load_local(spec: TaskSpec, split: str, data_dir: Path) -> datasets.Dataset:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a directory; {EXPECTED_LAYOUT}")
    path = data_dir / spec.local_files[split]
    if not path.is_file():
        raise FileNotFoundError(f"task {spec.name!r} split {split!r}: no file at {str(path)!r}; {EXPECTED_LAYOUT}")
    try:
        with _quiet_datasets_log():  # its own ERROR line would repeat the message below
            return _read_local(spec, split, path)
    except Exception as exc:  # datasets wraps the parser's error (pandas, pyarrow) in its own classes
        kind = "tab-separated text with a header line" if spec.local_format == "tsv" else "JSON lines"
        raise DataError(f"{path}: cannot be read as {kind} ({_innermost(exc)})") from exc


@contextlib.contextmanager
def _quiet_datasets_log():
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_local(spec: TaskSpec, split: str, path: Path) -> datasets.Dataset:
    if spec.local_format == "tsv":
        # QUOTE_NONE: a quote character in a sentence is text, not a CSV quote.
        # na_filter=False: a sentence like "null" or "nan" stays a string.
        return datasets.load_dataset(
            "csv",
            data_files={split: str(path)},
            split=split,
            delimiter="\t",
            quoting=csv.QUOTE_NONE,
            na_filter=False,
        )
    return datasets.load_dataset("json", data_files={split: str(path)}, split=split)


def label_to_int(value, label_names: tuple) -> int:
    """bool -> 0/1, class-name string -> its index in ``label_names``, int -> itself (range-checked)."""
    if isinstance(value, bool):
        index = int(value)
    elif isinstance(value, str):
        key = value.strip().lower()
        names = [n.lower() for n in label_names]
        if key in names:
            index = names.index(key)
        elif key.lstrip("-").isdigit():
            index = int(key)
        else:
            raise ValueError(f"label {value!r} is not one of {list(label_names)}")
    elif isinstance(value, int):
        index = value
    else:
        raise ValueError(f"unsupported label {value!r} of type {type(value).__name__}")
    if not 0 <= index < len(label_names):
        raise ValueError(f"label {value!r} out of range for classes {list(label_names)}")
    return index


def _normalise(spec: TaskSpec, raw: datasets.Dataset) -> datasets.Dataset:
    # map() keeps a rewritten column's old Arrow type (WSC's bool label would stay bool): cast after.
    normalised = _normalise_rows(spec, raw)
    return normalised.cast_column("label", datasets.Value("int64"))


def _normalise_rows(spec: TaskSpec, raw: datasets.Dataset) -> datasets.Dataset:
    columns = raw.column_names
    names = spec.label_names

    if spec.name == "sst2":
        text_field = "sentence" if "sentence" in columns else "text"

        def sst2_row(row, index):
            return {
                "sentence": str(row[text_field]),
                "label": label_to_int(row["label"], names),
                "idx": row["idx"] if "idx" in row else index,
            }

        return raw.map(sst2_row, with_indices=True, remove_columns=columns, keep_in_memory=True)

    if spec.name == "wsc" and "target" in columns:
        # Local (jiant/SuperGLUE-distribution) files nest the spans under "target".
        def wsc_row(row):
            target = row["target"]
            return {
                "text": row["text"],
                "span1_index": int(target["span1_index"]),
                "span2_index": int(target["span2_index"]),
                "span1_text": target["span1_text"],
                "span2_text": target["span2_text"],
                "label": label_to_int(row["label"], names),
                "idx": int(row["idx"]),
            }

        return raw.map(wsc_row, remove_columns=columns, keep_in_memory=True)

    if spec.name == "multirc" and "passage" in columns:
        # Local (SuperGLUE-distribution) files hold one passage per line with nested questions and
        # answers; the hub has one row per (passage, question, answer). Flatten to the hub's rows.
        def multirc_rows(batch):
            out = {"paragraph": [], "question": [], "answer": [], "label": [], "idx": []}
            for passage_idx, passage in zip(batch["idx"], batch["passage"]):
                for question in passage["questions"]:
                    for answer in question["answers"]:
                        out["paragraph"].append(passage["text"])
                        out["question"].append(question["question"])
                        out["answer"].append(answer["text"])
                        out["label"].append(label_to_int(answer["label"], names))
                        out["idx"].append(
                            {
                                "paragraph": int(passage_idx),
                                "question": int(question["idx"]),
                                "answer": int(answer["idx"]),
                            }
                        )
            return out

        return raw.map(multirc_rows, batched=True, remove_columns=columns, keep_in_memory=True)

    def label_only(row):
        return {"label": label_to_int(row["label"], names)}

    # CB/RTE string labels, WiC/BoolQ bools, hub ints: all to ints.
    return raw.map(label_only, remove_columns=["label"], keep_in_memory=True)
