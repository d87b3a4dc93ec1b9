"""Triton kernel of the single-pass fused policy loss (docs/losses.md section 13.1).

One program per row, as the token_logprobs kernels (and with their row sweeps, ``_row_stats`` /
``_row_grad``, so the numerics of lp, H and the gradient are exactly theirs):

1. sweep the row once for (m, ln s, b): lp, H, LSE;
2. the per-token functor ``_token_grad`` turns lp and the row's ``token_inputs`` (A, old, ref, c_pg, c_kl,
   g_H; the layout of csrc/cpu/policy_loss.cpp) into g_lp = dLoss/dlp;
3. sweep the row again writing dLoss/dlogits. On a GPU the second sweep re-reads the row from L2 when the
   in-flight rows fit (a 150k bf16 row is 297 KiB; 132 SMs x a few rows exceed H100's 50 MiB L2, so the
   expected cost is between 1 read + 1 write and 2 reads + 1 write; keeping the row in shared memory of a
   cluster, as QuACK does, is the known next step).

The functor runs in fp32 (the C++ one in fp64). The loss kind, the KL estimator and the flags are constexpr
(a handful of variants); every hyper-parameter (clip bounds, delta, dual clip C, log-ratio clamp, CISPO cap,
SAPO temperatures) is a runtime argument, so changing one never recompiles, nor does N or V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reasonrl.kernels.token_logprobs import (
    _direct_launch,
    _multiple_of_16,
    _row_grad,
    _row_setup,
    _row_stats,
    _row_zero,
    _stream_config,
)

# The kernels' interface: codes of loss_kind / kl_kind, the token_inputs columns and the params order. The
# table is reasonrl/ops/policy_loss.py; tests/losses/test_policy_loss_table.py checks these against it (and
# csrc/cpu/policy_loss.cpp). tl.constexpr globals, so that the @triton.jit branches can name them.
LOSS_CLIP = tl.constexpr(0)
LOSS_CISPO_UPPER = tl.constexpr(1)
LOSS_CISPO_TWO_SIDED = tl.constexpr(2)
LOSS_SAPO = tl.constexpr(3)
LOSS_REINFORCE = tl.constexpr(4)
KL_NO_KL = tl.constexpr(0)
KL_K1 = tl.constexpr(1)
KL_ABS = tl.constexpr(2)
KL_K2 = tl.constexpr(3)
KL_K3 = tl.constexpr(4)
KL_LOW_VAR_KL = tl.constexpr(5)
KL_STRAIGHT_THROUGH = 8  # added to a base code for the "+" variants (decoded on the host)
COL_A = tl.constexpr(0)
COL_OLD = tl.constexpr(1)
COL_REF = tl.constexpr(2)
COL_COEF_PG = tl.constexpr(3)
COL_COEF_KL = tl.constexpr(4)
COL_GRAD_H = tl.constexpr(5)
NUM_INPUTS = tl.constexpr(6)
PARAMS = ("eps_low", "eps_high", "delta_cap", "dual_clip_c", "log_ratio_clamp", "cispo_max", "sapo_tau_pos",
          "sapo_tau_neg", "has_old", "kl_bias_correction")


def loss_launch_args(loss_kind, kl_kind, params):
    """``(runtime floats, constexpr flags)`` of ``_token_grad`` for a call's codes and ``params`` (in the
    order of PARAMS): the eight hyper-parameters in the kernels' argument order, and the variant flags."""
    p = dict(zip(PARAMS, (float(v) for v in params), strict=True))
    floats = [p[name] for name in PARAMS[:8]]
    flags = dict(
        LOSS_KIND=int(loss_kind),
        KL_BASE=int(kl_kind) & ~KL_STRAIGHT_THROUGH,
        KL_ST=bool(int(kl_kind) & KL_STRAIGHT_THROUGH),
        HAS_OLD=p["has_old"] != 0.0,
        BIAS_CORRECTION=p["kl_bias_correction"] != 0.0,
        DUAL_CLIP=p["dual_clip_c"] > 0,
    )
    return floats, flags


@triton.jit
def _token_grad(
    lp, a, old, ref, c_pg, c_kl,
    eps_low, eps_high, delta_cap, dual_clip_c, log_ratio_clamp, cispo_max, tau_pos, tau_neg,
    LOSS_KIND: tl.constexpr, KL_BASE: tl.constexpr, KL_ST: tl.constexpr, HAS_OLD: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, DUAL_CLIP: tl.constexpr,
):
    """dLoss/dlp of one token: d(c_pg l_pg + c_kl kappa)/dlp (docs/losses.md 6, 7, 9), torch.clamp's
    convention at the bounds (the gradient passes on a bound) and the unclipped branch on the clip's tie."""
    delta = 0.0
    if HAS_OLD:
        delta = lp - old
    d_delta = tl.where((delta > log_ratio_clamp) | (delta < -log_ratio_clamp), 0.0, 1.0)
    delta = tl.minimum(tl.maximum(delta, -log_ratio_clamp), log_ratio_clamp)
    w = tl.exp(delta)
    dw = w * d_delta
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    if LOSS_KIND == LOSS_CLIP:  # clip family, with TRL's delta cap and verl's dual clip
        c1 = tl.minimum(w, delta_cap)
        dc1 = tl.where(w <= delta_cap, dw, 0.0)
        c2 = tl.minimum(tl.maximum(w, lo), hi)
        dc2 = tl.where((w >= lo) & (w <= hi), dw, 0.0)
        a1 = c1 * a
        a2 = c2 * a
        loss = tl.where(a1 <= a2, -a1, -a2)
        dl = tl.where(a1 <= a2, -a * dc1, -a * dc2)
        if DUAL_CLIP:
            dl = tl.where((a < 0) & (loss > -dual_clip_c * a), 0.0, dl)
    elif LOSS_KIND == LOSS_CISPO_UPPER:  # CISPO, upper cap
        dl = -tl.minimum(w, cispo_max) * a
    elif LOSS_KIND == LOSS_CISPO_TWO_SIDED:  # CISPO, two-sided clip
        dl = -tl.minimum(tl.maximum(w, lo), hi) * a
    elif LOSS_KIND == LOSS_SAPO:  # SAPO
        tau = tl.where(a > 0, tau_pos, tau_neg)
        s = 1.0 / (1.0 + tl.exp(-tau * (w - 1.0)))
        dl = -4.0 * s * (1.0 - s) * a * dw
    else:  # LOSS_REINFORCE
        dl = -a
    g = c_pg * dl
    if KL_BASE != KL_NO_KL:
        d = lp - ref
        if KL_BASE == KL_K1:  # k1
            kappa = d
            dk = 1.0
        elif KL_BASE == KL_ABS:  # abs
            kappa = tl.abs(d)
            dk = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        elif KL_BASE == KL_K2:  # k2
            kappa = 0.5 * d * d
            dk = d
        elif KL_BASE == KL_K3:  # k3 (TRL, unclamped): e^x - x - 1, x = ref - lp
            ex = tl.exp(-d)
            kappa = ex + d - 1.0
            dk = 1.0 - ex
        else:  # KL_LOW_VAR_KL (verl): x clamped to +-20, kappa clamped to +-10
            x = -d
            xc = tl.minimum(tl.maximum(x, -20.0), 20.0)
            ex = tl.exp(xc)
            raw = ex - xc - 1.0
            kappa = tl.minimum(tl.maximum(raw, -10.0), 10.0)
            dk = tl.where((x >= -20.0) & (x <= 20.0) & (raw >= -10.0) & (raw <= 10.0), 1.0 - ex, 0.0)
        if KL_ST:
            dk = d
        if BIAS_CORRECTION:
            dk = w * dk + kappa * dw
        g += c_kl * dk
    return g


@triton.jit(do_not_specialize=["vocab", "ignore_index"])
def _policy_loss_fused_kernel(
    logits_ptr, labels_ptr, temperature_ptr, inputs_ptr,
    logprobs_ptr, entropy_ptr, lse_ptr, grad_lp_ptr, grad_h_ptr, grad_ptr,
    stride_logits_n, stride_grad_n, stride_temperature_n, temperature_scalar, vocab, ignore_index,
    # the hyper-parameters and variant flags of _token_grad, in its order (loss_launch_args)
    eps_low, eps_high, delta_cap, dual_clip_c, log_ratio_clamp, cispo_max, tau_pos, tau_neg,
    HAS_TEMP: tl.constexpr, LOSS_KIND: tl.constexpr, KL_BASE: tl.constexpr, KL_ST: tl.constexpr,
    HAS_OLD: tl.constexpr, BIAS_CORRECTION: tl.constexpr, DUAL_CLIP: tl.constexpr,
    BLOCK_V: tl.constexpr, STAGES: tl.constexpr, ALIGNED: tl.constexpr,
):
    vocab = _multiple_of_16(vocab, ALIGNED)  # 16-byte row sweeps (kernels/token_logprobs.py)
    row, label, tau, valid = _row_setup(labels_ptr, temperature_ptr, stride_temperature_n, temperature_scalar,
                                        vocab, ignore_index, HAS_TEMP)
    row_ptr = logits_ptr + row * stride_logits_n
    grad_row_ptr = grad_ptr + row * stride_grad_n
    if valid:
        inv_tau = tl.div_rn(1.0, tau)  # correctly rounded, as kernels/token_logprobs.py
        x_label = tl.load(row_ptr + label).to(tl.float32)
        m, m_lo, s, b, _ = _row_stats(row_ptr, x_label, inv_tau, vocab, True, False, BLOCK_V, STAGES)
        log_s = tl.log(s)
        log_s_lo = log_s + m_lo
        # As kernels/token_logprobs.py: <= 0 exactly, and bitwise the ln p_y of the gradient sweep below.
        lp = tl.fma(x_label, inv_tau, -m) - log_s_lo
        h = log_s - tl.div_rn(b, s)
        tl.store(logprobs_ptr + row, lp)
        tl.store(entropy_ptr + row, h)
        tl.store(lse_ptr + row, m + log_s_lo)
        inp = inputs_ptr + row * NUM_INPUTS
        g_lp = _token_grad(
            lp, tl.load(inp + COL_A), tl.load(inp + COL_OLD), tl.load(inp + COL_REF),
            tl.load(inp + COL_COEF_PG), tl.load(inp + COL_COEF_KL),
            eps_low, eps_high, delta_cap, dual_clip_c, log_ratio_clamp, cispo_max, tau_pos, tau_neg,
            LOSS_KIND, KL_BASE, KL_ST, HAS_OLD, BIAS_CORRECTION, DUAL_CLIP,
        )
        g_h = tl.load(inp + COL_GRAD_H)
        if lp != lp:  # NaN row (NaN / +inf logits): no gradient; the Python layer reports it
            g_lp = 0.0
            g_h = 0.0
        tl.store(grad_lp_ptr + row, g_lp)
        tl.store(grad_h_ptr + row, g_h)
        _row_grad(row_ptr, grad_row_ptr, label, inv_tau, m, log_s_lo, g_lp, g_h, h, vocab, BLOCK_V, STAGES)
    else:
        fill = tl.where(label == ignore_index, 0.0, float("nan"))
        tl.store(logprobs_ptr + row, fill)
        tl.store(entropy_ptr + row, fill)
        tl.store(lse_ptr + row, fill)
        tl.store(grad_lp_ptr + row, 0.0)
        tl.store(grad_h_ptr + row, 0.0)
        _row_zero(grad_row_ptr, vocab, BLOCK_V)


def policy_loss_fused(
    logits,
    labels,
    temperature,
    temperature_scalar,
    ignore_index,
    token_inputs,
    loss_kind,
    kl_kind,
    params,
    *,
    inplace=False,
    launch=_direct_launch,
):
    """Launch the fused kernel; returns (logprobs, entropy, lse, grad_logprobs, grad_entropy, grad_logits)
    like the C++ op ``reasonrl::policy_loss_fused``. With ``inplace`` grad_logits is ``logits`` itself
    (contiguous): each block of a row is read by the gradient sweep before it is overwritten
    (``_row_grad``), as in token_logprobs' in-place backward."""
    n, vocab = logits.shape
    dev = logits.device
    rows = [torch.empty((n,), device=dev, dtype=torch.float32) for _ in range(5)]
    lp, ent, lse, g_lp, g_h = rows
    if inplace and not logits.is_contiguous():
        raise ValueError(f"policy_loss_fused: inplace_backward=True needs contiguous logits, got strides "
                         f"{tuple(logits.stride())}")
    grad = logits if inplace else torch.empty((n, vocab), device=dev, dtype=logits.dtype)
    if n == 0:
        return lp, ent, lse, g_lp, g_h, grad
    if token_inputs.dtype != torch.float32 or tuple(token_inputs.shape) != (n, NUM_INPUTS.value):
        k = NUM_INPUTS.value
        raise ValueError(
            f"policy_loss_fused: token_inputs must be float32 [N, {k}] = [{n}, {k}], got "
            f"{token_inputs.dtype} {tuple(token_inputs.shape)}"
        )
    floats, flags = loss_launch_args(loss_kind, kl_kind, params)
    has_temp = temperature is not None
    launch(_policy_loss_fused_kernel)[(n,)](
        logits, labels, temperature if has_temp else lp, token_inputs.contiguous(),  # lp: dummy pointer
        lp, ent, lse, g_lp, g_h, grad,
        logits.stride(0), grad.stride(0), temperature.stride(0) if has_temp else 0, float(temperature_scalar),
        vocab, ignore_index,
        *floats,
        HAS_TEMP=has_temp, **flags, **_stream_config(vocab, logits, grad),
    )
    return lp, ent, lse, g_lp, g_h, grad
