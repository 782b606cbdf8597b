"""Backends: one module per implementation of the six direction ops.

Every backend module exposes the same six functions, called by the kernels of
:mod:`hosl.ops.library` with arguments those kernels have already checked (so backends do no
checking of their own; ``perturbed_embedding``'s ``ids`` are only range-checked by the Python API),
every argument below passed (the defaults shown are the op schemas' own). ``family`` is one of
``hosl.directions.families.FAMILIES``; ``z`` below is that family's direction
(:func:`hosl.directions.families.direction_reference`), except that for ``"sphere"`` the backend only
generates the Gaussian ``z`` and multiplies it by the per-tensor factor it is given (the factors
come from :func:`sq_norms` and :func:`hosl.directions.spec.sphere_scale`, on the host).

``randn(key_lo, key_hi, numel, offset, device, family="gaussian", scale=1.0) -> Tensor``
    float32 tensor of ``z(seed, offset + e)`` for ``e`` in ``[0, numel)``; for ``"sphere"``
    ``float32(scale * z_gaussian)``.

``perturb(tensors, outs, offsets, key_lo, key_hi, scale, family="gaussian", dir_scales=None) -> None``
    ``outs[j][e] = round(float32(tensors[j][e]) + scale * z(seed, offsets[j] + e))``.
    ``outs`` may be ``tensors`` itself (in place). ``scale`` is an exact float32 value. For
    ``"sphere"``, ``dir_scales[j]`` is tensor ``j``'s factor and ``z = dir_scales[j] * z_gaussian``
    (that product rounded first, then the formula above).

``zo_update(tensors, offsets, keys_lo, keys_hi, coeffs, decay, family="gaussian", dir_scales=None) -> None``
    per element, in float32, each operation rounded on its own and in this order::

        acc = w - decay * w
        for q in range(Q): acc = acc - coeffs[q] * z(seed_q, offsets[j] + e)
        w = round(acc)

    ``coeffs`` (already ``lr * c_q``) and ``decay`` (``lr * weight_decay``) are exact float32 values.
    For ``"sphere"``, ``z = dir_scales[q * len(tensors) + j] * z_gaussian`` (rounded, then as above).

``perturbed_linear(x, weight, bias, w_offset, b_offset, keys_lo, keys_hi, scales, shared_x, family="gaussian",
factors=None) -> Tensor``
    Any direction family (sphere: ``factors[2d]`` / ``factors[2d+1]`` are direction ``d``'s
    factors of the weight / bias). ``[D, M, N]``: ``y[d] = x[d] @ round(W + scales[d]*Z_d)^T + round(b + scales[d]*z_b,d)``
    with ``Z_d[o, i] = z(seed_d, w_offset + o*K + i)``, ``z_b,d[o] = z(seed_d, b_offset + o)``; ``x`` is
    ``[M, K]`` (``shared_x``: the same input for every direction) or ``[D, M, K]``; ``bias`` may be
    None, ``b_offset`` None leaves it unperturbed. ``W`` and ``b`` are never written. Equal to the
    materialised computation up to matmul summation order (Triton fuses it; the others materialise
    with their ``perturb``, :mod:`.materialised`).

``perturbed_embedding(ids, weight, w_offset, keys_lo, keys_hi, scales, shared_ids, family="gaussian", factors=None) -> Tensor``
    Any direction family (sphere: ``factors[d]`` is direction ``d``'s factor of the weight). ``[D, T, H]``:
    rows ``ids`` (int64 ``[T]`` shared, or ``[D, T]``, all in range) of ``round(W + scales[d]*Z_d)``,
    bit-identical in every backend.

``sq_norms(numels, offsets, key_lo, key_hi, device) -> list[int]``
    per tensor, :func:`hosl.directions.spec.sphere_sq_norm` of its Gaussian slice: the exact
    integer ``sum_e floor(float32(z*z) * 2**24)`` (order-free, so every backend gets the same
    int). ``device`` is where to compute; numels are below ``spec.SPHERE_MAX_NUMEL``.

Tensors are contiguous, on one device, of dtype float32, float16 or bfloat16 (``outs[j]`` has the
dtype and shape of ``tensors[j]``); ``round`` is round-to-nearest-even into that dtype. Seeds come
as their two 32-bit halves (the Philox key). Offsets are below 2**63.

Each module also has ``is_available() -> bool``, ``unavailable_reason() -> str`` and
``DEVICE_TYPES`` (the device types it runs on).

Adding a backend ``foo``: write ``hosl/ops/backends/foo.py`` with the above (a compiled extension
with the bindings of ``csrc/bindings_common.h`` needs only :class:`._compiled.CompiledBackend`, as
:mod:`.cpu` and :mod:`.cuda` do; one without fused forwards takes them from :mod:`.materialised`);
add ``"foo"`` to ``BACKENDS`` in :mod:`hosl.ops.dispatch` and, to have it picked without being
named, to that device type's ``_PREFERENCE`` list (a new device type also goes into
``hosl.ops.library.DEVICE_TYPES``, which registers a kernel for it); then add it to the bit-identity
tests (``tests/test_backend_identity.py`` runs every available backend against the reference).
"""
