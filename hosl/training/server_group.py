"""The server half over several processes (``--server-procs P``): the thin torch.distributed layer
that :class:`~hosl.training.server_handler.ServerHandler` calls. It knows nothing of ZO or of the
protocol's phases.

Every server rank runs the same handler on every request. Rank 0 receives the request (from the
in-process client, or from the client process) and shares it with the other ranks
(:meth:`ServerGroup.share`: a few broadcasts of plain tensors, no pickling); each rank then
computes on its own rows of the batch (:meth:`ServerGroup.rows_of`, contiguous blocks as
``torch.tensor_split`` deals them) and the results are reduced over the group:

* a loss: :meth:`ServerGroup.mean` turns each rank's mean over its rows into the mean over the
  whole batch, weighted by each rank's share of the loss (rows, or answer tokens), and scales the
  part that gradients flow through so that DDP's (or FSDP2's) average of the ranks' gradients is
  the gradient of the whole batch's loss;
* dL/dh (HOSL's linear estimate, FO-SL): :meth:`ServerGroup.input_grad`, the ranks' rows summed;
* evaluation outputs: :meth:`ServerGroup.gather_rows` and :meth:`ServerGroup.total`.

Every rank keeps its own optimizer over its parameters (DDP: a replica; FSDP2: its shards) and
steps it on the same averaged gradients; ZO-SL's perturbations and updates are seeded, so each
replica draws the same ones. The result is one server process's trajectory up to the order of
the float reductions (a sum over ranks instead of over rows). A rank with no row of a small batch
computes on the batch's first row with weight 0, so that every rank joins every collective.

Waits are bounded: the group is formed with ``timeout_s``, which bounds every collective (gloo
and NCCL raise once it passes). A rank that dies closes its connections, so the other ranks' next
collective fails at once; :meth:`ServerGroup.lost` then names the dead rank (the ranks run on one
machine and know each other's process ids) as a :class:`ServerRankLost`.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from hosl.transport.link import PeerLostError
from hosl.transport.wire import TENSOR_HEADER_LEN, Kind, Message, as_bytes, parse_tensor_header, tensor_header

PARALLEL = ("ddp", "fsdp")
_STOP = -1  # the shared request header of "no more requests"
_DEATH_GRACE_S = 2.0  # after a failed collective: how long a dead rank's process may take to be gone
# what gloo and NCCL say when a collective fails because a peer is gone or silent (they raise a
# plain RuntimeError; torch's own wrappers raise DistError)
_COLLECTIVE_FAILURES = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "NCCL")


class ServerRankLost(PeerLostError):
    """A server rank died (or stopped answering): the server half cannot answer any more requests.
    ``detail``: what the failed collective said."""

    detail = ""


@dataclass
class ServerGroup:
    """One server rank's view of the group; ``size == 1`` (the default) is one server process and
    every method is then the identity."""

    rank: int = 0
    size: int = 1
    parallel: str = "ddp"  # ddp: a replica per rank; fsdp: parameters sharded (FSDP2, fully_shard)
    device: torch.device = torch.device("cpu")
    pids: list[int] = field(default_factory=list)  # every rank's process id (the ranks share one machine)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- forming the group ---------------------------------------------------------------------
    @classmethod
    def join(
        cls, rank: int, size: int, parallel: str, addr: str, port: int, timeout_s: float, backend: str | None = None
    ) -> ServerGroup:
        """Form the server ranks' process group (this process's default group; rank 0 hosts the
        store on ``addr:port``). ``timeout_s`` bounds the rendezvous and every later collective."""
        check_parallel(size, parallel)
        if not 0 <= rank < size:
            raise ValueError(f"server rank must be in 0..{size - 1}, got {rank}")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(addr, port, size, rank == 0, timeout, wait_for_workers=False)
        dist.init_process_group(
            backend, store=dist.PrefixStore("hosl/server-group/", store), rank=rank, world_size=size, timeout=timeout
        )
        pids = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
        dist.all_gather(pids, torch.tensor([os.getpid()], dtype=torch.int64, device=device))
        return cls(rank=rank, size=size, parallel=parallel, device=device, pids=[int(p) for p in pids])

    def dead_ranks(self, wait_s: float = 0.0) -> list[int]:
        """The other ranks whose process has exited, waiting up to ``wait_s`` for one to show (a
        killed process's connections close a moment before it is gone)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [r for r, pid in enumerate(self.pids) if r != self.rank and _gone(pid)]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def lost(self, exc: BaseException) -> ServerRankLost | None:
        """``exc`` as a :class:`ServerRankLost` naming the dead rank(s) when it is the group failing
        (a rank's process exited, or a collective failed); None when it is a request's own error."""
        text = str(exc)
        collective = isinstance(exc, dist.DistError) or any(s in text for s in _COLLECTIVE_FAILURES)
        dead = self.dead_ranks(_DEATH_GRACE_S if collective else 0.0)
        if not dead and not collective:
            return None
        who = (
            ", ".join(f"server rank {r}" for r in dead)
            if dead
            else "a server rank (none has exited: one stopped answering, or the network failed)"
        )
        # the backend's first sentence, without its source location ("[.../pair.cc:553] ")
        first = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0]).split(". ")[0] if text.strip() else ""
        lost = ServerRankLost(f"server rank {self.rank}: lost {who} of --server-procs {self.size}: {first}")
        lost.detail = first or type(exc).__name__
        return lost

    def barrier(self) -> None:
        """Wait for every rank to reach this point (one process: nothing to wait for)."""
        if self.distributed:
            dist.barrier()

    def leave(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # -- the module ----------------------------------------------------------------------------
    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to run forwards through: ``module`` itself (one process, or nothing to
        train), ``DistributedDataParallel(module)``, or ``module`` sharded in place with FSDP2
        (each block of every ``nn.ModuleList``, then the root)."""
        if not self.distributed:
            return module  # one process: where and as it is
        module.to(self.device)
        if not any(p.requires_grad for p in module.parameters()):
            return module  # nothing trains: the replicas stay equal without any sync
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(
                module, device_ids=None if self.device.type == "cpu" else [self.device], broadcast_buffers=False
            )
        from torch.distributed.fsdp import fully_shard

        for child in module.modules():
            if isinstance(child, nn.ModuleList):
                for block in child:
                    fully_shard(block)
        # the root too reshards after each forward: a forward without backward (an evaluation, the
        # perturbed losses) would otherwise leave its own parameters (e.g. the head) gathered
        fully_shard(module, reshard_after_forward=True)
        return module

    # -- checkpoints: one server process's states ------------------------------------------------
    # A run begun with fsdp writes sharded checkpoints (hosl/training/sharded_checkpoint.py, each
    # rank its shards). The full states below serve the runs whose checkpoints are one server
    # process's: FSDP2's shards gathered to rank 0 (the other ranks get empty states), which any P
    # (or hosl export) reads; ddp replicas, and one process, hold the full states already.
    @property
    def sharded(self) -> bool:
        return self.distributed and self.parallel == "fsdp"

    def full_state(self, module: nn.Module) -> dict:
        """``module.state_dict()`` as one process holds it (fsdp: a collective; rank 0 gets it)."""
        if not self.sharded:
            return module.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state(self, module: nn.Module, state: dict, strict: bool = True) -> None:
        """Load one process's ``state`` into ``module`` (fsdp: every rank passes the full state and
        keeps its shards)."""
        if not self.sharded:
            module.load_state_dict(state, strict=strict)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))

    def full_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` as one process's optimizer over ``module`` holds it (fsdp: a
        collective; rank 0 gets the gathered state, its parameters numbered in the optimizer's order)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        by_name = get_optimizer_state_dict(module, optimizer, options=options)
        if self.rank != 0:
            return {}
        index = {name: i for i, name in enumerate(_optimized_names(module, optimizer))}
        return _renumbered(by_name, index)

    def load_full_optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load one process's optimizer ``state`` (fsdp: each rank keeps its shards of it)."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = dict(enumerate(_optimized_names(module, optimizer)))
        set_optimizer_state_dict(
            module, optimizer, _renumbered(state, names), options=StateDictOptions(full_state_dict=True)
        )

    # -- rows ----------------------------------------------------------------------------------
    def part(self, rows: int) -> slice:
        """This rank's rows of a batch of ``rows`` (torch.tensor_split's deal: the first
        ``rows % size`` ranks take one more)."""
        base, extra = divmod(rows, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def has_rows(self, rows: int) -> bool:
        part = self.part(rows)
        return part.stop > part.start

    def rows_of(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """This rank's rows of ``t``, which stacks copies of a batch of ``rows`` rows (copy-major);
        a rank with no row takes the first one (its results are weighted 0 or dropped)."""
        if not self.distributed:
            return t
        part = self.part(rows) if self.has_rows(rows) else slice(0, 1)
        copies = t.shape[0] // rows
        return t.view(copies, rows, *t.shape[1:])[:, part].reshape(-1, *t.shape[1:])

    # -- reductions ----------------------------------------------------------------------------
    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(t)
        return t

    def mean(self, local: torch.Tensor, weight: float) -> torch.Tensor:
        """The whole batch's mean loss (a scalar, or one per copy) from this rank's mean ``local``
        over its rows, whose share of the mean is ``weight`` (its rows, or answer tokens). Its
        value is the same on every rank; its gradient, averaged over the ranks (as DDP and FSDP2
        average), is the whole batch's."""
        if not self.distributed:
            return local
        total = float(self._sum(torch.tensor(float(weight))))
        contribution = local * (weight / total) if total > 0 else local * 0.0
        scaled = (contribution * self.size).double()  # the ranks' gradients are averaged, not summed
        value = self._sum(contribution)
        return scaled + (value - scaled).detach()

    def input_grad(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """dL/dh of the whole batch from each rank's gradient of :meth:`mean` with respect to the
        full ``h`` (non-zero only on its rows, and scaled by the group's size)."""
        if not self.distributed or grad is None:  # None: no backward ran (on every rank alike)
            return grad
        return (self._sum(grad) / self.size).to(grad.device, grad.dtype)

    def total(self, value: float, counts: bool = True) -> float:
        """``value`` summed over the ranks (``counts=False``: this rank's value does not count)."""
        if not self.distributed:
            return value
        return float(self._sum(torch.tensor(value if counts else 0.0)))

    def gather_rows(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """Every rank's rows of a per-row output ``t`` (this rank's, from :meth:`rows_of` of one
        copy), in batch order."""
        if not self.distributed:
            return t
        width = -(-rows // self.size)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=self.device)
        mine = self.part(rows)
        n = mine.stop - mine.start
        padded[:n] = t[:n].to(self.device)
        pieces = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(pieces, padded)
        out = []
        for r, piece in enumerate(pieces):
            part = ServerGroup(rank=r, size=self.size).part(rows)
            out.append(piece[: part.stop - part.start])
        return torch.cat(out).to(t.device)

    # -- requests: rank 0 shares each one with the other ranks ----------------------------------
    def share(self, msg: Message | None) -> Message | None:
        """Rank 0: send ``msg`` (None: no more requests) to every other rank; the others: receive
        it. Returns the message (None once rank 0 said there are no more)."""
        if not self.distributed:
            return msg
        dev = self.device
        if self.rank == 0:
            head = (
                ([_STOP] + [0] * 6)
                if msg is None
                else [int(msg.kind), msg.phase, msg.step, len(msg.ints), len(msg.floats), len(msg.tensors), msg.code]
            )
            head_t = torch.tensor(head, dtype=torch.int64, device=dev)
        else:
            head_t = torch.empty(7, dtype=torch.int64, device=dev)
        dist.broadcast(head_t, 0)
        kind, phase, step, n_ints, n_floats, n_tensors, code = head_t.tolist()
        if kind == _STOP:
            return None
        send = self.rank == 0
        sent = cast(Message, msg)  # on rank 0 a message: the stop returned above
        ints = torch.tensor(sent.ints, dtype=torch.int64) if send else torch.empty(n_ints, dtype=torch.int64)
        floats = torch.tensor(sent.floats, dtype=torch.float64) if send else torch.empty(n_floats, dtype=torch.float64)
        if send:
            headers = (
                torch.stack([tensor_header(t) for t in sent.tensors])
                if sent.tensors
                else torch.empty((0, 0), dtype=torch.int64)
            )
        else:
            headers = torch.empty((n_tensors, TENSOR_HEADER_LEN), dtype=torch.int64)
        small = [ints.to(dev), floats.to(dev), headers.to(dev)]
        for t in small:
            if t.numel():
                dist.broadcast(t, 0)
        if send:
            tensors = [t.contiguous().to(dev) for t in sent.tensors]
        else:
            tensors = [
                torch.empty(shape, dtype=dtype, device=dev)
                for dtype, shape in (parse_tensor_header(h) for h in small[2].cpu())
            ]
        for t in tensors:
            if t.numel():
                dist.broadcast(as_bytes(t), 0)
        if send:
            return msg
        return Message(Kind(kind), phase, step, small[0].tolist(), small[1].tolist(), tensors, code)


def check_parallel(size: int, parallel: str) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"--server-procs must be a whole number of processes >= 1, got {size}")
    if parallel not in PARALLEL:
        raise ValueError(f"--server-parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")


def _optimized_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters in its order (the numbers of its state dict)."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _renumbered(state: dict, key: dict) -> dict:
    """An optimizer state dict with each parameter's key (a name, or a number) mapped by ``key``."""
    return {
        "state": {key[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in state["param_groups"]],
    }


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (not Linux): ask the process table
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def follow(group: ServerGroup, answer) -> None:
    """Ranks 1..P-1: answer each request rank 0 shares, until it says there are no more. A request's
    own failure is rank 0's to report (it computes the same request); this rank goes on to the next
    one. The group failing (a rank died) raises :class:`ServerRankLost` naming it."""
    while True:
        try:
            request = group.share(None)
        except Exception as exc:
            lost = group.lost(exc)
            if lost is None:
                raise
            raise lost from exc
        if request is None:
            return
        try:
            answer(request)
        except Exception as exc:  # noqa: BLE001 - rank 0 answers the client with the same failure
            if (lost := group.lost(exc)) is not None:
                raise lost from exc
            print(f"[hosl] server rank {group.rank}: {type(exc).__name__}: {exc}", flush=True)
