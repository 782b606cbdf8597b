"""Everything one training run needs, with the defaults ``hosl train`` uses."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from hosl.directions.spec import FAMILIES
from hosl.models.lora import LORA_HALVES
from hosl.optim.functional import VARIANTS
from hosl.optim.micro_batch import check_micro_batch
from hosl.training.memory import parse_bytes
from hosl.training.modes import MODES, ZO_CLIENT_MODES

# the paper's ZO client settings: full fine-tuning, and LoRA (r=8, alpha=16)
ZO_LR, ZO_EPS = 1e-6, 1e-3
LORA_ZO_LR, LORA_ZO_EPS = 5e-5, 5e-3
FO_CLIENT_LR = 1e-3
MAX_SEED = 2**63 - 1  # seeds go through int64 (torch generators, the direction seed stream)


@dataclass
class TrainConfig:
    model: str = "minilm-l6"
    task: str = "sst2"
    # --task custom / lm: your own files (csv, tsv, json, jsonl); see hosl/tasks/custom.py
    train_file: str | None = None
    eval_file: str | None = None  # None: evaluation rows are held out of train_file
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    template: str | None = None  # format string over the row's columns ({text}, {text_pair}, ...)
    verbalizer: str | None = None  # "LABEL=WORD,..." or a JSON object; None: labels from the data, each its own word
    mode: str = "hosl"
    cut: int = 2
    num_queries: int = 10
    eps: float | None = None  # None: 1e-3, or 5e-3 with LoRA (the paper's)
    lr_client: float | None = None  # None: 1e-6 for ZO clients (5e-5 with LoRA), 1e-3 for FO clients (the paper's)
    lr_server: float = 1e-3
    server_optimizer: str = "sgd"  # sgd | adamw: the server half of hosl and fo-sl (hosl/training/schedule.py)
    lr_schedule: str = "constant"  # constant | linear | cosine over --steps, for every optimizer
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    momentum: float = 0.9
    weight_decay: float = 0.0
    difference: str = "central"
    dropout: str = "off"  # off | on, the same for every mode (ZO estimates need off, as MeZO)
    direction: str = "gaussian"  # ZO direction family: gaussian | rademacher | sphere
    zo_optimizer: str = "sgd"  # ZO update rule: sgd | momentum | adam | sign (ZO-Bench's)
    zo_momentum: float = 0.9  # of zo_optimizer=momentum
    zo_betas: tuple = (0.9, 0.999)  # of zo_optimizer=adam
    lora: bool = False  # LoRA adapters (peft) instead of full fine-tuning
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: str | None = None  # comma-separated module names; None: per architecture
    lora_halves: str = "both"  # both | client | server: where the adapters go (the other half trains fully)
    server_batch: int = 1
    query_batch: int | str = 1  # hosl, zo: perturbed points per client forward, or "auto" (query_memory_budget)
    query_memory_budget: int | None = None  # bytes the batched points may add; "auto"'s budget
    server_estimate: str = "exact"  # hosl: exact (a server forward per point) | linear (dL/dh . (h+ - h-))
    linear_on: str = "server"  # hosl linear: who computes the dot products: server | client (receives dL/dh)
    client_micro_batch: int | None = None  # hosl / zo-sl: client passes in slices of this many rows; None: whole batch
    client_memory_budget: str | None = None  # e.g. "1.0GiB": pick client_micro_batch from a measured per-row cost
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
    seed: int = 0
    dtype: str = "float32"
    backend: str | None = None
    progress: bool = True
    notes: list = field(default_factory=list)

    def resolved_lr_client(self) -> float:
        if self.lr_client is not None:
            return self.lr_client
        if self.mode not in ZO_CLIENT_MODES:
            return FO_CLIENT_LR
        return LORA_ZO_LR if self.lora else ZO_LR

    def resolved_eps(self) -> float:
        if self.eps is not None:
            return self.eps
        return LORA_ZO_EPS if self.lora else ZO_EPS

    def lora_target_list(self) -> list[str] | None:
        if not self.lora_targets:
            return None
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def resolved_eval_every(self) -> int:
        return self.eval_every or max(1, self.steps // 4)

    def resolved_checkpoint_every(self) -> int:
        return self.checkpoint_every or self.resolved_eval_every()

    def validate(self) -> None:
        def positive(name, integer=False, allow_zero=False):
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number {'>= 0' if allow_zero else '> 0'}, "
                                 f"got {v!r}")

        from hosl.tasks.custom import FileTaskOptions, check_options

        check_options(FileTaskOptions.of(self))  # which data flags go with which --task (no file is read)
        from hosl.training.schedule import LR_SCHEDULES, SERVER_OPTIMIZERS

        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"--server-optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.server_optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        for name in ("num_queries", "batch_size", "max_length", "train_size", "eval_size",
                     "eval_batch_size", "server_batch"):
            positive(name, integer=True)
        # steps=0: evaluate the starting weights once and write the summary (zero-shot)
        for name in ("steps", "eval_every", "checkpoint_every", "cut"):
            positive(name, integer=True, allow_zero=True)
        if self.eps is not None:
            positive("eps")
        positive("lr_server", allow_zero=True)
        positive("momentum", allow_zero=True)
        positive("weight_decay", allow_zero=True)
        if self.lr_client is not None:
            positive("lr_client", allow_zero=True)
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.difference not in ("central", "forward"):
            raise ValueError(f"--difference must be central or forward, got {self.difference!r}")
        if self.dropout not in ("off", "on"):
            raise ValueError(f"--dropout must be off or on, got {self.dropout!r}")
        if self.direction not in FAMILIES:
            raise ValueError(f"--direction must be one of {', '.join(FAMILIES)}, got {self.direction!r}")
        if self.zo_optimizer not in VARIANTS:
            raise ValueError(f"--zo-optimizer must be one of {', '.join(VARIANTS)}, got {self.zo_optimizer!r}")
        betas = tuple(self.zo_betas) if isinstance(self.zo_betas, (tuple, list)) else ()
        for name, value in (("--zo-momentum", self.zo_momentum), *((f"--zo-betas[{i}]", b) for i, b in enumerate(betas))):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if len(betas) != 2:
            raise ValueError(f"--zo-betas must be two numbers (beta1,beta2), got {self.zo_betas!r}")
        self.zo_betas = tuple(float(b) for b in betas)
        self._validate_step_options()
        if self.lora:
            positive("lora_r", integer=True)
            positive("lora_alpha")
            if self.lora_halves not in LORA_HALVES:
                raise ValueError(f"--lora-halves must be one of {', '.join(LORA_HALVES)}, got {self.lora_halves!r}")
        self._validate_client_slicing()

    def _validate_client_slicing(self) -> None:
        if self.client_micro_batch is None and self.client_memory_budget is None:
            return
        flag = "--client-micro-batch" if self.client_micro_batch is not None else "--client-memory-budget"
        if self.mode not in ("hosl", "zo-sl"):
            raise ValueError(f"{flag} slices the passes of a ZO client that sends its activation (--mode hosl or "
                             f"zo-sl), got --mode {self.mode}")
        if self.client_micro_batch is not None and self.client_memory_budget is not None:
            raise ValueError("give --client-micro-batch or --client-memory-budget, not both (the budget picks the rows)")
        if self.client_micro_batch is not None:
            check_micro_batch(self.client_micro_batch, "--client-micro-batch")
        else:
            parse_bytes(self.client_memory_budget)

    def _validate_step_options(self) -> None:
        """--query-batch, --query-memory-budget, --server-estimate, --linear-on (docs/optimizer.md)."""
        qb = self.query_batch
        if qb != "auto" and (isinstance(qb, bool) or not isinstance(qb, int) or qb < 1):
            raise ValueError(f"--query-batch must be an integer >= 1 or auto, got {qb!r}")
        if qb != 1 and self.mode not in ("hosl", "zo"):
            raise ValueError(f"--query-batch batches the perturbed points of --mode hosl or zo (zo-sl perturbs its "
                             f"server one point at a time), got --mode {self.mode}")
        budget = self.query_memory_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"--query-memory-budget must be a number of bytes >= 0, got {budget!r}")
        if self.server_estimate not in ("exact", "linear"):
            raise ValueError(f"--server-estimate must be exact or linear, got {self.server_estimate!r}")
        if self.server_estimate == "linear" and self.mode != "hosl":
            raise ValueError(f"--server-estimate linear needs the server's gradient (--mode hosl), got --mode {self.mode}")
        if self.linear_on not in ("server", "client"):
            raise ValueError(f"--linear-on must be server or client, got {self.linear_on!r}")
        if self.linear_on == "client" and self.server_estimate != "linear":
            raise ValueError("--linear-on client applies to --server-estimate linear")

    def to_dict(self) -> dict:
        return asdict(self)
