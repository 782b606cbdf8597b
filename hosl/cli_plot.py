"""``hosl plot RUN [RUN...] --out curves.png``: loss and evaluation curves of runs; see ``hosl/plot.py``."""

from __future__ import annotations

from hosl import cli_options


def _cmd_plot(args) -> int:
    """draw runs' loss and evaluation against steps and seconds into one image (matplotlib)

    Training loss and evaluation (accuracy, or perplexity for --task lm) of each run, against steps
    and against training seconds, from the runs' metrics.jsonl; several runs share the figure, each
    labelled by its folder name."""
    from hosl.plot import plot_runs

    out = plot_runs(args.runs, args.out, smooth=args.smooth, title=args.title)
    print(out)
    return 0


def register(sub) -> None:
    p = cli_options.add_command(sub, "plot", _cmd_plot)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (the --out of hosl train)")
    p.add_argument("--out", required=True, help="image to write; its suffix picks the format (.png, .svg, .pdf)")
    p.add_argument("--smooth", type=int, default=10, help="training loss: mean over this many steps (1: raw)")
    p.add_argument("--title", default=None, help="a title over the figure")
