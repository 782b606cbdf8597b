"""``D`` perturbed points in ONE client forward over a ``D x B`` batch (``query_batch``).

Inside ``BatchedPerturber.perturbed(points)`` (``points``: ``D`` pairs ``(seed, scale)``):

* the client module's inputs are repeated ``D`` times along dim 0 by a forward pre-hook on the
  module itself, so the user's ``client_fn`` is unchanged (``lambda: client(ids, mask)``): every
  tensor argument whose first dimension equals the first tensor argument's (the batch ``B``) becomes
  ``[D*B, ...]`` (rows ``d*B .. d*B+B-1`` are direction ``d``); other tensors pass through as given.
  The activation comes back with ``D*B`` rows, copy ``d`` at rows ``d*B ..``;
* every eligible ``nn.Linear`` / ``nn.Embedding`` (:func:`hosl.forward.fused.fused_kind`) runs
  ``ops.perturbed_linear`` / ``ops.perturbed_embedding`` with the ``D`` directions at once on its
  input viewed as ``[D, B, ...]``: the weight is read once per group of directions (Triton) and never
  written; the materialising backends (CPU) build one perturbed copy of that one layer at a time;
* every other module owning trainable parameters (norms: small) runs once per direction on its
  ``B``-row slice, with its parameters perturbed into a scratch buffer for that call (the scratch
  path's mechanism); Linear/Embedding layers nested inside such a module then run the one direction
  of the slice.

Row independence is assumed: a module must not mix the rows of a batch (true of transformer
clients; batch norm in training mode would not be). The perturbed values are those of the
sequential paths (same ops, same bits of ``W + s z``), so the ``D`` activations equal ``D``
sequential perturbed forwards up to matmul summation order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from hosl import ops
from hosl.forward.fused import EMBEDDING, EMBEDDING_INTERCEPT, LINEAR, describe_fused, fused_kind, intercepting_forward
from hosl.forward.layout import LowRankSeeds, ParameterLayout, SphereScales
from hosl.forward.scratch import _ScratchStack, scratch_sizes


def repeat_batch(args: tuple, kwargs: dict, copies: int) -> tuple[tuple, dict, int]:
    """``args``/``kwargs`` with every batch-shaped tensor repeated ``copies`` times along dim 0.

    Batch-shaped: a tensor with at least one dimension whose first dimension equals that of the
    first tensor argument. Returns the new arguments and ``B`` (0 when there is no tensor argument).
    """
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim >= 1]
    if not tensors:
        return args, kwargs, 0
    rows = tensors[0].shape[0]

    def rep(a):
        if isinstance(a, torch.Tensor) and a.ndim >= 1 and a.shape[0] == rows:
            return a.repeat(copies, *([1] * (a.ndim - 1)))
        return a

    return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}, rows


class BatchedPerturber:
    """Batched perturbed forwards of one module tree (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        layout: ParameterLayout,
        backend: str | None = None,
        fused_backend: str | None = None,
        direction: str = "gaussian",
        sphere_scales: SphereScales | None = None,
        lowrank: LowRankSeeds | None = None,
    ):
        self.module, self.layout, self.backend, self.fused_backend = module, layout, backend, fused_backend
        self.direction = direction
        if (direction == "lowrank") != (lowrank is not None):
            raise ValueError("lowrank (the rank and U seeds) is given with direction='lowrank' and only then")
        self.lowrank = lowrank
        if direction == "sphere" and sphere_scales is None:
            sphere_scales = SphereScales(layout, backend)
        self.sphere_scales = sphere_scales if direction == "sphere" else None
        self.fused: list[tuple[nn.Module, str, dict]] = []
        self.looped: list[tuple[nn.Module, list]] = []  # other owners: once per direction, via scratch
        for mod in module.modules():
            slots = [layout.by_param[id(p)] for p in mod.parameters(recurse=False) if id(p) in layout.by_param]
            if not slots:
                continue
            by_name = {s.name.rsplit(".", 1)[-1]: s for s in slots}
            kind = fused_kind(mod, by_name)
            if kind is None:
                self.looped.append((mod, slots))
            else:
                self.fused.append((mod, kind, by_name))
        self._scratch: _ScratchStack | None = None
        self._points: list[tuple[int, float]] = []
        self._factors: list[list[float]] | None = None  # sphere: per direction, per layout slot
        self._active: int | None = None  # inside a looped owner: the one direction of its slice
        self.root_calls = 0

    # -- sizes ------------------------------------------------------------------------------
    def _scratch_sizes(self) -> dict:
        """Per dtype, the most scratch any chain of nested looped owners holds at once."""
        return scratch_sizes(self.module, {id(s.param) for _, slots in self.looped for s in slots})

    def scratch_nbytes(self) -> int:
        """Bytes of the looped owners' scratch (the largest of them: norms on transformer clients)."""
        return sum(n * key[0].itemsize for key, n in self._scratch_sizes().items())

    def describe(self) -> str:
        return (
            f"{describe_fused('batched', self.fused_backend, self.fused)} with D directions per call; "
            f"{len(self.looped)} other modules once per direction"
        )

    # -- the directions of a call -------------------------------------------------------------
    def _directions(self, rows: int) -> list[int]:
        """The directions a layer call with ``rows`` input rows runs (all, or the looped slice's one)."""
        if self._active is not None:
            return [self._active]
        if self.root_calls == 0 or rows % len(self._points):
            raise RuntimeError(
                f"with query_batch, client_fn must run the client module itself (the optimizer repeats its batch "
                f"inputs {len(self._points)} times in the module's forward pre-hook); a layer got {rows} rows"
            )
        return list(range(len(self._points)))

    def _factors_of(self, dirs: list[int], slots: list) -> list[list[float]] | None:
        if self._factors is None:
            return None
        return [[self._factors[d][self.layout.index[id(s.param)]] for s in slots] for d in dirs]

    def _linear(self, mod: nn.Linear, slots: dict):
        w_slot, b_slot = slots["weight"], slots.get("bias")

        def forward(x):
            dirs = self._directions(x.shape[0])
            d = len(dirs)
            xs = x.reshape(d, x.shape[0] // d, *x.shape[1:])
            perturb_slots = [w_slot] + ([b_slot] if b_slot is not None else [])
            seeds = [self._points[i][0] for i in dirs]
            if self.lowrank is not None:  # one GEMM over the D*B rows + a batched rank-R term
                y = ops.perturbed_linear(
                    xs,
                    mod.weight,
                    mod.bias,
                    seeds=seeds,
                    scales=[self._points[i][1] for i in dirs],
                    weight_offset=w_slot.offset,
                    bias_offset=b_slot.offset if b_slot is not None else None,
                    per_direction_input=True,
                    family="lowrank",
                    backend=self.backend,
                    **self.lowrank.op_options(seeds),
                )
                return y.reshape(x.shape[0], *y.shape[2:])
            y = ops.perturbed_linear(
                xs,
                mod.weight,
                mod.bias,
                seeds=[self._points[i][0] for i in dirs],
                scales=[self._points[i][1] for i in dirs],
                weight_offset=w_slot.offset,
                bias_offset=b_slot.offset if b_slot is not None else None,
                per_direction_input=True,
                family=self.direction,
                factors=self._factors_of(dirs, perturb_slots),
                # on CUDA the fused Triton linear only for few rows per direction, else materialise + cuBLAS
                backend=ops.perturbed_linear_backend(
                    xs[0].numel() // max(x.shape[-1], 1), x.device, self.fused_backend
                ),
            )
            return y.reshape(x.shape[0], *y.shape[2:])

        return forward

    def _lookup(self, mod: nn.Embedding, slots: dict):
        w_slot = slots["weight"]

        def lookup(ids):
            dirs = self._directions(ids.shape[0])
            d = len(dirs)
            factors = self._factors_of(dirs, [w_slot])
            seeds = [self._points[i][0] for i in dirs]
            extra = {} if self.lowrank is None else {"backend": self.backend, **self.lowrank.op_options(seeds)}
            y = ops.perturbed_embedding(
                ids.reshape(d, ids.shape[0] // d, *ids.shape[1:]),
                mod.weight,
                seeds=seeds,
                scales=[self._points[i][1] for i in dirs],
                offset=w_slot.offset,
                per_direction_input=True,
                family=self.direction,
                factors=None if factors is None else [f[0] for f in factors],
                **{"backend": self.fused_backend, **extra},
            )
            return y.reshape(ids.shape[0], *y.shape[2:])

        return lookup

    def _embedding_intercept(self, mod: nn.Embedding, slots: dict):
        return intercepting_forward(mod, self._lookup(mod, slots), "batched path", "use query_batch=1")

    def _looped(self, mod: nn.Module, slots: list):
        class_forward = type(mod).forward
        params = [s.param for s in slots]

        def forward(*args, **kwargs):
            if self._active is not None:  # nested in another looped owner: already one direction
                return self._one_direction(mod, class_forward, params, slots, self._active, args, kwargs)
            d = len(self._points)
            first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is None or first.ndim == 0 or first.shape[0] % d:
                raise RuntimeError(
                    f"{type(mod).__name__} got no input with {d} copies of the batch along dim 0; "
                    "the batched perturbed forward cannot split it by direction (use query_batch=1)"
                )
            rows = first.shape[0]

            def part(a, i):
                if isinstance(a, torch.Tensor) and a.ndim >= 1 and a.shape[0] == rows:
                    return a[i * (rows // d) : (i + 1) * (rows // d)]
                return a

            outs = []
            for i in range(d):
                outs.append(
                    self._one_direction(
                        mod,
                        class_forward,
                        params,
                        slots,
                        i,
                        tuple(part(a, i) for a in args),
                        {k: part(v, i) for k, v in kwargs.items()},
                    )
                )
            return _concat(outs)

        return forward

    def _one_direction(self, mod, class_forward, params, slots, i, args, kwargs):
        outs = [self._scratch.take(p) for p in params]
        seed, scale = self._points[i]
        factors = self._factors_of([i], slots)
        extra = {} if self.lowrank is None else {"rank": self.lowrank.rank, "u_seed": self.lowrank.u_seed(seed)}
        ops.perturb_(
            params,
            seed,
            scale,
            out=outs,
            offsets=[s.offset for s in slots],
            family=self.direction,
            scales=None if factors is None else factors[0],
            backend=self.backend,
            **extra,
        )
        originals = [p.data for p in params]
        outer, self._active = self._active, i
        try:
            for p, o in zip(params, outs):
                p.data = o
            return class_forward(mod, *args, **kwargs)
        finally:
            for p, o in zip(params, originals):
                p.data = o
            for p in reversed(params):
                self._scratch.give_back(p)
            self._active = outer

    @contextlib.contextmanager
    def perturbed(self, points: Sequence[tuple[int, float]]) -> Iterator[None]:
        """Inside the block, a call of the module runs the ``D = len(points)`` points ``w + scale * z(seed)``
        at once on its inputs repeated ``D`` times; ``w`` is never written."""
        if self._points:
            raise RuntimeError("perturbed() blocks of one module cannot nest")
        if not points:
            raise ValueError("points is empty: at least one (seed, scale) is needed")
        if self._scratch is None:
            self._scratch = _ScratchStack(self._scratch_sizes())
        self._points = [(int(s), float(c)) for s, c in points]
        self._factors = [self.sphere_scales(s) for s, _ in self._points] if self.sphere_scales is not None else None
        self.root_calls = 0
        copies = len(self._points)

        def repeat_inputs(mod, args, kwargs):
            self.root_calls += 1
            args, kwargs, _ = repeat_batch(args, kwargs, copies)
            return args, kwargs

        swapped: list[nn.Module] = []
        handle = self.module.register_forward_pre_hook(repeat_inputs, prepend=True, with_kwargs=True)
        try:
            for mod, kind, slots in self.fused:
                make = {
                    LINEAR: self._linear,
                    EMBEDDING: lambda m, s: self._lookup(m, s),
                    EMBEDDING_INTERCEPT: self._embedding_intercept,
                }[kind]
                self._swap(mod, make(mod, slots), swapped)
            for mod, owned in self.looped:
                self._swap(mod, self._looped(mod, owned), swapped)
            with torch.no_grad():
                yield
        finally:
            handle.remove()
            for mod in swapped:
                del mod.forward
            for key in self._scratch.tops:
                self._scratch.tops[key] = 0
            self._points, self._factors, self._active = [], None, None

    @staticmethod
    def _swap(mod: nn.Module, forward, swapped: list) -> None:
        if "forward" in mod.__dict__:
            raise RuntimeError(f"{type(mod).__name__} already has an instance forward; use query_batch=1")
        mod.forward = forward
        swapped.append(mod)


def _concat(outs: list):
    """The per-direction outputs of a looped module, joined along dim 0 (tensors, or tuples of them)."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, dim=0)
    if isinstance(first, (tuple, list)):
        return type(first)(
            _concat([o[j] for o in outs]) if isinstance(first[j], torch.Tensor) else first[j] for j in range(len(first))
        )
    raise TypeError(f"a module run once per direction returned {type(first).__name__}; expected tensors")
