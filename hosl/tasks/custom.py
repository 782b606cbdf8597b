"""Your own data: ``--task custom`` (classification with verbalisers) and ``--task lm`` (plain
text, evaluated by perplexity), from local CSV/TSV/JSON/JSONL files read with ``datasets``.

``--task custom --train-file F [--eval-file F] [--text-field text] [--text-pair-field P]
[--label-field label] [--template T] [--verbalizer V]``

* Labels come from the data: the distinct values of the label column of the training file,
  sorted (numerically when they are all integers), unless ``--verbalizer`` lists them. A label of
  the evaluation file that the training file lacks is an error.
* Verbaliser: the answer word of each label, ``--verbalizer "neg=terrible,pos=great"`` (or a JSON
  object); by default each label's own text is its word. A causal LM is scored on
  ``prompt + " " + word``, as the built-in tasks; an encoder gets a classification head.
* Template: a Python format string over the row's columns; ``{text}`` and ``{text_pair}`` name
  the ``--text-field`` / ``--text-pair-field`` columns. Default ``"{text}\\nAnswer:"`` (with a pair
  ``"{text}\\n{text_pair}\\nAnswer:"``) for causal LMs; an encoder reads the text (and pair) alone
  unless ``--template`` is given.

``--task lm --train-file F [--eval-file F] [--text-field text]``: every row's text is one training
sequence (cut at ``--max-length`` tokens); the loss is the next-token cross-entropy of all its
tokens and evaluation reports the perplexity ``exp(mean token loss)``.

Without ``--eval-file`` the evaluation rows are held out of the training file (``--eval-fraction``
of its rows, default 0.1, at least one and at most ``--eval-size``; disjoint from training), and
the run's notes say so. Every problem with the files (missing,
unreadable, empty, a missing column, an empty text, an unknown label, a template field that is no
column) is a :class:`~hosl.tasks.data.DataError` naming the file and the column, raised before any
model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Any

import datasets

from .data import DataError, _innermost, _quiet_datasets_log
from .sampling import TaskData, _split_shared_pool, mezo_subset_indices
from .templates import PromptTemplate

CUSTOM, LM = "custom", "lm"
FILE_TASKS = (CUSTOM, LM)
# file suffix -> (datasets builder, its options); na_filter=False: a text "null" or "NA" stays text
READERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {"na_filter": False}),
    ".tsv": ("csv", {"delimiter": "\t", "na_filter": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".txt": ("text", {}),  # --task lm: one text per non-blank line, in the column "text"
}
DEFAULT_TEMPLATE, DEFAULT_PAIR_TEMPLATE = "{text}\nAnswer:", "{text}\n{text_pair}\nAnswer:"


@dataclass(frozen=True)
class FileTaskOptions:
    """The ``hosl train`` settings of a file task (the TrainConfig fields of the same names)."""

    task: str
    train_file: str | None = None
    eval_file: str | None = None
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    template: str | None = None
    verbalizer: str | None = None
    eval_fraction: float = 0.1  # without eval_file: the share of the training file held out

    @classmethod
    def of(cls, cfg) -> FileTaskOptions:
        defaults = cls(task=cfg.task)
        return cls(**{name: getattr(cfg, name, getattr(defaults, name)) for name in cls.__dataclass_fields__})


def is_file_task(task: str) -> bool:
    return isinstance(task, str) and task.strip().lower() in FILE_TASKS


def check_options(opts: FileTaskOptions) -> None:
    """The settings alone (no file is read): which flags go with which task."""
    file_flags = [
        f"--{name.replace('_', '-')}"
        for name in ("train_file", "eval_file", "template", "verbalizer", "text_pair_field")
        if getattr(opts, name)
    ]
    if not is_file_task(opts.task):
        if file_flags:
            raise ValueError(f"{', '.join(file_flags)} go with --task custom or --task lm, not --task {opts.task}")
        return
    fraction = opts.eval_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"--eval-fraction must be a number in (0, 1), got {fraction!r}")
    if not opts.train_file:
        raise ValueError(f"--task {opts.task} needs --train-file F (csv, tsv, json or jsonl; .txt for lm)")
    if opts.task == LM:
        extra = [f for f in file_flags if f in ("--template", "--verbalizer", "--text-pair-field")]
        if extra:
            raise ValueError(f"{', '.join(extra)} go with --task custom, not --task lm")


# -- reading ---------------------------------------------------------------------------------------


def read_rows(path: str, flag: str, task: str) -> list[dict]:
    """The rows of a local csv/tsv/json/jsonl file (or a .txt for ``--task lm``: one row per
    non-blank line); DataError naming ``flag`` and the file otherwise."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{flag} {path}: no such file")
    suffix = file.suffix.lower()
    if suffix not in READERS:
        raise DataError(
            f"{flag} {path}: unknown format {suffix or '(no suffix)'!r}; expected .csv, .tsv, .json or .jsonl "
            "(or .txt for --task lm)"
        )
    builder, options = READERS[suffix]
    if suffix == ".txt" and task != LM:
        raise DataError(
            f"{flag} {path}: a .txt file has one text per line and no labels; --task custom needs "
            ".csv, .tsv, .json or .jsonl with a label column"
        )
    if file.stat().st_size == 0:
        raise DataError(f"{flag} {path}: the file is empty")
    bars_were_off = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()  # a user's small file needs no "Generating train split" bar
    try:
        with _quiet_datasets_log():
            rows = datasets.load_dataset(builder, data_files={"train": str(file)}, split="train", **options).to_list()
    except Exception as exc:  # datasets wraps the parser's error (pandas, pyarrow)
        raise DataError(f"{flag} {path}: cannot be read as {suffix[1:]} ({_innermost(exc)})") from exc
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    if suffix == ".txt":  # blank lines separate paragraphs; they are not texts
        rows = [row for row in rows if row["text"].strip()]
    if not rows:
        raise DataError(f"{flag} {path}: no rows")
    return rows


def _check_columns(rows: list[dict], path: str, flag: str, columns: dict[str, str]) -> None:
    """``columns``: column name -> the flag that named it; each must exist and hold text in every row."""
    have = list(rows[0])
    for column, option in columns.items():
        if column not in have:
            raise DataError(f"{flag} {path}: no column {column!r} ({option}); its columns are {', '.join(have)}")
    for i, row in enumerate(rows):
        for column, option in columns.items():
            value = row.get(column)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{flag} {path}: row {i + 1}, column {column!r} ({option}) is empty")


def _label_key(value) -> str:
    return str(value).strip() if not isinstance(value, bool) else str(value).lower()


def parse_verbalizer(text: str) -> dict[str, str]:
    """``"neg=terrible,pos=great"`` or a JSON object -> {label: word}, in the order given."""
    text = text.strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--verbalizer: not a JSON object ({exc})") from None
        if not isinstance(mapping, dict):
            raise ValueError("--verbalizer: expected a JSON object of label: word")
        pairs = [(_label_key(k), str(v)) for k, v in mapping.items()]
    else:
        pairs = []
        for item in text.split(","):
            if "=" not in item:
                raise ValueError(f"--verbalizer: expected LABEL=WORD pairs separated by commas, got {item!r}")
            label, word = item.split("=", 1)
            pairs.append((_label_key(label), word.strip()))
    words = dict(pairs)
    repeated = sorted({label for label, _ in pairs if sum(other == label for other, _ in pairs) > 1})
    if repeated:
        raise ValueError(f"--verbalizer: label {repeated[0]!r} is listed more than once; give each label once")
    if len(words) < 2:
        raise ValueError(f"--verbalizer: needs at least two distinct labels, got {', '.join(map(repr, words))}")
    empty = [label for label, word in words.items() if not word]
    if empty:
        raise ValueError(f"--verbalizer: label {empty[0]!r} has an empty word; every label needs one")
    return words


def _sorted_labels(values: set[str]) -> list[str]:
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def label_words(opts: FileTaskOptions, train_rows: list[dict] | None = None) -> dict[str, str]:
    """{label: answer word} in label order (index = class id) for ``--task custom``."""
    if train_rows is None:
        train_file = _train_file(opts)
        train_rows = read_rows(train_file, "--train-file", opts.task)
        _check_columns(train_rows, train_file, "--train-file", {opts.label_field: "--label-field"})
    seen = {_label_key(row[opts.label_field]) for row in train_rows}
    if opts.verbalizer:
        words = parse_verbalizer(opts.verbalizer)
        unknown = sorted(seen - words.keys())
        if unknown:
            raise DataError(
                f"--train-file {opts.train_file}: column {opts.label_field!r} has label(s) "
                f"{', '.join(map(repr, unknown[:5]))} that --verbalizer does not list ({', '.join(words)})"
            )
        return words
    if len(seen) < 2:
        raise DataError(
            f"--train-file {opts.train_file}: column {opts.label_field!r} holds one label value "
            f"({next(iter(seen))!r}); classification needs at least two"
        )
    numeric = _sorted_labels({v for v in seen if v.lstrip("-").isdigit()})
    named = sorted(seen.difference(numeric))
    if numeric and named:  # 0/1 beside "neg"/"pos": most likely two spellings of the same classes
        raise DataError(
            f"--train-file {opts.train_file}: column {opts.label_field!r} mixes numeric labels "
            f"({', '.join(numeric[:5])}) with named ones ({', '.join(named[:5])}); write every label one way, "
            f"or list the classes with --verbalizer if they really are {len(seen)} different ones"
        )
    return {label: label for label in _sorted_labels(seen)}


def _train_file(opts: FileTaskOptions) -> str:
    """``--train-file``, which :func:`check_options` requires of a file task."""
    fraction = opts.eval_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"--eval-fraction must be a number in (0, 1), got {fraction!r}")
    if not opts.train_file:
        raise ValueError(f"--task {opts.task} needs --train-file F (csv, tsv, json or jsonl; .txt for lm)")
    return opts.train_file


def num_labels(opts: FileTaskOptions) -> int | None:
    """Classes of a custom task (read from the training file's label column); None for ``lm``."""
    return len(label_words(opts)) if opts.task == CUSTOM else None


# -- templates ---------------------------------------------------------------------------------------


class CustomTemplate(PromptTemplate):
    task = CUSTOM
    option_prefix = " "

    def __init__(self, words: list[str], template: str | None, has_pair: bool):
        self.verbalizer = tuple(words)
        self.template = template or (DEFAULT_PAIR_TEMPLATE if has_pair else DEFAULT_TEMPLATE)
        self.user_template = template is not None
        self.has_pair = has_pair

    @property
    def num_options(self) -> int:
        return len(self.verbalizer)

    def encode(self, example: dict) -> str:
        return self.template.format_map(example)

    def classifier_text(self, example: dict) -> str:
        if self.user_template:
            return self.encode(example).rstrip()
        return f"{example['text']}\n{example['text_pair']}" if self.has_pair else example["text"]


class LMTemplate(PromptTemplate):
    """Each text is the single 'option' of an empty prompt: the causal-LM batching then trains on,
    and scores, every token of it (the first is predicted from the tokenizer's BOS, if it adds one)."""

    task = LM
    truncate_option = True  # a text longer than --max-length is cut, not refused
    reports_perplexity = True

    @property
    def num_options(self) -> int:
        return 1

    def encode(self, example: dict) -> str:
        return ""

    def options(self, example: dict) -> list[str]:
        return [example["text"]]

    def label(self, example: dict) -> int:
        return 0

    def classifier_text(self, example: dict) -> str:
        return example["text"]


def _check_template(template: str, row: dict, path: str, flag: str) -> None:
    fields = {name for _, name, _, _ in Formatter().parse(template) if name}
    missing = sorted(f for f in fields if f.split(".")[0].split("[")[0] not in row)
    if missing:
        raise DataError(
            f"--template uses {{{missing[0]}}}, which is not a column of {flag} {path} "
            f"(columns: {', '.join(k for k in row if k not in ('label',))})"
        )


# -- sampling ----------------------------------------------------------------------------------------


def _examples(rows, opts: FileTaskOptions, path: str, flag: str, words: dict[str, str] | None) -> list[dict]:
    columns = {opts.text_field: "--text-field"}
    if opts.task == CUSTOM:
        columns[opts.label_field] = "--label-field"
        if opts.text_pair_field:
            columns[opts.text_pair_field] = "--text-pair-field"
    _check_columns(rows, path, flag, columns)
    examples = []
    index = {label: i for i, label in enumerate(words or {})}
    for i, row in enumerate(rows):
        example: dict[str, Any] = {k: (v if isinstance(v, str) else str(v)) for k, v in row.items() if v is not None}
        example["text"] = str(row[opts.text_field])
        if opts.task == CUSTOM:
            if opts.text_pair_field:
                example["text_pair"] = str(row[opts.text_pair_field])
            label = _label_key(row[opts.label_field])
            if label not in index:
                known = "--verbalizer's labels" if opts.verbalizer else "the training labels"
                raise DataError(
                    f"{flag} {path}: row {i + 1}, column {opts.label_field!r} has label {label!r}, which "
                    f"{known} ({', '.join(index)}) do not include"
                )
            example["label"] = index[label]
        examples.append(example)
    if opts.task == CUSTOM and opts.template:
        _check_template(opts.template, examples[0], path, flag)
    return examples


def sample_file_task(opts: FileTaskOptions, train_size: int, eval_size: int, seed: int = 0) -> TaskData:
    """Train and eval sets of a file task, sampled as the built-in tasks are (MeZO's seeded draw)."""
    check_options(opts)
    train_file = _train_file(opts)
    train_rows = read_rows(train_file, "--train-file", opts.task)
    words = None
    if opts.task == CUSTOM:
        _check_columns(train_rows, train_file, "--train-file", {opts.label_field: "--label-field"})
        words = label_words(opts, train_rows)
    pool = _examples(train_rows, opts, train_file, "--train-file", words)
    notes = []
    if opts.eval_file:
        eval_pool = _examples(
            read_rows(opts.eval_file, "--eval-file", opts.task), opts, opts.eval_file, "--eval-file", words
        )
        train = [pool[i] for i in mezo_subset_indices(len(pool), train_size, seed)]
        evaluation = [eval_pool[i] for i in mezo_subset_indices(len(eval_pool), eval_size, seed)]
    else:
        if len(pool) < 2:
            raise DataError(
                f"--train-file {opts.train_file}: one row cannot give both training and evaluation "
                "examples; add rows or pass --eval-file"
            )
        train, evaluation = _split_shared_pool(
            opts.task, pool, train_size, eval_size, seed, seed, eval_fraction=opts.eval_fraction
        )
        notes.append(
            f"{opts.task}: no --eval-file; {len(evaluation)} of the {len(pool)} rows of {opts.train_file} "
            f"are held out for evaluation, {len(train)} others train."
        )
    template: PromptTemplate
    if words is not None:  # --task custom
        template = CustomTemplate(list(words.values()), opts.template, bool(opts.text_pair_field))
    else:
        template = LMTemplate()
    return TaskData(
        name=opts.task,
        train=train,
        eval=evaluation,
        template=template,
        notes=notes,
        num_labels=len(words) if words is not None else None,
    )


# -- for the training loop: any --task, built-in or file ---------------------------------------------


def sample_configured_task(cfg) -> TaskData:
    """The TaskData of ``cfg.task`` (built-in: ``sample_task``; custom / lm: the files), from a TrainConfig."""
    from .sampling import sample_task

    opts = FileTaskOptions.of(cfg)
    check_options(opts)
    if is_file_task(cfg.task):
        return sample_file_task(opts, cfg.train_size, cfg.eval_size, seed=cfg.seed)
    return sample_task(cfg.task, cfg.data_dir, cfg.train_size, cfg.eval_size, seed=cfg.seed)


def configured_num_labels(cfg) -> int | None:
    """Classes of ``cfg.task`` (None for ``lm``); raises for an unknown task or unusable custom files."""
    from .registry import get_task_spec

    opts = FileTaskOptions.of(cfg)
    check_options(opts)
    if is_file_task(cfg.task):
        return num_labels(opts)
    return get_task_spec(cfg.task).num_labels


def configured_label_names(cfg) -> list[str] | None:
    """Class names of ``cfg.task`` in label order (custom: its labels, from the training file or
    ``--verbalizer``; a built-in task: its registry's), None for ``lm``."""
    from .registry import get_task_spec

    opts = FileTaskOptions.of(cfg)
    check_options(opts)
    if cfg.task == LM:
        return None
    if cfg.task == CUSTOM:
        return list(label_words(opts))
    return list(get_task_spec(cfg.task).label_names)


def configured_prompt(cfg) -> dict:
    """How a run's causal LM is prompted and scored: ``{"template", "verbalizer"}`` (``hosl
    export`` records it). Custom: the format string and {label: word}; a built-in task: its
    template's name (hosl/tasks/templates.py) and {label: word}; ``lm``: no prompt."""
    from .templates import get_template

    opts = FileTaskOptions.of(cfg)
    check_options(opts)
    if cfg.task == LM:
        return {"template": None, "verbalizer": None}
    if cfg.task == CUSTOM:
        has_pair = bool(opts.text_pair_field)
        template = opts.template or (DEFAULT_PAIR_TEMPLATE if has_pair else DEFAULT_TEMPLATE)
        return {"template": template, "verbalizer": label_words(opts)}
    builtin = get_template(cfg.task)
    names = configured_label_names(cfg) or []
    words = dict(zip(names, builtin.verbalizer)) if len(builtin.verbalizer) == len(names) else None
    return {"template": type(builtin).__name__, "verbalizer": words}
