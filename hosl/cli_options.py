"""Pieces of the command line that ``hosl/cli.py`` (``hosl train``) and ``hosl/cli_remote.py``
(``hosl serve``, ``--role``) share: option groups (your own data, ``--task custom`` / ``--task
lm``, with the rules in ``hosl/tasks/custom.py``; the schedule; ``--config FILE``) and the
TrainConfig of the parsed arguments. Both import this module and neither imports the other's
parser code back (``tests/test_training_structure.py`` checks hosl has no import circle)."""

from __future__ import annotations

import argparse
import re
import sys

# The data options as (flag, metavar, help); each one's default is TrainConfig's field of the flag's
# name and its value a string, but for --eval-fraction's float (DATA_TYPES).
DATA_OPTIONS: tuple[tuple[str, str | None, str], ...] = (
    ("--train-file", "F", "training rows: .csv, .tsv, .json or .jsonl (read with the datasets library)"),
    ("--eval-file", "F", "evaluation rows (default: --eval-fraction of --train-file's rows, held out of training)"),
    (
        "--eval-fraction",
        "F",
        "without --eval-file: the share of --train-file's rows held out for evaluation, at least one and at "
        "most --eval-size (default %(default)s)",
    ),
    ("--text-field", "COLUMN", "the text column (default %(default)s)"),
    ("--text-pair-field", "COLUMN", "custom: a second text column (premise/hypothesis style; default none)"),
    ("--label-field", "COLUMN", "custom: the label column; the classes are its distinct values (default %(default)s)"),
    (
        "--template",
        None,
        "custom: prompt as a format string over the columns, e.g. 'Review: {text}\\nSentiment:' (default "
        "'{text}\\nAnswer:'; an encoder reads the bare text unless given)",
    ),
    (
        "--verbalizer",
        "L=W,...",
        "custom: the answer word of each label, e.g. 'neg=terrible,pos=great' or a JSON object (default: "
        "each label's own text)",
    ),
)
DATA_TYPES = {"--eval-fraction": float}


def add_data_args(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("your own data (--task custom: classification; --task lm: plain text, perplexity)")
    for flag, metavar, text in DATA_OPTIONS:
        dest = flag[2:].replace("-", "_")
        g.add_argument(flag, type=DATA_TYPES.get(flag, str), default=getattr(d, dest), metavar=metavar, help=text)


def add_command(sub, name: str, run) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``, which ``run(args)`` carries out: the first paragraph of
    ``run``'s docstring is the line in ``hosl --help``, the rest the command's description, and its
    --help shows every option's default."""
    summary, _, description = run.__doc__.partition("\n\n")
    p = sub.add_parser(
        name,
        help=" ".join(summary.split()),
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.set_defaults(func=run)
    return p


def config_from(args: argparse.Namespace):
    """The TrainConfig of parsed ``hosl train`` / ``hosl serve`` arguments (other attributes, such as
    the connection flags, are not TrainConfig's and are left out)."""
    from dataclasses import fields

    from hosl.training.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="settings from a .json or .yaml file (keys: TrainConfig's field names, e.g. a run's "
        "config.json, which reproduces that run); flags given on the command line win",
    )


# Settings that say what this one command does to --out, not how the run trains: taken from the
# command line only (a run's config.json records "overwrite": true when that run was started with it).
ONE_SHOT = ("resume", "overwrite", "overrides")


def read_config_file(path: str) -> dict:
    """{TrainConfig field: value} from a .json/.yaml file, less the ``ONE_SHOT`` settings; a one-line
    ValueError for anything else."""
    from dataclasses import fields
    from pathlib import Path

    from hosl.training.config import TrainConfig

    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: not a JSON or YAML file (not UTF-8 text)") from None
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            import json

            values = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        first = " ".join(str(exc).split())
        raise ValueError(
            f"--config {path}: not valid {'YAML' if file.suffix.lower() in ('.yaml', '.yml') else 'JSON'} ({first})"
        ) from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of setting: value, got {type(values).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ValueError(
            f"--config {path}: unknown setting(s) {', '.join(map(repr, unknown[:5]))}; the keys are "
            "TrainConfig's field names (hosl/training/config.py; the ZO options' come from ZOConfig in "
            "hosl/optim/config.py), as in a run's config.json"
        )
    defaults = TrainConfig()
    nulls = sorted(k for k, v in values.items() if v is None and getattr(defaults, k) is not None)
    if nulls:
        raise ValueError(
            f"--config {path}: {nulls[0]} is null; give it a value (or leave the key out for its "
            f"default, {getattr(defaults, nulls[0])!r})"
        )
    for key in ONE_SHOT:  # a run's config.json records them: never let a file resume or replace a run
        if values.pop(key, None):
            flag = "--override" if key == "overrides" else f"--{key}"
            print(
                f"[hosl] --config {path}: {key} is not taken from a config file; pass {flag} if you mean it",
                file=sys.stderr,
            )
    return values


# What argparse takes for a negative value rather than an option: -1, -.5, and (beyond argparse's own
# pattern) -1e-3 and -1GiB, so `--lr-client -1e-3` reaches the option's own check (no option of hosl
# looks like a number).
NEGATIVE_VALUE = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?[A-Za-z]*$")


def accept_negative_values(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` and its subcommands' parsers read ``-1e-3`` as a value (see NEGATIVE_VALUE)."""
    parser._negative_number_matcher = NEGATIVE_VALUE  # argparse's own attribute for this pattern
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                accept_negative_values(sub)


def resumed_config(args: argparse.Namespace) -> str | None:
    """``hosl train --resume --out RUN`` without ``--config``: RUN's ``config.json``, when there is
    one, so the run continues with its own settings and only the flags given change them."""
    if getattr(args, "command", None) != "train" or not getattr(args, "resume", False):
        return None
    from pathlib import Path

    from hosl.training import run_folder

    out = Path(args.out)
    return str(out / run_folder.CONFIG) if run_folder.kind_of(out) == "run" else None


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; when the command got ``--config FILE`` (or is ``train --resume``
    of a run folder: its ``config.json``), the file's values become that command's defaults and the
    arguments are parsed again, so explicit flags still win."""
    accept_negative_values(parser)
    args = parser.parse_args(argv)
    path = getattr(args, "config", None) or resumed_config(args)
    if not path:
        return args
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subparsers.choices[args.command].set_defaults(**read_config_file(path))
    return parser.parse_args(argv)


def add_schedule_args(p: argparse.ArgumentParser, d) -> None:
    g = p.add_argument_group("optimizers and learning-rate schedule (hosl/training/schedule.py)")
    g.add_argument(
        "--server-optimizer",
        default=d.server_optimizer,
        choices=("sgd", "adamw"),
        help="the server half's optimizer in hosl and fo-sl: SGD with --momentum, or AdamW (default %(default)s)",
    )
    g.add_argument(
        "--lr-schedule",
        default=d.lr_schedule,
        choices=("constant", "linear", "cosine"),
        help="every optimizer's learning rate over --steps, after the warmup (default %(default)s)",
    )
    g.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help="linear warmup over the first N steps (default %(default)s)",
    )


def summary_lines(summary: dict, extra: tuple[str, ...] = ()) -> dict:
    """What ``hosl train`` prints at the end: the run, its last evaluation (accuracy, or perplexity
    for --task lm), the client's peak bytes, the training seconds, then ``extra`` keys."""
    metric = "eval_perplexity" if summary.get("eval_perplexity") is not None else "eval_accuracy"
    keys = ("mode", "task", "model", "steps", metric, "client_peak_bytes", "seconds", *extra)
    return {k: summary.get(k) for k in keys}
