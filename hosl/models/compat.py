"""What differs between the transformers 5.x releases hosl supports, in one place.

Attention-mask builders (called the same way on every release) and the output of a decoder/encoder
block (a tuple ``(hidden, ...)`` in early 5.x releases, the hidden states alone later:
:func:`block_output`, and :func:`run_layers`, which runs blocks in turn through it).

The builders in ``transformers.masking_utils`` renamed their cache argument between releases
(``past_key_values`` in earlier 5.x, ``cache`` later). The split halves never use a cache, so these
wrappers take ``cache=None`` and pass it under whichever name the installed release expects, and
drop keyword arguments that release does not know (e.g. ``position_ids``).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import masking_utils

_CACHE_NAMES = ("cache", "past_key_values")


def _adapt(builder):
    params = inspect.signature(builder).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    cache_name = next((n for n in _CACHE_NAMES if n in params), None)

    @functools.wraps(builder)
    def call(**kwargs):
        cache = kwargs.pop("cache", None)
        if "inputs_embeds" in kwargs and "inputs_embeds" not in params and "input_embeds" in params:
            kwargs["input_embeds"] = kwargs.pop("inputs_embeds")
        if "cache_position" in params and "cache_position" not in kwargs:  # required by earlier releases
            embeds = kwargs.get("inputs_embeds", kwargs.get("input_embeds"))
            kwargs["cache_position"] = torch.arange(embeds.shape[1], device=embeds.device)
        if cache_name is not None:
            kwargs[cache_name] = cache
        if not accepts_any:
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        return builder(**kwargs)

    return call


create_causal_mask = _adapt(masking_utils.create_causal_mask)
create_sliding_window_causal_mask = _adapt(masking_utils.create_sliding_window_causal_mask)
create_bidirectional_mask = _adapt(masking_utils.create_bidirectional_mask)


def block_output(out):
    """The hidden states a transformer block returned: early 5.x releases return ``(hidden, ...)``."""
    return out[0] if isinstance(out, tuple) else out


def run_layers(layers, hidden, *args, **kwargs):
    """``hidden`` through each block of ``layers`` in turn, every block called with the same extra
    arguments (mask, positions, ...) and its output unwrapped by :func:`block_output`."""
    for layer in layers:
        hidden = block_output(layer(hidden, *args, **kwargs))
    return hidden
