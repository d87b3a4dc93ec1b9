"""Triton kernel of ``r3_reward`` (docs/ops.md section 5): DRO's reasoning-reflection reward, forward only.

Contract (the registered op in ``reasonrl/ops/r3_reward.py`` prepares it): ``ref_logprobs`` padded
``[G, K, L]`` (any strides) with ``ref_mask`` ``[G, L]`` (uint8, contiguous), or packed ``[K, M]`` with
``ref_cu_seqlens`` ``[G + 1]`` int64; ``rollout_mask`` ``[G, K]`` uint8; ``baseline`` fp32 contiguous
``[G, L]`` / ``[M]`` or absent; ``k_g`` ``[G]`` int64 (the top-k size of every prompt). fp32 / bf16 / fp16
input, fp32 arithmetic and outputs (the reference's compute dtype); float64 is not supported (cpp or
reference).

One program per prompt (the grid is ``[G]``): the prompt's work is K x L_g elements, small next to the model
forward that produced the log-probs, and sigma couples all rollouts of a prompt. The program streams the
prompt's columns in BLOCK_L blocks, several times:

1. sigma per column: two passes over the valid rollouts (mean, then squared deviations), so equal log-probs
   give exactly 0, as the reference; the sum of sigma, its maximum and a NaN flag for the weights;
2. the top-k set (topk weighting and the propagation form's reflective set): the rank of each column is the
   number of valid columns that sort before it (larger sigma, NaN first as torch.sort descending, ties to the
   lower index), counted block against block (O(L_g^2) comparisons, no sort); written to the ``top`` scratch;
3. the weights (the all-zero fallback to uniform for every weighting, as the reference);
4. per valid rollout, R = sum w u with u = (l - b) + P; the propagation term P of column j sums
   log1p(expm1(l_a) exp(-gamma (j - a))) over the reflective columns a < j, with positions counted among the
   valid columns (a running count plus a block cumsum of the mask); expm1 / log1p by Kahan's formulas
   (``_expm1`` / ``_log1p``), exact near p = 1 and for tiny products as the reference's torch.expm1 / log1p.

The program re-reads what it wrote in earlier phases (sigma, top, weights): a ``tl.debug_barrier`` between
the phases makes the stores visible to the whole program. Column positions are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Codes shared with csrc/cpu/r3_reward.cpp and reasonrl/ops/r3_reward.py.
LINEAR: tl.constexpr = tl.constexpr(0)
SOFTMAX: tl.constexpr = tl.constexpr(1)
TOPK: tl.constexpr = tl.constexpr(2)
UNIFORM: tl.constexpr = tl.constexpr(3)
SUM: tl.constexpr = tl.constexpr(1)


@triton.jit
def _columns(g, blk, cu_ptr, mask_ptr, L, M, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    """Absolute columns, output offsets and validity of block ``blk`` of prompt ``g``."""
    i = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    if PACKED:
        # Clamped so that bad offsets (validate=False) stay inside [0, M): memory safety only.
        c0 = tl.minimum(tl.maximum(tl.load(cu_ptr + g), 0), M)
        c1 = tl.minimum(tl.maximum(tl.load(cu_ptr + g + 1), c0), M)
        col = c0 + i
        valid = col < c1
        out = col
    else:
        col = i
        inside = i < L
        valid = inside & (tl.load(mask_ptr + g * L + i, mask=inside, other=0) != 0)
        out = g * L + i
    return col, out, valid


@triton.jit
def _n_blocks(g, cu_ptr, L, M, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    if PACKED:
        c0 = tl.minimum(tl.maximum(tl.load(cu_ptr + g), 0), M)
        c1 = tl.minimum(tl.maximum(tl.load(cu_ptr + g + 1), c0), M)
        width = c1 - c0
    else:
        width = L
    return tl.cdiv(width, BLOCK)


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation (Kahan's trick: (u - 1) x / log(u) with u = exp(x) carries the rounding
    error of u in both factors, so it cancels; exact-ish to a few ulps). Written out because libdevice's
    expm1 / log1p are not available under TRITON_INTERPRET=1, where the kernel is tested."""
    u = tl.exp(x)
    r = (u - 1.0) * x / tl.log(u)
    r = tl.where(u == 1.0, x, r)
    return tl.where(u == 0.0, -1.0, r)


@triton.jit
def _log1p(y):
    """log(1 + y) without cancellation (Kahan's trick: log(u) y / (u - 1) with u = 1 + y)."""
    u = 1.0 + y
    r = tl.log(u) * y / (u - 1.0)
    return tl.where(u == 1.0, y, r)


@triton.jit
def _roll(roll_ptr, g, K, k, BLOCK: tl.constexpr):
    """Rollout k's validity as a block (a block & a scalar bool is not a valid mask in the interpreter)."""
    return (tl.zeros((BLOCK,), tl.int32) + tl.load(roll_ptr + g * K + k).to(tl.int32)) != 0


@triton.jit
def _ranks_before(sa, ia, sb, ib):
    """Column a sorts before column b: NaN first, then larger sigma, ties to the lower index."""
    na = sa != sa
    nb = sb != sb
    return (na & ~nb) | (sa > sb) | (((sa == sb) | (na & nb)) & (ia < ib))


@triton.jit
def r3_reward_kernel(
    lp_ptr, mask_ptr, cu_ptr, roll_ptr, base_ptr, kg_ptr,
    reward_ptr, w_ptr, sigma_ptr, top_ptr, nvalid_ptr,
    stride_g, stride_k, stride_c,
    K, L, M, softmax_tau, gamma, min_valid,
    PACKED: tl.constexpr, HAS_BASE: tl.constexpr, HAS_GAMMA: tl.constexpr,
    WEIGHTING: tl.constexpr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    nblk = _n_blocks(g, cu_ptr, L, M, PACKED, BLOCK)
    lp_g = lp_ptr + g * stride_g
    # Scalar accumulators start as typed tensors (a loop that runs zero times, an empty segment with
    # validate=False, must still leave tensors behind under the interpreter).
    n = tl.full((), 0, tl.int32)
    for k in range(0, K):
        n += (tl.load(roll_ptr + g * K + k) != 0).to(tl.int32)
    tl.store(nvalid_ptr + g, n)
    n_f = tl.maximum(n, 1).to(tl.float32)
    use_sigma = n >= min_valid

    # 1. sigma, L_g, sum / max / NaN flag of sigma.
    length = tl.full((), 0, tl.int32)
    sig_sum = tl.full((), 0.0, tl.float32)
    sig_max = tl.full((), 0.0, tl.float32)
    n_nan = tl.full((), 0, tl.int32)
    for blk in range(0, nblk):
        col, out, valid = _columns(g, blk, cu_ptr, mask_ptr, L, M, PACKED, BLOCK)
        s = tl.zeros((BLOCK,), tl.float32)
        for k in range(0, K):
            rv = _roll(roll_ptr, g, K, k, BLOCK)
            s += tl.load(lp_g + k * stride_k + col * stride_c, mask=valid & rv, other=0.0).to(tl.float32)
        mean = s / n_f
        ss = tl.zeros((BLOCK,), tl.float32)
        for k in range(0, K):
            rv = _roll(roll_ptr, g, K, k, BLOCK)
            x = tl.load(lp_g + k * stride_k + col * stride_c, mask=valid & rv, other=0.0).to(tl.float32)
            d = tl.where(valid & rv, x - mean, 0.0)
            ss += d * d
        sig = tl.where(use_sigma, tl.where(valid, tl.sqrt(ss / n_f), 0.0), 0.0)
        tl.store(sigma_ptr + out, sig, mask=valid)
        length += tl.sum(valid.to(tl.int32), axis=0)
        sig_sum += tl.sum(sig, axis=0)
        sig_max = tl.maximum(sig_max, tl.max(tl.where(valid, sig, 0.0), axis=0))
        n_nan += tl.sum((sig != sig).to(tl.int32), axis=0)
    tl.debug_barrier()
    all_zero = sig_sum == 0.0
    len_f = tl.maximum(length, 1).to(tl.float32)
    kg = tl.load(kg_ptr + g)

    # 2. the top-k set: rank = number of valid columns that sort before this one.
    if (WEIGHTING == TOPK) or HAS_GAMMA:
        for blk in range(0, nblk):
            col, out, valid = _columns(g, blk, cu_ptr, mask_ptr, L, M, PACKED, BLOCK)
            sig = tl.load(sigma_ptr + out, mask=valid, other=0.0)
            rank = tl.zeros((BLOCK,), tl.int64)
            for blk_a in range(0, nblk):
                col_a, out_a, valid_a = _columns(g, blk_a, cu_ptr, mask_ptr, L, M, PACKED, BLOCK)
                sig_a = tl.load(sigma_ptr + out_a, mask=valid_a, other=0.0)
                before = _ranks_before(sig_a[None, :], col_a[None, :], sig[:, None], col[:, None])
                rank += tl.sum((before & valid_a[None, :]).to(tl.int64), axis=1)
            top = tl.where(all_zero, False, valid & (rank < kg))
            tl.store(top_ptr + out, top.to(tl.int8), mask=valid)
        tl.debug_barrier()

    # 3. weights (uniform when every sigma is 0, for every weighting).
    if WEIGHTING == SOFTMAX:
        m = tl.where(n_nan > 0, float("nan"), sig_max / softmax_tau)
        denom = tl.full((), 0.0, tl.float32)
        for blk in range(0, nblk):
            col, out, valid = _columns(g, blk, cu_ptr, mask_ptr, L, M, PACKED, BLOCK)
            sig = tl.load(sigma_ptr + out, mask=valid, other=0.0)
            denom += tl.sum(tl.where(valid, tl.exp(sig / softmax_tau - m), 0.0), axis=0)
        denom = tl.where(denom < 1.1754943508222875e-38, 1.1754943508222875e-38, denom)
    for blk in range(0, nblk):
        col, out, valid = _columns(g, blk, cu_ptr, mask_ptr, L, M, PACKED, BLOCK)
        sig = tl.load(sigma_ptr + out, mask=valid, other=0.0)
        if WEIGHTING == LINEAR:
            w = sig / tl.where(all_zero, 1.0, sig_sum)
        elif WEIGHTING == SOFTMAX:
            w = tl.exp(sig / softmax_tau - m) / denom
        elif WEIGHTING == TOPK:
            top = tl.load(top_ptr + out, mask=valid, other=0) != 0
            w = tl.where(top, 1.0 / tl.maximum(kg, 1).to(tl.float32), 0.0)
        else:
            w = tl.zeros((BLOCK,), tl.float32) + 1.0 / len_f
        w = tl.where(all_zero, 1.0 / len_f, w)
        tl.store(w_ptr + out, w, mask=valid)
    tl.debug_barrier()

    # 4. rewards of the valid rollouts.
    for k in range(0, K):
        rv_s = tl.load(roll_ptr + g * K + k) != 0
        rv = _roll(roll_ptr, g, K, k, BLOCK)
        r = tl.full((), 0.0, tl.float32)
        pos0 = tl.full((), 0, tl.int32)  # valid columns before this block
        for blk in range(0, nblk):
            col, out, valid = _columns(g, blk, cu_ptr, mask_ptr, L, M, PACKED, BLOCK)
            ld = valid & rv
            u = tl.load(lp_g + k * stride_k + col * stride_c, mask=ld, other=0.0).to(tl.float32)
            if HAS_BASE:
                u -= tl.load(base_ptr + out, mask=ld, other=0.0)
            if HAS_GAMMA:
                pos = pos0 + tl.cumsum(valid.to(tl.int32), axis=0) - 1
                p = tl.zeros((BLOCK,), tl.float32)
                pos_a0 = tl.full((), 0, tl.int32)
                for blk_a in range(0, blk + 1):
                    col_a, out_a, valid_a = _columns(g, blk_a, cu_ptr, mask_ptr, L, M, PACKED, BLOCK)
                    pos_a = pos_a0 + tl.cumsum(valid_a.to(tl.int32), axis=0) - 1
                    top_a = (tl.load(top_ptr + out_a, mask=valid_a, other=0) != 0) & valid_a & rv
                    em1 = _expm1(
                        tl.load(lp_g + k * stride_k + col_a * stride_c, mask=top_a, other=0.0).to(tl.float32))
                    d = (pos[:, None] - pos_a[None, :]).to(tl.float32)
                    pair = top_a[None, :] & (d > 0.0)
                    decay = tl.exp(-gamma * tl.where(pair, d, 0.0))
                    term = _log1p(em1[None, :] * decay)
                    p += tl.sum(tl.where(pair, term, 0.0), axis=1)
                    pos_a0 += tl.sum(valid_a.to(tl.int32), axis=0)
                u += p
                pos0 += tl.sum(valid.to(tl.int32), axis=0)
            w = tl.load(w_ptr + out, mask=ld, other=0.0)
            r += tl.sum(tl.where(ld, w * u, 0.0), axis=0)
        if REDUCTION == SUM:
            r = r * length.to(tl.float32)
        r = tl.where(rv_s & (length > 0), r, float("nan"))
        tl.store(reward_ptr + g * K + k, r)


def r3_reward_fwd(lp, ref_mask, cu, roll, base, k_g, weighting, softmax_tau, reduction, gamma, min_valid,
                  reward, weights, sigma, top, nvalid, *, launch=None):
    """Launch one program per prompt; the outputs (fp32) and the ``top`` scratch (int8) are preallocated by
    the caller. ``ref_mask`` (uint8) / ``cu`` (int64): exactly one is given."""
    packed = cu is not None
    g = cu.numel() - 1 if packed else lp.shape[0]
    if g == 0:
        return
    k = lp.shape[0] if packed else lp.shape[1]
    if packed:
        strides = (0, lp.stride(0), lp.stride(1))
        width, m = 0, lp.shape[1]
    else:
        strides = (lp.stride(0), lp.stride(1), lp.stride(2))
        width, m = lp.shape[2], 0
    block = 32
    kernel = r3_reward_kernel if launch is None else launch(r3_reward_kernel)
    dummy = sigma
    kernel[(g,)](
        lp, ref_mask if not packed else roll, cu if packed else k_g, roll,
        base if base is not None else dummy, k_g, reward, weights, sigma, top, nvalid,
        strides[0], strides[1], strides[2],
        k, width, m, float(softmax_tau), float(gamma if gamma is not None else 0.0), int(min_valid),
        PACKED=packed, HAS_BASE=base is not None, HAS_GAMMA=gamma is not None,
        WEIGHTING=int(weighting), REDUCTION=int(reduction), BLOCK=block,
    )
