"""``train(config)``: validate, build the run (``hosl/training/run.py``), then the loop: steps,
evaluations, checkpoints, metrics, and the summary.

Files in ``config.out``: ``config.json`` (written once, when the run starts), ``metrics.jsonl``
(one line per step, per evaluation and per resume), ``checkpoints/`` (see checkpoint.py),
``resumes.jsonl`` (one line per resume) and, at the end, ``summary.json``. What ``--out`` may
hold and when a resume is allowed: run_folder.py.

The split modes reach their server half through a ``Link``: in one process an ``InProcessLink``
to a ``ServerHandler`` the run builder makes; as the client of a two-process run, the link that
``connect_server`` returns (``hosl/training/remote.py``). The loop is the same either way; in
the two-process case the checkpoint holds only the client, after the server has saved its half.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hosl.tasks import evaluate
from hosl.training import checkpoint as ckpt
from hosl.training.config import TrainConfig
from hosl.training.modes import FO_CLIENT_MODES, SPLIT_MODES
from hosl.training.run import Run, build_run, say
from hosl.training.schedule import half_rates, schedule_client_step
from hosl.training.tracking import open_tracker
from hosl.transport import Link


def forward_passes_per_step(mode: str, q: int, difference: str, server_estimate: str = "exact") -> dict:
    """Client and server forward passes (and backward passes) one step of ``mode`` costs; with HOSL's
    linear server estimate the server runs only the clean pass (the perturbed points are dot
    products with its dL/dh, no forward)."""
    perturbed = 2 * q if difference == "central" else q
    clean = 0 if difference == "central" else 1
    hosl_server = 1 if server_estimate == "linear" else 1 + perturbed
    table = {
        "hosl": dict(client_forward=1 + perturbed, server_forward=hosl_server, client_backward=0, server_backward=1),
        "fo-sl": dict(client_forward=1, server_forward=1, client_backward=1, server_backward=1),
        "frozen-client": dict(client_forward=1, server_forward=1, client_backward=0, server_backward=1),
        "zo-sl": dict(
            client_forward=perturbed + clean, server_forward=perturbed + clean, client_backward=0, server_backward=0
        ),
        "fo": dict(client_forward=1, server_forward=1, client_backward=1, server_backward=1),
        "zo": dict(
            client_forward=perturbed + clean, server_forward=perturbed + clean, client_backward=0, server_backward=0
        ),
    }
    return table[mode]


class _Log:
    """metrics.jsonl, and the ``--report-to`` tracker that receives the same records.

    The JSONL file stays hand-written beside the maintained writers (TensorBoard, W&B): it is the
    run's own record, which ``--resume``, ``hosl plot`` and the benchmarks read without either installed.
    """

    def __init__(self, path: Path, tracker=None):
        self.file = open(path, "a", buffering=1)
        self.tracker = tracker

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self):
        self.file.close()
        if self.tracker is not None:
            self.tracker.close()


def train(cfg: TrainConfig, *, connect_server: Callable[[], Link] | None = None) -> dict:
    """One run. ``connect_server`` (two-process runs): called once the model is loaded, returns
    the link to the server process; this process then holds only the client."""
    cfg.validate()
    if connect_server is not None and cfg.mode not in SPLIT_MODES:
        raise ValueError(
            f"--mode {cfg.mode} trains the unsplit model; only {', '.join(SPLIT_MODES)} run as client and server"
        )
    return run_loop(build_run(cfg, connect_server=connect_server))


def run_loop(run: Run) -> dict:
    """Train ``run`` from its step to ``cfg.steps``: evaluate (at step 0 of a new run, every
    ``eval_every`` steps and at the end), checkpoint, log each step; returns the summary."""
    cfg, link = run.cfg, run.link
    resumed_after = run.step if cfg.resume else None  # a resume: its checkpoint's step (0: none yet)
    log = _Log(run.run_dir / "metrics.jsonl", open_tracker(cfg.report_to, run.run_dir, cfg.to_dict(), resumed_after))
    eval_every, ckpt_every = cfg.resolved_eval_every(), cfg.resolved_checkpoint_every()
    traffic = []  # (bytes_up, bytes_down) of each step of this session
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=run.step, desc=f"{cfg.mode} {cfg.task}", unit="step", file=sys.stderr)
    try:
        if run.step == 0 and not run.evals and run.evaluates:
            _evaluate(run, log, 0)
        while run.step < cfg.steps:
            batch = next(run.batches)
            up0, down0 = (link.bytes_up, link.bytes_down) if link is not None else (0, 0)
            t0 = time.perf_counter()
            run.mode.step_number = run.step + 1
            schedule_client_step(run.mode, run.hp, run.step + 1)  # --lr-schedule / --warmup-steps (no-op by default)
            loss = run.mode.step(batch)
            run.seconds += time.perf_counter() - t0
            run.step += 1
            lr_client, lr_server = half_rates(cfg.mode, run.hp, run.step)
            record = {
                "step": run.step,
                "loss": loss,
                "seconds": run.seconds,
                "lr_client": lr_client,
                "lr_server": lr_server,
                "skipped_updates": run.mode.skipped_updates,
                "skipped_server_steps": run.mode.skipped_server_steps,
                "client_peak_bytes": client_peak_bytes(run),
            }
            if link is not None:
                traffic.append((link.bytes_up - up0, link.bytes_down - down0))
                record.update(bytes_up=traffic[-1][0], bytes_down=traffic[-1][1])
            log.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            if (run.step % eval_every == 0 or run.step == cfg.steps) and run.evaluates:
                _evaluate(run, log, run.step)
            if run.step % ckpt_every == 0 or run.step == cfg.steps:
                save_run(run, run.step)
    except KeyboardInterrupt:
        latest = ckpt.latest_checkpoint(run.run_dir)
        say(f"interrupted at step {run.step}; last checkpoint: {latest or 'none'}; continue with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()
        log.close()
    summary = _summary(run, traffic)
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _evaluate(run: Run, log: _Log, at_step: int) -> dict:
    cfg, data = run.cfg, run.data
    run.set_training(False)
    result = evaluate(
        None,  # type: ignore[arg-type]  # the mode's eval_outputs runs it
        data.eval,
        run.tokenizer,
        cfg.eval_batch_size,
        data.template,
        model_kind=run.model_kind,
        max_length=cfg.max_length,
        outputs_fn=lambda batch: run.mode.eval_outputs(batch, run.model_kind),
    )
    run.set_training(True)
    # seconds: training time so far (evaluations not counted), for accuracy-against-time curves
    record = {"step": at_step, "eval_accuracy": result["accuracy"], "eval_loss": result["loss"], "seconds": run.seconds}
    if getattr(data.template, "reports_perplexity", False):  # --task lm: one continuation per text
        record.update(eval_accuracy=None, eval_perplexity=math.exp(min(result["loss"], 700.0)))
    run.evals.append(record)
    log.write({"event": "eval", **record})
    shown = (
        f"perplexity {record['eval_perplexity']:.4f}"
        if "eval_perplexity" in record
        else f"accuracy {result['accuracy']:.4f}"
    )
    say(f"step {at_step}: eval {shown}, loss {result['loss']:.4f}")
    return record


def save_run(run: Run, at_step: int) -> None:
    """Checkpoint ``run`` at ``at_step`` (in a two-process run or fleet, the server's half first)."""
    if run.remote:
        run.proxy.save(at_step)  # type: ignore[union-attr]  # remote: has a proxy; the server's half first: a client checkpoint implies the server's
    state = {
        "step": at_step,
        "seconds": run.seconds,
        "evals": run.evals,
        "optimizers": run.mode.optimizer_state(),
        "batches": run.batches.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "config": run.cfg.to_dict(),
    }
    if run.half is not None:
        state["server_half"] = run.half.state_dict()
    ckpt.save_checkpoint(run.run_dir, at_step, run.modules, state, trainable_only=run.cfg.lora)


def client_peak_bytes(run: Run) -> int:
    """The client's accounted peak so far (hosl/training/memory.py: weights, gradients, optimizer
    state, ZO scratch, activations)."""
    mode = run.mode
    return mode.memory.peak_bytes(
        run.client,
        fo_client=run.cfg.mode in FO_CLIENT_MODES,
        optimizer_state_bytes=mode.client_optimizer_state_bytes(),
        scratch_bytes=mode.scratch_bytes(),
    )


def _summary(run: Run, traffic: list) -> dict:
    cfg, mode, evals = run.cfg, run.mode, run.evals
    summary = {
        "mode": cfg.mode,
        "task": cfg.task,
        "model": cfg.model,
        "cut": cfg.cut,
        "role": "client" if run.remote else "local",
        "steps": run.step,
        "eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
        "eval_perplexity": evals[-1].get("eval_perplexity") if evals else None,
        "eval_history": evals,
        "client_peak_bytes": client_peak_bytes(run),
        "client_weight_bytes": mode.memory.weight_bytes(run.client),
        "client_trainable_bytes": mode.memory.trainable_bytes(run.client),
        "client_optimizer_state_bytes": mode.client_optimizer_state_bytes(),
        "client_scratch_bytes": mode.scratch_bytes(),
        "seconds": run.seconds,
        "train_examples": run.step * cfg.batch_size,
        "forward_passes_per_step": forward_passes_per_step(
            cfg.mode, cfg.num_queries, cfg.resolved_difference(), cfg.server_estimate
        ),
        "skipped_updates": mode.skipped_updates,
        "skipped_server_steps": mode.skipped_server_steps,
        "client_micro_batch": mode.client_micro_batch,
        "num_queries": cfg.num_queries,
        "lr_client": cfg.resolved_lr_client(),
        "eps": cfg.resolved_eps(),
        "direction": cfg.direction,
        "zo_optimizer": cfg.zo_optimizer,
        "lora": cfg.lora,
        "lr_server": cfg.lr_server,
        "data_notes": run.data.notes,
    }
    if run.link is not None and traffic:
        # bytes on the wire per training step (evaluation traffic not included), this session's steps
        summary["bytes_up_per_step"] = sum(u for u, _ in traffic) / len(traffic)
        summary["bytes_down_per_step"] = sum(d for _, d in traffic) / len(traffic)
    return summary
