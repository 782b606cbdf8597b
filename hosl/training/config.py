"""Everything one training run needs, with the defaults ``hosl train`` uses.

TrainConfig declares every field: the run's own settings, then the zeroth-order options
(``lr_client``, ``eps``, ``num_queries``, ``zo_optimizer``, ...), one per
:class:`~hosl.optim.config.ZOConfig` field that ``hosl train`` exposes, under its training name with
its training default (``hosl/optim/config.py``: the field's ``train`` and ``train_default``; help,
checks and flags come from there). ``tests/test_zo_config.py`` fails if the two fall out of step
(a ZO option added to ZOConfig is added here too). :meth:`TrainConfig.zo_config` turns them back
into a validated ZOConfig.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from hosl.models.lora import LORA_HALVES
from hosl.models.trainable import parse_globs
from hosl.optim.config import (
    FO_CLIENT_LR,
    LORA_ZO_EPS,
    LORA_ZO_LR,
    ZO_DIFFERENCE,
    ZO_EPS,
    ZO_LR,
    ZOConfig,
    from_train_names,
    train_fields,
    train_name,
)
from hosl.training.memory import parse_bytes
from hosl.training.modes import CLIENT_SLICING_MODES, MODES, QUERY_BATCH_MODES, ZO_CLIENT_MODES
from hosl.training.recipes import apply_recipe

MAX_SEED = 2**63 - 1  # seeds go through int64 (torch generators, the direction seed stream)


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """A run's settings: the run's own, then the ZO options (ZOConfig's, by their training names).
    ``lr_client``, ``eps`` and ``difference`` default to None: the paper's values for the mode and
    ``--lora`` (:meth:`resolved_lr_client`, :meth:`resolved_eps`, :meth:`resolved_difference`), so
    a ``--recipe`` can tell a setting not given from one given as the default."""

    model: str = "minilm-l6"
    task: str = "sst2"
    # --task custom / lm: your own files (csv, tsv, json, jsonl); see hosl/tasks/custom.py
    train_file: str | None = None
    eval_file: str | None = None  # None: evaluation rows are held out of train_file
    eval_fraction: float = 0.1  # without eval_file: the share of train_file's rows held out (at most eval_size)
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    template: str | None = None  # format string over the row's columns ({text}, {text_pair}, ...)
    verbalizer: str | None = None  # "LABEL=WORD,..." or a JSON object; None: labels from the data, each its own word
    mode: str = "hosl"
    cut: int = 2
    lr_server: float = 1e-3
    server_optimizer: str = "sgd"  # sgd | adamw: the server half of hosl and fo-sl (hosl/training/schedule.py)
    lr_schedule: str = "constant"  # constant | linear | cosine over --steps, for every optimizer
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    momentum: float = 0.9  # SGD momentum of the FO optimizers (the ZO rule's is zo_momentum)
    dropout: str = "off"  # off | on, the same for every mode (ZO estimates need off, as MeZO)
    lora: bool = False  # LoRA adapters (peft) instead of full fine-tuning
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: str | None = None  # comma-separated module names; None: per architecture
    lora_halves: str = "both"  # both | client | server: where the adapters go (the other half trains fully)
    # comma-separated fnmatch patterns over the client half's parameter names: only those train
    client_params: str | None = None
    recipe: str | None = None  # a named recipe (hosl/training/recipes.py): fills in the settings left None
    client_memory_budget: str | None = None  # e.g. "1.0GiB": pick client_micro_batch from a measured per-row cost
    client_checkpointing: bool = False  # fo-sl: each client block under torch.utils.checkpoint
    client_fused_step: bool = False  # fo-sl: the client's SGD step inside backward (post-accumulate-grad hooks)
    steps: int = 1000
    batch_size: int = 16
    max_length: int = 128
    train_size: int = 1000
    eval_size: int = 1000
    eval_every: int = 0  # 0: four evaluations over the run
    eval_batch_size: int = 32
    checkpoint_every: int = 0  # 0: at every evaluation
    data_dir: str | None = None
    out: str = "runs/hosl"
    resume: bool = False
    overwrite: bool = False  # start a new run in an --out that holds one (hosl's files there are replaced)
    overrides: list = field(default_factory=list)  # settings a resume may change (run_folder.OVERRIDABLE)
    dtype: str = "float32"
    # fleets (hosl serve --clients N; docs/fleet.md): 0 is a single client (in-process or two-process)
    clients: int = 0
    client_sync: str = "shared"  # shared: one client model kept identical on every client; local: each its own
    shard: str = "iid"  # iid | dirichlet:ALPHA | by-file: which training examples each client sees
    wire: str = "native"  # upload codec of the activations: native | float32 | bfloat16 | float16 | delta8
    progress: bool = True
    report_to: str = "none"  # none | tensorboard | wandb: where the metrics records also go (hosl/training/tracking.py)
    notes: list = field(default_factory=list)

    # -- the ZO options: ZOConfig's fields with a training name, in its order (hosl/optim/config.py) --
    lr_client: float | None = None  # ZOConfig.lr; None: ZO_LR, LORA_ZO_LR or FO_CLIENT_LR
    eps: float | None = None  # None: ZO_EPS or LORA_ZO_EPS
    num_queries: int = 10
    weight_decay: float = 0.0
    difference: str | None = None  # None: central (a --recipe may set it)
    step_scale: str = "none"
    seed: int = 0
    backend: str | None = None
    direction: str = "gaussian"
    direction_rank: int = 1  # ZOConfig.rank
    resample_every: int = 1
    zo_optimizer: str = "sgd"  # ZOConfig.variant
    zo_momentum: float = 0.9  # ZOConfig.momentum
    zo_betas: tuple[float, float] = (0.9, 0.999)  # ZOConfig.betas
    query_batch: int | str = 1
    query_memory_budget: int | None = None
    server_batch: int = 1
    server_estimate: str = "exact"
    linear_on: str = "server"
    server_grad: str = "clean"
    client_update: str = "joint"
    client_micro_batch: int | None = None

    def resolved_lr_client(self) -> float:
        if self.mode == "frozen-client":
            return 0.0  # the client never trains
        if self.lr_client is not None:
            return self.lr_client
        if self.mode not in ZO_CLIENT_MODES:
            return FO_CLIENT_LR
        return LORA_ZO_LR if self.lora else ZO_LR

    def resolved_difference(self) -> str:
        return self.difference if self.difference is not None else ZO_DIFFERENCE

    def resolved_eps(self) -> float:
        if self.eps is not None:
            return self.eps
        return LORA_ZO_EPS if self.lora else ZO_EPS

    def lora_target_list(self) -> list[str] | None:
        if not self.lora_targets:
            return None
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def client_param_patterns(self) -> list[str] | None:
        """``--client-params`` as its list of patterns; None: every client parameter trains."""
        if self.client_params is None:
            return None
        return parse_globs(self.client_params)

    def resolved_eval_every(self) -> int:
        return self.eval_every or max(1, self.steps // 4)

    def resolved_checkpoint_every(self) -> int:
        return self.checkpoint_every or self.resolved_eval_every()

    def zo_config(self) -> ZOConfig:
        """The ZO options as a validated :class:`ZOConfig` (``lr_client`` and ``eps`` resolved);
        a bad value is a ValueError naming its flag."""
        values = {train_name(f): getattr(self, train_name(f)) for f in train_fields()}
        values["lr_client"], values["eps"] = self.resolved_lr_client(), self.resolved_eps()
        values["difference"] = self.resolved_difference()
        names = {f.name: flag(train_name(f)) for f in train_fields()}
        try:
            return ZOConfig.build(from_train_names(values), label=lambda name: names.get(name, name))
        except TypeError as exc:  # a value of the wrong type (a YAML string, say): a usage error like the rest
            raise ValueError(str(exc)) from None

    def validate(self) -> None:
        apply_recipe(self)  # first: the values it fills in are checked like any other

        def positive(name, integer=False, allow_zero=False):
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
                raise ValueError(f"{flag(name)} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")

        from hosl.tasks.custom import FileTaskOptions, check_options

        check_options(FileTaskOptions.of(self))  # which data flags go with which --task (no file is read)
        from hosl.training.schedule import LR_SCHEDULES, SERVER_OPTIMIZERS

        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"--server-optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.server_optimizer!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        for name in ("batch_size", "max_length", "train_size", "eval_size", "eval_batch_size"):
            positive(name, integer=True)
        # steps=0: evaluate the starting weights once and write the summary (zero-shot)
        for name in ("steps", "eval_every", "checkpoint_every", "cut"):
            positive(name, integer=True, allow_zero=True)
        positive("lr_server", allow_zero=True)
        positive("momentum", allow_zero=True)
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.dropout not in ("off", "on"):
            raise ValueError(f"--dropout must be off or on, got {self.dropout!r}")
        from hosl.training.tracking import check_report_to

        check_report_to(self.report_to)  # an unknown tracker, or one whose package is missing
        zo = self.zo_config()  # every ZO option, checked once, by ZOConfig
        for f in train_fields():  # a --config file's lists (zo_betas: [0.9, 0.99]) become the tuples ZOConfig keeps
            if isinstance(getattr(self, train_name(f)), list):
                setattr(self, train_name(f), getattr(zo, f.name))
        self._validate_step_options()
        if self.lora:
            positive("lora_r", integer=True)
            positive("lora_alpha")
            if self.lora_halves not in LORA_HALVES:
                raise ValueError(f"--lora-halves must be one of {', '.join(LORA_HALVES)}, got {self.lora_halves!r}")
        self._validate_client_params()
        self._validate_client_slicing()
        self._validate_lean_fo_client()
        self._validate_fleet()

    def _validate_fleet(self) -> None:
        from hosl.tasks.shard import parse_shard
        from hosl.transport.codecs import check_codec

        positive = isinstance(self.clients, int) and not isinstance(self.clients, bool) and self.clients >= 0
        if not positive:
            raise ValueError(f"--clients must be an integer >= 0 (0: no fleet), got {self.clients!r}")
        if self.client_sync not in ("shared", "local"):
            raise ValueError(f"--client-sync must be shared or local, got {self.client_sync!r}")
        parse_shard(self.shard)
        check_codec(self.wire, "--wire")
        if self.clients and (self.client_update != "joint" or self.server_grad != "clean"):
            raise ValueError(
                "a fleet's clients send one clean activation and one update per step: it runs "
                "--server-grad clean --client-update joint"
            )
        if self.clients and self.mode != "hosl":
            raise ValueError(
                f"--clients runs a fleet of hosl clients (a client's update is its seeds and scalars); "
                f"got --mode {self.mode}"
            )

    def _validate_client_params(self) -> None:
        """The patterns' syntax and the mode; which parameters they match is checked on the built
        client half (``hosl/models/trainable.py``, from ``load_split_model``)."""
        if self.client_params is None:
            return
        self.client_param_patterns()
        if self.mode == "frozen-client":
            raise ValueError("--client-params has no effect with --mode frozen-client (the client never trains)")

    def _validate_lean_fo_client(self) -> None:
        for name in ("client_checkpointing", "client_fused_step"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{flag(name)} must be true or false, got {value!r}")
            if value and self.mode != "fo-sl":
                raise ValueError(f"{flag(name)} applies to a first-order client (--mode fo-sl), got --mode {self.mode}")

    def _validate_client_slicing(self) -> None:
        if self.client_micro_batch is None and self.client_memory_budget is None:
            return
        which = "--client-micro-batch" if self.client_micro_batch is not None else "--client-memory-budget"
        if self.mode == "fo-sl" and self.client_memory_budget is None:
            return  # fo-sl: gradient accumulation over slices of M rows (hosl/training/lean_fo_client.py)
        if self.mode not in CLIENT_SLICING_MODES:
            also = (
                " or accumulates a split FO client's gradients (--mode fo-sl)"
                if self.client_memory_budget is None
                else ""
            )
            raise ValueError(
                f"{which} slices the passes of a ZO client that sends its activation (--mode "
                f"{' or '.join(CLIENT_SLICING_MODES)}){also}, got --mode {self.mode}"
            )
        if self.client_micro_batch is not None and self.client_memory_budget is not None:
            raise ValueError(
                "give --client-micro-batch or --client-memory-budget, not both (the budget picks the rows)"
            )
        if self.client_micro_batch is None:
            parse_bytes(self.client_memory_budget)

    def _validate_step_options(self) -> None:
        """Which modes take --query-batch, --server-estimate, --linear-on (docs/optimizer.md); their
        values are ZOConfig's to check."""
        if self.query_batch != 1 and self.mode not in QUERY_BATCH_MODES:
            raise ValueError(
                f"--query-batch batches the perturbed points of --mode {' or '.join(QUERY_BATCH_MODES)} "
                f"(zo-sl perturbs its server one point at a time), got --mode {self.mode}"
            )
        if self.server_estimate == "linear" and self.mode != "hosl":
            raise ValueError(
                f"--server-estimate linear needs the server's gradient (--mode hosl), got --mode {self.mode}"
            )
        for name, plain in (("server_grad", "clean"), ("client_update", "joint")):
            value = getattr(self, name)
            if value != plain and self.mode != "hosl":
                raise ValueError(
                    f"{flag(name)} {value} applies to --mode hosl (the authors' step), got --mode {self.mode}"
                )
        if self.linear_on == "client" and self.server_estimate != "linear":
            raise ValueError("--linear-on client applies to --server-estimate linear")

    def to_dict(self) -> dict:
        return asdict(self)
