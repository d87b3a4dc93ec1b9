"""Triton kernels of ``linear_token_logprobs`` (docs/ops.md section 3): per-token log-prob, entropy, rank and
LSE straight from ``hidden [N, H]`` and the lm_head ``weight [V, H]`` (+ ``bias [V]``), forward and backward,
never materialising the N x V logits.

Contract (the registered ops that wrap these launchers check it): ``hidden`` [N, H] and ``weight`` [V, H]
contiguous, same dtype, fp32 / bf16 / fp16; ``bias`` [V] (same dtype) or None; ``labels`` [N] int64;
``temperature`` [N] fp32 (stride 0 allowed) or None with ``temperature_scalar``. Statistics are fp32;
gradients come back in the dtype of the tensor they belong to. Semantics are those of
``token_logprobs(hidden @ weight.T + bias, labels, ...)`` with the logits kept as the fp32 matmul
accumulator (never rounded to the input dtype), divided by the temperature. The division uses 1/tau as
two floats hi + lo, like the CPU kernels (csrc/cpu/row_kernels_impl.h), not the single rounded 1/tau of
``kernels/token_logprobs.py``: the fp32 gradient tests failed by ~5% of the bound with the single one.

Forward (``linear_logprobs_fwd``): split-vocabulary tiling, two kernels.

* ``_linear_logprobs_fwd_kernel``: a 1-D grid of ``row_blocks x splits`` programs (row block fastest, so
  programs resident at the same time share the same weight tiles in L2). A program owns BLOCK_N rows and one
  contiguous vocabulary range of ``blocks_per_split`` BLOCK_V tiles. Per tile it computes the logits
  [BLOCK_N, BLOCK_V] with ``tl.dot`` over H in BLOCK_K steps (input dtype, fp32 accumulator; fp32 inputs use
  ``input_precision="ieee"`` so no TF32 rounding), adds the bias, scales by 1/tau (held as two floats
  hi + lo, z - m = fma(x, lo, fma(x, hi, -m)), see ``_rows_setup``) and folds the tile into the
  online state of docs/ops.md 2.2 per row: the raw maximum x_m (from -inf) and the shift m it defines,
  s = sum exp(z - m), the shifted entropy accumulator b = sum (z - m) exp(z - m), the raw label logit x_y
  (gathered when its tile passes) and, with HAS_RANK, the count of columns j != y with x_j > x_y. The
  partial (x_m, s, b, x_y[, count]) of every split is written to a workspace [splits, 4, N] fp32
  (+ [splits, N] int32).
* ``_linear_logprobs_combine_kernel``: one program per 128 rows merges the splits exactly as the
  vocab-parallel combine of docs/ops.md 3.3 (M = the shift of max x_m, S = sum s_r e^(m_r - M),
  B = sum e^(m_r - M) (b_r + (m_r - M) s_r)) and writes logprobs, entropy = ln S - B / S, rank, LSE and
  ``stats`` [N, 2] = (M_hi, ln S + M_lo), the pair the backward needs (the logits path writes the same pair).

One consistent scaling (docs/numerics.md, as csrc/cpu/token_logprobs_kernel.h): z - m is formed by ONE
expression, d(x) = fma(x, lo, fma(x, hi, -m_hi)) - m_lo, and the shift (m_hi, m_lo) of a raw maximum x_m is
m_hi = x_m hi, m_lo = fma(x_m, lo, fma(x_m, hi, -m_hi)), so d(x_m) = 0 exactly and d <= 0 elsewhere: s >= 1,
lp = d(x_y) - ln S <= 0 and H >= 0 hold exactly. The splits store the RAW maximum, so the combine recomputes
every shift with the same expression and the split holding the maximum gets the factor e^0 = 1 exactly.

Why split the vocabulary: one program per row block sweeping all of V gives only N / BLOCK_N programs
(128 at N = 16k, 32 at N = 4k) for 132 SMs on an H100; splitting V into ``splits`` ranges fills the machine
at any N for the price of an O(splits x N) workspace and a tiny combine. ``splits`` aims at
2 x SM-count programs (1 on CPU / the interpreter; tests force more).

Rank (docs/ops.md 3.3): with HAS_RANK each program first computes the raw label logit x_y = h . W[y] + b[y] by
a per-row gathered dot product (O(N H) per split, negligible), then counts x_j > x_y over the tile-computed
x_j, the label column excluded by index; only near-ties within GEMM rounding can differ from the reference.
``lp`` always uses the label logit of the streaming pass.

Backward (``linear_logprobs_bwd``): vocabulary chunks of a dz workspace, deterministic, atomics-free.
For each chunk of ``vc`` vocabulary columns (and, only for N > ~1M rows, each chunk of rows):

1. ``_linear_logprobs_dz_kernel`` (grid: row blocks x vocab blocks of the chunk, grouped for L2 reuse)
   recomputes the logits tiles with the forward's tile code, forms ln p = (z - m) - ln s from ``stats``
   and dx_j = (g_lp (1[j=y] - p_j) - g_H p_j (ln p_j + H)) / tau (docs/ops.md 2.3) in fp32, writes dx to the
   workspace [N, vc] in the input dtype and the per-row-block column sums of the fp32 dx to
   [row_blocks, vc] (for grad_bias). Invalid rows (ignore_index, out-of-range label, bad temperature)
   write 0. 2 N vc H FLOP.
2. ``_matmul_kernel``: grad_weight[chunk] = dx^T @ hidden (fp32 accumulator over all N rows, written once
   in the weight dtype: no [V, H] fp32 buffer is needed). 2 N vc H FLOP.
3. ``_matmul_kernel``: grad_hidden += dx @ weight[chunk] into an fp32 [N, H] accumulator (the output itself
   for fp32 hidden), cast to the hidden dtype at the end. 2 N vc H FLOP.
4. grad_bias[chunk] = sum over row blocks of the partial column sums (fp32, fixed order).

Every output element is produced by one program in a fixed order, so gradients are bitwise reproducible
(the ``deterministic=True`` contract of docs/ops.md 0) and no atomics are used. Alternative considered: one
tile kernel with fp32 atomics into grad_hidden and grad_weight (CCE's scheme): the same 6NVH FLOP and no
workspace, but non-deterministic, a V x H fp32 buffer, and an atomic read-modify-write of
(BLOCK_N + BLOCK_V) x H fp32 per tile; it is left as future work behind ``deterministic=False``.

Precision of the backward GEMMs: for bf16 / fp16 inputs dx is rounded once to the input dtype before the
tensor-core dot (fp32 accumulation), which is exactly what the docs/ops.md 8 yardstick "reference in the input
dtype, fp32 accumulation" does (its grad_logits are in the input dtype); grad_bias is summed from the fp32
dx. fp32 inputs keep dx in fp32 and use IEEE fp32 dots.

Memory. Forward: O(splits x N) fp32 workspace. Backward: the dx workspace N x vc x elt bytes plus
(N / BLOCK_N) x vc x 4 for the bias partials, with vc the largest multiple of BLOCK_V that keeps it under
``WORKSPACE_BYTES`` (256 MiB; docs/ops.md 3.1); an fp32 grad_hidden accumulator N x H x 4 bytes for 16-bit
hidden (256 MiB at N = 16k, H = 4096); an fp32 [V] grad_bias accumulator. Only when N x BLOCK_V x elt
exceeds the budget (N > 1M rows in bf16) are rows chunked too, and then grad_weight is accumulated in an
fp32 [V, H] buffer (V x H x 4 bytes, the one the spec allows) across row chunks.

Work: forward 2NVH FLOP (the epilogue is not counted); backward 6NVH (recompute 2NVH + dX 2NVH + dW 2NVH);
forward + backward 8NVH. The backward re-reads the workspace twice (2 x N x V x elt bytes; 10 GB at the
reference shape, ~3 ms at 3 TB/s against a 76 ms compute floor) and, with several chunks, the fp32
grad_hidden accumulator once per chunk (N x H x 8 bytes per chunk).

Block sizes (constexpr, ``_tile_config`` / ``_matmul_config``, per architecture): BLOCK_N = next power of
two of N clamped to [16, 128] (four buckets, so small batches do not compute 128-row tiles of padding). For
16-bit inputs on sm_90 / sm_100: forward and dz (always the same tiles) 128 x 64 x 64, matmul 128 x 128 x 64,
8 warps, 3 / 4 pipeline stages; sm_80: BLOCK_K = 32 and 4 stages. fp32 inputs (IEEE fp32 dots on the FMA
units): 64 x 64 x 32, 8 warps, 3 stages. A 128 x 128 forward tile needed 255
registers and 12-20 bytes of spills once its K loop was pipelined, hence 64 vocabulary columns.
Checked by compiling ahead of time without a GPU (``bench/sm90_report.py``, ``make check-sm90``, the table
in docs/gpu-kernels.md): every specialisation compiles for sm_90a with no spills, 16-byte cp.async loads
with copy groups in flight and wgmma with one group in flight (mma.sync on sm_80, tcgen05 on sm_100).
Nothing has been timed or tuned on a GPU.

Specialisation. N, V, H, the chunk offsets and ignore_index are runtime arguments listed in
``do_not_specialize``, so a new sequence length, vocabulary or hidden size never recompiles a kernel. One
constexpr, ALIGNED, says that the sizes along the tiles' contiguous dimensions (H; the vocabulary chunk in
the backward) and the element offsets are multiples of 16 (``_aligned``, checked on the host); the kernels
then rewrite those sizes as (n // 16) * 16, which Triton's alignment analysis understands: every tile load
becomes 16 bytes wide, which is also the condition for Triton to issue cp.async and pipeline the K loop (it
pipelines no 2-byte loads). Sizes that are not multiples of 16 (H = 4100; for the matmuls also the last
chunk of V = 50257) run the ALIGNED=False variant: the same code with 2-byte masked loads, unpipelined, on
smaller K tiles (``_tile_config``). Row strides keep Triton's
usual ==1 / %16 specialisation (for contiguous tensors they follow H, so no further variants). Tile origins
are int64; offsets inside a tile are int32, which assumes BLOCK x row stride < 2^31 (H and the workspace
width below 2^24).

Known limits: the number of kernel launches of the backward (the chunk loop) and the split count of the
forward are computed on the host from N and V; under ``torch.compile`` with dynamic shapes that host code
is traced, so those counts may add guards (unverified: no GPU in the task that wrote this). No tuning, no
TMA descriptors or warp specialisation (cp.async rings; TMA would need a device-side descriptor allocator
inside ``torch.library.triton_op``); float64 is not supported (use the cpp or reference implementation).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from reasonrl.kernels.token_logprobs import _direct_launch, _multiple_of_16

#: Upper bound on the backward's dx workspace (docs/ops.md 3.1: "bounded tile workspace, default <= 256 MiB").
WORKSPACE_BYTES = 256 * 1024 * 1024


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _rows_setup(labels_ptr, temperature_ptr, rows, row_ok, stride_temperature_n, temperature_scalar, vocab,
                ignore_index, HAS_TEMP: tl.constexpr):
    """Per row of a block: label, 1 / tau as an unevaluated sum hi + lo of two floats, and validity (a label
    in [0, V) other than ignore_index, a finite temperature > 0, and a row inside [0, N)). Invalid rows get
    tau = 1 so that no NaN is computed.

    Why two terms (as csrc/cpu/row_kernels_impl.h does): with hi alone the rounding of 1/tau scales every
    z of a row by up to (1 + 6e-8), ~5e-7 in ln p at |z| ~ 10, which is over the fp32 gradient budget of
    docs/ops.md 8 (the reference rounds x / tau once). z - m = fma(x, lo, fma(x, hi, -m)) is x / tau - m to
    about one rounding of the small result. The residual 1 - tau hi is exact in an fma."""
    label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    if HAS_TEMP:
        tau = tl.load(temperature_ptr + rows * stride_temperature_n, mask=row_ok, other=1.0).to(tl.float32)
    else:
        tau = tl.zeros(rows.shape, dtype=tl.float32) + temperature_scalar
    # A subnormal tau has no finite reciprocal: the smallest valid tau is the smallest normal fp32.
    tau_ok = (tau >= 1.1754943508222875e-38) & (tau < float("inf"))
    valid = row_ok & (label != ignore_index) & (label >= 0) & (label < vocab) & tau_ok
    tau = tl.where(valid, tau, 1.0)
    # Correctly rounded divisions (div.rn), not the approximate div.full.f32 of `/` on the GPU: every
    # kernel of the forward, combine and backward derives the same (hi, lo) (docs/numerics.md section 6).
    inv_hi = tl.div_rn(1.0, tau)
    inv_lo = tl.div_rn(tl.fma(-tau, inv_hi, 1.0), tau)
    return label, inv_hi, inv_lo, valid


@triton.jit
def _grouped_tile(pid, n_m, n_n, GROUP: tl.constexpr):
    """(tile row, tile column) of program ``pid`` on an n_m x n_n tile grid in grouped order: GROUP tile rows
    sweep the tile columns together, so the operand tiles of concurrently running programs stay in L2."""
    per_group = GROUP * n_n
    first_m = (pid // per_group) * GROUP
    group_size = tl.minimum(n_m - first_m, GROUP)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with an fp32 accumulator. UPCAST_DOT (set only under TRITON_INTERPRET=1 for bf16) computes
    in fp32 instead: the interpreter multiplies the uint16 bit patterns of bf16 dot operands (triton issue
    #11584). bf16 x bf16 products are exact in fp32, so this matches the tensor-core dot up to summation
    order."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, row0, row_ok, col0, col_ok, hdim, stride_hidden_n, stride_weight_v,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):  # fmt: skip
    """Raw logits x = hidden[row0 + i] @ weight[col0 + j]^T + bias[col0 + j] as an fp32 [BLOCK_N, BLOCK_V]
    accumulator. Out-of-range rows / columns read zeros (the callers mask them). The tile origins row0 / col0
    are int64 scalars; in-tile offsets are int32 (BLOCK x H < 2^31), which keeps the 2-D pointer arithmetic
    of the K loop out of 64-bit registers."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = (
        hidden_ptr + row0 * stride_hidden_n + (tl.arange(0, BLOCK_N)[:, None] * stride_hidden_n + ks[None, :])
    )
    w_ptrs = (
        weight_ptr + col0 * stride_weight_v + (ks[:, None] + tl.arange(0, BLOCK_V)[None, :] * stride_weight_v)
    )
    for k0 in range(0, hdim, BLOCK_K):
        k_ok = ks < hdim - k0
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_V]
        acc = _dot(h, w, acc, DOT_PRECISION, UPCAST_DOT)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col0 + tl.arange(0, BLOCK_V), mask=col_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    return acc


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _shift_of(x_max, inv_hi, inv_lo):
    """The row shift (m_hi, m_lo) of a raw maximum ``x_max`` (see the module docstring); (0, 0) while the row
    has seen only -inf, which keeps every d = -inf (never -inf - -inf)."""
    fin = x_max > -float("inf")
    m_hi = tl.where(fin, x_max * inv_hi, 0.0)
    m_lo = tl.where(fin, tl.fma(x_max, inv_lo, tl.fma(x_max, inv_hi, -m_hi)), 0.0)
    return m_hi, m_lo


@triton.jit
def _shifted(x, inv_hi, inv_lo, m_hi, m_lo):
    """d(x) = z - m (the one expression of the module docstring); -inf stays -inf (x lo would be NaN for
    lo = 0 and -inf + inf for lo < 0)."""
    d = tl.fma(x, inv_lo, tl.fma(x, inv_hi, -m_hi)) - m_lo
    return tl.where(x == -float("inf"), -float("inf"), d)


@triton.jit(do_not_specialize=["n_rows", "vocab", "hdim", "ignore_index", "blocks_per_split"])
def _linear_logprobs_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, temperature_ptr,
    part_ptr,  # [splits, 4, N] fp32: x_m (raw maximum), s, b, x_y (raw label logit)
    count_ptr,  # [splits, N] int32 (HAS_RANK)
    n_rows, vocab, hdim, stride_hidden_n, stride_weight_v, stride_temperature_n, temperature_scalar,
    ignore_index, blocks_per_split,
    HAS_BIAS: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_RANK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    hdim = _multiple_of_16(hdim, ALIGNED)  # ALIGNED: H % 16 == 0 (host-checked), 16-byte GEMM loads
    pid = tl.program_id(0).to(tl.int64)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    row_block = pid % n_row_blocks
    split = pid // n_row_blocks
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < n_rows
    label, inv_hi, inv_lo, valid = _rows_setup(labels_ptr, temperature_ptr, rows, row_ok,
                                               stride_temperature_n, temperature_scalar, vocab, ignore_index,
                                               HAS_TEMP)

    xm = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)  # raw running maximum
    m_hi = tl.zeros([BLOCK_N], dtype=tl.float32)  # its shift (0, 0 while xm = -inf)
    m_lo = tl.zeros([BLOCK_N], dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    b = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    # A block with no valid row (prompt / padding rows the caller did not compact away) skips the GEMM.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        if HAS_RANK:
            # Raw label logit x_y = h . W[y] + b[y] (before temperature, docs/ops.md 2.1), by a gathered dot.
            safe_label = tl.where(valid, label, 0)
            x_label = tl.zeros([BLOCK_N], dtype=tl.float32)
            ks = tl.arange(0, BLOCK_K)
            for k0 in range(0, hdim, BLOCK_K):
                k = k0 + ks
                mk = valid[:, None] & (k < hdim)[None, :]
                h = tl.load(hidden_ptr + rows[:, None] * stride_hidden_n + k[None, :], mask=mk, other=0.0)
                w = tl.load(
                    weight_ptr + safe_label[:, None] * stride_weight_v + k[None, :], mask=mk, other=0.0
                )
                x_label += tl.sum(h.to(tl.float32) * w.to(tl.float32), axis=1)
            if HAS_BIAS:
                x_label += tl.load(bias_ptr + safe_label, mask=valid, other=0.0).to(tl.float32)

        v_start = split * blocks_per_split * BLOCK_V
        v_end = tl.minimum(vocab, v_start + blocks_per_split * BLOCK_V)
        for v0 in range(v_start, v_end, BLOCK_V):
            # Columns as int32 offsets inside the tile and the label as its offset from v0 (-1 when not in
            # this tile): int64 column indices in the MMA layout would cost 2 registers per element of the
            # epilogue (the scarcest resource of this kernel: see _tile_config).
            cols = tl.arange(0, BLOCK_V)
            col_ok = cols < v_end - v0
            lab = label - v0
            lab = tl.where((lab >= 0) & (lab < BLOCK_V), lab, -1).to(tl.int32)
            x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, row_block * BLOCK_N, row_ok, v0, col_ok, hdim,
                             stride_hidden_n, stride_weight_v, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K,
                             DOT_PRECISION, UPCAST_DOT)
            if HAS_RANK:
                above = (x > x_label[:, None]) & (cols[None, :] != lab[:, None]) & col_ok[None, :]
                count += tl.sum(above.to(tl.int32), axis=1)
            # The raw x_y, gathered when its tile passes (only the owning split sees it; the others keep 0).
            t += tl.sum(tl.where(cols[None, :] == lab[:, None], x, 0.0), axis=1)
            # docs/ops.md 2.2 per row, one maximum per tile: tau > 0, so the raw maximum is also that of z.
            # While a row has seen only -inf, the shift is (0, 0): d = -inf and e = 0 (never -inf - -inf),
            # alpha = 0 and s, b stay 0. NaN / +inf logits make d NaN for that column, so s and everything
            # after it become NaN.
            x_max = tl.max(tl.where(col_ok[None, :], x, -float("inf")), axis=1)
            xm_new = tl.maximum(xm, x_max)
            mh_new, ml_new = _shift_of(xm_new, inv_hi, inv_lo)
            m_fin = xm > -float("inf")
            # m <= m_new (a larger raw maximum); the minimum only guards the sign of b (<= 0).
            delta = tl.where(m_fin, tl.minimum((m_hi - mh_new) + (m_lo - ml_new), 0.0), 0.0)
            alpha = tl.where(m_fin, tl.exp2(delta * 1.4426950408889634), 0.0)
            # d = z - m, 0 exactly at the maximum, and it is the difference (not z) that is scaled to base 2
            # (see kernels/token_logprobs.py): the exponent's rounding error stays proportional to |d|.
            # Columns past the vocabulary end are -inf.
            d = _shifted(x, inv_hi[:, None], inv_lo[:, None], mh_new[:, None], ml_new[:, None])
            d = tl.where(col_ok[None, :], d, -float("inf"))
            e = tl.exp2(d * 1.4426950408889634)
            if HAS_ENTROPY:
                b = alpha * (b + delta * s) + tl.sum(tl.where(e > 0, d * e, 0.0), axis=1)
            s = alpha * s + tl.sum(e, axis=1)
            xm = xm_new
            m_hi = mh_new
            m_lo = ml_new

    base = part_ptr + split * 4 * n_rows + rows
    tl.store(base, xm, mask=row_ok)
    tl.store(base + n_rows, s, mask=row_ok)
    tl.store(base + 2 * n_rows, b, mask=row_ok)
    tl.store(base + 3 * n_rows, t, mask=row_ok)
    if HAS_RANK:
        tl.store(count_ptr + split * n_rows + rows, count, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "vocab", "ignore_index", "n_splits"])
def _linear_logprobs_combine_kernel(
    part_ptr, count_ptr, labels_ptr, temperature_ptr,
    logprobs_ptr, entropy_ptr, rank_ptr, lse_ptr, stats_ptr,
    n_rows, vocab, stride_temperature_n, temperature_scalar, ignore_index, n_splits,
    HAS_TEMP: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_RANK: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < n_rows
    label, inv_hi, inv_lo, valid = _rows_setup(labels_ptr, temperature_ptr, rows, row_ok,
                                               stride_temperature_n, temperature_scalar, vocab, ignore_index,
                                               HAS_TEMP)
    big_xm = tl.full([BLOCK_R], -float("inf"), dtype=tl.float32)
    for r in range(0, n_splits):
        xm_r = tl.load(part_ptr + r * 4 * n_rows + rows, mask=row_ok, other=-float("inf"))
        big_xm = tl.maximum(big_xm, xm_r)
    # The global shift, by the expression every split used: the split holding the maximum gets dm = 0.
    big_m, big_m_lo = _shift_of(big_xm, inv_hi, inv_lo)
    big_m = tl.where(big_xm > -float("inf"), big_m, -float("inf"))
    big_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    big_b = tl.zeros([BLOCK_R], dtype=tl.float32)
    t = tl.zeros([BLOCK_R], dtype=tl.float32)
    count = tl.zeros([BLOCK_R], dtype=tl.int32)
    for r in range(0, n_splits):
        base = part_ptr + r * 4 * n_rows + rows
        xm_r = tl.load(base, mask=row_ok, other=-float("inf"))
        s_r = tl.load(base + n_rows, mask=row_ok, other=0.0)
        t += tl.load(base + 3 * n_rows, mask=row_ok, other=0.0)  # only the owning split is non-zero
        # docs/ops.md 3.3 step 3: a split that saw only -inf (x_m = -inf)
        # contributes 0, never exp(-inf + inf).
        fin = xm_r > -float("inf")
        m_r, m_r_lo = _shift_of(xm_r, inv_hi, inv_lo)
        dm = tl.where(fin, tl.minimum((m_r - big_m) + (m_r_lo - big_m_lo), 0.0), 0.0)
        f = tl.where(fin, tl.exp2(dm * 1.4426950408889634), 0.0)
        big_s += f * s_r
        if HAS_ENTROPY:
            b_r = tl.load(base + 2 * n_rows, mask=row_ok, other=0.0)
            big_b += tl.where(fin, f * (b_r + dm * s_r), 0.0)
        if HAS_RANK:
            count += tl.load(count_ptr + r * n_rows + rows, mask=row_ok, other=0)
    big_s = tl.where(valid, big_s, 1.0)  # ignored / padding lanes: no log(0) (their outputs are filled below)
    log_s = tl.log(big_s)
    fill = tl.where(label == ignore_index, 0.0, float("nan"))
    # stats fold M_lo into ln S; lp is formed by the backward's expression, fma(x, lo, fma(x, hi, -M)) -
    # stats[1], so that it is bitwise the ln p_y the dz kernel recomputes (docs/numerics.md section 6). <= 0
    # exactly: the fma pair is <= M_lo (equal at the maximum) and ln S + M_lo rounds to >= M_lo.
    log_s_lo = log_s + big_m_lo
    m_fin = tl.where(big_xm > -float("inf"), big_m, 0.0)
    lp = tl.fma(t, inv_lo, tl.fma(t, inv_hi, -m_fin)) - log_s_lo
    lp = tl.where(t == -float("inf"), -float("inf"), lp)
    tl.store(logprobs_ptr + rows, tl.where(valid, lp, fill), mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(valid, big_m + log_s_lo, fill), mask=row_ok)
    tl.store(stats_ptr + 2 * rows, tl.where(valid, big_m, fill), mask=row_ok)
    tl.store(stats_ptr + 2 * rows + 1, tl.where(valid, log_s_lo, fill), mask=row_ok)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(valid, log_s - tl.div_rn(big_b, big_s), fill), mask=row_ok)
    if HAS_RANK:
        tl.store(rank_ptr + rows, tl.where(valid, count + 1, 0), mask=row_ok)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_rows", "vocab", "hdim", "ignore_index", "row_start", "v_start", "v_count"])
def _linear_logprobs_dz_kernel(
    grad_logprobs_ptr, grad_entropy_ptr, hidden_ptr, weight_ptr, bias_ptr, labels_ptr, temperature_ptr,
    stats_ptr, entropy_ptr,
    dx_ptr,  # [rows of the chunk, >= v_count] workspace, input dtype
    dbias_ptr,  # [row blocks of the chunk, >= v_count] fp32 (HAS_BIAS)
    n_rows,  # rows of this chunk
    vocab, hdim, row_start, v_start, v_count,
    stride_hidden_n, stride_weight_v, stride_temperature_n, stride_dx_n, stride_dbias_n,
    temperature_scalar, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_GRAD_LP: tl.constexpr, HAS_GRAD_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    # ALIGNED: H and the chunk's first column are multiples of 16 (host-checked), so the GEMM loads are
    # 16-byte accesses. The stores cover the chunk's columns rounded up to 16 (v_store): the extra columns
    # (only in the last chunk of a vocabulary that is not a multiple of 16) hold zeros in the workspace's
    # padding (its width is a multiple of BLOCK_V), which no later kernel reads, so the dx stores are 16
    # bytes wide whatever V is and a vocabulary never selects the ALIGNED=False variant on its own.
    hdim = _multiple_of_16(hdim, ALIGNED)
    v_start = _multiple_of_16(v_start, ALIGNED)
    v_store = v_count
    if ALIGNED:
        v_store = ((v_count + 15) // 16) * 16
    # Grouped tile order (GROUP_N row blocks sweep the vocabulary blocks together) so the weight and hidden
    # tiles of concurrently running programs stay in L2.
    pid = tl.program_id(0).to(tl.int64)
    rb, vb = _grouped_tile(pid, tl.cdiv(n_rows, BLOCK_N), tl.cdiv(v_count, BLOCK_V), GROUP_N)

    local_rows = rb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = local_rows < n_rows
    rows = row_start + local_rows
    local_cols = vb * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_ok = local_cols < v_count
    cols = v_start + local_cols
    label, inv_hi, inv_lo, valid = _rows_setup(labels_ptr, temperature_ptr, rows, row_ok,
                                               stride_temperature_n, temperature_scalar, vocab, ignore_index,
                                               HAS_TEMP)

    dx = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        x = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, row_start + rb * BLOCK_N, row_ok,
                         v_start + vb * BLOCK_V, col_ok, hdim, stride_hidden_n, stride_weight_v, HAS_BIAS,
                         BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
        m = tl.load(stats_ptr + 2 * rows, mask=valid, other=0.0)
        log_s = tl.load(stats_ptr + 2 * rows + 1, mask=valid, other=0.0)
        g_lp = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_GRAD_LP:
            g_lp = tl.load(grad_logprobs_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        g_h = tl.zeros([BLOCK_N], dtype=tl.float32)
        ent = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_GRAD_H:
            g_h = tl.load(grad_entropy_ptr + rows, mask=valid, other=0.0).to(tl.float32)
            ent = tl.load(entropy_ptr + rows, mask=valid, other=0.0)
        # ln p_j, formed as the forward summed it: the two-term z - m, then - ln s.
        d = tl.fma(x, inv_lo[:, None], tl.fma(x, inv_hi[:, None], -m[:, None])) - log_s[:, None]
        p = tl.exp2(d * 1.4426950408889634)
        # z_j - mu = ln p_j + H;  dz_j = g_lp (1[j=y] - p_j) - g_H p_j (ln p_j + H)
        dz = -p * (g_lp[:, None] + g_h[:, None] * (d + ent[:, None]))
        dz = tl.where(p > 0, dz, 0.0)  # p = 0: never 0 * inf
        dz = tl.where(cols[None, :] == label[:, None], dz + g_lp[:, None], dz)
        dx = tl.where(
            valid[:, None] & col_ok[None, :], tl.fma(dz, inv_lo[:, None], dz * inv_hi[:, None]), 0.0
        )
    tl.store(
        dx_ptr + local_rows[:, None] * stride_dx_n + local_cols[None, :],
        dx.to(dx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (local_cols < v_store)[None, :],
    )
    if HAS_BIAS:
        tl.store(dbias_ptr + rb * stride_dbias_n + local_cols, tl.sum(dx, axis=0), mask=local_cols < v_store)


@triton.jit(do_not_specialize=["m_size", "n_size", "k_size", "a_offset", "b_offset", "c_offset"])
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, m_size, n_size, k_size, a_offset, b_offset, c_offset,
    stride_a_m, stride_a_k, stride_b_k, stride_b_n, stride_c_m, stride_c_n,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, A_K_CONTIG: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """C[m, n] (+)= sum_k A[m, k] B[k, n] with an fp32 accumulator; C is stored in its own dtype. With
    ACCUMULATE the existing C (fp32) is added once, after the K loop: each C element is owned by one program
    and summed in a fixed order (deterministic). Element offsets a/b/c_offset address chunks of a buffer.

    Layouts: B and C are contiguous along n; A along k (A_K_CONTIG, dx @ weight) or along m (dx^T @ hidden).
    ALIGNED (host-checked): the sizes of those contiguous dimensions and the three offsets are multiples of
    16, so every tile load / store is 16 bytes wide and the K loop is pipelined with cp.async. The size
    along A's strided dimension (the token count for dx^T @ hidden) may be anything."""
    if ALIGNED:
        n_size = _multiple_of_16(n_size, True)
        if A_K_CONTIG:
            k_size = _multiple_of_16(k_size, True)
        else:
            m_size = _multiple_of_16(m_size, True)
        a_offset = _multiple_of_16(a_offset, True)
        b_offset = _multiple_of_16(b_offset, True)
        c_offset = _multiple_of_16(c_offset, True)
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(m_size, BLOCK_M), tl.cdiv(n_size, BLOCK_N), GROUP_M)

    # int64 only in the scalar tile origins; in-tile offsets are int32 (BLOCK x stride < 2^31: the strides
    # are H and the workspace width), which keeps the 2-D pointer arithmetic out of 64-bit registers.
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    m_ok = rm < m_size - m0
    n_ok = rn < n_size - n0
    a_ptrs = a_ptr + a_offset + m0 * stride_a_m + (rm[:, None] * stride_a_m + rk[None, :] * stride_a_k)
    b_ptrs = b_ptr + b_offset + n0 * stride_b_n + (rk[:, None] * stride_b_k + rn[None, :] * stride_b_n)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_size, BLOCK_K):
        k_ok = rk < k_size - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_PRECISION, UPCAST_DOT)
        a_ptrs += BLOCK_K * stride_a_k
        b_ptrs += BLOCK_K * stride_b_k
    c_ptrs = (
        c_ptr
        + c_offset
        + m0 * stride_c_m
        + n0 * stride_c_n
        + (rm[:, None] * stride_c_m + rn[None, :] * stride_c_n)
    )
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Host side: heuristics and launchers
# ----------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _arch(device: torch.device, arch: int | None) -> int:
    """Compute capability x 10 the tile configurations are chosen for: ``arch`` when given (the ahead-of-time
    compile check passes it with meta tensors), the device's on CUDA, else 90 (the interpreter: the tiles
    only change how fast it runs, never the results' semantics)."""
    if arch is not None:
        return int(arch)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def _tile_config(n_rows: int, vocab: int, hdim: int, dtype: torch.dtype, arch: int = 90) -> dict:
    """Constexpr tile sizes and pipeline depth of the forward and dz kernels: a few buckets, never one
    variant per N, V or H (see the module docstring). Checked by compiling for each architecture
    (bench/sm90_report.py: no spills, 16-byte cp.async loads, the MMA kind), not timed.

    The forward and the dz kernel always share one configuration: the dz kernel recomputes the forward's
    logits tiles, and the same tile code with the same tiles gives the same bits (the backward's ln p_j is
    then exactly the forward's, docs/numerics.md section 6).

    * 16-bit inputs, sm_90 / sm_100: 128 x 64 x 64 tiles, 8 warps (two warpgroups of wgmma on sm_90),
      3 stages (72 KiB of shared memory for the operand ring). 128 x 128 would halve the shared-memory
      traffic per MMA, but the forward's online-softmax epilogue then needs 255 registers and 12-20 bytes
      of spills once its K loop is pipelined (197 registers, none, at 128 x 64).
    * 16-bit inputs, sm_80 (mma.sync, 164 KiB of shared memory): BLOCK_K = 32 and 4 stages.
    * fp32 inputs (IEEE fp32 dots on the FMA units, no tensor cores): 64 x 64 x 32, 8 warps, 3 stages
      (32 KiB; with 2 stages Triton's pipeline keeps no copy in flight during the dot; 2 for the small-batch
      tiles on sm_100, where 3 spilled).
    * H not a multiple of 16 (the ALIGNED=False variant: 2-byte loads, which Triton cannot pipeline):
      BLOCK_K = 32 and one stage. The scalar loads' addresses and masks cost registers; at BLOCK_K = 64
      the forward spilled up to 260 bytes (250 registers, none, at 32).
    BLOCK_N (rows) follows N up to 128 so that small batches do not compute 128-row tiles of padding."""
    block_n = min(128, max(16, _next_pow2(n_rows)))
    if dtype == torch.float32:
        block_n = min(block_n, 64)
        # sm_100's ptxas spilled 4 bytes for 16-row tiles with 3 stages (none with 2).
        stages = (2 if arch >= 100 and block_n < 64 else 3) if hdim % 16 == 0 else 1
        return dict(BLOCK_N=block_n, BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=stages)
    warps = 8 if block_n >= 64 else 4
    if hdim % 16 != 0:
        return dict(BLOCK_N=block_n, BLOCK_V=64, BLOCK_K=32, num_warps=warps, num_stages=1)
    if arch < 90:
        return dict(BLOCK_N=block_n, BLOCK_V=64, BLOCK_K=32, num_warps=warps, num_stages=4)
    return dict(BLOCK_N=block_n, BLOCK_V=64, BLOCK_K=64, num_warps=warps, num_stages=3)


def _matmul_config(dtype: torch.dtype, arch: int = 90, aligned: bool = True) -> dict:
    """Tiles of the backward's two GEMMs (same reasoning as ``_tile_config``; no epilogue to speak of, so
    128 x 128 tiles and one more stage than the dz kernel on sm_90 / sm_100: 4 x 32 KiB). ``aligned``: the
    call's ALIGNED flag; without it (2-byte loads, no pipeline) 128 x 64 x 32 in one stage, since the fp32
    accumulate variant spilled 36-52 bytes at 128 x 128."""
    if dtype == torch.float32:
        # Warps and stages as the compile check found them spill-free: with 4 warps the FMA dot's operand
        # fragments spilled 8-36 bytes (aligned: sm_80; unaligned: sm_100), with 8 the unaligned one 4 bytes
        # on sm_90.
        stages = 3 if aligned else 1
        warps = 8 if aligned or arch >= 100 else 4
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=warps, num_stages=stages)
    if not aligned:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=1)
    if arch < 90:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)


def _matmul_into(a, b, c, sizes, *, accumulate: bool, a_k_contig: bool, dot: dict, arch: int, launch) -> None:
    """``C[c_off:] (+)= A @ B`` through ``_matmul_kernel``. ``a`` / ``b`` are ``(tensor, element offset,
    stride along M or K, stride along K or N)``, ``c`` is ``(tensor, element offset)`` (row-major, unit column
    stride), ``sizes`` is ``(M, N, K)``. The tile config follows the alignment of the sizes and offsets."""
    (a_t, a_off, a_sm, a_sk), (b_t, b_off, b_sk, b_sn), (c_t, c_off) = a, b, c
    m, n_cols, k = sizes
    a_cols = k if a_k_contig else m  # A's contiguous extent (dx's vocab columns in both backward GEMMs)
    aligned = _aligned((a_cols, n_cols, b_off, c_off), (a_t, b_t, c_t))
    cfg = _matmul_config(b_t.dtype, arch, aligned)
    launch(_matmul_kernel)[(_cdiv(m, cfg["BLOCK_M"]) * _cdiv(n_cols, cfg["BLOCK_N"]),)](
        a_t, b_t, c_t, m, n_cols, k, a_off, b_off, c_off, a_sm, a_sk, b_sk, b_sn, c_t.stride(0), 1,
        ACCUMULATE=accumulate, A_K_CONTIG=a_k_contig, ALIGNED=aligned, **dot, **cfg,
    )  # fmt: skip


def _aligned(sizes, tensors) -> bool:
    """The ALIGNED constexpr: every size / offset in ``sizes`` and every row stride of ``tensors`` is a
    multiple of 16 elements (then the kernels' 2-D tiles load and store 16 bytes at a time). Sizes stay
    runtime arguments; this flag is the only extra compiled variant. Shapes and strides only, never
    ``data_ptr()`` (FakeTensors under torch.compile have none): base-address alignment is Triton's own
    run-time specialisation of pointer arguments, which the flag does not assert."""
    return all(x % 16 == 0 for x in sizes) and all(t.stride(0) % 16 == 0 for t in tensors)


def _target_programs(device: torch.device) -> int:
    """How many forward programs to aim for: 2 per SM on CUDA (queried at call time, never at import);
    1 elsewhere (the interpreter runs programs one after the other, so splitting only costs time)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _vocab_splits(n_row_blocks: int, n_vocab_blocks: int, device: torch.device) -> tuple[int, int]:
    """(splits, vocabulary blocks per split), with no empty split."""
    want = max(1, min(n_vocab_blocks, _cdiv(_target_programs(device), n_row_blocks)))
    per_split = _cdiv(n_vocab_blocks, want)
    return _cdiv(n_vocab_blocks, per_split), per_split


def _bwd_chunks(n_rows: int, vocab: int, block_n: int, block_v: int, elt: int) -> tuple[int, int]:
    """(rows per chunk, vocabulary columns per chunk) keeping the dx workspace (+ the bias partials) under
    WORKSPACE_BYTES. All rows at once whenever a BLOCK_V-wide chunk fits (N <= ~1M in bf16); otherwise
    chunks of 8192 columns and as many rows as fit (then grad_weight needs an fp32 accumulator)."""
    per_col = n_rows * elt + _cdiv(n_rows, block_n) * 4
    v_all = _cdiv(vocab, block_v) * block_v
    if per_col * block_v <= WORKSPACE_BYTES:
        vc = min(v_all, max(block_v, (WORKSPACE_BYTES // per_col) // block_v * block_v))
        return n_rows, vc
    vc = min(v_all, 8192 // block_v * block_v or block_v)
    nc = max(block_n, int(WORKSPACE_BYTES // (vc * (elt + 4 / block_n))) // block_n * block_n)
    return int(min(nc, n_rows)), vc


def _dot_args(dtype: torch.dtype) -> dict:
    # fp32 inputs: true fp32 products, no TF32 (the oracle rule of docs/ops.md 8 is sized for fp32
    # arithmetic). The environment is read at call time, like reasonrl._backend does (see _dot for the
    # interpreter case).
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return dict(
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        UPCAST_DOT=interpret and dtype == torch.bfloat16,
    )


def linear_logprobs_fwd(hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index,
                        want_entropy, want_rank, *, launch=None, arch=None):
    """Forward of ``linear_token_logprobs`` without the N x V logits.

    Args:
        hidden: [N, H] contiguous, fp32 / bf16 / fp16. weight: [V, H] contiguous, same dtype.
        bias: [V] or None.
        labels: [N] int64. temperature: [N] fp32 (any stride) or None, then ``temperature_scalar`` (float).
        launch: ``torch.library.wrap_triton`` inside a ``triton_op``; direct launch by default.
        arch: compute capability x 10 to choose tiles for (default: the device's; see ``_arch``).

    Returns:
        (logprobs [N] fp32, entropy [N] fp32 or [0], rank [N] int32 or [0], lse [N] fp32,
        stats [N, 2] fp32 = (max of z, ln sum exp(z - max)) for the backward).
    """
    launch = launch or _direct_launch
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    lp = torch.empty((n,), device=dev, dtype=torch.float32)
    lse = torch.empty((n,), device=dev, dtype=torch.float32)
    stats = torch.empty((n, 2), device=dev, dtype=torch.float32)
    ent = torch.empty((n if want_entropy else 0,), device=dev, dtype=torch.float32)
    rank = torch.empty((n if want_rank else 0,), device=dev, dtype=torch.int32)
    if n == 0:
        return lp, ent, rank, lse, stats
    cfg = _tile_config(n, vocab, hdim, hidden.dtype, _arch(dev, arch))
    n_rb = _cdiv(n, cfg["BLOCK_N"])
    splits, per_split = _vocab_splits(n_rb, _cdiv(vocab, cfg["BLOCK_V"]), dev)
    part = torch.empty((splits, 4, n), device=dev, dtype=torch.float32)
    count = torch.empty((splits, n) if want_rank else (0,), device=dev, dtype=torch.int32)
    has_temp = temperature is not None
    has_bias = bias is not None
    launch(_linear_logprobs_fwd_kernel)[(n_rb * splits,)](
        hidden, weight, bias if has_bias else hidden, labels, temperature if has_temp else part,  # dummies
        part, count if want_rank else part,
        n, vocab, hdim, hidden.stride(0), weight.stride(0), temperature.stride(0) if has_temp else 0,
        float(temperature_scalar), ignore_index, per_split,
        HAS_BIAS=has_bias, HAS_TEMP=has_temp, HAS_ENTROPY=want_entropy, HAS_RANK=want_rank,
        ALIGNED=_aligned((hdim,), (hidden, weight)), **_dot_args(hidden.dtype), **cfg,
    )  # fmt: skip
    block_r = 128
    launch(_linear_logprobs_combine_kernel)[(_cdiv(n, block_r),)](
        part, count if want_rank else part, labels, temperature if has_temp else part,
        lp, ent if want_entropy else lp, rank if want_rank else lp, lse, stats,
        n, vocab, temperature.stride(0) if has_temp else 0, float(temperature_scalar), ignore_index, splits,
        HAS_TEMP=has_temp, HAS_ENTROPY=want_entropy, HAS_RANK=want_rank, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return lp, ent, rank, lse, stats


def linear_logprobs_bwd(grad_logprobs, grad_entropy, hidden, weight, bias, labels, temperature,
                        temperature_scalar, ignore_index, stats, entropy, *, launch=None, arch=None):
    """Backward of ``linear_token_logprobs``: recomputes the logits tiles (see the module docstring).

    ``grad_logprobs`` / ``grad_entropy``: [N] or None (zero upstream gradient; its work is compiled out).
    ``stats`` and ``entropy`` are the forward's outputs (``entropy`` is read only with ``grad_entropy``).

    Returns (grad_hidden [N, H] in hidden's dtype, grad_weight [V, H] in weight's dtype, grad_bias [V] in
    bias's dtype or None). Deterministic: bitwise-identical results for the same inputs and device.
    """
    launch = launch or _direct_launch
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    has_lp = grad_logprobs is not None
    has_h = grad_entropy is not None
    has_bias = bias is not None
    if n == 0 or not (has_lp or has_h):
        return (
            torch.zeros_like(hidden, memory_format=torch.contiguous_format),
            torch.zeros_like(weight, memory_format=torch.contiguous_format),
            torch.zeros_like(bias) if has_bias else None,
        )
    has_temp = temperature is not None
    cc = _arch(dev, arch)
    cfg = _tile_config(n, vocab, hdim, hidden.dtype, cc)
    dot = _dot_args(hidden.dtype)
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    nc, vc = _bwd_chunks(n, vocab, block_n, block_v, hidden.element_size())
    row_chunks = _cdiv(n, nc)

    dx = torch.empty((nc, vc), device=dev, dtype=hidden.dtype)
    dbias = torch.empty((_cdiv(nc, block_n), vc) if has_bias else (0,), device=dev, dtype=torch.float32)
    grad_hidden = torch.empty((n, hdim), device=dev, dtype=hidden.dtype)
    gh_acc = (
        grad_hidden
        if hidden.dtype == torch.float32
        else torch.empty((n, hdim), device=dev, dtype=torch.float32)
    )
    grad_weight = torch.empty((vocab, hdim), device=dev, dtype=weight.dtype)
    # One row chunk (the normal case): each grad_weight tile is a single reduction over all N rows, written
    # straight in the weight dtype. Several row chunks: accumulate in fp32 [V, H] across them.
    gw_acc = (
        grad_weight
        if row_chunks == 1 or weight.dtype == torch.float32
        else torch.empty((vocab, hdim), device=dev, dtype=torch.float32)
    )
    gb_acc = torch.zeros((vocab,), device=dev, dtype=torch.float32) if has_bias else None
    stats = stats.contiguous()
    g_lp = grad_logprobs.float().contiguous() if has_lp else stats
    g_h = grad_entropy.float().contiguous() if has_h else stats
    matmul = functools.partial(_matmul_into, dot=dot, arch=cc, launch=launch)

    for r0 in range(0, n, nc):
        nr = min(nc, n - r0)
        n_rb = _cdiv(nr, block_n)
        for v0 in range(0, vocab, vc):
            nv = min(vc, vocab - v0)
            launch(_linear_logprobs_dz_kernel)[(n_rb * _cdiv(nv, block_v),)](
                g_lp, g_h, hidden, weight, bias if has_bias else hidden, labels,  # dummies: hidden / stats
                temperature if has_temp else stats, stats, entropy if has_h else stats,
                dx, dbias if has_bias else stats,
                nr, vocab, hdim, r0, v0, nv,
                hidden.stride(0), weight.stride(0), temperature.stride(0) if has_temp else 0, dx.stride(0),
                dbias.stride(0) if has_bias else 0,
                float(temperature_scalar), ignore_index,
                HAS_BIAS=has_bias, HAS_TEMP=has_temp, HAS_GRAD_LP=has_lp, HAS_GRAD_H=has_h, GROUP_N=8,
                ALIGNED=_aligned((hdim, v0), (hidden, weight, dx)), **dot, **cfg,
            )  # fmt: skip
            # grad_weight[v0:v0+nv] (+)= dx^T @ hidden[r0:r0+nr]: A = dx read transposed (K = rows strided).
            matmul((dx, 0, 1, dx.stride(0)), (hidden, r0 * hidden.stride(0), hidden.stride(0), 1),
                   (gw_acc, v0 * gw_acc.stride(0)), (nv, hdim, nr), accumulate=r0 > 0, a_k_contig=False)
            # grad_hidden[r0:r0+nr] (+)= dx @ weight[v0:v0+nv]: A = dx row-major (K = vocab contiguous).
            matmul((dx, 0, dx.stride(0), 1), (weight, v0 * weight.stride(0), weight.stride(0), 1),
                   (gh_acc, r0 * gh_acc.stride(0)), (nr, hdim, nv), accumulate=v0 > 0, a_k_contig=True)
            if has_bias:
                gb_acc[v0 : v0 + nv] += dbias[:n_rb, :nv].sum(0)

    if gh_acc is not grad_hidden:
        grad_hidden.copy_(gh_acc)
    if gw_acc is not grad_weight:
        grad_weight.copy_(gw_acc)
    grad_bias = gb_acc.to(bias.dtype) if has_bias else None
    return grad_hidden, grad_weight, grad_bias
