"""What authenticating (and with ``--encrypt``, encrypting) every message costs per training step.

The messages of one ``hosl`` step of a two-process run, at the shapes given (default: OPT-125M's
hidden size 768, batch 16, sequence 128, Q=10, fp32, central differences: the upload of
docs/transport.md's "Bytes per step" table): the request carrying the clean and the 2Q perturbed
activations with the mask and the labels, and the reply carrying the 2Q+1 losses. Each is cut into
parts as ``hosl.transport.distributed.Endpoint`` cuts it, then sealed by the sender's
``hosl.transport.session.Session`` and checked (and decrypted) by the receiver's, for each mode:

* ``none``: no session (what a run did before every message carried a MAC): the parts only;
* ``mac``: HMAC-SHA256 over every part (the default);
* ``encrypt``: ChaCha20-Poly1305 over the payloads (``--encrypt``).

Reported per mode: the median over ``--repeats`` (after one untimed warm-up) of the CPU time
(``time.thread_time``: the wait for a core on a shared machine is left out) to seal and to open one
step's messages, their sum (what a step gains, both sides together, one thread), and the payload
bytes per second. Nothing is sent: the network's own time is left out, so these are the crypto's
cost alone.

    python benchmarks/message_auth.py --json message_auth.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _clock() -> float:
    """This thread's CPU time: on a shared machine, what the crypto itself costs, not the wait for a core."""
    return time.thread_time()


def step_messages(hidden: int, batch: int, seq: int, queries: int):
    """(request, reply) of one hosl step as ``hosl.transport.wire.Message`` s."""
    import torch

    from hosl.transport.wire import Kind, Message

    g = torch.Generator().manual_seed(0)
    copies = 2 * queries + 1
    acts = [torch.randn(batch, seq, hidden, generator=g) for _ in range(copies)]
    mask, labels = torch.ones(batch, seq, dtype=torch.int64), torch.randint(0, 2, (batch,), generator=g)
    request = Message(Kind.REQUEST, 1, 1, ints=[1, 2, 3], floats=[1e-3], tensors=[*acts, mask, labels])
    reply = Message(Kind.REPLY, 1, 1, floats=[0.5] * copies)
    return request, reply


def parts_of(msg):
    """The (tag, tensor) parts ``Endpoint.send`` cuts a message into (hosl/transport/distributed.py)."""
    from hosl.transport.distributed import message_parts

    return message_parts(msg)


def time_mode(mode: str, messages, repeats: int) -> dict:
    """Median seconds to seal and to open one step's messages under ``mode``."""
    from hosl.transport.session import SMALL_TAGS, TAG_HEADER_TRAILER, TAG_TRAILER, Session

    nonces = (os.urandom(32), os.urandom(32))
    secret, run_id = os.urandom(32), "0" * 32
    sealed_s, opened_s = [], []
    for _ in range(repeats + 1):  # the first is a warm-up, dropped below
        if mode == "none":
            t0 = _clock()
            for msg in messages:
                parts_of(msg)
            sealed_s.append(_clock() - t0)
            opened_s.append(0.0)
            continue
        sender = Session(secret, run_id, *nonces, is_host=True, encrypt=mode == "encrypt")
        receiver = Session(secret, run_id, *nonces, is_host=False, encrypt=mode == "encrypt")
        t0 = _clock()
        wire = [sender.seal(parts_of(msg)) for msg in messages]
        t1 = _clock()
        for parts in wire:
            trailers = {tag: t for tag, t in parts if tag in (TAG_HEADER_TRAILER, TAG_TRAILER)}
            received = [(tag, t.clone()) for tag, t in parts if tag not in trailers]  # the receiver's own buffers
            t_open = _clock()
            # as Endpoint.recv_rest does: the headers' check before sizing, then the whole message's
            small = [(tag, t) for tag, t in received if tag in SMALL_TAGS]
            receiver.check_headers(small, trailers[TAG_HEADER_TRAILER], "the benchmark")
            receiver.open(received, trailers[TAG_TRAILER], "the benchmark")
            opened_s.append(_clock() - t_open)
        sealed_s.append(t1 - t0)
    per_step_open = [sum(opened_s[i : i + len(messages)]) for i in range(0, len(opened_s), len(messages))]
    if mode == "none":
        per_step_open = opened_s
    sealed_s, per_step_open = sealed_s[1:], per_step_open[1:]
    return {"seal_s": statistics.median(sealed_s), "open_s": statistics.median(per_step_open)}


def main(argv=None) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from hosl.transport.wire import message_nbytes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768, help="hidden size (default %(default)s: OPT-125M)")
    p.add_argument("--batch-size", type=int, default=16, help="(default %(default)s)")
    p.add_argument("--max-length", type=int, default=128, help="sequence length (default %(default)s)")
    p.add_argument("--queries", type=int, default=10, help="Q (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per mode (default %(default)s)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    for name in ("hidden", "batch_size", "max_length", "queries", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")

    messages = step_messages(a.hidden, a.batch_size, a.max_length, a.queries)
    nbytes = sum(message_nbytes(m) for m in messages)
    rows = {}
    print(f"one hosl step: {nbytes:,} payload bytes (hidden {a.hidden}, batch {a.batch_size}, "
          f"sequence {a.max_length}, Q={a.queries}), median of {a.repeats}, CPU ms of one thread")
    print(f"{'mode':<8} {'seal ms':>9} {'open ms':>9} {'total ms/step':>14} {'MB/s':>8}")
    for mode in ("none", "mac", "encrypt"):
        r = time_mode(mode, messages, a.repeats)
        total = r["seal_s"] + r["open_s"]
        r.update(total_s=total, mb_per_s=nbytes / total / 1e6 if mode != "none" and total > 0 else None)
        rows[mode] = r
        rate = f"{r['mb_per_s']:8.0f}" if r["mb_per_s"] else f"{'-':>8}"
        print(f"{mode:<8} {1e3 * r['seal_s']:9.1f} {1e3 * r['open_s']:9.1f} {1e3 * total:14.1f} {rate}")
    result = {
        "config": vars(a) | {"payload_bytes_per_step": nbytes, "threads": torch.get_num_threads()},
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "modes": rows,
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.json}")
    return result


if __name__ == "__main__":
    main()
