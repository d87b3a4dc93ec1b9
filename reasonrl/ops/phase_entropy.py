"""``phase_entropy`` and ``find_boundary``: PEAR's per-sequence mean entropy before and after a boundary
marker such as ``</think>``, and the search for that marker (docs/ops.md section 6).

Implementations (the choice is ``reasonrl._backend.select_impl``: ``auto`` takes C++ on CPU tensors and
Triton on CUDA tensors, falling back to the reference; an explicit choice that cannot run raises):

* ``reference``: ``reasonrl/reference/phase_entropy.py``, the oracle;
* ``cpp``: ``torch.ops.reasonrl.phase_entropy_fwd`` / ``_bwd`` and ``find_boundary_fwd``
  (csrc/cpu/phase_entropy.cpp), one streaming pass per sequence, fp64 arithmetic for fp64 input;
* ``triton``: ``torch.ops.reasonrl.phase_entropy_fwd_triton`` / ``_bwd_triton`` and
  ``find_boundary_fwd_triton`` (kernels/phase_entropy.py), one program per sequence, fp32 / bf16 / fp16.

``phase_entropy`` is differentiable with respect to ``entropy`` (a masked mean: a token's gradient is
g / count of its phase, 0 outside both phases); forward and backward are separate registered ops joined by
``register_autograd``. ``find_boundary`` has no gradient. The reference materialises a segment id, a
valid-token index and masked copies of the entropies (several [N] int64 / fp32 tensors and a dozen
launches); the kernels read each token once and write [B] (the backward writes the [N] gradient).

The arguments are checked here with the reference's own checks (docs/ops.md section 7: errors name the
argument); with ``validate`` also the values that need a host sync (mask values, offsets, ``0 <= boundary
<= n_b``, marker ids >= 0). With ``validate=False`` nothing here syncs, so the op compiles with
``torch.compile(fullgraph=True)``; boundary values outside ``[0, n_b]`` then give the reference's result.
The kernels get the mask as bool (C++) / uint8 (Triton) of the input's shape, the offsets as int64 and the
boundary as int64, all contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from reasonrl import _backend as backend
from reasonrl.reference.phase_entropy import (
    PhaseEntropy,
    check_boundary,
    check_layout,
    check_phase_args,
    check_token_ids,
    find_boundary_reference,
    marker_list,
    phase_entropy_reference,
    valid_counts,
)

__all__ = ["PhaseEntropy", "phase_entropy", "find_boundary"]

OP = "phase_entropy"
FIND_OP = "find_boundary"


# ----------------------------------------------------------------------------------------------------------
# Fake (meta) functions and autograd
# ----------------------------------------------------------------------------------------------------------


def _fake_fwd(entropy, mask, cu_seqlens, boundary, boundary_len):
    acc = backend.accumulation_dtype(entropy.dtype)
    b = boundary.shape[0]
    return (entropy.new_empty((b,), dtype=acc), entropy.new_empty((b,), dtype=acc),
            entropy.new_empty((b,), dtype=torch.int32), entropy.new_empty((b,), dtype=torch.int32))


def _fake_bwd(grad_before, grad_after, entropy, mask, cu_seqlens, boundary, count_before, count_after,
              boundary_len):
    return torch.empty(entropy.shape, dtype=entropy.dtype, device=entropy.device)


def _fake_find(token_ids, mask, cu_seqlens, marker):
    b = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else token_ids.shape[0]
    return token_ids.new_empty((b,), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    entropy, mask, cu_seqlens, boundary, boundary_len = inputs
    ctx.save_for_backward(entropy, mask, cu_seqlens, boundary, output[2], output[3])
    ctx.boundary_len = boundary_len


def _make_backward(bwd_op):
    def backward(ctx, grad_before, grad_after, _grad_count_before, _grad_count_after):
        entropy, mask, cu_seqlens, boundary, count_before, count_after = ctx.saved_tensors
        acc = backend.accumulation_dtype(entropy.dtype)
        b = boundary.shape[0]

        def upstream(g):  # an unused mean arrives as None: its gradient is 0
            if g is None:
                return entropy.new_zeros((b,), dtype=acc)
            return g.to(acc).contiguous()

        grad = bwd_op(upstream(grad_before), upstream(grad_after), entropy, mask, cu_seqlens, boundary,
                      count_before, count_after, ctx.boundary_len)
        return grad, None, None, None, None

    return backward


def _cpp_ops():
    """The fake functions and the autograd formula of the C++ ops (schemas in csrc/reasonrl.cpp)."""
    bwd = backend.attach_cpp("phase_entropy_bwd", _fake_bwd)
    fwd = backend.attach_cpp("phase_entropy_fwd", _fake_fwd, backward=_make_backward(bwd),
                             setup_context=_setup_context)
    return fwd, bwd


def _cpp_find_ops():
    return (backend.attach_cpp("find_boundary_fwd", _fake_find),)


def _triton_ops():
    """Define the Triton phase_entropy ops on first use (importing triton is deferred until then)."""
    from reasonrl.kernels import phase_entropy as kernels

    @torch.library.triton_op("reasonrl::phase_entropy_bwd_triton", mutates_args=())
    def bwd(
        grad_before: torch.Tensor,
        grad_after: torch.Tensor,
        entropy: torch.Tensor,
        mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        boundary: torch.Tensor,
        count_before: torch.Tensor,
        count_after: torch.Tensor,
        boundary_len: int,
    ) -> torch.Tensor:
        grad = _fake_bwd(grad_before, grad_after, entropy, mask, cu_seqlens, boundary, count_before,
                         count_after, boundary_len)
        kernels.phase_entropy_bwd(grad_before, grad_after, count_before, count_after,
                                  None if mask is None else mask.view(torch.uint8), cu_seqlens, boundary,
                                  boundary_len, grad, launch=torch.library.wrap_triton)
        return grad

    @torch.library.triton_op("reasonrl::phase_entropy_fwd_triton", mutates_args=())
    def fwd(
        entropy: torch.Tensor,
        mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        boundary: torch.Tensor,
        boundary_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = _fake_fwd(entropy, mask, cu_seqlens, boundary, boundary_len)
        kernels.phase_entropy_fwd(entropy, None if mask is None else mask.view(torch.uint8), cu_seqlens,
                                  boundary, boundary_len, *out, launch=torch.library.wrap_triton)
        return out

    fwd.register_autograd(_make_backward(bwd), setup_context=_setup_context)
    return fwd, bwd


def _triton_find_ops():
    from reasonrl.kernels import phase_entropy as kernels

    @torch.library.triton_op("reasonrl::find_boundary_fwd_triton", mutates_args=())
    def find(
        token_ids: torch.Tensor,
        mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        marker: torch.Tensor,
    ) -> torch.Tensor:
        out = _fake_find(token_ids, mask, cu_seqlens, marker)
        # The compacted valid tokens of every sequence (one int64 slot per token), re-read by its program.
        scratch = torch.empty(token_ids.numel(), dtype=torch.int64, device=token_ids.device)
        kernels.find_boundary_fwd(token_ids, None if mask is None else mask.view(torch.uint8), cu_seqlens,
                                  marker, scratch, out, launch=torch.library.wrap_triton)
        return out

    return (find,)


backend.declare_op(OP, cpp=_cpp_ops, triton=_triton_ops)
backend.declare_op(FIND_OP, cpp=_cpp_find_ops, triton=_triton_find_ops)


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def _kernel_layout(x: torch.Tensor, mask, cu_seqlens, op: str, name: str, validate: bool):
    """The reference's layout checks; ``(B, cu int64 | None, mask bool | None)``, contiguous, on x's device,
    as the kernels take them."""
    b, cu, valid = check_layout(x, mask, cu_seqlens, op, name, validate)
    return b, None if cu is None else cu.contiguous(), None if valid is None else valid.contiguous()


def phase_entropy(
    entropy: torch.Tensor,
    boundary: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    boundary_len: int = 1,
    impl: str = "auto",
    validate: bool | None = None,
) -> PhaseEntropy:
    """Mean entropy before and after a boundary marker, per sequence (docs/ops.md section 6).

    Args:
        entropy: ``[B, T]`` (padded, optional ``mask [B, T]``) or ``[N]`` with ``cu_seqlens`` (packed,
            optional ``mask [N]``); float32 / bfloat16 / float16 / float64, any strides.
        boundary: ``[B]`` int: valid-token index of the marker's first token; ``n_b`` = no marker.
        mask: valid tokens (bool or 0/1); masked tokens are skipped and belong to neither phase.
        cu_seqlens: ``[B + 1]`` int32 / int64 segment offsets (packed layout).
        boundary_len: number of marker tokens (>= 1), which belong to neither phase.
        impl: ``auto`` / ``cpp`` / ``triton`` / ``reference``.
        validate: check mask values, offsets and ``0 <= boundary <= n_b`` (host syncs); None follows
            ``reasonrl.set_validation``.

    Returns:
        ``PhaseEntropy(mean_before, mean_after, count_before, count_after)``, all ``[B]``: means in fp32 (fp64
        for fp64 input), 0 for an empty phase; counts int32. Differentiable with respect to ``entropy``.
    """
    check_phase_args(entropy, boundary_len, OP)
    validate = backend.resolve_validate(validate, entropy)
    impl = backend.select_impl(OP, impl, entropy.device.type, entropy.dtype)
    if impl == "reference":
        return phase_entropy_reference(entropy, boundary, mask=mask, cu_seqlens=cu_seqlens,
                                       boundary_len=boundary_len, validate=validate)
    b, cu, valid = _kernel_layout(entropy, mask, cu_seqlens, OP, "entropy", validate)
    n = valid_counts(entropy, b, cu, valid) if validate else None
    bnd = check_boundary(boundary, b, n, OP, entropy.device).contiguous()
    out = backend.kernel_op("phase_entropy_fwd", impl)(entropy, valid, cu, bnd, int(boundary_len))
    return PhaseEntropy(*out)


def find_boundary(
    token_ids: torch.Tensor,
    marker_ids: int | Sequence[int] | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """Valid-token index of the first occurrence of the contiguous id sequence ``marker_ids`` in each
    sequence, ``n_b`` if absent (docs/ops.md section 6).

    Args:
        token_ids: ``[B, T]`` (padded) or ``[N]`` with ``cu_seqlens`` (packed), int32 / int64.
        marker_ids: one id, a sequence of ids, or a 1-D int tensor (non-empty, ids >= 0). Contiguity is in the
            valid-token index space (masked tokens are skipped, as in ``phase_entropy``).
        mask: valid tokens (bool or 0/1); default all.
        cu_seqlens: ``[B + 1]`` segment offsets (packed layout).
        impl: ``auto`` / ``cpp`` / ``triton`` / ``reference``.
        validate: check mask values, offsets and (for a tensor ``marker_ids``) ids >= 0 (host syncs).

    Returns:
        ``[B]`` int64.
    """
    check_token_ids(token_ids, FIND_OP)
    validate = backend.resolve_validate(validate, token_ids)
    impl = backend.select_impl(FIND_OP, impl, token_ids.device.type, token_ids.dtype)
    if impl == "reference":
        return find_boundary_reference(token_ids, marker_ids, mask=mask, cu_seqlens=cu_seqlens,
                                       validate=validate)
    if isinstance(marker_ids, torch.Tensor) and not validate:
        # No host sync: the ids stay on the device (their values are unchecked, as any value with validate).
        if marker_ids.is_floating_point() or marker_ids.dtype == torch.bool or marker_ids.dim() > 1:
            raise ValueError(f"{FIND_OP}: marker_ids must be an int, a sequence of ints or a 1-D int tensor")
        if marker_ids.numel() == 0:
            raise ValueError(f"{FIND_OP}: marker_ids must not be empty")
        marker = marker_ids.reshape(-1).to(device=token_ids.device, dtype=torch.int64).contiguous()
    else:
        marker = torch.tensor(marker_list(marker_ids, FIND_OP), dtype=torch.int64, device=token_ids.device)
    if token_ids.dtype not in (torch.int32, torch.int64):
        token_ids = token_ids.to(torch.int64)  # int8 / int16 / uint8 ids: the kernels read int32 / int64
    _, cu, valid = _kernel_layout(token_ids, mask, cu_seqlens, FIND_OP, "token_ids", validate)
    return backend.kernel_op("find_boundary_fwd", impl)(token_ids, valid, cu, marker)
