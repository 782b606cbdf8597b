"""``train(config)``: load, split, train with one mode, evaluate, checkpoint, summarise.

Files in ``config.out``: ``config.json`` (written once, when the run starts), ``metrics.jsonl``
(one line per step, per evaluation and per resume), ``checkpoints/`` (see checkpoint.py),
``resumes.jsonl`` (one line per resume) and, at the end, ``summary.json``. What ``--out`` may
hold and when a resume is allowed: run_folder.py.

The split modes reach their server half through a ``Link``: in one process an ``InProcessLink``
to a ``ServerHandler`` built here; as the client of a two-process run, the link that
``connect_server`` returns (``hosl/training/remote.py``). The loop is the same either way; in
the two-process case the checkpoint holds only the client, after the server has saved its half.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from hosl.models import MODEL_NAMES, TASK_CAUSAL_LM, TASK_SEQUENCE_CLASSIFICATION, load_model, resolve_model, split
from hosl.models.lora import apply_lora, lora_layers
from hosl.tasks import (
    ShuffledBatches,
    classification_loss,
    evaluate,
    get_task_spec,
    lm_answer_loss,
    make_collate_fn,
    sample_task,
)
from hosl.tasks.custom import configured_num_labels, sample_configured_task
from hosl.training import checkpoint as ckpt
from hosl.training import run_folder
from hosl.training.config import TrainConfig
from hosl.training.schedule import schedule_client_step
from hosl.training.memory import parse_bytes, return_freed_memory
from hosl.training.modes import Hyper, make_mode
from hosl.training.protocol import PHASE_NAMES, SPLIT_MODES
from hosl.training.server_handler import ServerHandler
from hosl.training.server_proxy import ServerProxy
from hosl.transport import InProcessLink, Link

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RunExistsError(RuntimeError):
    pass


ENCODER_MODEL_TYPES = ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2")


def _model_kind(name: str, source) -> str:
    """"classifier" for encoders (classification head), "causal_lm" for decoders."""
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
    return "classifier" if config.model_type in ENCODER_MODEL_TYPES else "causal_lm"


def _loss_fn(model_kind: str):
    if model_kind == "classifier":
        def loss_of(logits, batch, copies):
            return classification_loss(logits, batch["labels"], reduction="mean" if copies == 1 else "per_copy")
    else:
        def loss_of(logits, batch, copies):
            return lm_answer_loss(logits, batch, reduction="mean" if copies == 1 else "per_copy", num_copies=copies)
    return loss_of


def forward_passes_per_step(mode: str, q: int, difference: str) -> dict:
    """Client and server forward passes (and backward passes) one step of ``mode`` costs."""
    perturbed = 2 * q if difference == "central" else q
    clean = 0 if difference == "central" else 1
    table = {
        "hosl": dict(client_forward=1 + perturbed, server_forward=1 + perturbed, client_backward=0, server_backward=1),
        "fo-sl": dict(client_forward=1, server_forward=1, client_backward=1, server_backward=1),
        "zo-sl": dict(client_forward=perturbed + clean, server_forward=perturbed + clean, client_backward=0, server_backward=0),
        "fo": dict(client_forward=1, server_forward=1, client_backward=1, server_backward=1),
        "zo": dict(client_forward=perturbed + clean, server_forward=perturbed + clean, client_backward=0, server_backward=0),
    }
    return table[mode]


class _Log:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self):
        self.file.close()


def _drop_metrics_after(path: Path, step: int) -> None:
    """Forget metrics of steps after the checkpoint being resumed (they will be redone); step -1
    forgets all. A torn last line (a kill mid-write) goes too."""
    if not path.exists():
        return
    kept = run_folder.metrics_up_to(path, step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _say(msg: str) -> None:
    print(f"[hosl] {msg}", file=sys.stderr, flush=True)


def hyper(cfg: TrainConfig) -> Hyper:
    return Hyper(zo=cfg.zo_config(), lr_server=cfg.lr_server, momentum=cfg.momentum,
                 server_optimizer=cfg.server_optimizer, lr_schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
                 total_steps=cfg.steps)


def load_split_model(cfg: TrainConfig):
    """(model_kind, tokenizer, client, server) as ``cfg`` says; both sides of a two-process run
    call this with the same arguments and get the same weights."""
    num_labels = configured_num_labels(cfg)  # raises for an unknown task or unusable data files, before any slow loading
    source = resolve_model(cfg.model)
    model_kind = _model_kind(cfg.model, source)
    if model_kind == "classifier" and num_labels is None:
        raise ValueError(f"--task {cfg.task} trains a causal LM on plain text; {cfg.model} is an encoder")
    task_kind = TASK_SEQUENCE_CLASSIFICATION if model_kind == "classifier" else TASK_CAUSAL_LM
    _say(f"loading {cfg.model} ({task_kind})")
    model, tokenizer = load_model(cfg.model, task_kind, num_labels=num_labels if model_kind == "classifier" else None,
                                  dtype=DTYPES[cfg.dtype], seed=cfg.seed)
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_target_list(),
                           layers=lora_layers(model.config.num_hidden_layers, cfg.cut, cfg.lora_halves),
                           train_head=model_kind == "classifier", seed=cfg.seed)
    client, server = split(model, cut=cfg.cut)
    if cfg.lora and cfg.lora_halves != "both":  # the half without adapters trains all its weights
        (server if cfg.lora_halves == "client" else client).requires_grad_(True)
    return model_kind, tokenizer, client, server


def train_dropout(cfg: TrainConfig) -> bool:
    """``--dropout``, one policy for every mode (default off, as MeZO: the + and - passes of a ZO
    direction must see the same function, or the loss difference measures dropout noise)."""
    return cfg.dropout == "on"


def _load_resume_state(state: dict, mode, half) -> None:
    """Optimizer, server-half and data-order state from a checkpoint; learning rates stay those of
    this command (equal to the run's unless changed with --override)."""
    try:
        mode.load_optimizer_state({k: ckpt.with_current_lr(opt, state["optimizers"][k])
                                   for k, opt in mode.optimizers().items()})
        if half is not None:
            saved = dict(state["server_half"])
            if half.optimizer is not None and saved.get("optimizer") is not None:
                saved["optimizer"] = ckpt.with_current_lr(half.optimizer, saved["optimizer"])
            if saved.get("zo") is not None:  # ZO-SL's server optimizer (built on first use) runs at lr_client
                saved["zo"] = ckpt.with_lr(saved["zo"], half.hp.lr_client)
            half.load_state_dict(saved)
    except (KeyError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{ckpt.STATE} of the checkpoint does not fit this run's optimizers "
                                   f"({exc.__class__.__name__}: {exc})") from None


def _record_resume(run_dir: Path, plan: "run_folder.ResumePlan", step: int, overrides: list) -> None:
    """One record in metrics.jsonl and in resumes.jsonl (config.json keeps the run's first settings)."""
    record = {"event": "resume", "step": step,
              "checkpoint": plan.checkpoint.name if plan.checkpoint is not None else None,
              "changes": plan.changes, "overrides": list(overrides or []),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    line = json.dumps(record) + "\n"
    with open(run_dir / run_folder.METRICS, "a") as f:
        f.write(line)
    with open(run_dir / run_folder.RESUMES, "a") as f:
        f.write(line)
    for name, change in plan.changes.items():
        _say(f"--resume: {name} changes from {change['was']!r} to {change['now']!r}")


def train(cfg: TrainConfig, *, connect_server: Callable[[], Link] | None = None) -> dict:
    """One run. ``connect_server`` (two-process runs): called once the model is loaded, returns
    the link to the server process; this process then holds only the client."""
    cfg.validate()
    remote = connect_server is not None
    if remote and cfg.mode not in SPLIT_MODES:
        raise ValueError(f"--mode {cfg.mode} trains the unsplit model; only {', '.join(SPLIT_MODES)} run as client and server")
    run_dir = Path(cfg.out)
    # every refusal (folder, settings, damaged checkpoint) comes before anything in --out changes
    kind = run_folder.check_out(cfg)
    plan = None
    if cfg.resume and kind == "run":
        for name in cfg.overrides or []:
            run_folder.normalise_override(name)
        plan = run_folder.resume_plan(cfg, ["client"] if remote else ["client", "server"])
        for note in plan.notes:
            _say(note)
    elif cfg.resume:
        _say(f"--resume: no run in {run_dir} yet, starting a new one")
    elif cfg.overrides:
        raise run_folder.RunFolderError("--override applies to --resume only")
    torch.manual_seed(cfg.seed)

    # -- data and model ------------------------------------------------------------------------
    data = sample_configured_task(cfg)  # built-in, or --task custom / lm files; checked before the model loads
    for note in data.notes:
        _say(note)
    model_kind, tokenizer, client, server = load_split_model(cfg)
    dropout_on = train_dropout(cfg)
    hp = hyper(cfg)
    loss_of = _loss_fn(model_kind)
    half = None
    if remote:
        server = None  # that half lives in the server process
        link = connect_server()
    elif cfg.mode in SPLIT_MODES:
        half = ServerHandler(server, cfg.mode, hp, loss_of, model_kind, train_dropout=dropout_on,
                             trainable_only_checkpoints=cfg.lora)
        link = InProcessLink(half.handle, PHASE_NAMES)
    else:
        link = None
    proxy = ServerProxy(link, model_kind) if link is not None else None

    def set_training(flag: bool) -> None:
        client.train(flag and dropout_on)
        if half is None and server is not None:  # a server half sets its own mode
            server.train(flag and dropout_on)

    set_training(True)
    mode = make_mode(cfg.mode, client, server, hp, loss_of, proxy=proxy)
    if cfg.client_micro_batch is not None or cfg.client_memory_budget is not None:
        _say(return_freed_memory())  # sliced client passes: resident memory follows the tensors
    if cfg.client_memory_budget is not None:  # refuses a budget too small before any step or file write
        _say(mode.plan_client_memory(parse_bytes(cfg.client_memory_budget), cfg.batch_size, cfg.max_length).describe())
    collate = make_collate_fn(data.template, tokenizer, model_kind, cfg.max_length)
    batches = ShuffledBatches(data.train, cfg.batch_size, seed=cfg.seed, collate_fn=collate)
    modules = {"client": client} if remote else {"client": client, "server": server}

    step, elapsed, evals = 0, 0.0, []
    if plan is not None and plan.checkpoint is not None:
        state = plan.state
        ckpt.load_weights(plan.checkpoint, modules)
        _load_resume_state(state, mode, half)
        batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed, evals = state["step"], state["seconds"], state["evals"]
        _say(f"resumed from {plan.checkpoint} (step {step})")
    elif plan is not None:
        _say(f"--resume: no checkpoint in {run_dir} yet, starting again from step 0")
    if remote:
        proxy.resume(step)  # the server loads its half at the same step (or starts fresh at 0)
    if plan is not None:
        _drop_metrics_after(run_dir / run_folder.METRICS, run_folder.resume_step(plan.state))
        _record_resume(run_dir, plan, step, cfg.overrides)
    else:
        run_folder.create(run_dir)
        if kind in ("run", "other"):  # --overwrite
            run_folder.clear_hosl_files(run_dir)
        (run_dir / run_folder.CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))

    def run_eval(at_step: int) -> dict:
        set_training(False)
        result = evaluate(None, data.eval, tokenizer, cfg.eval_batch_size, data.template, model_kind=model_kind,
                          max_length=cfg.max_length, outputs_fn=lambda batch: mode.eval_outputs(batch, model_kind))
        set_training(True)
        record = {"step": at_step, "eval_accuracy": result["accuracy"], "eval_loss": result["loss"]}
        if getattr(data.template, "reports_perplexity", False):  # --task lm: one continuation per text
            record.update(eval_accuracy=None, eval_perplexity=math.exp(min(result["loss"], 700.0)))
        evals.append(record)
        log.write({"event": "eval", **record})
        shown = (f"perplexity {record['eval_perplexity']:.4f}" if "eval_perplexity" in record
                 else f"accuracy {result['accuracy']:.4f}")
        _say(f"step {at_step}: eval {shown}, loss {result['loss']:.4f}")
        return record

    def save(at_step: int) -> None:
        if remote:
            proxy.save(at_step)  # the server's half first: a client checkpoint implies the server's
        state = {"step": at_step, "seconds": elapsed, "evals": evals, "optimizers": mode.optimizer_state(),
                 "batches": batches.state_dict(), "torch_rng": torch.get_rng_state(), "config": cfg.to_dict()}
        if half is not None:
            state["server_half"] = half.state_dict()
        ckpt.save_checkpoint(run_dir, at_step, modules, state, trainable_only=cfg.lora)

    log = _Log(run_dir / "metrics.jsonl")
    eval_every, ckpt_every = cfg.resolved_eval_every(), cfg.resolved_checkpoint_every()
    traffic = []  # (bytes_up, bytes_down) of each step of this session
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.mode} {cfg.task}", unit="step", file=sys.stderr)
    try:
        if step == 0 and not evals:
            run_eval(0)
        while step < cfg.steps:
            batch = next(batches)
            up0, down0 = (link.bytes_up, link.bytes_down) if link is not None else (0, 0)
            t0 = time.perf_counter()
            mode.step_number = step + 1
            schedule_client_step(mode, hp, step + 1)  # --lr-schedule / --warmup-steps (no-op by default)
            loss = mode.step(batch)
            elapsed += time.perf_counter() - t0
            step += 1
            record = {"step": step, "loss": loss, "seconds": elapsed, "skipped_updates": mode.skipped_updates,
                      "skipped_server_steps": mode.skipped_server_steps}
            if link is not None:
                traffic.append((link.bytes_up - up0, link.bytes_down - down0))
                record.update(bytes_up=traffic[-1][0], bytes_down=traffic[-1][1])
            log.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if step % eval_every == 0 or step == cfg.steps:
                run_eval(step)
            if step % ckpt_every == 0 or step == cfg.steps:
                save(step)
    except KeyboardInterrupt:
        latest = ckpt.latest_checkpoint(run_dir)
        _say(f"interrupted at step {step}; last checkpoint: {latest or 'none'}; continue with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()
        log.close()

    summary = {
        "mode": cfg.mode,
        "task": cfg.task,
        "model": cfg.model,
        "cut": cfg.cut,
        "role": "client" if remote else "local",
        "steps": step,
        "eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
        "eval_perplexity": evals[-1].get("eval_perplexity") if evals else None,
        "eval_history": evals,
        "client_peak_bytes": mode.memory.peak_bytes(
            client, fo_client=cfg.mode in ("fo-sl", "fo"),
            optimizer_state_bytes=mode.client_optimizer_state_bytes(), scratch_bytes=mode.scratch_bytes()),
        "client_weight_bytes": mode.memory.weight_bytes(client),
        "client_trainable_bytes": mode.memory.trainable_bytes(client),
        "client_optimizer_state_bytes": mode.client_optimizer_state_bytes(),
        "client_scratch_bytes": mode.scratch_bytes(),
        "seconds": elapsed,
        "train_examples": step * cfg.batch_size,
        "forward_passes_per_step": forward_passes_per_step(cfg.mode, cfg.num_queries, cfg.difference),
        "skipped_updates": mode.skipped_updates,
        "skipped_server_steps": mode.skipped_server_steps,
        "client_micro_batch": hp.client_micro_batch,
        "num_queries": cfg.num_queries,
        "lr_client": cfg.resolved_lr_client(),
        "eps": cfg.resolved_eps(),
        "direction": cfg.direction,
        "zo_optimizer": cfg.zo_optimizer,
        "lora": cfg.lora,
        "lr_server": cfg.lr_server,
        "data_notes": data.notes,
    }
    if link is not None and traffic:
        # bytes on the wire per training step (evaluation traffic not included), this session's steps
        summary["bytes_up_per_step"] = sum(u for u, _ in traffic) / len(traffic)
        summary["bytes_down_per_step"] = sum(d for _, d in traffic) / len(traffic)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
