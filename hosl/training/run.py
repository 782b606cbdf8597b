"""The run builder: what one ``hosl train`` run sets up before its first step, as a :class:`Run`.

:func:`build_run` takes a validated TrainConfig (``TrainConfig.validate``, called once by the
caller: ``train`` in ``hosl/training/loop.py``, ``run_client`` in ``hosl/training/remote.py``) and
does, in order: check ``--out`` and plan a resume (every refusal comes before anything in
``--out`` changes; rules in ``run_folder.py``), sample the data, load and split the model, put
the server half behind a link (an in-process :class:`ServerHandler`, or the server process that
``connect_server`` reaches), build the mode, restore a checkpoint, and write the run folder's
start (``config.json``, or a resume record). The loop (``hosl/training/loop.py``) then runs it.

The model-loading helpers here (:func:`load_split_model`, :func:`hyper`, :func:`loss_fn`,
:func:`train_dropout`) are shared with the server process (``remote.py``) and ``hosl export``,
which build the same halves from the same settings.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from hosl.models import MODEL_NAMES, TASK_CAUSAL_LM, TASK_SEQUENCE_CLASSIFICATION, load_model, resolve_model, split
from hosl.models.architectures import is_encoder
from hosl.models.lora import apply_lora, lora_layers
from hosl.models.trainable import keep_trainable
from hosl.tasks import ShuffledBatches, TaskData, classification_loss, lm_answer_loss, make_collate_fn
from hosl.tasks.custom import configured_num_labels, sample_configured_task
from hosl.tasks.evaluation import check_encodable
from hosl.training import checkpoint as ckpt
from hosl.training import run_folder
from hosl.training.config import TrainConfig
from hosl.training.memory import parse_bytes, return_freed_memory
from hosl.training.modes import SPLIT_MODES, Hyper, Mode, make_mode
from hosl.training.protocol import PHASE_NAMES
from hosl.training.server_group import ServerGroup
from hosl.training.server_handler import ServerHandler
from hosl.training.server_proxy import ServerProxy
from hosl.transport import InProcessLink, Link

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RunExistsError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"[hosl] {msg}", file=sys.stderr, flush=True)


# -- the model, its loss and optimizer settings -------------------------------------------------------


def _model_kind(name: str, source) -> str:
    """ "classifier" for encoders (classification head), "causal_lm" for decoders."""
    if source.encoder_only or source.kind != "pretrained":
        return "classifier" if source.encoder_only else "causal_lm"
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.location)
    except OSError as exc:
        raise FileNotFoundError(
            f"--model {name!r} is not an offline name ({', '.join(MODEL_NAMES)}), not a local model folder, "
            f"and the hub could not provide it: {exc}"
        ) from None
    return "classifier" if is_encoder(config.model_type) else "causal_lm"


def loss_fn(model_kind: str):
    """``loss_of(logits, batch, copies)``: the mean loss (one copy) or one loss per copy."""
    if model_kind == "classifier":

        def loss_of(logits, batch, copies):
            return classification_loss(logits, batch["labels"], reduction="mean" if copies == 1 else "per_copy")
    else:

        def loss_of(logits, batch, copies):
            return lm_answer_loss(logits, batch, reduction="mean" if copies == 1 else "per_copy", num_copies=copies)

    return loss_of


def hyper(cfg: TrainConfig) -> Hyper:
    """The run's optimizer settings: ``cfg``'s ZO options as one ZOConfig, ``--steps`` as the schedule's
    length, and every other field of Hyper ``cfg``'s field of the same name."""
    same_name = {f.name: getattr(cfg, f.name) for f in fields(Hyper) if f.name not in ("zo", "total_steps")}
    return Hyper(zo=cfg.zo_config(), total_steps=cfg.steps, **same_name)


def train_dropout(cfg: TrainConfig) -> bool:
    """``--dropout``, one policy for every mode (default off, as MeZO: the + and - passes of a ZO
    direction must see the same function, or the loss difference measures dropout noise)."""
    return cfg.dropout == "on"


def load_split_model(cfg: TrainConfig, data: TaskData | None = None):
    """(model_kind, tokenizer, client, server) as ``cfg`` says; both sides of a two-process run
    call this with the same arguments and get the same weights. ``data``: the run's sampled task,
    whose label count sizes a classifier's head; without it (the server process, ``hosl export``)
    the task is looked up, raising for an unknown task or unusable data files before any slow loading."""
    num_labels = data.num_labels if data is not None else configured_num_labels(cfg)
    source = resolve_model(cfg.model)
    model_kind = _model_kind(cfg.model, source)
    if model_kind == "classifier" and num_labels is None:
        raise ValueError(f"--task {cfg.task} trains a causal LM on plain text; {cfg.model} is an encoder")
    task_kind = TASK_SEQUENCE_CLASSIFICATION if model_kind == "classifier" else TASK_CAUSAL_LM
    say(f"loading {cfg.model} ({task_kind})")
    model, tokenizer = load_model(
        cfg.model,
        task_kind,
        num_labels=num_labels if model_kind == "classifier" else None,
        dtype=DTYPES[cfg.dtype],
        seed=cfg.seed,
    )
    if cfg.lora:
        model = apply_lora(
            model,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            targets=cfg.lora_target_list(),
            layers=lora_layers(model.config.num_hidden_layers, cfg.cut, cfg.lora_halves),
            train_head=model_kind == "classifier",
            seed=cfg.seed,
        )
    client, server = split(model, cut=cfg.cut)
    if cfg.lora and cfg.lora_halves != "both":  # the half without adapters trains all its weights
        (server if cfg.lora_halves == "client" else client).requires_grad_(True)
    patterns = cfg.client_param_patterns()
    if patterns is not None:  # --client-params: only the matching client parameters train (LoRA: narrows)
        kept = keep_trainable(client, patterns)
        numel = sum(p.numel() for n, p in client.named_parameters() if p.requires_grad)
        say(f"--client-params: {len(kept)} client parameters train ({numel} coordinates)")
    return model_kind, tokenizer, client, server


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run, built and ready for its first step (or the step after its checkpoint)."""

    cfg: TrainConfig
    run_dir: Path
    data: TaskData
    model_kind: str
    tokenizer: object
    client: nn.Module
    server: nn.Module | None  # None: it lives in the server process
    hp: Hyper
    mode: Mode
    batches: ShuffledBatches
    dropout_on: bool
    remote: bool = False  # the client of a two-process run
    half: ServerHandler | None = None  # in-process split modes: the server's side
    link: Link | None = None  # split modes: to ``half`` or to the server process
    proxy: ServerProxy | None = None
    step: int = 0  # the last step done (a resumed checkpoint's)
    seconds: float = 0.0  # training time so far
    evals: list = field(default_factory=list)
    evaluates: bool = True  # False: a fleet client whose shared model another client evaluates

    @property
    def modules(self) -> dict:
        """What this process checkpoints."""
        return {"client": self.client} if self.remote else {"client": self.client, "server": self.server}

    def set_training(self, flag: bool) -> None:
        _set_training(self.client, self.server, self.half, self.dropout_on, flag)


def _set_training(client, server, half, dropout_on: bool, flag: bool) -> None:
    client.train(flag and dropout_on)
    if half is None and server is not None:  # a server handler sets its own module's mode
        server.train(flag and dropout_on)


def load_server_model(cfg: TrainConfig) -> tuple[str, nn.Module]:
    """(model_kind, server half) of a two-process run as ``cfg`` says, seeded as every process
    seeds it; the client half is dropped (it lives in the client process(es))."""
    torch.manual_seed(cfg.seed)
    model_kind, _tokenizer, _client, server = load_split_model(cfg)
    return model_kind, server


def server_handler(cfg: TrainConfig, model_kind: str, server: nn.Module, **handler_options) -> ServerHandler:
    """The :class:`ServerHandler` of a server process as ``cfg`` says; ``handler_options``: where
    it checkpoints, whether it may resume, its group."""
    return ServerHandler(
        server,
        cfg.mode,
        hyper(cfg),
        loss_fn(model_kind),
        model_kind,
        train_dropout=train_dropout(cfg),
        trainable_only_checkpoints=cfg.lora,
        wire=cfg.wire,
        **handler_options,
    )


def build_run(
    cfg: TrainConfig,
    *,
    connect_server: Callable[[], Link] | None = None,
    fleet_rank: int | None = None,
    server_group: ServerGroup | None = None,
) -> Run:
    """The run ``cfg`` (validated) describes. ``connect_server`` (two-process runs): called once the
    model is loaded, returns the link to the server process; this process then holds only the client.
    ``fleet_rank``: this client's rank in a fleet of ``cfg.clients`` (its ``--shard`` of the data).
    ``server_group``: the in-process server half is rank 0 of several (``--server-procs``,
    ``hosl/training/server_ranks.py``)."""
    remote = connect_server is not None
    kind, plan = _check_out(cfg, remote)
    torch.manual_seed(cfg.seed)

    data = sample_configured_task(cfg)  # built-in, or --task custom / lm files; checked before the model loads
    if fleet_rank is not None:
        data = _shard(data, cfg, fleet_rank)
    for note in data.notes:
        say(note)
    model_kind, tokenizer, client, server = load_split_model(cfg, data)
    check_encodable(data, tokenizer, model_kind, cfg.max_length)  # now, not at the first batch, after --out is written
    hp, loss_of, dropout_on = hyper(cfg), loss_fn(model_kind), train_dropout(cfg)
    half = link = None
    if remote:
        server = None  # that half lives in the server process
        link = connect_server()  # type: ignore[misc]  # remote: given
    elif cfg.mode in SPLIT_MODES:
        half = ServerHandler(
            server,
            cfg.mode,
            hp,
            loss_of,
            model_kind,
            train_dropout=dropout_on,
            trainable_only_checkpoints=cfg.lora,
            wire=cfg.wire,
            group=server_group,
        )
        link = InProcessLink(half.handle, PHASE_NAMES)
    proxy = ServerProxy(link, model_kind, wire=cfg.wire) if link is not None else None
    _set_training(client, server, half, dropout_on, True)
    mode = make_mode(cfg.mode, client, server, hp, loss_of, proxy=proxy)
    _plan_client_memory(cfg, mode)
    batches = ShuffledBatches(
        data.train,
        cfg.batch_size,
        seed=cfg.seed,
        collate_fn=make_collate_fn(data.template, tokenizer, model_kind, cfg.max_length),
    )
    run = Run(
        cfg=cfg,
        run_dir=Path(cfg.out),
        data=data,
        model_kind=model_kind,
        tokenizer=tokenizer,
        client=client,
        server=server,
        hp=hp,
        mode=mode,
        batches=batches,
        dropout_on=dropout_on,
        remote=remote,
        half=half,
        link=link,
        proxy=proxy,
    )
    _start_folder(run, kind, plan)
    return run


def _shard(data: TaskData, cfg: TrainConfig, rank: int) -> TaskData:
    """This fleet client's part of the training examples (``--shard``, hosl/tasks/shard.py)."""
    from dataclasses import replace as replace_fields

    from hosl.tasks.shard import shard_indices

    found = [ex.get("label") for ex in data.train]
    labels = [v for v in found if isinstance(v, int)] if all(isinstance(v, int) for v in found) else None
    keep = shard_indices(labels, rank, cfg.clients, cfg.shard, cfg.seed)
    note = (
        f"fleet client rank {rank} of {cfg.clients}: --shard {cfg.shard} gives it {len(keep)} of "
        f"{len(data.train)} training examples"
    )
    return replace_fields(data, train=[data.train[i] for i in keep], notes=[*data.notes, note])


def _check_out(cfg: TrainConfig, remote: bool) -> tuple[str, run_folder.ResumePlan | None]:
    """What ``--out`` holds and, under ``--resume`` of a run there, the resume plan (its refusals:
    settings, damaged checkpoints). Nothing in ``--out`` changes here."""
    kind = run_folder.check_out(cfg)
    plan = None
    if cfg.resume and kind == "run":
        for name in cfg.overrides or []:
            run_folder.normalise_override(name)
        plan = run_folder.resume_plan(cfg, ["client"] if remote else ["client", "server"])
        for note in plan.notes:
            say(note)
    elif cfg.resume:
        say(f"--resume: no run in {Path(cfg.out)} yet, starting a new one")
    elif cfg.overrides:
        raise run_folder.RunFolderError("--override applies to --resume only")
    return kind, plan


def _plan_client_memory(cfg: TrainConfig, mode: Mode) -> None:
    if cfg.client_micro_batch is not None or cfg.client_memory_budget is not None:
        say(return_freed_memory())  # sliced client passes: resident memory follows the tensors
    if cfg.client_memory_budget is not None:  # refuses a budget too small before any step or file write
        say(mode.plan_client_memory(parse_bytes(cfg.client_memory_budget), cfg.batch_size, cfg.max_length).describe())  # type: ignore[attr-defined]  # a ZO client mode (validate)


def _start_folder(run: Run, kind: str, plan: run_folder.ResumePlan | None) -> None:
    """Restore the checkpoint a resume starts from (the server process loads its half at the same
    step), then record the resume, or write a new run's config.json."""
    if plan is not None and plan.checkpoint is not None:
        state: dict = plan.state  # type: ignore[assignment]  # loaded with the checkpoint
        ckpt.load_weights(plan.checkpoint, run.modules)
        load_resume_state(state, run.mode, run.half)
        run.batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        run.step, run.seconds, run.evals = state["step"], state["seconds"], state["evals"]
        say(f"resumed from {plan.checkpoint} (step {run.step})")
    elif plan is not None:
        say(f"--resume: no checkpoint in {run.run_dir} yet, starting again from step 0")
    if run.remote:
        run.proxy.resume(run.step)  # type: ignore[union-attr]  # remote: has a proxy; the server loads its half at the same step (or starts fresh at 0)
    if plan is not None:
        _drop_metrics_after(run.run_dir / run_folder.METRICS, run_folder.resume_step(plan.state))
        _record_resume(run.run_dir, plan, run.step, run.cfg.overrides)
    else:
        run_folder.create(run.run_dir)
        if kind in ("run", "other"):  # --overwrite
            run_folder.clear_hosl_files(run.run_dir)
        (run.run_dir / run_folder.CONFIG).write_text(json.dumps(run.cfg.to_dict(), indent=2))


def load_resume_state(state: dict, mode, half) -> None:
    """Optimizer, server-half and data-order state from a checkpoint; learning rates stay those of
    this command (equal to the run's unless changed with --override)."""
    try:
        mode.load_optimizer_state(
            {k: ckpt.with_current_lr(opt, state["optimizers"][k]) for k, opt in mode.optimizers().items()}
        )
        if half is not None:
            saved = dict(state["server_half"])
            if half.optimizer is not None and saved.get("optimizer") is not None:
                saved["optimizer"] = ckpt.with_current_lr(half.optimizer, saved["optimizer"])
            if saved.get("zo") is not None:  # ZO-SL's server optimizer (built on first use) runs at lr_client
                saved["zo"] = ckpt.with_lr(saved["zo"], half.hp.lr_client)
            half.load_state_dict(saved)
    except (KeyError, ValueError) as exc:
        raise ckpt.CheckpointError(
            f"{ckpt.STATE} of the checkpoint does not fit this run's optimizers ({exc.__class__.__name__}: {exc})"
        ) from None


def _drop_metrics_after(path: Path, step: int) -> None:
    """Forget metrics of steps after the checkpoint being resumed (they will be redone); step -1
    forgets all. A torn last line (a kill mid-write) goes too."""
    if not path.exists():
        return
    kept = run_folder.metrics_up_to(path, step)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    except OSError as exc:  # e.g. an immutable or read-only metrics.jsonl: name it, leave no .tmp behind
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot rewrite {path} to resume ({exc.strerror or exc})") from None


def _record_resume(run_dir: Path, plan: run_folder.ResumePlan, step: int, overrides: list) -> None:
    """One record in metrics.jsonl and in resumes.jsonl (config.json keeps the run's first settings)."""
    record = {
        "event": "resume",
        "step": step,
        "checkpoint": plan.checkpoint.name if plan.checkpoint is not None else None,
        "changes": plan.changes,
        "overrides": list(overrides or []),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    line = json.dumps(record) + "\n"
    with open(run_dir / run_folder.METRICS, "a") as f:
        f.write(line)
    with open(run_dir / run_folder.RESUMES, "a") as f:
        f.write(line)
    for name, change in plan.changes.items():
        say(f"--resume: {name} changes from {change['was']!r} to {change['now']!r}")
