"""The ``hosl`` command: ``train`` one run (or its client half, ``--role client``), ``serve`` the
server half of a two-process run or a fleet (hosl/cli_remote.py), ``export`` a run as a Hugging Face
model folder (hosl/cli_export.py), ``plot`` runs' curves (hosl/cli_plot.py), ``demo`` (HOSL vs
ZO-SL vs FO-SL side by side), ``info``.

Exit status: 0 done; 2 a usage error, a refused input (argument, run folder, checkpoint, data
file) or a lost/refusing peer, reported as one ``hosl: error: ...`` line on stderr (set
HOSL_DEBUG=1 for the traceback); 130 interrupted (Ctrl-C). See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from hosl import cli_export, cli_options, cli_plot, cli_remote
from hosl.models import MODEL_NAMES, architectures
from hosl.models.lora import LORA_HALVES
from hosl.optim.config import field_help, train_fields, train_name
from hosl.training.config import MAX_SEED, TrainConfig, flag
from hosl.training.modes import MODES
from hosl.training.recipes import RECIPES
from hosl.training.run_folder import OVERRIDABLE
from hosl.training.tracking import REPORT_TO

DEFAULT_DATA_DIR = "../shared/data"


def finite_float(text: str) -> float:
    """argparse type: a finite number (``inf`` and ``nan`` are refused here, not found later in the weights)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {text}")
    return value


def _query_batch(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {text!r}")
    return value


def _betas(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers B1,B2, got {text!r}")
    try:
        return finite_float(parts[0]), finite_float(parts[1])
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected two finite numbers B1,B2, got {text!r}") from None


# how a ZOConfig field's flag parses (its metadata's cli["type"]; none: a string)
CLI_TYPES = {"int": int, "float": finite_float, "seed": seed_int, "query_batch": _query_batch, "betas": _betas}


def add_zo_args(p, defaults: TrainConfig, group: str) -> None:
    """The flags of the ZOConfig fields ``hosl train`` exposes whose ``cli["group"]`` is ``group``
    (``"zo"``, the default, or ``"run"``), from their metadata: name, help, type, choices; the
    default is TrainConfig's."""
    for f in train_fields():
        cli = f.metadata["cli"]
        if cli.get("group", "zo") != group:
            continue
        name = train_name(f)
        kwargs = {
            k: v
            for k, v in (
                ("type", CLI_TYPES.get(cli.get("type"))),
                ("choices", cli.get("choices")),
                ("metavar", cli.get("metavar")),
            )
            if v is not None
        }
        p.add_argument(flag(name), dest=name, default=getattr(defaults, name), help=field_help(f), **kwargs)


def _lora_defaults() -> str:
    """``q_proj,v_proj for OPT, ...; c_attn for GPT-2``: each registered architecture's LoRA targets."""
    by_targets: dict[tuple[str, ...], list[str]] = {}
    for arch in architectures.ARCHITECTURES.entries():
        by_targets.setdefault(arch.lora_targets, []).append(arch.title)
    return "; ".join(f"{','.join(t)} for {', '.join(titles)}" for t, titles in by_targets.items())


def _add_train_args(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    d = defaults
    p.add_argument(
        "--model",
        default=d.model,
        help=f"hub name, local folder, or {' | '.join(MODEL_NAMES)} (default {d.model}); families: "
        f"{architectures.titles()}",
    )
    p.add_argument(
        "--task",
        default=d.task,
        help="sst2 | rte | cb | boolq | wsc | wic | copa | multirc, or custom | lm "
        "with --train-file (your own data; default %(default)s)",
    )
    cli_options.add_data_args(p, d)
    cli_options.add_config_arg(p)
    cli_options.add_schedule_args(p, d)
    p.add_argument("--mode", default=d.mode, choices=MODES, help="who trains how (default %(default)s)")
    p.add_argument("--cut", type=int, default=d.cut, help="blocks on the client (default %(default)s)")
    p.add_argument(
        "--dropout",
        default=d.dropout,
        choices=("off", "on"),
        help="dropout while training, the same in every mode (default %(default)s, as MeZO: a ZO "
        "estimate needs its + and - passes to see the same function)",
    )
    add_zo_args(p, d, "run")  # --lr-client, --weight-decay, --seed, --backend (ZOConfig's; the FO modes use them too)
    p.add_argument(
        "--lr-server", type=finite_float, default=d.lr_server, help="server SGD learning rate (default %(default)s)"
    )
    p.add_argument(
        "--momentum", type=finite_float, default=d.momentum, help="SGD momentum of FO optimizers (default %(default)s)"
    )
    add_zo_args(
        p.add_argument_group(
            "zeroth-order options (the ZO-trained halves of hosl, zo-sl, zo; hosl/optim/config.py ZOConfig)"
        ),
        d,
        "zo",
    )
    g = p.add_argument_group("LoRA (peft)")
    g.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters instead of all weights; checkpoints then hold the adapters only",
    )
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="adapter rank (default %(default)s)")
    g.add_argument(
        "--lora-alpha", type=finite_float, default=d.lora_alpha, help="scaling alpha/r (default %(default)s)"
    )
    g.add_argument(
        "--lora-targets",
        default=d.lora_targets,
        metavar="NAMES",
        help=f"comma-separated module names to adapt (default: {_lora_defaults()})",
    )
    g.add_argument(
        "--lora-halves",
        default=d.lora_halves,
        choices=LORA_HALVES,
        help="which half gets adapters; the other trains all its weights (default %(default)s)",
    )
    p.add_argument(
        "--client-params",
        default=d.client_params,
        metavar="GLOBS",
        help="train only the client parameters whose names match one of these comma-separated fnmatch "
        "patterns (names as the client half's named_parameters() gives them, e.g. '*LayerNorm*' or "
        "'*.bias'; the word norms: every normalisation layer's parameters, whatever the architecture names "
        "them); the rest of the client is frozen, ZO perturbs only these, and with --lora it narrows "
        "the adapters; not with --mode frozen-client (default: every client parameter)",
    )
    p.add_argument(
        "--recipe",
        default=d.recipe,
        choices=RECIPES,
        metavar="NAME",
        help=f"a named, measured recipe: {RECIPES.help()}; it fills in only the settings not given "
        "(docs/time_to_accuracy.md; default: none)",
    )
    p.add_argument(
        "--client-memory-budget",
        default=d.client_memory_budget,
        metavar="SIZE",
        help="hosl / zo-sl: e.g. 1.0GiB; pick --client-micro-batch from the client's measured per-row "
        "cost, refusing a budget below weights + output activation (default: none)",
    )
    p.add_argument(
        "--client-checkpointing",
        action="store_true",
        help="fo-sl: run each client block under torch.utils.checkpoint (keeps block inputs, "
        "recomputes the rest in backward)",
    )
    p.add_argument(
        "--client-fused-step",
        action="store_true",
        help="fo-sl: apply the client's SGD step to each parameter inside backward and free its "
        "gradient at once (plain SGD with momentum)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step (default %(default)s)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example (default %(default)s)")
    p.add_argument(
        "--train-size", type=int, default=d.train_size, help="training examples sampled (default %(default)s)"
    )
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="evaluation examples (default %(default)s)")
    p.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="steps between evaluations (default: 4 per run)"
    )
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="(default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="(default: at each evaluation)")
    p.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="local task data laid out as ../shared/data (default: the Hugging Face hub)",
    )
    p.add_argument(
        "--out",
        default=d.out,
        help="run folder: new or empty, or (with --resume/--overwrite) one that holds a run; "
        "any other folder is refused (default %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest intact checkpoint, with the settings of its "
        "config.json (--resume --out RUN alone is enough); a flag given that changes the trajectory "
        "must match the run's (steps and eval/checkpoint cadence may change; steps under a "
        "linear/cosine --lr-schedule only with --override steps)",
    )
    p.add_argument(
        "--override",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD",
        help=f"with --resume: allow FIELD to differ from the run's: {', '.join(sorted(OVERRIDABLE))}; "
        "repeatable; recorded in metrics.jsonl and resumes.jsonl",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds one (hosl's files there are replaced)",
    )
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "float16", "bfloat16"), help="(default %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--report-to",
        default=d.report_to,
        choices=REPORT_TO,
        help="also send every metrics.jsonl record to TensorBoard (event files in OUT/tensorboard; "
        "pip install 'hosl[track]') or W&B (offline, OUT/wandb; pip install wandb) "
        "(default %(default)s)",
    )
    cli_remote.add_fleet_args(p, d)


def _cmd_train(args) -> int:
    from hosl.training.loop import train

    if args.role != "local":
        return cli_remote.cmd_train_remote(args)
    cfg = cli_options.config_from(args)
    if cfg.clients:
        raise ValueError(
            f"--clients {cfg.clients} is a fleet: start the server with hosl serve --clients "
            f"{cfg.clients} and each client with hosl train --role client --clients {cfg.clients} "
            "--rank R (docs/fleet.md)"
        )
    if args.server_procs != 1:
        summary = _train_with_server_procs(cfg, args)
    else:
        summary = train(cfg)
    print(json.dumps(cli_options.summary_lines(summary), indent=2))
    return 0


def _train_with_server_procs(cfg: TrainConfig, args) -> dict:
    """``hosl train --server-procs P``: the in-process server half as rank 0 of P processes."""
    from hosl.training.loop import run_loop
    from hosl.training.run import build_run
    from hosl.training.server_ranks import check_server_procs, server_ranks

    cfg.validate()
    check_server_procs(cfg, args.server_procs, args.server_parallel)
    with server_ranks(
        cfg, args.server_procs, args.server_parallel, timeout_s=args.connect_timeout, backend=args.dist_backend
    ) as group:
        return run_loop(build_run(cfg, server_group=group))


DEMO: dict[str, Any] = dict(
    model="minilm-l6",
    task="sst2",
    cut=2,
    num_queries=2,
    eps=1e-3,
    steps=150,
    batch_size=16,
    max_length=64,
    train_size=1000,
    eval_size=300,
    eval_every=50,
    lr_server=1e-2,
)
DEMO_MODES = ("hosl", "zo-sl", "fo-sl")
DEMO_CLIENT_LR = {"hosl": 1e-5, "zo-sl": 1e-5, "fo-sl": 1e-3}  # FO 1e-2 made FO-SL unstable (docs/accuracy.md)


def _cmd_demo(args) -> int:
    from hosl.training.loop import train

    data_dir = args.data_dir
    if data_dir is None and Path(DEFAULT_DATA_DIR).is_dir():
        data_dir = DEFAULT_DATA_DIR
    rows = []
    for mode in DEMO_MODES:
        cfg = TrainConfig(
            mode=mode,
            data_dir=data_dir,
            out=str(Path(args.out) / mode),
            seed=args.seed,
            lr_client=DEMO_CLIENT_LR[mode],
            progress=args.progress,
            resume=args.resume,
            overwrite=args.overwrite,
            steps=args.steps or DEMO["steps"],
            **{k: v for k, v in DEMO.items() if k != "steps"},
        )
        print(
            f"[hosl] demo: {mode} on {cfg.model}/{cfg.task}, {cfg.steps} steps, Q={cfg.num_queries}, cut={cfg.cut}",
            file=sys.stderr,
            flush=True,
        )
        rows.append(train(cfg))
    header = f"{'mode':8} {'eval acc (start -> end)':>26} {'client bytes':>14} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for s in rows:
        start = s["eval_history"][0]["eval_accuracy"]
        print(
            f"{s['mode']:8} {start:>12.3f} -> {s['eval_accuracy']:<11.3f} {s['client_peak_bytes']:>14,} {s['seconds']:>8.1f}"
        )
    (Path(args.out) / "demo.json").write_text(json.dumps(rows, indent=2))
    return 0


def _cmd_info(args) -> int:
    import torch

    import hosl
    from hosl import ops

    print(f"hosl {hosl.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    print(f"backends available: {', '.join(ops.available_backends())}")
    for name, why in ops.unavailable_reasons().items():
        print(f"  {name}: not available ({why})")
    from hosl.ops.backends import cpu

    if cpu.is_available():  # which SIMD variant the C++ kernels run (HOSL_CPU_ISA can lower it)
        print(
            f"cpu kernels: ISA {cpu.isa()} (this CPU supports: {', '.join(cpu.supported_isas())}) on {cpu.cpu_model()}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hosl", description="Hybrid-Order Split Learning")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train one run (see --mode)")
    _add_train_args(p_train, TrainConfig())
    cli_remote.add_role_arg(p_train)
    cli_remote.add_connection_args(p_train)
    cli_remote.add_server_procs_args(p_train)
    p_train.set_defaults(func=_cmd_train)
    cli_remote.register(sub, _add_train_args, TrainConfig())
    cli_export.register(sub)
    cli_plot.register(sub)
    p_demo = sub.add_parser("demo", help="MiniLM-L6 on SST-2: HOSL vs ZO-SL vs FO-SL side by side (CPU, ~5 minutes)")
    p_demo.add_argument(
        "--data-dir", default=None, help=f"task data (default {DEFAULT_DATA_DIR} if present, else the hub)"
    )
    p_demo.add_argument("--out", default="runs/demo", help="(default %(default)s)")
    p_demo.add_argument("--steps", type=int, default=None, help=f"steps per mode (default {DEMO['steps']})")
    p_demo.add_argument("--seed", type=seed_int, default=0)
    p_demo.add_argument("--resume", action="store_true", help="continue the three runs in --out")
    p_demo.add_argument("--overwrite", action="store_true", help="replace the three runs in --out")
    p_demo.add_argument("--no-progress", dest="progress", action="store_false")
    p_demo.set_defaults(func=_cmd_demo)
    p_info = sub.add_parser("info", help="which kernels are built and available")
    p_info.set_defaults(func=_cmd_info)
    return parser


def main(argv=None) -> int:
    try:
        args = cli_options.parse_with_config(build_parser(), argv)
    except ValueError as exc:  # an unusable --config file
        print(f"hosl: error: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as exc:
        # the project's user-facing errors (bad input, refused folder or checkpoint, lost peer):
        # one line, no traceback; anything else is a bug and keeps its traceback
        if os.environ.get("HOSL_DEBUG"):
            raise
        print(f"hosl: error: {one_line(exc)}", file=sys.stderr)
        return 2


def one_line(exc: BaseException) -> str:
    """The error's message on one line (an OSError without one: its strerror and file name)."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror and not text.startswith(exc.strerror):
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = " ".join(text.split())
    return text or exc.__class__.__name__


if __name__ == "__main__":
    sys.exit(main())
