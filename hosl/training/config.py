"""Everything one training run needs, with the defaults ``hosl train`` uses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hosl.training.modes import MODES, ZO_CLIENT_MODES


@dataclass
class TrainConfig:
    model: str = "minilm-l6"
    task: str = "sst2"
    mode: str = "hosl"
    cut: int = 2
    num_queries: int = 10
    eps: float = 1e-3
    lr_client: float | None = None  # None: 1e-6 for ZO clients, 1e-3 for FO clients (the paper's)
    lr_server: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    difference: str = "central"
    server_batch: int = 1
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
    seed: int = 0
    dtype: str = "float32"
    backend: str | None = None
    progress: bool = True
    notes: list = field(default_factory=list)

    def resolved_lr_client(self) -> float:
        if self.lr_client is not None:
            return self.lr_client
        return 1e-6 if self.mode in ZO_CLIENT_MODES else 1e-3

    def resolved_eval_every(self) -> int:
        return self.eval_every or max(1, self.steps // 4)

    def resolved_checkpoint_every(self) -> int:
        return self.checkpoint_every or self.resolved_eval_every()

    def validate(self) -> None:
        def positive(name, integer=False, allow_zero=False):
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or v < 0 or (v == 0 and not allow_zero) or v != v:
                raise ValueError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("num_queries", "steps", "batch_size", "max_length", "train_size", "eval_size",
                     "eval_batch_size", "server_batch"):
            positive(name, integer=True)
        for name in ("eval_every", "checkpoint_every", "cut"):
            positive(name, integer=True, allow_zero=True)
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

    def to_dict(self) -> dict:
        return asdict(self)
