"""``ZOConfig``: every option of the zeroth-order optimizers, declared and validated in one place.

Both optimizers build one from their keywords (``ZerothOrderOptimizer(model, lr=1e-6, eps=1e-3)``)
or take it whole (``ZerothOrderOptimizer(model, config=ZOConfig(lr=1e-6))``; keywords given as
well override the config's fields, as :func:`dataclasses.replace` would), keep it as
``opt.config`` and read their options from it. The config is frozen: change an option with
``dataclasses.replace(config, ...)`` (which validates again), or build a new optimizer.

Each field's ``metadata`` says where else the option goes, so a new option is declared once:

* ``help``: what it does (the ``hosl train`` help text; ``%(default)s`` is the flag's default), or
  a function giving it when the parser is built (help that lists a registry: see :func:`field_help`).
* ``optimizers``: which optimizers take it (``"zo"``: :class:`~hosl.optim.zo.ZerothOrderOptimizer`,
  ``"hybrid"``: :class:`~hosl.optim.hybrid.HybridOrderOptimizer`). Another optimizer refuses it
  as a keyword (TypeError) and in a ``config=`` unless it is at its default
  (:meth:`ZOConfig.for_optimizer` resets such fields).
* ``param_group``: a per-group hyperparameter: it goes into every ``param_groups`` entry, where LR
  schedulers may change it (``opt.config`` keeps the value given at construction).
* ``train``: the training setting's name (``TrainConfig`` field, ``--config`` key, config.json
  key, ``--override`` key; the flag is ``--`` + the name with ``-`` for ``_``), or None for an
  option ``hosl train`` does not expose. ``train_default``: TrainConfig's default when it differs
  from the field's (None for ``lr``/``eps``: the paper's value for the mode and ``--lora``).
  ``hosl/training/config.py`` declares the TrainConfig field (name, type, default: written out,
  ``tests/test_zo_config.py`` checks they match), ``hosl/cli.py`` generates the flag.
* ``cli``: how the flag parses: ``type`` (a name in ``hosl.cli.CLI_TYPES``), ``choices``,
  ``metavar``, ``group`` (``"zo"``: the zeroth-order group of the help; ``"run"``: the main group,
  for the settings non-ZO modes use too: the client's learning rate, weight decay, seed, backend).
* ``agree``: both processes of a two-process run must have the same value (the handshake's
  fingerprint, ``hosl/training/remote.py``).
* ``on_resume``: ``"compare"`` (default: ``--resume`` refuses a change), ``"override"`` (a resume
  may change it with ``--override NAME``) or ``"ignore"`` (never compared).

docs/optimizer.md ("Options: ZOConfig") lists the steps for adding an option.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from hosl import ops
from hosl.directions.families import FAMILIES
from hosl.forward import PERTURBED_FORWARDS
from hosl.optim.linear_estimate import LINEAR_PLACEMENTS, SERVER_ESTIMATES
from hosl.optim.micro_batch import check_micro_batch
from hosl.optim.rules import RULES

DIFFERENCES = ("central", "forward")
SERVER_GRADS = ("clean", "perturbed")  # hosl: where the server's gradient is taken
CLIENT_UPDATES = ("joint", "per-direction")  # hosl: one client update per step, or one per direction
STEP_SCALES = ("none", "loss-std")
OPTIMIZERS = {"zo": "ZerothOrderOptimizer", "hybrid": "HybridOrderOptimizer"}
BOTH = ("zo", "hybrid")
# options whose default differs between the optimizers: ZOConfig() holds HOSL's (and hosl train's)
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {"zo": {"num_queries": 1}, "hybrid": {}}

# The paper's client settings, one home for every default that repeats them: ZOConfig's ``lr`` and
# ``eps`` (full fine-tuning, ZO), and ``hosl train``'s (TrainConfig.resolved_lr_client / resolved_eps:
# LoRA's for --lora, the FO rate for fo-sl and fo). hosl/integrations/trainer.py reads ZOConfig's.
ZO_LR, ZO_EPS = 1e-6, 1e-3
ZO_DIFFERENCE = "central"  # hosl train's --difference when not given (TrainConfig keeps None)
LORA_ZO_LR, LORA_ZO_EPS = 5e-5, 5e-3  # LoRA, r=8, alpha=16
FO_CLIENT_LR = 1e-3


def _short(x: float) -> str:
    """1e-06 -> '1e-6', as the help writes numbers."""
    mantissa, _, exponent = f"{x:.0e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


# How errors name a field: the field's own name, or (TrainConfig.validate) its --flag.
_LABEL: contextvars.ContextVar[Callable[[str], str]] = contextvars.ContextVar("zo_config_label", default=str)


def option(
    default,
    help: str | Callable[[], str],
    *,
    optimizers=BOTH,
    param_group: bool = False,
    train: str | None = "",
    train_default=dataclasses.MISSING,
    cli: Mapping | None = None,
    agree: bool = False,
    on_resume: str = "compare",
):
    """A ZOConfig field with its metadata (see the module docstring). ``train=""``: the field's name."""
    return field(
        default=default,
        metadata=dict(
            help=help,
            optimizers=tuple(optimizers),
            param_group=param_group,
            train=train,
            train_default=default if train_default is dataclasses.MISSING else train_default,
            cli=dict(cli or {}),
            agree=agree,
            on_resume=on_resume,
        ),
    )


def hybrid_choice(default: str, choices: Sequence[str], help: str):
    """An option of the hybrid optimizer alone (``hosl``'s client and server estimates), one of ``choices``."""
    return option(default, help, optimizers=("hybrid",), cli=dict(choices=choices))


@dataclass(frozen=True)
class ZOConfig:
    """The zeroth-order optimizers' options (see the module docstring for the metadata)."""

    lr: float = option(
        ZO_LR,
        f"client learning rate (default {_short(ZO_LR)} for ZO clients, {_short(LORA_ZO_LR)} with --lora; "
        f"{_short(FO_CLIENT_LR)} for FO clients)",
        param_group=True,
        train="lr_client",
        train_default=None,
        cli=dict(type="float", group="run"),
        agree=True,
        on_resume="override",
    )
    eps: float = option(
        ZO_EPS,
        f"ZO smoothing scale (default {_short(ZO_EPS)}; {_short(LORA_ZO_EPS)} with --lora)",
        param_group=True,
        train_default=None,
        cli=dict(type="float"),
        agree=True,
    )
    num_queries: int = option(10, "ZO directions Q per step (default %(default)s)", cli=dict(type="int"))
    weight_decay: float = option(
        0.0,
        "(not on biases and norms; default %(default)s)",
        param_group=True,
        cli=dict(type="float", group="run"),
        agree=True,
    )
    difference: str = option(
        ZO_DIFFERENCE,
        "central: 2Q perturbed passes; forward: Q, reusing the clean loss (default central)",
        train_default=None,  # hosl train: None is central, so a --recipe can tell "not given"
        cli=dict(choices=DIFFERENCES),
    )
    step_scale: str = option(
        "none",
        "none: the step is lr * g; loss-std: FZOO's normalised step, g divided by the standard deviation "
        "of the step's perturbed losses (each direction then moves the client by about lr/eps * z whatever the "
        "loss's scale: pick --lr-client for that; needs 2 or more perturbed losses; not with --server-estimate "
        "linear) (default %(default)s)",
        cli=dict(choices=STEP_SCALES),
    )
    seed: int = option(0, "0 .. 2**63-1 (default %(default)s)", cli=dict(type="seed", group="run"), agree=True)
    backend: str | None = option(
        None,
        "direction-op backend (default: the fastest available)",
        cli=dict(choices=ops.BACKENDS, group="run"),
        on_resume="ignore",
    )
    perturbed_forward: str = option(
        "auto", "how a perturbed pass runs: auto, scratch or fused (hosl/forward)", train=None
    )
    direction: str = option(
        "gaussian",
        lambda: (
            f"direction family: {FAMILIES.help()}; rademacher and sphere use the scratch perturbed "
            "forward, lowrank its own x W^T + s (x V) U^T / sqrt(R) (default %(default)s)"
        ),
        cli=dict(choices=FAMILIES),
        agree=True,
    )
    rank: int = option(
        1,
        "--direction lowrank: the rank R of each weight matrix's direction U V^T / sqrt(R) (at most "
        "m*n/(m+n) for an m x n weight; the other families ignore it; default %(default)s)",
        train="direction_rank",
        cli=dict(type="int", metavar="R"),
        agree=True,
    )
    resample_every: int = option(
        1,
        "--direction lowrank: keep each direction's U for K steps (LOZO's lazy subspace; V is fresh every "
        "step; the other families ignore it; default %(default)s: U fresh every step too)",
        cli=dict(type="int", metavar="K"),
        agree=True,
    )
    variant: str = option(
        "sgd",
        lambda: f"update rule on the ZO gradient estimate: {RULES.help()} (default %(default)s)",
        train="zo_optimizer",
        cli=dict(choices=RULES),
        agree=True,
    )
    momentum: float = option(
        0.9,
        "of --zo-optimizer momentum (default %(default)s)",
        param_group=True,
        train="zo_momentum",
        cli=dict(type="float"),
        agree=True,
    )
    betas: tuple[float, float] = option(
        (0.9, 0.999),
        "of --zo-optimizer adam (default 0.9,0.999)",
        param_group=True,
        train="zo_betas",
        cli=dict(type="betas", metavar="B1,B2"),
        agree=True,
    )
    adam_eps: float = option(1e-8, "the adam rule's epsilon", param_group=True, train=None, agree=True)
    coordinate_offset: int = option(
        0,
        "the first module's first coordinate (the ZO-SL server half: the client's coordinate count)",
        optimizers=("zo",),
        train=None,
    )
    query_batch: int | str = option(
        1,
        "hosl / zo: run D perturbed points in one client forward over a D x B batch (fused linear/embedding "
        "with D directions on CUDA), or 'auto' (the largest D within --query-memory-budget); default "
        "%(default)s: one point per forward, the least memory",
        cli=dict(type="query_batch", metavar="D"),
    )
    query_memory_budget: int | None = option(
        None,
        "bytes the batched points may add to the client's peak (--query-batch auto picks D from it; an "
        "explicit D beyond it is refused; default for auto: 1/4 of the client's weights)",
        cli=dict(type="int", metavar="BYTES"),
    )
    server_batch: int = option(
        1,
        "perturbed activations the server evaluates in one batch (default %(default)s: least memory)",
        optimizers=("hybrid",),
        cli=dict(type="int"),
        on_resume="override",
    )
    server_estimate: str = hybrid_choice(
        "exact",
        SERVER_ESTIMATES,
        "hosl: exact (the server runs every perturbed activation, default) or linear (dL/dh . (h+ - h-) "
        "/ 2eps from the server's clean backward: one server forward per step)",
    )
    linear_on: str = hybrid_choice(
        "server",
        LINEAR_PLACEMENTS,
        "linear estimate: the server computes the Q dot products (default; the client uploads Q "
        "activation differences) or the client does, after receiving dL/dh (which tells it about the labels; "
        "see docs/optimizer.md)",
    )
    server_grad: str = hybrid_choice(
        "clean",
        SERVER_GRADS,
        "hosl: where the server's gradient is taken: clean (one backward at the clean activation; default) "
        "or perturbed (at each direction's +eps activation, averaged over Q, as the authors' code does; "
        "docs/paper_settings.md)",
    )
    client_update: str = hybrid_choice(
        "joint",
        CLIENT_UPDATES,
        "hosl: joint (one client update over all Q directions; default) or per-direction (a plain "
        "ZO-SGD update after each direction's two passes, lr/Q times its estimate, as the authors' code steps "
        "per direction; docs/paper_settings.md)",
    )
    client_micro_batch: int | None = option(
        None,
        "hosl / zo-sl: run every client pass (clean and perturbed) M rows at a time and send the assembled "
        "activation; same update up to matmul rounding. fo-sl: forward and backward M rows at a time, gradients "
        "accumulated, one step (default: the whole batch)",
        optimizers=("hybrid",),
        cli=dict(type="int", metavar="M"),
        on_resume="override",
    )

    def __post_init__(self):
        label = _LABEL.get()
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        _number(self.lr, label("lr"), allow_zero=True)
        _number(self.eps, label("eps"))
        _number(self.num_queries, label("num_queries"), integer=True)
        _number(self.weight_decay, label("weight_decay"), allow_zero=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"{label('seed')} must be an integer, got {type(self.seed).__name__}")
        if not 0 <= self.seed < 2**63:  # what the CLI's --seed takes; the generators hold 64 bits
            raise ValueError(f"{label('seed')} must be an integer in [0, 2**63 - 1], got {self.seed}")
        _one_of(self.difference, DIFFERENCES, label("difference"))
        _one_of(self.step_scale, STEP_SCALES, label("step_scale"))
        if self.step_scale == "loss-std" and self.difference == "forward" and self.num_queries < 2:
            raise ValueError(
                f"{label('step_scale')}=loss-std divides by the spread of the perturbed losses: with "
                f"{label('difference')}=forward it needs {label('num_queries')} >= 2, got {self.num_queries}"
            )
        if self.backend is not None:
            _one_of(self.backend, ops.BACKENDS, label("backend"))
        _one_of(self.perturbed_forward, PERTURBED_FORWARDS, label("perturbed_forward"))
        _one_of(self.direction, FAMILIES, label("direction"))
        _number(self.rank, label("rank"), integer=True)
        _number(self.resample_every, label("resample_every"), integer=True)
        _one_of(self.variant, RULES, label("variant"))
        _fraction(self.momentum, label("momentum"))
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"{label('betas')} must be a pair (beta1, beta2), got {self.betas!r}")
        set_("betas", tuple(_fraction(b, f"{label('betas')}[{i}]") for i, b in enumerate(self.betas)))
        _number(self.adam_eps, label("adam_eps"))
        _number(self.coordinate_offset, label("coordinate_offset"), integer=True, allow_zero=True)
        qb = self.query_batch
        if qb != "auto" and (isinstance(qb, bool) or not isinstance(qb, int) or qb < 1):
            raise ValueError(f"{label('query_batch')} must be an integer >= 1 or 'auto', got {qb!r}")
        budget = self.query_memory_budget
        if budget is not None:
            if (
                isinstance(budget, bool)
                or not isinstance(budget, (int, float))
                or not math.isfinite(budget)
                or budget < 0
            ):
                raise ValueError(
                    f"{label('query_memory_budget')} must be a number of bytes >= 0 (or None), got {budget!r}"
                )
            set_("query_memory_budget", int(budget))
        if isinstance(self.server_batch, bool) or not isinstance(self.server_batch, int) or self.server_batch < 1:
            raise ValueError(f"{label('server_batch')} must be an integer >= 1, got {self.server_batch!r}")
        if qb != 1 and self.server_batch != 1:
            raise ValueError(
                f"{label('query_batch')}={qb!r} batches the perturbed points itself: it does not take "
                f"{label('server_batch')} > 1 ({label('client_micro_batch')} composes: M rows of each "
                "of the D copies)"
            )
        _one_of(self.server_estimate, SERVER_ESTIMATES, label("server_estimate"))
        if self.step_scale == "loss-std" and self.server_estimate == "linear":
            raise ValueError(
                f"{label('step_scale')}=loss-std needs the perturbed losses; {label('server_estimate')}"
                "=linear has only their linearisation (use --server-estimate exact)"
            )
        _one_of(self.linear_on, LINEAR_PLACEMENTS, label("linear_on"))
        check_micro_batch(self.client_micro_batch, label("client_micro_batch"))
        self._check_authors_step(label)

    def _check_authors_step(self, label) -> None:
        """``server_grad=perturbed`` and ``client_update=per-direction`` run one direction's passes at a
        time with the exact server estimate; per-direction steps are plain ZO-SGD."""
        _one_of(self.server_grad, SERVER_GRADS, label("server_grad"))
        _one_of(self.client_update, CLIENT_UPDATES, label("client_update"))
        for name, value, plain in (
            ("server_grad", self.server_grad, "clean"),
            ("client_update", self.client_update, "joint"),
        ):
            if value == plain:
                continue
            if self.server_estimate != "exact":
                raise ValueError(f"{label(name)}={value} needs {label('server_estimate')}=exact")
            if self.query_batch != 1 or self.server_batch != 1:
                raise ValueError(
                    f"{label(name)}={value} runs one perturbed point at a time: it does not take "
                    f"{label('query_batch')} or {label('server_batch')} > 1"
                )
        if self.client_update == "per-direction":
            if self.difference != "central":
                raise ValueError(
                    f"{label('client_update')}=per-direction needs {label('difference')}=central "
                    "(a forward difference would reuse a clean loss taken before the earlier updates)"
                )
            if self.variant != "sgd" or self.weight_decay != 0 or self.step_scale != "none":
                raise ValueError(
                    f"{label('client_update')}=per-direction steps plain ZO-SGD: it needs "
                    f"{label('variant')}=sgd, {label('weight_decay')}=0 and {label('step_scale')}=none"
                )

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, values: Mapping, *, label: Callable[[str], str] = str) -> ZOConfig:
        """``ZOConfig(**values)``, its errors naming each field as ``label(name)`` (TrainConfig: the --flag)."""
        token = _LABEL.set(label)
        try:
            return cls(**values)
        finally:
            _LABEL.reset(token)

    @classmethod
    def defaults_for(cls, optimizer: str) -> ZOConfig:
        """The defaults of ``optimizer`` (``"zo"`` or ``"hybrid"``): ``ZOConfig()`` but for the options
        whose default differs (ZerothOrderOptimizer: ``num_queries=1``, MeZO's)."""
        return cls(**OPTIMIZER_DEFAULTS[optimizer])

    def for_optimizer(self, optimizer: str) -> ZOConfig:
        """This config with the options ``optimizer`` does not take reset to their defaults (one config
        for a run: each of its optimizers gets the part that applies to it)."""
        reset: dict[str, Any] = {
            f.name: f.default
            for f in fields(self)
            if optimizer not in f.metadata["optimizers"] and getattr(self, f.name) != f.default
        }
        return dataclasses.replace(self, **reset) if reset else self

    @classmethod
    def of_optimizer(cls, optimizer: str, config: ZOConfig | None, options: Mapping) -> ZOConfig:
        """An optimizer's config from its ``config=`` and keyword options (keywords override the
        config's fields; without a config, they override :meth:`defaults_for`)."""
        owner = OPTIMIZERS[optimizer]
        by_name = {f.name: f for f in fields(cls)}
        for name in options:
            if name not in by_name:
                raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
            takers = by_name[name].metadata["optimizers"]
            if optimizer not in takers:
                raise TypeError(
                    f"{owner} does not take {name} (an option of {', '.join(OPTIMIZERS[t] for t in takers)})"
                )
        if config is None:
            base = cls.defaults_for(optimizer)
        elif not isinstance(config, cls):
            raise TypeError(f"config must be a ZOConfig, got {type(config).__name__}")
        else:
            base = config
            for f in fields(cls):
                if (
                    optimizer not in f.metadata["optimizers"]
                    and getattr(config, f.name) != f.default
                    and f.name not in options
                ):
                    raise ValueError(
                        f"config.{f.name}={getattr(config, f.name)!r} is an option of "
                        f"{', '.join(OPTIMIZERS[t] for t in f.metadata['optimizers'])}, not of {owner}; "
                        f"pass config.for_optimizer({optimizer!r}) (it resets such options to their defaults)"
                    )
        return dataclasses.replace(base, **options) if options else base

    # -- what other parts read ------------------------------------------------------------------
    def param_group_defaults(self) -> dict:
        """The per-group hyperparameters (a torch optimizer's ``defaults``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["param_group"]}

    def fingerprint(self) -> dict:
        """The options both processes of a two-process run must share (``agree``), by training name,
        as scalars: a pair ``name`` becomes ``name[0]``, ``name[1]``; float options as floats."""
        out = {}
        for f in fields(self):
            if not f.metadata["agree"]:
                continue
            key, value = train_name(f), getattr(self, f.name)
            if isinstance(value, tuple):
                out.update({f"{key}[{i}]": float(v) for i, v in enumerate(value)})
            else:
                out[key] = float(value) if f.type == "float" else value
        return out


# -- the training side's view -----------------------------------------------------------------
def field_help(f: dataclasses.Field) -> str:
    """The option's help text; a callable ``help`` is called now, so help that lists a registry
    (direction families, update rules) names the entries registered when the parser is built."""
    help_ = f.metadata["help"]
    return help_() if callable(help_) else help_


def train_name(f: dataclasses.Field) -> str:
    """The option's training name (``lr`` -> ``lr_client``), its own name when it has none."""
    return f.metadata["train"] or f.name


def train_fields() -> Iterator[dataclasses.Field]:
    """The ZOConfig fields ``hosl train`` exposes (``train`` is not None), in declaration order."""
    return (f for f in fields(ZOConfig) if f.metadata["train"] is not None)


def from_train_names(values: Mapping) -> dict:
    """``{field: value}`` from ``{training name: value}`` (every exposed option must be there)."""
    return {f.name: values[train_name(f)] for f in train_fields()}


def config_attribute(name: str, *, settable: bool = False) -> property:
    """An optimizer attribute that reads ``self.config.<name>``; settable ones replace the config
    (validated again)."""

    def get(self):
        return getattr(self.config, name)

    def set_(self, value):
        self.config = dataclasses.replace(self.config, **{name: value})

    return property(get, set_ if settable else None, doc=f"``config.{name}``")


def optimizer_signature(init, optimizer: str) -> inspect.Signature:
    """``init``'s signature with ``**options`` spelled out as the ZOConfig keywords ``optimizer``
    takes and their defaults (what ``help()`` and editors show)."""
    sig = inspect.signature(init)
    defaults = ZOConfig.defaults_for(optimizer)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=getattr(defaults, f.name), annotation=f.type)
        for f in fields(ZOConfig)
        if optimizer in f.metadata["optimizers"]
    ]
    return sig.replace(parameters=params)


# -- checks (messages name the option as the caller calls it) ---------------------------------
def _number(value, name: str, *, integer: bool = False, allow_zero: bool = False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")
    return value


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _one_of(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
