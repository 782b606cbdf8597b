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

``perturbed_linear(x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x) -> Tensor``
    ``[D, M, N]``: ``y[d] = x[d] @ round(W + scales[d]*Z_d)^T + round(b + scales[d]*z_b,d)`` with
    ``Z_d[o, i] = z(seed_d, w_offset + o*K + i)``, ``z_b,d[o] = z(seed_d, b_offset + o)``; ``x`` is
    ``[M, K]`` (``shared_x``: the same input for every direction) or ``[D, M, K]``; ``bias`` may be
    None, ``b_offset`` None leaves it unperturbed. ``W`` and ``b`` are never written. Equal to the
    materialised computation up to matmul summation order (Triton fuses it; the others materialise
    with their ``perturb``, :mod:`.materialised`).

``perturbed_embedding(ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids) -> Tensor``
    ``[D, T, H]``: rows ``ids`` (int64 ``[T]`` shared, or ``[D, T]``, all in range) of
    ``round(W + scales[d]*Z_d)``, bit-identical in every backend.

Tensors are contiguous, on one device, of dtype float32, float16 or bfloat16 (``outs[j]`` has the
dtype and shape of ``tensors[j]``); ``round`` is round-to-nearest-even into that dtype. Seeds come
as their two 32-bit halves (the Philox key). Offsets are below 2**63.

Each module also has ``is_available() -> bool``, ``unavailable_reason() -> str`` and
``DEVICE_TYPES`` (the device types it runs on).
"""
