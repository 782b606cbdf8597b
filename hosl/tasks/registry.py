"""The tasks this project knows: where each lives on the hub and in a local data folder.

Every loaded example is a plain dict in the Hugging Face hub schema of its task (field names of
``nyu-mll/glue`` / ``aps/super_glue``) with an ``int`` ``label``, whichever source it came from:

===========  ==================================================================================
task         fields
===========  ==================================================================================
sst2         sentence, label (0 negative, 1 positive), idx
rte          premise, hypothesis, label (0 entailment, 1 not_entailment), idx
cb           premise, hypothesis, label (0 entailment, 1 contradiction, 2 neutral), idx
boolq        question, passage, label (0 False, 1 True), idx
wsc          text, span1_index, span2_index, span1_text, span2_text, label (0/1), idx
wic          word, sentence1, sentence2, start1, start2, end1, end2, label (0/1), idx
copa         premise, choice1, choice2, question ("cause"/"effect"), label (0/1: which choice), idx
multirc      paragraph, question, answer, label (0/1), idx = {paragraph, question, answer}
===========  ==================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

# Hub ids that host these datasets as data files (the old script-based "glue"/"super_glue" no
# longer load with datasets >= 4). Unverifiable offline: change here if the hub moves them again.
GLUE_HUB_ID = "nyu-mll/glue"
SUPER_GLUE_HUB_ID = "aps/super_glue"

# Accepted spellings of a split, mapped to the canonical name.
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
}


@dataclass(frozen=True)
class TaskSpec:
    """Static facts about one task (no data)."""

    name: str
    hub_id: str
    hub_config: str
    # Local layout, relative to data_dir: file per canonical split, and its format.
    local_files: dict  # {"train": relpath, "validation": relpath}
    local_format: str  # "tsv" or "jsonl"
    # Class names in label order, used to turn string labels into ints.
    label_names: tuple
    # Whether the local train file is FewGLUE's 32-example set (see sampling.py).
    local_train_is_fewglue: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _superglue(name: str, folder: str, hub_config: str, label_names: tuple, fewglue: bool = False):
    return TaskSpec(
        name=name,
        hub_id=SUPER_GLUE_HUB_ID,
        hub_config=hub_config,
        local_files={
            "train": f"superglue/{folder}/train.jsonl",
            "validation": f"superglue/{folder}/val.jsonl",
        },
        local_format="jsonl",
        label_names=label_names,
        local_train_is_fewglue=fewglue,
    )


_BINARY = ("false", "true")

TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2",
        hub_id=GLUE_HUB_ID,
        hub_config="sst2",
        local_files={"train": "sst2/train.tsv", "validation": "sst2/dev.tsv"},
        local_format="tsv",
        label_names=("negative", "positive"),
    ),
    "rte": _superglue("rte", "RTE", "rte", ("entailment", "not_entailment")),
    "cb": _superglue("cb", "CB", "cb", ("entailment", "contradiction", "neutral")),
    "boolq": _superglue("boolq", "BoolQ", "boolq", _BINARY, fewglue=True),
    # MeZO uses the "fixed" WSC config (corrected span indices).
    "wsc": _superglue("wsc", "WSC", "wsc.fixed", _BINARY),
    "wic": _superglue("wic", "WiC", "wic", _BINARY, fewglue=True),
    "copa": _superglue("copa", "COPA", "copa", ("choice1", "choice2"), fewglue=True),
    "multirc": _superglue("multirc", "MultiRC", "multirc", _BINARY, fewglue=True),
}

# Spellings people use for the same task.
_NAME_ALIASES = {"sst-2": "sst2", "sst": "sst2", "wsc.fixed": "wsc"}


def known_tasks() -> list[str]:
    return list(TASKS)


def get_task_spec(name: str) -> TaskSpec:
    """The spec of task ``name`` (case-insensitive); ValueError listing the known tasks otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _NAME_ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}")
    return TASKS[key]


def canonical_split(split: str) -> str:
    key = str(split).strip().lower()
    if key not in SPLIT_ALIASES:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'validation' (aliases: val, valid, dev)")
    return SPLIT_ALIASES[key]
