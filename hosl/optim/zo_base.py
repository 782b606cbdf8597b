"""What every zeroth-order optimizer here shares: layouts, perturbed forwards, seeds, the update.

A torch ``Optimizer`` subclass so LR schedulers and ``param_groups`` work as users expect: one
param group per ZO-trained module, holding ``lr``, ``eps``, ``weight_decay`` and the update rule's
hyperparameters. Every option is a field of the optimizer's :class:`~hosl.optim.config.ZOConfig`
(``self.config``, validated there); the other options are read from it.

The modules share one coordinate numbering, in the order given, starting at ``coordinate_offset``
(the ZO-SL server half passes the client's coordinate count, so the two halves are numbered as the
unsplit model is). ``peers`` are halves trained with the same directions somewhere this optimizer
cannot reach (the ZO-SL server in another process): each gives a context manager ``perturbed(seed, scale)`` entered
together with the local perturbation (``scale = sign * eps`` of the first group), and
``update(seeds, grads)``, called after the local update (not when a step's update is skipped).
The peer applies its own learning rate and weight decay.

``direction`` picks the direction family (:data:`hosl.directions.families.FAMILIES`) of every
perturbation and update; ``variant`` the update rule (:data:`hosl.optim.rules.RULES`; math in
:mod:`hosl.optim.functional`). The rules' float32 state lives in
``self.state`` (a torch ``Optimizer``'s), so ``state_dict()`` carries it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hosl.directions.families import FAMILIES
from hosl.forward import LowRankSeeds, ParameterLayout, SphereScales, make_batched_perturber, make_perturber
from hosl.ops.lowrank import check_shapes
from hosl.optim import functional as F
from hosl.optim import query_batch as QB
from hosl.optim import rules
from hosl.optim.config import ZOConfig, config_attribute

logger = logging.getLogger("hosl.optim")


class ZerothOrderBase(torch.optim.Optimizer):
    """``config``: the options (:class:`~hosl.optim.config.ZOConfig`, validated there); the
    subclasses build it from their keywords. ``peers``: see the module docstring."""

    config_kind = ""  # "zo" or "hybrid": which ZOConfig options the subclass takes

    # options read from ``self.config`` (per-group ones, lr and eps say, live in ``param_groups``)
    num_queries = config_attribute("num_queries")
    difference = config_attribute("difference")
    backend = config_attribute("backend")
    direction = config_attribute("direction")
    variant = config_attribute("variant")
    query_batch = config_attribute("query_batch")
    query_memory_budget = config_attribute("query_memory_budget")

    def __init__(self, modules: Sequence[nn.Module], config: ZOConfig, *, peers: Sequence = ()):
        if not isinstance(config, ZOConfig):
            raise TypeError(f"config must be a ZOConfig, got {type(config).__name__}")
        self.config = config
        c = config
        if c.query_batch != 1 and peers:
            raise ValueError("query_batch must be 1 with peers (a peer is perturbed one point at a time)")
        for m in modules:
            if not isinstance(m, nn.Module):
                raise TypeError(f"expected an nn.Module to train with ZO, got {type(m).__name__}")
        # one numbering over all the modules (MeZO on the whole): each starts where the previous ends
        self.layouts: list[ParameterLayout] = []
        for m in modules:
            self.layouts.append(
                ParameterLayout(m, offset=self.layouts[-1].end if self.layouts else c.coordinate_offset)
            )
        # sphere: each seed's per-tensor factors, computed once and shared by the passes and the update
        factor = FAMILIES[c.direction].per_tensor_factor
        self.sphere_scales = [
            SphereScales(lay, c.backend, keep=c.num_queries) if factor else None for lay in self.layouts
        ]
        # lowrank: the rank and each direction's U seed (resample_every), shared by the passes and the update
        self.lowrank = LowRankSeeds(c.rank) if c.direction == "lowrank" else None
        if self.lowrank is not None:
            for lay in self.layouts:
                check_shapes(
                    [tuple(s.param.shape) for s in lay.slots], c.rank, [f"parameter {s.name}" for s in lay.slots]
                )
            if c.resample_every > 1 and peers:
                raise ValueError(
                    "resample_every > 1 keeps U seeds in this optimizer; a peer could not follow them "
                    "(use resample_every=1 with peers)"
                )
        self.window_seeds: list[int] = []  # resample_every: the seeds of the first step of the current window
        # "auto": fused Linear/Embedding kernels on CUDA+Triton, else the materialising fused path (one
        # layer at a time); scratch when asked for or for a non-Gaussian direction (hosl/forward/choice.py)
        made = [
            make_perturber(m, lay, c.backend, c.perturbed_forward, c.direction, sph, self.lowrank)
            for m, lay, sph in zip(modules, self.layouts, self.sphere_scales)
        ]
        self.perturbers = [p for p, _ in made]
        self.perturbed_forward_info = [line for _, line in made]
        # query_batch: D points per client forward (hosl.forward.batched), built on first use
        self.batch_perturbers: list | None = None
        self.last_query_batch = 1  # the D the last step ran
        fell_back = c.perturbed_forward == "fused" and c.direction not in ("gaussian", "lowrank")
        for i, line in enumerate(self.perturbed_forward_info):
            logger.log(logging.WARNING if fell_back else logging.INFO, "%s module %d: %s", type(self).__name__, i, line)
        groups = [{"params": lay.params(), "module_index": i} for i, lay in enumerate(self.layouts)]
        super().__init__(groups, c.param_group_defaults())
        self.peers = list(peers)
        self.generator = torch.Generator().manual_seed(c.seed)
        self.steps_taken = 0
        self.skipped_updates = 0
        self.last_seeds: list[int] = []
        self.last_projected_grads: list[float] = []
        self._groups_fixed = True  # add_param_group is refused from here on

    # -- evaluating at a point: the public face of the perturbers (hosl.forward) ----------------
    # Code outside hosl.optim (the training modes, the split protocol's server half, benchmarks)
    # goes through these methods, never through ``self.perturbers``.
    def perturbed(self, seed: int, sign: float) -> contextlib.AbstractContextManager:
        """Context manager: inside it, forwards of every ZO-trained module run at
        ``w + sign * eps * z(seed)`` (each group with its own ``eps``, each module in its own
        coordinates; the peers at group 0's ``sign * eps``). The weights are never written: on exit
        they hold the same bits, even if a forward raised. Blocks do not nest."""
        eps0 = self.param_groups[0]["eps"]
        return self._at(seed, [sign * group["eps"] for group in self.param_groups], sign * eps0)

    def at_point(self, seed: int, scale: float) -> contextlib.AbstractContextManager:
        """Context manager: as :meth:`perturbed`, at ``w + scale * z(seed)`` with the raw ``scale``
        for every module and peer. This is how a peer is asked for a point (the ZO-SL server half
        answers its client's ``(seed, scale)`` with it); ``at_point(seed, sign * eps)`` is
        ``perturbed(seed, sign)`` when every group has the same ``eps``."""
        return self._at(seed, [scale] * len(self.perturbers), scale)

    @contextlib.contextmanager
    def _at(self, seed: int, scales: Sequence[float], peer_scale: float):
        with contextlib.ExitStack() as stack:
            for perturber, scale in zip(self.perturbers, scales):
                stack.enter_context(perturber.perturbed(seed, scale))
            for peer in self.peers:
                stack.enter_context(peer.perturbed(seed, peer_scale))
            yield

    def zo_modules(self) -> list[nn.Module]:
        """The modules this optimizer trains with ZO, in coordinate order (one per param group)."""
        return [p.module for p in self.perturbers]

    # -- pieces the subclasses combine --------------------------------------------------------
    @contextlib.contextmanager
    def batched(self, points: Sequence[tuple[int, float]]):
        """All ZO-trained modules run the ``D = len(points)`` points ``(seed, sign)`` in one forward
        over their inputs repeated ``D`` times (:mod:`hosl.forward.batched`)."""
        if self.batch_perturbers is None:
            self.batch_perturbers = [
                make_batched_perturber(p.module, lay, self.backend, self.direction, sph, self.lowrank)
                for p, lay, sph in zip(self.perturbers, self.layouts, self.sphere_scales)
            ]
        with contextlib.ExitStack() as stack:
            for group, perturber in zip(self.param_groups, self.batch_perturbers):
                stack.enter_context(perturber.perturbed([(seed, sign * group["eps"]) for seed, sign in points]))
            yield

    def query_batch_for(self, per_copy_bytes: int, points: int) -> int:
        """The ``D`` of this step (``query_batch``, or the ``"auto"`` choice), checked against
        ``query_memory_budget``: a ValueError before any weight is touched when it cannot fit."""
        weight_bytes = sum(s.param.numel() * s.param.element_size() for lay in self.layouts for s in lay.slots)
        device = self.layouts[0].slots[0].param.device if self.layouts and self.layouts[0].slots else None
        self.last_query_batch = QB.resolve(
            self.query_batch, self.query_memory_budget, per_copy_bytes, weight_bytes, points, device
        )
        return self.last_query_batch

    def begin_directions(self, seeds: Sequence[int]) -> None:
        """Called with each step's fresh seeds before its perturbed passes. ``"lowrank"`` with
        ``resample_every = K``: the seeds of the first step of each K-step window (``steps_taken %
        K == 0``) become the U seeds, direction ``q`` of every step in the window taking window seed
        ``q`` (docs/directions.md, "lowrank")."""
        if self.lowrank is None:
            return
        if self.steps_taken % self.config.resample_every == 0 or len(self.window_seeds) != len(seeds):
            self.window_seeds = list(seeds)
        self.lowrank.u_seeds = dict(zip(seeds, self.window_seeds))

    def points(self, seeds: Sequence[int]) -> list[tuple[int, float]]:
        signs = (1.0, -1.0) if self.difference == "central" else (1.0,)
        return [(s, sign) for s in seeds for sign in signs]

    def estimate(self, losses: Sequence[float], clean_loss: float | None) -> list[float]:
        """``g_q`` from the losses at :meth:`points` (``step_scale="loss-std"``: divided by their spread)."""
        eps = self.param_groups[0]["eps"]
        if self.difference == "central":
            grads = F.projected_gradients(losses[0::2], losses[1::2], eps)
        else:
            grads = F.projected_gradients(losses, None, eps, clean_loss)
        if self.config.step_scale == "loss-std":
            grads = F.loss_spread_scaled(grads, losses)
        return grads

    def group_grads(self, grads: Sequence[float]) -> list[list[float]]:
        """Each param group's ``g_q``: ``grads`` are ``(L+ - L-) / (2 eps_0)`` (group 0's eps); a
        group perturbed with its own ``eps_i`` gets ``(L+ - L-) / (2 eps_i)``, the unbiased estimate
        of its gradient when each group moves by ``eps_i z_i``."""
        eps0 = self.param_groups[0]["eps"]
        return [list(grads) if g["eps"] == eps0 else [v * (eps0 / g["eps"]) for v in grads] for g in self.param_groups]

    def apply_update(self, seeds: Sequence[int], grads: Sequence[float]) -> bool:
        """The update of every group (then the peers'). Returns False, touching nothing and counting
        the step in ``skipped_updates``, when it could make a weight non-finite
        (:func:`hosl.optim.rules.update_is_safe`: checked for all groups before any is written)."""
        per_group = self.group_grads(grads)
        for group, layout, g in zip(self.param_groups, self.layouts, per_group):
            if not rules.update_is_safe(
                self.variant,
                layout,
                g,
                self.state,
                direction=self.direction,
                rank=self.config.rank if self.lowrank is not None else None,
                **F.step_hyperparameters(group),
            ):
                self.skipped_updates += 1
                return False
        for group, layout, sphere, g in zip(self.param_groups, self.layouts, self.sphere_scales, per_group):
            rules.zo_step(
                self.variant,
                layout,
                seeds,
                g,
                self.state,
                direction=self.direction,
                **({} if self.lowrank is None else self.lowrank.op_options(seeds)),
                scales=None if sphere is None else [sphere(s) for s in seeds],
                backend=self.backend,
                **F.step_hyperparameters(group),
            )
        for peer in self.peers:
            peer.update(seeds, grads)
        return True

    def add_param_group(self, param_group: dict) -> None:
        """Refused once built: each group is one module's coordinate layout, perturber and eps,
        fixed at construction (build a new optimizer over all the modules instead)."""
        if getattr(self, "_groups_fixed", False):
            raise ValueError(
                f"{type(self).__name__} does not take add_param_group: its groups are the modules given "
                "at construction (each with its own coordinates, perturber and eps); build a new "
                "optimizer over all the modules instead"
            )
        super().add_param_group(param_group)

    @contextlib.contextmanager
    def seed_stream_kept_on_error(self):
        """Around a step: an exception puts the seed generator back where the step found it."""
        saved = self.generator.get_state()
        try:
            yield
        except BaseException:
            self.generator.set_state(saved)
            raise

    def layout_signature(self) -> list[list]:
        """What a saved state must match: each group's parameters as ``[name, shape, first coordinate]``."""
        return [[[s.name, list(s.param.shape), s.offset] for s in lay.slots] for lay in self.layouts]

    def scratch_nbytes(self) -> int:
        """Bytes of the one-point perturbed passes' scratch buffers (all modules; allocated on the
        first perturbed pass and kept)."""
        return sum(p.scratch_nbytes() for p in self.perturbers)

    def state_nbytes(self) -> int:
        """Bytes of the update rule's state now held (float32; 0 for sgd and sign, 1x the trainable
        parameters' element count in float32 for momentum, 2x for adam once the first update ran)."""
        return F.state_nbytes(self.state)

    def estimate_nbytes(self) -> int:
        """Bytes of the transient float32 gradient estimate the non-sgd rules materialise: the
        largest trainable tensor, one at a time (0 for sgd, whose fused update never builds it)."""
        if self.variant == "sgd":
            return 0
        return max(s.param.numel() for lay in self.layouts for s in lay.slots) * 4

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state["hosl"] = {
            "generator": self.generator.get_state(),
            "steps_taken": self.steps_taken,
            "skipped_updates": self.skipped_updates,
            "num_queries": self.num_queries,
            "difference": self.difference,
            "direction": self.direction,
            "variant": self.variant,
            "layout": self.layout_signature(),
            "window_seeds": list(self.window_seeds),
        }
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("hosl", None)
        if extra is None:
            raise ValueError("state_dict has no 'hosl' entry: it was not saved by a hosl optimizer")
        # fields a state saved before they were recorded may lack: then the default they had
        defaults = {
            "direction": "gaussian",
            "variant": "sgd",
            "num_queries": self.num_queries,
            "difference": self.difference,
            "layout": None,
        }
        for key, mine in (
            ("num_queries", self.num_queries),
            ("difference", self.difference),
            ("direction", self.direction),
            ("variant", self.variant),
        ):
            saved = extra.get(key, defaults[key])
            if saved != mine:
                raise ValueError(f"the state_dict was saved with {key}={saved!r}, this optimizer has {key}={mine!r}")
        saved_layout = extra.get("layout")
        if saved_layout is not None and saved_layout != self.layout_signature():
            difference = _layout_difference(saved_layout, self.layout_signature())
            raise ValueError(
                "the state_dict was saved with another parameter layout (names, shapes or first "
                f"coordinates of the trainable parameters): {difference}"
            )
        super().load_state_dict(state_dict)
        # torch casts loaded state to each parameter's dtype; this state is float32 whatever the weights' dtype
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            self.state[p] = {
                k: v.to(device=p.device, dtype=v.dtype, copy=True) if isinstance(v, torch.Tensor) else v
                for k, v in saved.items()
            }
        for group in self.param_groups:  # state saved before these options existed
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.generator.set_state(extra["generator"])
        self.steps_taken = extra["steps_taken"]
        self.skipped_updates = extra["skipped_updates"]
        self.window_seeds = list(extra.get("window_seeds", []))


def _layout_difference(saved: list, mine: list) -> str:
    """The first difference between two ``layout_signature()``s, in words."""
    if len(saved) != len(mine):
        return f"{len(saved)} groups saved, {len(mine)} here"
    for i, (a, b) in enumerate(zip(saved, mine)):
        for sa, sb in zip(a, b):
            if list(sa) != list(sb):
                return f"group {i}: saved {sa[0]} {sa[1]} at {sa[2]}, here {sb[0]} {sb[1]} at {sb[2]}"
        if len(a) != len(b):
            return f"group {i}: {len(a)} parameters saved, {len(b)} here"
    return "they differ"


def scalar_loss(value, what: str) -> torch.Tensor:
    if not isinstance(value, (torch.Tensor, int, float)) or isinstance(value, bool):
        raise TypeError(f"{what} must return the loss as a tensor (or a number), got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, dtype=torch.float32)
    if value.numel() != 1:
        raise ValueError(f"{what} must return a scalar loss, got shape {tuple(value.shape)}")
    return value.reshape(())


def batch_losses(out, count: int, what: str, setting: str) -> list[float]:
    """The losses of ``count`` perturbed copies run as one batch: ``what``'s output ``out`` must be
    one loss per copy, shape ``[count]`` (a lone copy: a scalar loss). ``setting`` names the option
    that batched them (``"query_batch=4"``), for the error."""
    if count == 1:
        return [float(scalar_loss(out, what))]
    if not isinstance(out, torch.Tensor) or out.shape != (count,):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"with {setting}, {what} must return one loss per copy (shape [{count}]) for {count} "
            f"copies in one batch, got {got}"
        )
    return out.float().tolist()


def call_checked(fn: Callable, name: str) -> Callable:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    return fn
