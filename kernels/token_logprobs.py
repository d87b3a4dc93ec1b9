"""Triton kernels of ``token_logprobs`` (docs/ops.md section 2): forward and backward, one program per row.

Contract (the registered ops in ``reasonrl/ops/token_logprobs.py`` check it): ``logits`` ``[N, V]`` with
unit stride on V (any row stride), fp32 / bf16 / fp16; ``labels`` ``[N]`` int32/int64; ``temperature``
``[N]`` fp32 (stride 0 allowed) or None with ``temperature_scalar``. Outputs fp32.

Forward: a 1-D grid of N programs (any N up to 2^31 - 1; nothing on grid axes 1/2). Each program streams its
row in BLOCK_V columns with the online log-sum-exp of docs/ops.md 2.2: z = x / tau, one maximum per block,
e = exp2((z - m) log2(e)) (the difference, not z, is scaled to base 2: the exponent's rounding error stays
proportional to |z - m|, which is what keeps the gradient within 2x of the fp32 reference's error), and the
shifted entropy accumulator b = sum (z - m) e so that H = ln(s) - b / s never cancels (1.4426950408889634 is
log2(e) in the kernels). m starts at -inf; a block whose maximum is -inf leaves the state unchanged (the
rescale factor is computed only when m is finite); terms with z = -inf are masked out of b. Vocabulary size,
temperature and ignore_index are runtime arguments, so a new sequence length or vocabulary never recompiles;
only BLOCK_V, STAGES and the feature flags (HAS_ENTROPY, HAS_RANK, HAS_TEMP) are constexpr, plus ALIGNED
(``_aligned``: V and the row strides are multiples of 16), the one extra variant, in which the row sweeps load
16 bytes per thread and instruction through a cp.async pipeline (``_stream_config``; the other variant is the
same code with 2- / 4-byte loads, unpipelined).

One consistent scaling (docs/numerics.md): d_j = z_j - m is formed by ONE expression everywhere,
d(x) = fma(x, 1/tau, -m) - m_lo, with the shift m + m_lo defined by that expression at the row's RAW maximum
x_max (m = x_max / tau rounded, m_lo = fma(x_max, 1/tau, -m) its exact rounding error). So d = 0 exactly at
the maximum and d <= 0 elsewhere (d is a rounded monotone function of x), s >= 1, lp = d_y - ln s <= 0 and
H >= 0 exactly, and a row with one finite logit (V = 1 included) gets lp = H = 0 and a zero gradient. Writing
the products as explicit FMAs also keeps these exact when the compiler contracts x * (1/tau) - m into an
FMA, which would otherwise leave d(x_max) = the rounding error of m (up to 6e-8 |m|, of either sign).

The forward also writes ``stats`` [N, 2] = (m, ln s + m_lo), for the backward only.

Backward: the same grid; each program recomputes ln p_j = fma(x_j, 1/tau, -m) - (ln s + m_lo) block by
block, the exponent the forward summed (so gradient rows sum to 0 to fp32 rounding even for |logits| ~ 1e4),
and writes dx_j = (g_lp (1[j=y] - p_j) - g_H p_j (ln p_j + H)) / tau in the logits dtype. Reading a block
before writing the same addresses makes the in-place variant (grad aliasing logits) safe.

Vocab-parallel mode (docs/ops.md 3.3): ``logits`` are the global columns [vocab_start, vocab_start + V) of a
vocabulary of ``vocab_global`` ids and labels are global ids (``vocab_global = V, vocab_start = 0`` is the
unsharded op; both are runtime arguments, never specialised). A row whose label another rank owns gets this
shard's statistics and lp = -inf (no label logit here); its rank count uses the pivot ``label_logit`` [N]
(HAS_LABEL_LOGIT) shared by the owner; its backward has no one-hot term. The collectives live in
``reasonrl/ops/token_logprobs.py``.

Known limits: one program per row leaves SMs idle when N is below a few hundred rows of a 150k vocabulary
(a split-V variant is future work); float64 is not supported (use the cpp or reference implementation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _block_v(vocab: int) -> int:
    # Two buckets, not one block size per vocabulary (which would recompile for every V): large blocks
    # amortise the per-block max/rescale on real vocabularies; small ones keep tiny vocabularies cheap.
    return 1024 if vocab <= 8192 else 4096


def _aligned(vocab: int, *tensors) -> bool:
    """Whether V and the row strides of ``tensors`` ([N, V] views) are multiples of 16: then the kernels may
    tell Triton so (the ALIGNED constexpr) and the row sweeps compile to 16-byte loads / stores (8 bf16 or 4
    fp32 per thread and instruction) instead of 2- or 4-byte ones. The sizes stay runtime arguments; this is
    the only extra compiled variant. Only shapes and strides are read, never ``data_ptr()`` (a FakeTensor has
    none while torch.compile traces the op): the base address's alignment is Triton's own run-time
    specialisation of pointer arguments, and the flag asserts nothing about it."""
    return vocab % 16 == 0 and all(t.stride(0) % 16 == 0 for t in tensors)


def _stream_config(vocab: int, *tensors) -> dict:
    """Launch constants of the one-program-per-row sweeps over the [N, V] ``tensors`` (also used by
    kernels/policy_loss.py).

    * ALIGNED: ``_aligned(vocab, *tensors)``.
    * BLOCK_V: ``_block_v``. num_warps: 8 for the 4096 block, 4 for the 1024 one, so that each thread
      holds 8 consecutive elements (16 bytes of bf16 / fp16, 2 x 16 bytes of fp32) per block: the widest
      load the hardware has, on every architecture since sm_80.
    * STAGES: the sweep loops are software-pipelined with ``tl.range(..., num_stages=STAGES)``: on sm_80+
      the next STAGES - 1 blocks are fetched by cp.async into shared memory while the current one is
      reduced, so one program keeps several 16-byte loads in flight instead of waiting on each block
      ((STAGES - 1) x BLOCK_V x element bytes of shared memory: 32 KiB for fp32 at 4096, 16 KiB for bf16).
      Only the ALIGNED variant is pipelined: the other one's 2-byte loads cannot become cp.async, and its
      fp32 form pipelined with 4-byte copies needed 165 registers (1 program per SM).
      Chosen, not tuned: no GPU has timed it (docs/gpu-kernels.md)."""
    aligned = _aligned(vocab, *tensors)
    block = _block_v(vocab)
    return dict(ALIGNED=aligned, BLOCK_V=block, STAGES=3 if aligned else 1,
                num_warps=8 if block >= 4096 else 4)


@triton.jit
def _row_setup(labels_ptr, temperature_ptr, stride_temperature_n, temperature_scalar, vocab, ignore_index,
               HAS_TEMP: tl.constexpr):
    """This program's row (int64), its label and temperature, and whether the row has a distribution to
    evaluate: a label in [0, V) that is not ignore_index, and a finite temperature > 0. Anything else
    (validate=False) gives the documented fills: zeros for ignored rows, NaN otherwise, and a zero
    gradient."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if HAS_TEMP:
        tau = tl.load(temperature_ptr + row * stride_temperature_n).to(tl.float32)
    else:
        tau = temperature_scalar
    # A subnormal tau has no finite reciprocal: the smallest valid tau is the smallest normal fp32.
    tau_ok = (tau >= 1.1754943508222875e-38) & (tau < float("inf"))
    valid = (label != ignore_index) & (label >= 0) & (label < vocab) & tau_ok
    return row, label, tau, valid


@triton.jit
def _row_stats(row_ptr, x_label, inv_tau, vocab, HAS_ENTROPY: tl.constexpr, HAS_RANK: tl.constexpr,
               BLOCK_V: tl.constexpr, STAGES: tl.constexpr):
    """One streaming sweep over a row (docs/ops.md 2.2): the shift m + m_lo of z = x / tau (see the module
    docstring), s = sum exp(d), the shifted entropy accumulator b = sum d exp(d), d = z - m - m_lo <= 0, and
    the rank count #{j : x_j > x_label}."""
    xm = -float("inf")  # running RAW maximum: tau > 0, so it is also the maximum of z
    m = -float("inf")
    m_lo = 0.0
    s = 0.0
    b = 0.0
    count = 0
    cols = tl.arange(0, BLOCK_V)
    for start in tl.range(0, vocab, BLOCK_V, num_stages=STAGES):
        offs = start + cols
        in_v = offs < vocab
        x = tl.load(row_ptr + offs, mask=in_v, other=-float("inf")).to(tl.float32)
        if HAS_RANK:
            count += tl.sum((x > x_label).to(tl.int32), axis=0)
        xm_new = tl.maximum(xm, tl.max(x, axis=0))
        # NaN / +inf logits need no extra check: whether or not the max propagates NaN, d = NaN for that
        # column (NaN - m or inf - inf, and m_lo = NaN for an infinite maximum), so s becomes NaN and so do
        # LSE, lp and H. The test is != -inf (not > -inf) so that a NaN maximum also enters the branch.
        if xm_new != -float("inf"):
            m_new = xm_new * inv_tau
            m_lo_new = tl.fma(xm_new, inv_tau, -m_new)  # the exact rounding error of m_new
            # m + m_lo <= m_new + m_lo_new (a larger raw maximum); the minimum only guards b's sign (<= 0).
            delta = tl.minimum((m - m_new) + (m_lo - m_lo_new), 0.0)
            alpha = tl.where(xm > -float("inf"), tl.exp2(delta * 1.4426950408889634), 0.0)
            # d = z - m - m_lo, exactly 0 at the maximum; scaling the DIFFERENCE by log2(e) (not z itself)
            # keeps the exponent's rounding error proportional to |d|, small exactly where p is large.
            d = tl.fma(x, inv_tau, -m_new) - m_lo_new
            e = tl.exp2(d * 1.4426950408889634)
            if HAS_ENTROPY:
                b = alpha * (b + tl.where(xm > -float("inf"), delta * s, 0.0)) + tl.sum(
                    tl.where(e > 0, d * e, 0.0), axis=0
                )
            s = alpha * s + tl.sum(e, axis=0)
            m = m_new
            m_lo = m_lo_new
            xm = xm_new
    return m, m_lo, s, b, count


@triton.jit
def _row_label(row_ptr, label, vocab_start, vocab, label_logit_ptr, row, HAS_LABEL_LOGIT: tl.constexpr):
    """The label's local column (-1 when another rank owns it), its raw logit (-inf then) and the rank
    pivot (the shared label logit when HAS_LABEL_LOGIT, else the local one)."""
    local = label - vocab_start
    owner = (local >= 0) & (local < vocab)
    local = tl.where(owner, local, -1)
    x_label = tl.load(row_ptr + tl.where(owner, local, 0), mask=owner, other=-float("inf")).to(tl.float32)
    if HAS_LABEL_LOGIT:
        pivot = tl.load(label_logit_ptr + row).to(tl.float32)
    else:
        pivot = x_label
    return local, x_label, pivot


@triton.jit
def _row_grad(row_ptr, grad_row_ptr, label, inv_tau, m, log_s, g_lp, g_h, h, vocab, BLOCK_V: tl.constexpr,
              STAGES: tl.constexpr):
    """One sweep writing dx_j = (g_lp (1[j=y] - p_j) - g_H p_j (ln p_j + H)) / tau for a row
    (docs/ops.md 2.3), with ln p_j = fma(x_j, 1/tau, -m) - log_s formed as the forward formed every exponent
    (``log_s`` is the second statistic, ln s + m_lo). The pipelined loop prefetches later blocks before
    writing this one: an in-place gradient (grad_row_ptr == row_ptr) still reads every block before
    overwriting it."""
    cols = tl.arange(0, BLOCK_V)
    for start in tl.range(0, vocab, BLOCK_V, num_stages=STAGES):
        offs = start + cols
        in_v = offs < vocab
        x = tl.load(row_ptr + offs, mask=in_v, other=0.0).to(tl.float32)
        d = tl.fma(x, inv_tau, -m) - log_s  # ln p_j, formed as in the forward
        p = tl.exp2(d * 1.4426950408889634)
        # z_j - mu = ln p_j + H;  dz_j = g_lp (1[j=y] - p_j) - g_H p_j (ln p_j + H)
        dz = -p * (g_lp + g_h * (d + h))
        dz = tl.where(p > 0, dz, 0.0)  # p = 0 at -inf logits: never 0 * inf
        dz = tl.where(offs == label, dz + g_lp, dz)
        tl.store(grad_row_ptr + offs, (dz * inv_tau).to(grad_row_ptr.dtype.element_ty), mask=in_v)


@triton.jit
def _multiple_of_16(n, ALIGNED: tl.constexpr):
    """``n`` itself; with ALIGNED (the host checked n % 16 == 0) written as (n // 16) * 16, which Triton's
    alignment analysis can see through (``tl.multiple_of`` does not apply to scalar arguments): masks
    ``offs < n`` are then constant over groups of 16 elements, so the row sweeps (and the tiles of
    kernels/linear_logprobs.py along their contiguous dimension) load 16 bytes at a time, which is also what
    lets Triton turn the loads into cp.async and pipeline a loop (it pipelines no 2-byte loads)."""
    if ALIGNED:
        n = (n // 16) * 16
    return n


@triton.jit
def _row_zero(grad_row_ptr, vocab, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        tl.store(grad_row_ptr + offs, tl.zeros([BLOCK_V], dtype=grad_row_ptr.dtype.element_ty),
                 mask=offs < vocab)


@triton.jit(do_not_specialize=["vocab", "ignore_index", "vocab_start", "vocab_global"])
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, temperature_ptr,
    logprobs_ptr, entropy_ptr, rank_ptr, lse_ptr, stats_ptr, label_logit_ptr,
    stride_logits_n, stride_temperature_n, temperature_scalar, vocab, ignore_index, vocab_start, vocab_global,
    HAS_TEMP: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_RANK: tl.constexpr, HAS_LABEL_LOGIT: tl.constexpr,
    BLOCK_V: tl.constexpr, STAGES: tl.constexpr, ALIGNED: tl.constexpr,
):
    vocab = _multiple_of_16(vocab, ALIGNED)
    # Labels are checked against the global vocabulary (= vocab unless vocab-parallel).
    row, label, tau, valid = _row_setup(labels_ptr, temperature_ptr, stride_temperature_n, temperature_scalar,
                                        vocab_global, ignore_index, HAS_TEMP)
    if valid:
        # Correctly rounded (div.rn), not the approximate div.full.f32 that `1.0 / tau` compiles to: the
        # backward and the fused loss compute the same bits (docs/numerics.md section 6).
        inv_tau = tl.div_rn(1.0, tau)
        row_ptr = logits_ptr + row * stride_logits_n
        _, x_label, pivot = _row_label(row_ptr, label, vocab_start, vocab, label_logit_ptr, row,
                                       HAS_LABEL_LOGIT)
        m, m_lo, s, b, count = _row_stats(row_ptr, pivot, inv_tau, vocab, HAS_ENTROPY, HAS_RANK, BLOCK_V,
                                          STAGES)
        log_s = tl.log(s)
        # lp = ln p_y by the backward's expression, fma(x_y, 1/tau, -m) - (ln s + m_lo) with the stored second
        # statistic: bitwise the log-probability the backward (and the fused loss) recomputes for the label
        # (docs/numerics.md section 6). <= 0 exactly: fma(x_y, 1/tau, -m) <= m_lo (monotone rounding, equal
        # at the maximum) and ln s + m_lo rounds to >= m_lo (ln s >= 0); -inf on a rank without the label.
        log_s_lo = log_s + m_lo
        tl.store(logprobs_ptr + row, tl.fma(x_label, inv_tau, -m) - log_s_lo)
        tl.store(lse_ptr + row, m + log_s_lo)
        tl.store(stats_ptr + 2 * row, m)
        tl.store(stats_ptr + 2 * row + 1, log_s_lo)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, log_s - tl.div_rn(b, s))
        if HAS_RANK:
            tl.store(rank_ptr + row, (count + 1).to(tl.int32))
    else:
        fill = tl.where(label == ignore_index, 0.0, float("nan"))
        tl.store(logprobs_ptr + row, fill)
        tl.store(lse_ptr + row, fill)
        tl.store(stats_ptr + 2 * row, fill)
        tl.store(stats_ptr + 2 * row + 1, fill)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, fill)
        if HAS_RANK:
            tl.store(rank_ptr + row, 0)


@triton.jit(do_not_specialize=["vocab", "ignore_index", "vocab_start", "vocab_global"])
def _token_logprobs_bwd_kernel(
    grad_logprobs_ptr, grad_entropy_ptr, logits_ptr, labels_ptr, temperature_ptr, stats_ptr, entropy_ptr,
    grad_ptr,
    stride_logits_n, stride_grad_n, stride_temperature_n, temperature_scalar, vocab, ignore_index,
    vocab_start, vocab_global,
    HAS_TEMP: tl.constexpr, HAS_GRAD_LP: tl.constexpr, HAS_GRAD_H: tl.constexpr,
    BLOCK_V: tl.constexpr, STAGES: tl.constexpr, ALIGNED: tl.constexpr,
):
    vocab = _multiple_of_16(vocab, ALIGNED)
    row, label, tau, valid = _row_setup(labels_ptr, temperature_ptr, stride_temperature_n, temperature_scalar,
                                        vocab_global, ignore_index, HAS_TEMP)
    row_ptr = logits_ptr + row * stride_logits_n
    grad_row_ptr = grad_ptr + row * stride_grad_n
    if valid:
        inv_tau = tl.div_rn(1.0, tau)  # bitwise the forward's
        m = tl.load(stats_ptr + 2 * row)
        log_s = tl.load(stats_ptr + 2 * row + 1)
        g_lp = 0.0
        if HAS_GRAD_LP:
            g_lp = tl.load(grad_logprobs_ptr + row).to(tl.float32)
        g_h = 0.0
        h = 0.0
        if HAS_GRAD_H:
            g_h = tl.load(grad_entropy_ptr + row).to(tl.float32)
            h = tl.load(entropy_ptr + row)
        # The one-hot term only where this shard holds the label (local column -1 matches no column).
        local = label - vocab_start
        local = tl.where((local >= 0) & (local < vocab), local, -1)
        _row_grad(row_ptr, grad_row_ptr, local, inv_tau, m, log_s, g_lp, g_h, h, vocab, BLOCK_V, STAGES)
    else:
        _row_zero(grad_row_ptr, vocab, BLOCK_V)


def _direct_launch(kernel):
    return kernel


def token_logprobs_fwd(logits, labels, temperature, temperature_scalar, ignore_index, want_entropy, want_rank,
                       vocab_start=0, vocab_global=0, label_logit=None, *, launch=_direct_launch):
    """Launch the forward kernel; returns (logprobs, entropy, rank, lse, stats) like the C++ op.
    ``vocab_global = 0`` means unsharded (the global vocabulary is the local one)."""
    n, vocab = logits.shape
    lp = torch.empty((n,), device=logits.device, dtype=torch.float32)
    lse = torch.empty((n,), device=logits.device, dtype=torch.float32)
    stats = torch.empty((n, 2), device=logits.device, dtype=torch.float32)
    ent = torch.empty((n if want_entropy else 0,), device=logits.device, dtype=torch.float32)
    rank = torch.empty((n if want_rank else 0,), device=logits.device, dtype=torch.int32)
    if n == 0:
        return lp, ent, rank, lse, stats
    has_temp = temperature is not None
    has_pivot = label_logit is not None
    launch(_token_logprobs_fwd_kernel)[(n,)](
        logits, labels, temperature if has_temp else lp,  # dummy pointers (lp) where a flag is off
        lp, ent if want_entropy else lp, rank if want_rank else lp, lse, stats,
        label_logit if has_pivot else lp,
        logits.stride(0), temperature.stride(0) if has_temp else 0, float(temperature_scalar), vocab,
        ignore_index, vocab_start, vocab_global if vocab_global > 0 else vocab,
        HAS_TEMP=has_temp, HAS_ENTROPY=want_entropy, HAS_RANK=want_rank, HAS_LABEL_LOGIT=has_pivot,
        **_stream_config(vocab, logits),
    )
    return lp, ent, rank, lse, stats


def token_logprobs_bwd(grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar,
                       ignore_index, stats, entropy, grad, vocab_start=0, vocab_global=0, *,
                       launch=_direct_launch):
    """Launch the backward kernel, writing into ``grad`` (which may be ``logits`` itself)."""
    n, vocab = logits.shape
    if n == 0:
        return grad
    has_temp = temperature is not None
    has_lp = grad_logprobs is not None
    has_h = grad_entropy is not None
    launch(_token_logprobs_bwd_kernel)[(n,)](
        grad_logprobs.float().contiguous() if has_lp else stats,  # dummy pointers (stats) where a flag is off
        grad_entropy.float().contiguous() if has_h else stats,
        logits, labels, temperature if has_temp else stats, stats, entropy if has_h else stats, grad,
        logits.stride(0), grad.stride(0), temperature.stride(0) if has_temp else 0, float(temperature_scalar),
        vocab, ignore_index, vocab_start, vocab_global if vocab_global > 0 else vocab,
        HAS_TEMP=has_temp, HAS_GRAD_LP=has_lp, HAS_GRAD_H=has_h,
        **_stream_config(vocab, logits, grad),
    )
    return grad
