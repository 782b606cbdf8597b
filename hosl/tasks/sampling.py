"""MeZO's data protocol: ``train_size`` examples sampled from train, up to ``eval_size`` from validation.

Subsets are ``numpy.random.RandomState(seed).permutation(n)[:size]``, the draw MeZO makes (it
seeds numpy's global legacy generator and permutes), so on the same rows the same subsets come out.
As in MeZO the evaluation subset is drawn with the training seed unless ``eval_seed`` is given.

The shared data folder has only FewGLUE's 32-example training files for BoolQ, WiC, COPA and
MultiRC. For BoolQ and WiC (tasks of the paper) the training examples are then taken from the
validation file and evaluation uses a disjoint part of it; ``TaskData.notes`` says so, with counts.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .data import load_task
from .registry import get_task_spec
from .templates import PromptTemplate, get_template

# Tasks whose training examples come from the validation file by default when read locally.
TRAIN_FROM_VALIDATION_BY_DEFAULT = ("boolq", "wic")


@dataclass
class TaskData:
    """A sampled task: examples are hub-schema dicts with int labels (see registry.py)."""

    name: str
    train: list[dict]
    eval: list[dict]
    template: PromptTemplate
    notes: list[str] = field(default_factory=list)
    # classes of a classification task (a classifier's head size); None for --task lm (plain text)
    num_labels: int | None = None


def mezo_subset_indices(num_rows: int, size: int, seed: int) -> list[int]:
    """The first ``size`` entries of a seeded permutation of ``range(num_rows)`` (MeZO's draw)."""
    return np.random.RandomState(seed).permutation(num_rows)[:size].tolist()


def sample_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    train_size: int = 1000,
    eval_size: int = 1000,
    seed: int = 0,
    *,
    eval_seed: int | None = None,
    train_from_validation: bool | None = None,
) -> TaskData:
    """Sample MeZO-style train and eval sets for task ``name``.

    data_dir: local data folder (layout in data.py); None reads from the hub.
    train_size, eval_size: upper bounds; a smaller split is used whole (in seeded order).
    train_from_validation: take train from the validation file, disjoint from eval. None means
        yes for BoolQ and WiC read locally (their local train files have 32 examples), no otherwise.
        When sharing, eval gets at most half the pool and train at most the rest.
    """
    spec = get_task_spec(name)
    for arg, value in (("train_size", train_size), ("eval_size", eval_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
    if eval_seed is None:
        eval_seed = seed
    if train_from_validation is None:
        train_from_validation = data_dir is not None and spec.name in TRAIN_FROM_VALIDATION_BY_DEFAULT

    notes: list[str] = []
    validation = load_task(spec, "validation", data_dir).to_list()
    if train_from_validation:
        train, eval_ = _split_shared_pool(spec.name, validation, train_size, eval_size, seed, eval_seed)
        source = "the local data folder" if data_dir is not None else "the hub"
        notes.append(
            f"{spec.name}: training examples are taken from the validation split ({source} "
            f"has no full training set here); evaluation uses a disjoint part of the same split: "
            f"{len(train)} train / {len(eval_)} eval out of {len(validation)} validation examples."
        )
    else:
        train_rows = load_task(spec, "train", data_dir).to_list()
        train = [train_rows[i] for i in mezo_subset_indices(len(train_rows), train_size, seed)]
        eval_ = [validation[i] for i in mezo_subset_indices(len(validation), eval_size, eval_seed)]
        if len(train_rows) < train_size:
            small = (
                " (from FewGLUE's 32-example training file)"
                if data_dir is not None and spec.local_train_is_fewglue
                else ""
            )
            notes.append(
                f"{spec.name}: the training split has only {len(train_rows)} examples{small}; "
                f"all are used (train_size={train_size})."
            )
    if len(eval_) < eval_size:
        notes.append(f"{spec.name}: evaluating on {len(eval_)} examples (eval_size={eval_size}).")
    return TaskData(
        name=spec.name, train=train, eval=eval_, template=get_template(spec), notes=notes, num_labels=spec.num_labels
    )


def _group_key(task: str, example: dict, row: int):
    # MultiRC rows of one paragraph share its text: keep a paragraph on one side of the split.
    if task == "multirc":
        return example["idx"]["paragraph"]
    return row


def _split_shared_pool(task, pool, train_size, eval_size, seed, eval_seed, eval_fraction=0.5):
    """(train, eval) from one pool: at most ``eval_fraction`` of its rows (at least one) and at most
    ``eval_size`` are held out for evaluation, whole groups at a time; the rest train."""
    groups: OrderedDict = OrderedDict()
    for row, example in enumerate(pool):
        groups.setdefault(_group_key(task, example, row), []).append(row)
    group_rows = list(groups.values())

    eval_target = min(eval_size, max(1, int(len(pool) * eval_fraction)))
    eval_rows: list[int] = []
    remaining_groups = []
    for g in np.random.RandomState(eval_seed).permutation(len(group_rows)).tolist():
        if len(eval_rows) < eval_target:
            eval_rows.extend(group_rows[g])
        else:
            remaining_groups.append(g)
    train_pool = sorted(row for g in remaining_groups for row in group_rows[g])
    train_rows = [train_pool[i] for i in mezo_subset_indices(len(train_pool), train_size, seed)]
    return [pool[i] for i in train_rows], [pool[i] for i in eval_rows]
