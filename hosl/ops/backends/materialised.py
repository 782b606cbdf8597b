"""Perturbed forwards composed from a backend's own ``perturb``: materialise, then run the torch op.

The backends without a fused kernel (reference, cpu, cuda) get ``perturbed_linear`` and
``perturbed_embedding`` from here, bound to their ``perturb``. It is the definition the fused Triton
kernels are tested against: ``W + scale*Z`` rounded into W's dtype exactly as ``perturb_`` writes
it, then ``F.linear`` / row gather, one direction at a time. Memory: one weight-sized buffer (linear)
or the gathered rows only (embedding with ``rows_only``, O(tokens x hidden)). ``family`` is any
direction family; sphere ``factors`` are per direction (``[2d]`` weight, ``[2d+1]`` bias for the
linear; ``[d]`` for the embedding), the factors of the WHOLE tensor (``ops.sphere_scales``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _dir_scales(family, factors, index, count=1):
    """``perturb``'s ``dir_scales`` for ``count`` tensors that share the sphere factor
    ``factors[index]``; None for the other families."""
    return [factors[index]] * count if family == "sphere" else None


def perturbed_linear(
    perturb, x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family="gaussian", factors=None
):
    w_p = torch.empty_like(weight)
    b_p = torch.empty_like(bias) if bias is not None and b_offset is not None else bias
    outs = []
    for d, (lo, hi, scale) in enumerate(zip(keys_lo, keys_hi, scales)):
        perturb([weight], [w_p], [w_offset], lo, hi, scale, family, _dir_scales(family, factors, 2 * d))
        if b_offset is not None and bias is not None:
            perturb([bias], [b_p], [b_offset], lo, hi, scale, family, _dir_scales(family, factors, 2 * d + 1))
        outs.append(F.linear(x if shared_x else x[d], w_p, b_p))
    if not outs:
        return x.new_empty((0, x.shape[-2], weight.shape[0]))
    return torch.stack(outs)


def perturbed_embedding(
    perturb,
    ids,
    weight,
    w_offset,
    keys_lo,
    keys_hi,
    scales,
    shared_ids,
    family="gaussian",
    factors=None,
    *,
    rows_only=True,
):
    hidden = weight.shape[1]
    outs = []
    for d, (lo, hi, scale) in enumerate(zip(keys_lo, keys_hi, scales)):
        tok = ids if shared_ids else ids[d]
        if rows_only:  # perturb only the rows looked up: row r holds coordinates w_offset + r*H + [0, H)
            rows = torch.unique(tok).tolist()
            srcs = [weight[r] for r in rows]
            dsts = list(torch.empty((len(rows), hidden), dtype=weight.dtype, device=weight.device).unbind(0))
            # sphere: one factor for the whole weight, whichever rows are perturbed
            perturb(
                srcs,
                dsts,
                [w_offset + r * hidden for r in rows],
                lo,
                hi,
                scale,
                family,
                _dir_scales(family, factors, d, len(rows)),
            )
            table = torch.stack(dsts) if dsts else weight.new_empty((0, hidden))
            outs.append(table[torch.searchsorted(torch.tensor(rows, device=tok.device), tok)])
        else:
            w_p = torch.empty_like(weight)
            perturb([weight], [w_p], [w_offset], lo, hi, scale, family, _dir_scales(family, factors, d))
            outs.append(F.embedding(tok, w_p))
    if not outs:
        return weight.new_empty((0, ids.shape[-1], hidden))
    return torch.stack(outs)
