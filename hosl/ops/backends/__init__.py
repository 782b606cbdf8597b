"""Backends: one module per implementation of the three direction ops.

Every backend module exposes the same three functions, called by :mod:`hosl.ops` with arguments
that are already validated (so backends do no checking of their own):

``randn(key_lo, key_hi, numel, offset, device) -> Tensor``
    float32 tensor of ``z(seed, offset + e)`` for ``e`` in ``[0, numel)``.

``perturb(tensors, outs, offsets, key_lo, key_hi, scale) -> None``
    ``outs[j][e] = round(float32(tensors[j][e]) + scale * z(seed, offsets[j] + e))``.
    ``outs`` may be ``tensors`` itself (in place). ``scale`` is an exact float32 value.

``zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay) -> None``
    per element, in float32, each operation rounded on its own and in this order::

        acc = w - decay * w
        for q in range(Q): acc = acc - coeffs[q] * z(seed_q, offsets[j] + e)
        w = round(acc)

    ``coeffs`` (already ``lr * c_q``) and ``decay`` (``lr * weight_decay``) are exact float32 values.

Tensors are contiguous, on one device, of dtype float32, float16 or bfloat16 (``outs[j]`` has the
dtype and shape of ``tensors[j]``); ``round`` is round-to-nearest-even into that dtype. Seeds come
as their two 32-bit halves (the Philox key). Offsets are below 2**63.

Each module also has ``is_available() -> bool``, ``unavailable_reason() -> str`` and
``DEVICE_TYPES`` (the device types it runs on).
"""
