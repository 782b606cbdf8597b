"""The conversation between the client half and the server half, for the split modes: the phases
and what each message carries. The server's side is ``hosl/training/server_handler.py``
(:class:`ServerHandler`), the client's ``hosl/training/server_proxy.py`` (:class:`ServerProxy`).

One training step, as the client's modes (``hosl/training/modes.py``) drive it:

==========  =====================================  ==========================================
phase       up (client -> server)                  down (server -> client)
==========  =====================================  ==========================================
begin-step  attention mask + the batch's labels    (ack)
            [+ zo-sl: the client's coordinate
            count]
clean-loss  h (hosl: the clean activation)         loss; the server back-propagates it
losses      h (copies stacked) [+ zo-sl: seed,     one loss per copy, no grad
            scale of the point]
backprop    h (fo-sl)                              loss and dL/dh
end-step    [zo-sl: seeds, projected grads]        the count of skipped server steps; the
                                                   server's optimizer steps (unless the clean
                                                   loss or its gradient is not finite)
eval        h, mask, the batch's scoring tensors   option scores / class logits, loss sum
save        step                                   (ack) once the server's checkpoint is on disk
resume      step (0: fresh start)                  (ack) once the server has loaded that step
linear-     (hosl linear, --linear-on client)      dL/dh at the clean point (once per step)
grad
linear-     h+ - h- per direction (copies          <dL/dh, difference> per copy
dots        stacked; hosl linear, on the server)
join        (fleets) the client's checkpoint steps     the step to restart from, the fleet's
                                                   step, and the update log in between
==========  =====================================  ==========================================

In a fleet (``hosl serve --clients N``, ``hosl/training/fleet_server.py``) the hosl client sends its
step's update (seeds, projected gradients) with ``end-step`` instead of applying it, and the reply
relays the updates it must apply: every client's (``--client-sync shared``, in rank order) or its
own (``local``). See docs/fleet.md.

Clean and perturbed are different phases: ``clean-loss`` and ``backprop`` are the server's
first-order passes (it computes with grad and back-propagates), ``losses`` and ``eval`` are
evaluations without grad. The server decides by the phase alone, never by the grad mode it
happens to be called under (an in-process server runs inside the client's optimizer step).

HOSL with ``--server-grad perturbed`` (the authors' step): the clean-loss request carries ints
``[NO_BACKWARD]`` (the loss only), and each direction's ``+`` activation goes up (as a ``plain``
activation: the step's clean one stays the wire's reference) in a clean-loss request with ints
``[WEIGHTED_BACKWARD]`` and floats ``[1/Q]``: the server back-propagates its loss
there with that weight (its gradients accumulate over the Q directions) and answers the loss.

HOSL's linear estimate (``--server-estimate linear``): the clean-loss request asks the server to
keep dL/dh (ints ``[KEEP_ACTIVATION_GRAD]``); the client then asks for the Q scalars
(``linear-dots``, Q activation differences up) or, only when the server was started with
``--linear-on client``, for dL/dh itself (``linear-grad``, once). No ``losses`` phase runs.

ZO-SL numbers the coordinates of the whole model once, as the unsplit ``zo`` mode does: the server
half's first coordinate is the client's coordinate count, which the client sends with every
``begin-step`` (the server builds its ZO optimizer from the first one and refuses a different count
later). The two halves' perturbations are therefore independent parts of one direction, and ZO-SL
is MeZO on the whole model.

The integer and float lists a phase carries are declared below, one ``NamedTuple`` per payload
with ``to_fields`` / ``from_fields`` (:class:`ZOPoint`, :class:`ZOUpdate`, :class:`Relay`,
:class:`CatchUp`), and the protocol has a version, :data:`SPLIT_PROTOCOL_VERSION`, checked at the
handshake.

Labels travel up with the batch (``begin-step``), once per step: the client owns the data, and the
server never reads a dataset, so the two can never disagree on the data order. The server
sees labels, the attention mask and (for evaluation) the answer tokens, never the prompts.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple

import torch

from hosl.transport.codecs import check_codec, decode, encode
from hosl.transport.wire import from_int64, to_int64


class Phase(enum.IntEnum):
    BEGIN_STEP = 1
    CLEAN_LOSS = 2
    LOSSES = 3
    BACKPROP = 4
    END_STEP = 5
    EVAL = 6
    SAVE = 7
    RESUME = 8
    LINEAR_GRAD = 9
    LINEAR_DOTS = 10
    JOIN = 11


PHASE_NAMES = {int(p): p.name.lower().replace("_", "-") for p in Phase}

# The version of this protocol: the phases and the payload schemas below (the transport's own
# framing has hosl.transport.PROTOCOL_VERSION). Both processes send it at the handshake
# (hosl/training/remote.py, fingerprint) and a peer with another version is refused, naming both.
# Raise it with any change to what a phase means or to a payload's layout.
SPLIT_PROTOCOL_VERSION = 1

# clean-loss ints: [KEEP_ACTIVATION_GRAD] asks the server to keep dL/dh for the linear estimate;
# --server-grad perturbed: [NO_BACKWARD] at the clean point (the loss only), and [WEIGHTED_BACKWARD]
# with floats [w] at each direction's + point (the loss there back-propagated with weight w = 1/Q)
KEEP_ACTIVATION_GRAD = 1
NO_BACKWARD = 2
WEIGHTED_BACKWARD = 3

# What of a batch the server needs, by model kind (training / evaluation), in wire order.
_TRAIN_KEYS = ("labels",)
_EVAL_KEYS = {"causal_lm": ("labels", "answer_mask", "answer_ids"), "classifier": ("labels",)}


def server_side_of(batch: dict, model_kind: str, for_eval: bool) -> list[torch.Tensor]:
    """The tensors of ``batch`` the server needs (after the attention mask)."""
    keys = _EVAL_KEYS[model_kind] if for_eval else _TRAIN_KEYS
    if "answer_ids" in keys:
        # option scores read the input ids only at answer positions: send just those
        batch = dict(batch, answer_ids=batch["input_ids"].masked_fill(~batch["answer_mask"], 0))
    return [batch[k] for k in keys]


def batch_from_server_side(tensors: list[torch.Tensor], model_kind: str, for_eval: bool) -> dict:
    keys = _EVAL_KEYS[model_kind] if for_eval else _TRAIN_KEYS
    batch = dict(zip(keys, tensors))
    if "answer_ids" in batch:
        batch["input_ids"] = batch.pop("answer_ids")
    return batch


# -- the payloads that travel as integer and float lists: one declared schema each --------------------
# Seeds are unsigned 64-bit; they travel as int64 (hosl/transport/wire.py: to_int64 / from_int64).


class ZOPoint(NamedTuple):
    """The point a zo-sl ``losses`` request evaluates the server half at: ints ``[seed]``, floats
    ``[scale]``. A request with no ints is at the current weights (``from_fields`` gives None)."""

    seed: int
    scale: float

    def to_fields(self) -> tuple[list[int], list[float]]:
        return [to_int64(self.seed)], [self.scale]

    @classmethod
    def from_fields(cls, ints: list[int], floats: list[float]) -> ZOPoint | None:
        return cls(from_int64(ints[0]), floats[0]) if ints else None


class ZOUpdate(NamedTuple):
    """A zo-sl (or fleet) ``end-step`` request's update: ints ``[seed_1, ...]``, floats
    ``[projected gradient_1, ...]``; empty: no ZO update this step."""

    seeds: list[int]
    grads: list[float]

    def to_fields(self) -> tuple[list[int], list[float]]:
        return [to_int64(s) for s in self.seeds], list(self.grads)

    @classmethod
    def from_fields(cls, ints: list[int], floats: list[float]) -> ZOUpdate:
        return cls([from_int64(s) for s in ints], list(floats))


class ClientUpdate(NamedTuple):
    """One client's update as a fleet's server relays it (``rank``: whose)."""

    rank: int
    seeds: list[int]
    grads: list[float]


class Relay(NamedTuple):
    """A fleet's ``end-step`` reply: the count of skipped server steps and the updates to apply, in
    order. ints ``[skipped, n, rank_1, count_1, ..., rank_n, count_n, seeds of 1..n]``, floats: the
    gradients of 1..n."""

    skipped: int
    updates: Sequence[tuple[int, list[int], list[float]]]  # ClientUpdates, or plain (rank, seeds, grads)

    def to_fields(self) -> tuple[list[int], list[float]]:
        ints, floats = [self.skipped, len(self.updates)], []
        for rank, seeds, _grads in self.updates:
            ints += [rank, len(seeds)]
        for _rank, seeds, grads in self.updates:
            ints += [to_int64(s) for s in seeds]
            floats += list(grads)
        return ints, floats

    @classmethod
    def from_fields(cls, ints: list[int], floats: list[float]) -> Relay:
        skipped, n = ints[0], ints[1]
        heads = [(ints[2 + 2 * i], ints[3 + 2 * i]) for i in range(n)]
        pos, fpos, updates = 2 + 2 * n, 0, []
        for rank, count in heads:
            seeds = [from_int64(s) for s in ints[pos : pos + count]]
            updates.append(ClientUpdate(rank, seeds, list(floats[fpos : fpos + count])))
            pos, fpos = pos + count, fpos + count
        if pos != len(ints) or fpos != len(floats):
            raise ValueError(f"a relayed update of {len(ints)} ints and {len(floats)} floats does not add up")
        return cls(skipped, updates)


class CatchUp(NamedTuple):
    """A ``join`` reply: restart from checkpoint step ``start``, replay ``steps`` (each the list of
    updates of steps start+1 .. to, as :class:`Relay` carries them), then run from step ``to + 1``.
    ints ``[start, to, (n_ints, n_floats, the step's Relay ints) per step]``, floats: each step's
    Relay floats."""

    start: int
    to: int
    steps: Sequence[Sequence[tuple[int, list[int], list[float]]]]

    def to_fields(self) -> tuple[list[int], list[float]]:
        ints, floats = [self.start, self.to], []
        for updates in self.steps:
            i, f = Relay(0, updates).to_fields()
            ints += [len(i), len(f), *i]
            floats += f
        return ints, floats

    @classmethod
    def from_fields(cls, ints: list[int], floats: list[float]) -> CatchUp:
        start, to, pos, fpos, steps = ints[0], ints[1], 2, 0, []
        while pos < len(ints):
            n_i, n_f = ints[pos], ints[pos + 1]
            steps.append(Relay.from_fields(ints[pos + 2 : pos + 2 + n_i], floats[fpos : fpos + n_f]).updates)
            pos, fpos = pos + 2 + n_i, fpos + n_f
        if len(steps) != to - start:
            raise ValueError(f"a catch-up from step {start} to {to} carries {len(steps)} steps")
        return cls(start, to, steps)


# -- activations on the wire (--wire) -----------------------------------------------------------------


class ActivationWire:
    """How a request's activation travels (``hosl/transport/codecs.py``), the same on both sides.

    Kinds: ``clean`` (the step's clean activation: with ``delta8`` it goes as is and both sides keep
    it as the step's reference), ``copies`` (perturbed activations stacked: ``delta8`` sends them as
    int8 differences from the reference), ``difference`` (already differences, e.g. the linear
    estimate's h+ - h-: ``delta8`` quantises them directly) and ``plain`` (evaluation, fo-sl, and
    zo-sl's points, which have no clean activation: ``delta8`` sends them as they are). The float
    codecs cast every kind. A ``delta8`` client keeps the clean activation until the step ends (one
    activation more than the floor)."""

    def __init__(self, codec: str = "native"):
        self.codec = check_codec(codec)
        self.reference: torch.Tensor | None = None

    def _codec(self, kind: str) -> str:
        if self.codec != "delta8":
            return self.codec
        return {"clean": "native", "plain": "native"}.get(kind, "delta8")

    def _kind(self, kind: str) -> str:
        # copies with no clean activation this step (zo-sl perturbs both halves: each point stands alone)
        return "plain" if kind == "copies" and self.reference is None else kind

    def parts(self, kind: str) -> int:
        """How many tensors carry one activation of ``kind``."""
        return 2 if self._codec(kind) == "delta8" else 1

    def pack(self, h: torch.Tensor, kind: str) -> list[torch.Tensor]:
        h = h.detach()
        if kind == "clean":
            self.reference = h if self.codec == "delta8" else None
        kind = self._kind(kind)
        return encode(h, self._codec(kind), self.reference if kind == "copies" else None)

    def unpack(self, tensors: list[torch.Tensor], kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, list]:
        """(the activation, the request's other tensors)."""
        kind = self._kind(kind)
        n = self.parts(kind)
        h = decode(tensors[:n], self._codec(kind), self.reference if kind == "copies" else None, dtype=dtype)
        if kind == "clean":
            self.reference = h if self.codec == "delta8" else None
        return h, list(tensors[n:])

    def end_step(self) -> None:
        self.reference = None
