"""Triton kernels of ``phase_entropy`` (forward and backward) and ``find_boundary`` (docs/ops.md section 6).

Contract (the registered ops in ``reasonrl/ops/phase_entropy.py`` prepare it): ``entropy`` / ``token_ids``
padded ``[B, T]`` (any strides) with ``mask`` ``[B, T]`` (uint8, contiguous) or none, or packed ``[N]`` (any
stride) with ``cu_seqlens`` ``[B + 1]`` int64 (+ ``mask`` ``[N]``); ``boundary`` ``[B]`` int64. fp32 / bf16
/ fp16 entropies, fp32 arithmetic and outputs (the reference's compute dtype); float64 is not supported (cpp
or reference). Token ids int32 / int64, the marker ``[M]`` int64.

One program per sequence (the grid is ``[B]``, on axis 0, so any B up to 2^31 - 1 launches). A program
streams its sequence in BLOCK-token blocks and carries the number of valid tokens seen so far; a token's
valid-token index is that carry plus the block's inclusive cumulative sum of the mask, minus 1. Sequence
lengths, B, the boundary length and the marker length are runtime arguments: a new length never recompiles.

* forward: per phase the block sums of the entropies and of the membership, accumulated in fp32 (a tree sum
  per block, then a running sum over blocks: more accurate than the reference's sequential index_add);
* backward: every token of the sequence is written, ``g / count`` of its phase, 0 outside both phases and on
  masked tokens (the reference's gradient);
* find_boundary: the valid tokens are first compacted into a scratch buffer (``scratch[base + index]``,
  int64, written and re-read by the same program, a ``tl.debug_barrier`` between), then every window start i
  in blocks compares the M tokens at i .. i + M - 1 with the marker; the smallest matching i, or n_b.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _segment(b, cu_ptr, T, N, PACKED: tl.constexpr):
    """(first flat token, number of tokens) of sequence ``b``."""
    if PACKED:
        # Clamped so that bad offsets (validate=False) stay inside [0, N): memory safety only.
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), N)
        stop = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1), start), N)
        return start, stop - start
    else:
        return b * T, T + 0 * b


@triton.jit
def _sequence(x_ptr, cu_ptr, stride_x_b, stride_x_t, T, N, PACKED: tl.constexpr):
    """This program's sequence b: its ``_segment`` and the address of its first token in ``x`` (a strided
    [B, T] tensor, or a packed [N] one with stride ``stride_x_t``)."""
    b = tl.program_id(0).to(tl.int64)
    start, length = _segment(b, cu_ptr, T, N, PACKED)
    if PACKED:
        x_seq = x_ptr + start * stride_x_t
    else:
        x_seq = x_ptr + b * stride_x_b
    return b, start, length, x_seq


@triton.jit
def _block(b, blk, start, length, carry, mask_ptr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Token positions t (within the sequence), flat offsets, validity and valid-token indices of a block."""
    t = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = t < length
    flat = start + t
    if HAS_MASK:
        valid = inside & (tl.load(mask_ptr + flat, mask=inside, other=0) != 0)
    else:
        valid = inside
    idx = carry + tl.cumsum(valid.to(tl.int64), axis=0) - 1
    return t, flat, valid, idx


# Sizes and per-sequence strides are not specialised (docs/ops.md section 0): a new sequence length, batch or
# marker length never recompiles (Triton would otherwise specialise integers equal to 1 or divisible by 16).
@triton.jit(do_not_specialize=["stride_x_b", "T", "N", "boundary_len"])
def phase_entropy_fwd_kernel(
    x_ptr, mask_ptr, cu_ptr, bnd_ptr,
    mean_before_ptr, mean_after_ptr, count_before_ptr, count_after_ptr,
    stride_x_b, stride_x_t, T, N, boundary_len,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    b, start, length, x_seq = _sequence(x_ptr, cu_ptr, stride_x_b, stride_x_t, T, N, PACKED)
    bnd = tl.load(bnd_ptr + b)
    first_after = bnd + boundary_len
    # Scalar accumulators start as typed tensors (a loop that runs zero times, an empty sequence, must still
    # leave tensors behind under the interpreter).
    carry = tl.full((), 0, tl.int64)
    s_before = tl.full((), 0.0, tl.float32)
    s_after = tl.full((), 0.0, tl.float32)
    n_before = tl.full((), 0, tl.int64)
    n_after = tl.full((), 0, tl.int64)
    for blk in range(0, tl.cdiv(length, BLOCK)):
        t, flat, valid, idx = _block(b, blk, start, length, carry, mask_ptr, HAS_MASK, BLOCK)
        before = valid & (idx < bnd)
        after = valid & (idx >= first_after)
        x = tl.load(x_seq + t * stride_x_t, mask=before | after, other=0.0).to(tl.float32)
        s_before += tl.sum(tl.where(before, x, 0.0), axis=0)
        s_after += tl.sum(tl.where(after, x, 0.0), axis=0)
        n_before += tl.sum(before.to(tl.int64), axis=0)
        n_after += tl.sum(after.to(tl.int64), axis=0)
        carry += tl.sum(valid.to(tl.int64), axis=0)
    mean_before = tl.where(n_before > 0, s_before / tl.maximum(n_before, 1).to(tl.float32), 0.0)
    mean_after = tl.where(n_after > 0, s_after / tl.maximum(n_after, 1).to(tl.float32), 0.0)
    tl.store(mean_before_ptr + b, mean_before)
    tl.store(mean_after_ptr + b, mean_after)
    tl.store(count_before_ptr + b, n_before.to(tl.int32))
    tl.store(count_after_ptr + b, n_after.to(tl.int32))


@triton.jit(do_not_specialize=["T", "N", "boundary_len"])
def phase_entropy_bwd_kernel(
    grad_before_ptr, grad_after_ptr, count_before_ptr, count_after_ptr, mask_ptr, cu_ptr, bnd_ptr, grad_ptr,
    T, N, boundary_len,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start, length = _segment(b, cu_ptr, T, N, PACKED)
    bnd = tl.load(bnd_ptr + b)
    first_after = bnd + boundary_len
    n_before = tl.load(count_before_ptr + b)
    n_after = tl.load(count_after_ptr + b)
    # d mean / d x = 1 / count for a token of the phase: the reference's g / count (a phase of count 0 has
    # no token, so its quotient is never stored).
    w_before = tl.load(grad_before_ptr + b) / tl.maximum(n_before, 1).to(tl.float32)
    w_after = tl.load(grad_after_ptr + b) / tl.maximum(n_after, 1).to(tl.float32)
    carry = tl.full((), 0, tl.int64)
    for blk in range(0, tl.cdiv(length, BLOCK)):
        t, flat, valid, idx = _block(b, blk, start, length, carry, mask_ptr, HAS_MASK, BLOCK)
        g = tl.where(valid & (idx < bnd), w_before, tl.where(valid & (idx >= first_after), w_after, 0.0))
        tl.store(grad_ptr + flat, g.to(grad_ptr.dtype.element_ty), mask=t < length)
        carry += tl.sum(valid.to(tl.int64), axis=0)


@triton.jit(do_not_specialize=["stride_ids_b", "T", "N", "M"])
def find_boundary_kernel(
    ids_ptr, mask_ptr, cu_ptr, marker_ptr, scratch_ptr, out_ptr,
    stride_ids_b, stride_ids_t, T, N, M,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    b, start, length, ids_seq = _sequence(ids_ptr, cu_ptr, stride_ids_b, stride_ids_t, T, N, PACKED)
    # 1. compact the valid tokens: scratch[start + index] = id (the sequence's own slice of the scratch).
    carry = tl.full((), 0, tl.int64)
    for blk in range(0, tl.cdiv(length, BLOCK)):
        t, flat, valid, idx = _block(b, blk, start, length, carry, mask_ptr, HAS_MASK, BLOCK)
        tok = tl.load(ids_seq + t * stride_ids_t, mask=valid, other=-1).to(tl.int64)
        tl.store(scratch_ptr + start + idx, tok, mask=valid)
        carry += tl.sum(valid.to(tl.int64), axis=0)
    tl.debug_barrier()
    n = carry
    # 2. window starts i with i + M <= n: all M tokens equal the marker's. The first hit, or n (no marker).
    first = n
    for blk in range(0, tl.cdiv(n, BLOCK)):
        i = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        hit = i + M <= n
        for j in range(0, M):
            tok = tl.load(scratch_ptr + start + i + j, mask=hit, other=-1)
            hit = hit & (tok == tl.load(marker_ptr + j))
        first = tl.minimum(first, tl.min(tl.where(hit, i, n), axis=0))
    tl.store(out_ptr + b, first)


BLOCK = 256  # tokens per block: enough to amortise the loop, small enough for the interpreter's tests


def _layout_args(x, cu):
    """(B, strides of x as (per sequence, per token), T, N) of the padded or the packed layout."""
    if cu is not None:
        return cu.numel() - 1, (0, x.stride(0)), 0, x.shape[0]
    return x.shape[0], (x.stride(0), x.stride(1)), x.shape[1], 0


def phase_entropy_fwd(entropy, mask, cu, boundary, boundary_len, mean_before, mean_after, count_before,
                      count_after, *, launch=None):
    """Launch one program per sequence; the outputs ([B] fp32, [B] int32) are preallocated by the caller.
    ``mask``: uint8 of the entropy's shape, contiguous, or None."""
    b, strides, t, n = _layout_args(entropy, cu)
    if b == 0:
        return
    kernel = phase_entropy_fwd_kernel if launch is None else launch(phase_entropy_fwd_kernel)
    kernel[(b,)](
        entropy, mask if mask is not None else boundary, cu if cu is not None else boundary, boundary,
        mean_before, mean_after, count_before, count_after,
        strides[0], strides[1], t, n, int(boundary_len),
        PACKED=cu is not None, HAS_MASK=mask is not None, BLOCK=BLOCK,
    )


def phase_entropy_bwd(grad_before, grad_after, count_before, count_after, mask, cu, boundary, boundary_len,
                      grad, *, launch=None):
    """Write the whole gradient ``grad`` (contiguous, the entropy's shape and dtype) from the fp32 gradients
    of the two means."""
    b, _, t, n = _layout_args(grad, cu)
    if b == 0:
        return
    kernel = phase_entropy_bwd_kernel if launch is None else launch(phase_entropy_bwd_kernel)
    kernel[(b,)](
        grad_before, grad_after, count_before, count_after, mask if mask is not None else boundary,
        cu if cu is not None else boundary, boundary, grad, t, n, int(boundary_len),
        PACKED=cu is not None, HAS_MASK=mask is not None, BLOCK=BLOCK,
    )


def find_boundary_fwd(token_ids, mask, cu, marker, scratch, out, *, launch=None):
    """First occurrence of ``marker`` per sequence into ``out`` ([B] int64); ``scratch``: int64 with one slot
    per token (the compacted valid tokens), preallocated by the caller."""
    b, strides, t, n = _layout_args(token_ids, cu)
    if b == 0:
        return
    kernel = find_boundary_kernel if launch is None else launch(find_boundary_kernel)
    kernel[(b,)](
        token_ids, mask if mask is not None else marker, cu if cu is not None else marker, marker, scratch,
        out,
        strides[0], strides[1], t, n, marker.numel(),
        PACKED=cu is not None, HAS_MASK=mask is not None, BLOCK=BLOCK,
    )
