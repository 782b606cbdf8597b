"""Loading one split of one task through the ``datasets`` library, normalised to the hub schema.

``load_task(name, split)`` reads from the Hugging Face hub (what real users have);
``load_task(name, split, data_dir=...)`` reads local files laid out as the project's shared data:

    <data_dir>/sst2/train.tsv, dev.tsv                    (header ``text<TAB>label``)
    <data_dir>/superglue/<Task>/train.jsonl, val.jsonl    Task in CB, RTE, WSC, BoolQ, WiC, COPA, MultiRC

Files are read in place with datasets' "csv"/"json" builders; nothing is copied next to the code
(datasets keeps its usual Arrow cache under ~/.cache/huggingface).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import datasets

from .registry import TaskSpec, canonical_split, get_task_spec

EXPECTED_LAYOUT = (
    "expected layout: <data_dir>/sst2/{train,dev}.tsv (header 'text<TAB>label') and "
    "<data_dir>/superglue/<Task>/{train,val}.jsonl with Task in CB, RTE, WSC, BoolQ, WiC, COPA, MultiRC"
)


def load_task(name: str, split: str, data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """One split ("train" or "validation"; "val"/"dev" accepted) of task ``name`` as a Dataset.

    Rows follow the hub schema documented in :mod:`hosl.tasks.registry`, labels are ints.
    """
    spec = get_task_spec(name)
    split = canonical_split(split)
    if data_dir is None:
        raw = datasets.load_dataset(spec.hub_id, spec.hub_config, split=split)
    else:
        raw = _load_local(spec, split, Path(data_dir))
    return _normalise(spec, raw)


def local_path(name: str, split: str, data_dir: str | os.PathLike) -> Path:
    """Where the local file of ``name``/``split`` is expected under ``data_dir``."""
    spec = get_task_spec(name)
    return Path(data_dir) / spec.local_files[canonical_split(split)]


def _load_local(spec: TaskSpec, split: str, data_dir: Path) -> datasets.Dataset:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a directory; {EXPECTED_LAYOUT}")
    path = data_dir / spec.local_files[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"task {spec.name!r} split {split!r}: no file at {str(path)!r}; {EXPECTED_LAYOUT}"
        )
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
