"""The single-pass fused policy loss from logits (losses.md section 13.1).

When every term of the loss is token-local, the gradient of the loss with respect to a token's log-prob and
entropy is known as soon as that token's row of logits has been reduced, so one kernel sweep per row can
produce log-prob, entropy and dLoss/dlogits (1 read + 1 write of the logits instead of the 3 passes of a
separate forward and backward). This module holds:

* :func:`single_pass_blocker`: which configurations qualify (the others keep the two-phase path of
  ``reasonrl.losses.policy``, which is never more expensive than an unfused forward + backward);
* :func:`token_inputs`: the O(N) pre-pass that builds the kernel's per-token inputs (advantage, old / ref
  log-probs and the aggregation coefficients of losses.md section 10, which depend only on the mask and the
  normalisers), in the column layout documented in csrc/cpu/policy_loss.cpp;
* :func:`fused_policy_loss_from_logits`: runs the kernel, then evaluates the loss value and the metrics with
  the reference formulas on the kernel's (detached) per-token log-probs and entropies, O(N) work, and attaches
  the precomputed dLoss/dlogits as the gradient of the returned loss.

The gradient is computed inside the forward call, so it is held from the forward to the backward (the same
memory an unfused backward allocates anyway) and the autograd backward only scales it by the incoming
gradient: an upstream gradient of exactly 1 (the usual ``loss.backward()``, or ``loss / GA`` handled by the
caller's scaling before the call) returns the buffer itself, any other value costs one extra pass.
"""

from __future__ import annotations

import math

import torch

from reasonrl.losses.config import CLIP_FAMILY, LossNormalizers, PolicyLossConfig
from reasonrl.losses.types import LossOutput
from reasonrl.reference import policy_loss as _reference

__all__ = [
    "single_pass_blocker",
    "token_inputs",
    "fused_policy_loss_from_logits",
    "LOSS_KIND",
    "kl_kind",
    "kernel_params",
]

# Codes shared with csrc/cpu/policy_loss.cpp (enum LossKind / KlKind) and kernels/policy_loss.py.
LOSS_KIND = {"clip": 0, "cispo_upper": 1, "cispo_two_sided": 2, "sapo": 3, "reinforce": 4}
_KL_BASE = {"k1": 1, "abs": 2, "k2": 3, "k3": 4, "low_var_kl": 5}
_KL_STRAIGHT_THROUGH = 8
NUM_INPUTS = 6  # token_inputs columns: A, old, ref, c_pg, c_kl, g_H


def single_pass_blocker(config: PolicyLossConfig, *, return_per_token: bool = False) -> str | None:
    """Why ``config`` needs the two-phase path (losses.md 13.2), or None when one sweep suffices."""
    if config.importance_sampling_level != "token":
        return (
            f"importance_sampling_level={config.importance_sampling_level!r} couples the tokens of a sequence"
        )
    if config.loss_type == "vespo":
        return "vespo's weight is a function of the whole sequence's log-ratio"
    if config.off_policy_mask_threshold is not None:
        return "the off-policy mask is a per-sequence statistic of the log-probs"
    if config.top_entropy_quantile < 1.0:
        return "the top-entropy mask is a quantile over all tokens' entropies"
    if return_per_token:
        return "return_per_token needs the differentiable per-token loss"
    return None


def loss_kind(config: PolicyLossConfig) -> int:
    if config.loss_type in CLIP_FAMILY:
        return LOSS_KIND["clip"]
    if config.loss_type == "cispo":
        return LOSS_KIND["cispo_upper" if config.cispo_mode == "upper" else "cispo_two_sided"]
    return LOSS_KIND[config.loss_type]  # sapo, reinforce


def kl_kind(config: PolicyLossConfig) -> int:
    if config.beta == 0.0:
        return 0
    base = config.kl_estimator.rstrip("+")
    return _KL_BASE[base] + (_KL_STRAIGHT_THROUGH if config.kl_estimator.endswith("+") else 0)


def kernel_params(config: PolicyLossConfig, has_old: bool) -> list[float]:
    """The ``params`` list of the kernels, in the order of csrc/cpu/policy_loss.cpp's enum Param."""
    inf = math.inf
    return [
        float(config.epsilon_low),
        float(config.epsilon_high_value),
        inf if config.delta is None else float(config.delta),
        float(config.dual_clip_c) if config.dual_clip else 0.0,
        inf if config.log_ratio_clamp is None else float(config.log_ratio_clamp),
        float(config.cispo_ratio_max),
        float(config.sapo_tau_pos),
        float(config.sapo_tau_neg),
        1.0 if has_old else 0.0,
        1.0 if config.kl_bias_correction else 0.0,
    ]


def token_inputs(
    *,
    valid: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    sampling_logprobs: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    normalizers: LossNormalizers,
    config: PolicyLossConfig,
    entropy_coef: float | torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The ``[N, 6]`` per-token kernel inputs (A, old, ref, c_pg, c_kl, g_H), 0 outside ``valid`` (a bool
    tensor of the token shape: ``[B, T]`` padded or ``[N]`` packed with ``cu_seqlens``).

    Uses the reference's own helpers for the layout, the advantage broadcast, the rollout weights and the
    aggregation coefficients, so the coefficients are exactly those the reference loss multiplies by.
    """
    cfg = config
    device = valid.device
    s = _reference._segments(valid, valid, cu_seqlens, dtype)  # `valid` has the token shape
    zero = torch.zeros(s.valid.shape, dtype=dtype, device=device)
    a_tok, _ = _reference._per_seq_or_token(advantages.detach(), "advantages", s, dtype)
    old = _reference._per_token(old_logprobs, "old_logprobs", s, dtype)
    ref = _reference._per_token(ref_logprobs, "ref_logprobs", s, dtype)

    rho = None
    if is_weights is not None:
        rho, _ = _reference._per_seq_or_token(is_weights.detach(), "is_weights", s, dtype)
    elif cfg.is_correction is not None:
        samp = _reference._per_token(sampling_logprobs, "sampling_logprobs", s, dtype)
        rho, _ = _reference._rollout_is(s.masked(old.detach()), samp.detach(), s, cfg.is_correction)

    pg_mode = cfg.policy_agg_mode or cfg.loss_agg_mode
    agg_pg = _reference._agg_coef(pg_mode, cfg, s, normalizers)
    c_pg = agg_pg if rho is None else agg_pg * s.masked(rho)
    if cfg.beta != 0.0:
        agg_kl = (
            agg_pg
            if cfg.loss_agg_mode == pg_mode
            else _reference._agg_coef(cfg.loss_agg_mode, cfg, s, normalizers)
        )
        c_kl = cfg.beta * agg_kl
    else:
        c_kl = zero
    eta = entropy_coef
    if isinstance(eta, torch.Tensor) or eta != 0.0:
        if cfg.loss_agg_mode is None:  # TRL: micro-batch token mean over m (no entropy mask here), / GA
            m = s.valid.to(dtype)
            c_h = m / m.sum().clamp(min=1) / normalizers.effective_grad_accum_steps
        else:  # verl: loss_agg_mode with the global batch info
            c_h = _reference._agg_coef(cfg.loss_agg_mode, cfg, s, normalizers)
        eta_t = eta.detach().to(device=device, dtype=dtype) if isinstance(eta, torch.Tensor) else eta
        g_h = -eta_t * c_h
    else:
        g_h = zero

    columns = [
        s.masked(a_tok),
        zero if old is None else s.masked(old.detach()),
        zero if ref is None else s.masked(ref.detach()),
        s.masked(c_pg),
        s.masked(c_kl),
        s.masked(g_h),
    ]
    return torch.stack(columns, dim=1)


class _PrecomputedGradient(torch.autograd.Function):
    """Returns ``value``; its gradient with respect to ``logits`` is ``grad_logits`` x the upstream scalar."""

    @staticmethod
    def forward(ctx, value, logits, grad_logits):
        ctx.save_for_backward(grad_logits)
        ctx.logits_shape = logits.shape
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (grad_logits,) = ctx.saved_tensors
        grad = grad_logits.view(ctx.logits_shape)
        # The usual upstream gradient is exactly 1: hand the buffer over instead of a full extra pass. The
        # check reads one scalar (a host sync on GPU, free on CPU) and is skipped inside compiled graphs.
        if not torch.compiler.is_compiling() and grad_out.numel() == 1 and float(grad_out) == 1.0:
            return None, grad, None
        return None, grad * grad_out.to(grad.dtype), None


def _kernel_inputs(valid: torch.Tensor, dtype: torch.dtype, entropy_coef, loss_kw: dict) -> torch.Tensor:
    """:func:`token_inputs` for one call; ``loss_kw``: advantages, cu_seqlens, old / ref / sampling log-probs,
    is_weights, normalizers, config (the keywords of the reference loss)."""
    eta = loss_kw["config"].entropy_coef if entropy_coef is None else entropy_coef
    return token_inputs(valid=valid, entropy_coef=eta, dtype=dtype, **loss_kw)


def _kernel_codes(loss_kw: dict) -> tuple[int, int, list[float]]:
    """(loss_kind, kl_kind, params) of the kernels for the call's config."""
    config = loss_kw["config"]
    return loss_kind(config), kl_kind(config), kernel_params(config, loss_kw["old_logprobs"] is not None)


def _reference_value(lp, ent, token_shape, valid, entropy_coef, loss_kw: dict) -> LossOutput:
    """Loss value and metrics by the reference formulas over the kernel's per-token outputs (O(N))."""
    with torch.no_grad():
        return _reference.policy_loss_reference(
            lp.reshape(token_shape), mask=valid, entropies=ent.reshape(token_shape), entropy_coef=entropy_coef,
            **loss_kw,
        )


def fused_policy_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kernel,
    valid: torch.Tensor,
    temperature: float | torch.Tensor,
    ignore_index: int,
    check_outputs,
    entropy_coef: float | torch.Tensor | None = None,
    **loss_kw,
) -> LossOutput:
    """One kernel sweep (``kernel`` = the registered ``policy_loss_fused`` op of an implementation), then the
    loss value and metrics from the reference formulas over the kernel's per-token outputs.

    ``labels`` must already carry ``ignore_index`` at every token outside ``valid`` (the kernel skips those
    rows); ``check_outputs(lp, labels_flat)`` reports NaN rows when validation is on. ``loss_kw``: advantages,
    cu_seqlens, old_logprobs, ref_logprobs, sampling_logprobs, is_weights, normalizers, config.
    """
    from reasonrl.ops.token_logprobs import flatten_rows

    token_shape = logits.shape[:-1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    inputs = _kernel_inputs(valid, dtype, entropy_coef, loss_kw)
    x, labels_flat, temp_t, temp_scalar = flatten_rows(logits, labels, temperature)
    lp, ent, _lse, _g_lp, _g_h, grad_logits = kernel(
        x.detach(), labels_flat, temp_t, temp_scalar, ignore_index, inputs, *_kernel_codes(loss_kw)
    )
    check_outputs(lp, labels_flat)
    out = _reference_value(lp, ent, token_shape, valid, entropy_coef, loss_kw)
    loss = _PrecomputedGradient.apply(out.loss, logits, grad_logits)
    return LossOutput(loss, out.metrics, None)


class _PrecomputedLinearGradients(torch.autograd.Function):
    """Returns ``value``; its gradients with respect to hidden / weight / bias are the precomputed ones x the
    upstream scalar (the fused-linear loss computes them during the forward)."""

    @staticmethod
    def forward(ctx, value, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.has_bias = bias is not None
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grads = list(ctx.saved_tensors)
        if not ctx.has_bias:
            grads[2] = None
        one = not torch.compiler.is_compiling() and grad_out.numel() == 1 and float(grad_out) == 1.0
        if not one:
            grads = [None if g is None else g * grad_out.to(g.dtype) for g in grads]
        return (None, *grads, None, None, None)


def fused_policy_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    valid: torch.Tensor,
    temperature: float | torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    kernel,
    check_outputs,
    entropy_coef: float | torch.Tensor | None = None,
    **loss_kw,
) -> LossOutput:
    """The fused-linear loss (``kernel``: ``reasonrl::policy_loss_from_hidden_fused`` or its Triton twin)
    computes lp, H and grad_hidden / grad_weight / grad_bias in one call (C++: per row chunk, logits =
    hidden @ weight.T + bias, turned into dLoss/dlogits in place, then two GEMMs); then the loss value and
    metrics from the reference formulas over the per-token log-probs and entropies (O(N))."""
    token_shape = hidden.shape[:-1]
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    inputs = _kernel_inputs(valid, dtype, entropy_coef, loss_kw)
    h = hidden.reshape(-1, hidden.shape[-1])
    labels_flat = labels.reshape(-1)
    if isinstance(temperature, torch.Tensor):
        temp_t = temperature.to(device=h.device, dtype=dtype)
        temp_t = temp_t.reshape(-1) if temp_t.dim() > 0 else temp_t.reshape(1).expand(h.shape[0])
        temp_scalar = 1.0
    else:
        temp_t, temp_scalar = None, float(temperature)
    lp, ent, _lse, _g_lp, _g_h, grad_h, grad_w, grad_b = kernel(
        h.detach(), weight.detach(), None if bias is None else bias.detach(), labels_flat, temp_t, temp_scalar,
        ignore_index, inputs, *_kernel_codes(loss_kw), chunk_rows,
    )
    check_outputs(lp, labels_flat)
    out = _reference_value(lp, ent, token_shape, valid, entropy_coef, loss_kw)
    loss = _PrecomputedLinearGradients.apply(
        out.loss, hidden, weight, bias, grad_h.view(hidden.shape), grad_w, None if bias is None else grad_b
    )
    return LossOutput(loss, out.metrics, None)
