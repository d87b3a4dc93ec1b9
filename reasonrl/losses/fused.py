"""The single-pass fused policy loss from logits (docs/losses.md section 13.1).

When every term of the loss is token-local, the gradient of the loss with respect to a token's log-prob and
entropy is known as soon as that token's row of logits has been reduced, so one kernel sweep per row can
produce log-prob, entropy and dLoss/dlogits (1 read + 1 write of the logits instead of the 3 passes of a
separate forward and backward). This module holds:

* :func:`single_pass_blocker`: which configurations qualify (the others keep the two-phase path of
  ``reasonrl.losses.policy``, which is never more expensive than an unfused forward + backward);
* :func:`kernel_inputs`: the kernel's per-token inputs (advantage, old / ref log-probs and the coefficients
  of docs/losses.md section 10, which depend only on the mask and the normalisers) in the column order of
  ``reasonrl.ops.policy_loss.INPUT_COLUMNS``, read from the call's ``LossInputs`` (the reference's O(N)
  pre-pass, built once per call);
* :func:`fused_policy_loss_from_logits` / :func:`fused_policy_loss_from_hidden`: run the kernel, then
  evaluate the loss value and the metrics with the reference formulas (``loss_from_inputs``, over the same
  ``LossInputs``) on the kernel's (detached) per-token log-probs and entropies, O(N) work, and attach the
  precomputed gradients to the returned loss.

The gradient is computed inside the forward call, so it is held from the forward to the backward (the same
memory an unfused backward allocates anyway) and the autograd backward only scales it by the incoming
gradient: an upstream gradient of exactly 1 (the usual ``loss.backward()``, or ``loss / GA`` handled by the
caller's scaling before the call) returns the buffer itself, any other value costs one extra pass.
"""

from __future__ import annotations

import torch

from reasonrl import _backend as backend
from reasonrl.loss_config import LossNormalizers, PolicyLossConfig
from reasonrl.loss_types import LossOutput
from reasonrl.ops.policy_loss import INPUT_COLUMNS, kernel_codes, kernel_loss_kind
from reasonrl.reference.policy_loss import LossInputs, loss_from_inputs, loss_inputs

__all__ = [
    "single_pass_blocker",
    "kernel_inputs",
    "fused_policy_loss_from_logits",
    "fused_policy_loss_from_hidden",
]


def single_pass_blocker(config: PolicyLossConfig, *, return_per_token: bool = False) -> str | None:
    """Why ``config`` needs the two-phase path (docs/losses.md 13.2), or None when one sweep suffices."""
    if config.importance_sampling_level != "token":
        return (
            f"importance_sampling_level={config.importance_sampling_level!r} couples the tokens of a sequence"
        )
    _, why = kernel_loss_kind(config)
    if why is not None:
        return why
    if config.off_policy_mask_threshold is not None:
        return "the off-policy mask is a per-sequence statistic of the log-probs"
    if config.top_entropy_quantile < 1.0:
        return "the top-entropy mask is a quantile over all tokens' entropies"
    if return_per_token:
        return "return_per_token needs the differentiable per-token loss"
    return None


def kernel_inputs(
    inputs: LossInputs,
    *,
    config: PolicyLossConfig,
    normalizers: LossNormalizers,
    entropy_coef: float | torch.Tensor,
) -> torch.Tensor:
    """The ``[N, len(INPUT_COLUMNS)]`` per-token kernel inputs, 0 outside the loss, from the call's
    ``LossInputs``: the coefficients are exactly those the reference loss multiplies by."""
    cfg, s, dtype = config, inputs.s, inputs.dtype
    zero = torch.zeros(s.valid.shape, dtype=dtype, device=s.valid.device)
    c_pg = inputs.agg_pg if inputs.rho is None else inputs.agg_pg * s.masked(inputs.rho)
    c_kl = cfg.beta * inputs.agg_loss if cfg.beta != 0.0 else zero
    eta = entropy_coef
    if isinstance(eta, torch.Tensor) or eta != 0.0:
        if cfg.loss_agg_mode is None:  # TRL: micro-batch token mean over m (no entropy mask here), / GA
            m = s.valid.to(dtype)
            c_h = m / m.sum().clamp(min=1) / normalizers.effective_grad_accum_steps
        else:  # verl: loss_agg_mode with the global batch info
            c_h = inputs.agg_loss
        eta_t = eta.detach().to(device=zero.device, dtype=dtype) if isinstance(eta, torch.Tensor) else eta
        g_h = -eta_t * c_h
    else:
        g_h = zero
    columns = {
        "a": inputs.a_tok,
        "old": zero if inputs.old is None else s.masked(inputs.old.detach()),
        "ref": zero if inputs.ref is None else s.masked(inputs.ref.detach()),
        "coef_pg": s.masked(c_pg),
        "coef_kl": s.masked(c_kl),
        "grad_h": s.masked(g_h),
    }
    return torch.stack([columns[name] for name in INPUT_COLUMNS], dim=1)


def _single_pass(run_kernel, *, token_shape, valid, dtype, check_outputs, entropy_coef, loss_kw: dict):
    # dtype: the input's; the per-token arithmetic runs in its accumulation dtype (fp64 for fp64, else fp32).
    """The part both fused entry points share: the call's ``LossInputs`` (once), the kernel's per-token
    inputs and codes, ``run_kernel(token_inputs, loss_kind, kl_kind, params)`` (its outputs start with
    lp, H), then the loss value and metrics by the reference formulas over lp, H and the same ``LossInputs``.
    ``loss_kw``: advantages, cu_seqlens, old / ref / sampling log-probs, is_weights, normalizers, config."""
    config, normalizers = loss_kw["config"], loss_kw["normalizers"]
    inputs = loss_inputs(valid, mask=valid, dtype=backend.accumulation_dtype(dtype), **loss_kw)
    eta = config.entropy_coef if entropy_coef is None else entropy_coef
    columns = kernel_inputs(inputs, config=config, normalizers=normalizers, entropy_coef=eta)
    outputs = run_kernel(columns, *kernel_codes(config, loss_kw["old_logprobs"] is not None))
    lp, ent = outputs[0], outputs[1]
    check_outputs(lp)
    with torch.no_grad():
        value = loss_from_inputs(lp.reshape(token_shape), inputs, entropies=ent.reshape(token_shape),
                                 normalizers=normalizers, config=config, entropy_coef=entropy_coef)
    return value, outputs


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


def fused_policy_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    impl: str,
    valid: torch.Tensor,
    temperature: float | torch.Tensor,
    ignore_index: int,
    check_outputs,
    entropy_coef: float | torch.Tensor | None = None,
    inplace_backward: bool = False,
    **loss_kw,
) -> LossOutput:
    """One sweep of the registered ``policy_loss_fused`` op of ``impl``, then the loss value and metrics
    from the reference formulas over the kernel's per-token outputs.

    ``labels`` must already carry ``ignore_index`` at every token outside ``valid`` (the kernel skips those
    rows); ``check_outputs(lp, labels_flat)`` reports NaN rows when validation is on. ``inplace_backward``:
    the ``policy_loss_fused_inplace`` op writes dLoss/dlogits into the storage of ``logits`` (contiguous, the
    caller checked); the write bumps the version counter of ``logits``, so any other autograd use of the
    overwritten values fails loudly in its backward instead of reading the gradient.
    """
    x, labels_flat, temp_t, temp_scalar = backend.flatten_rows(logits, labels, temperature)
    kernel = backend.kernel_op("policy_loss_fused_inplace" if inplace_backward else "policy_loss_fused", impl)

    def run_kernel(columns, loss_kind, kl_kind, params):
        out = kernel(x.detach(), labels_flat, temp_t, temp_scalar, ignore_index, columns, loss_kind, kl_kind,
                     params)
        if not inplace_backward:
            return out
        # Bump the version counter of the overwritten logits for every impl (a C++ op called through the
        # dispatcher without an autograd kernel does not; a second bump after the triton_op's is harmless:
        # saved tensors compare versions for equality). Compiled graphs functionalise the mutation.
        if not torch.compiler.is_compiling():
            torch.autograd.graph.increment_version(x)
        return (*out, x.detach())

    value, outputs = _single_pass(
        run_kernel, token_shape=logits.shape[:-1], valid=valid, dtype=x.dtype, entropy_coef=entropy_coef,
        check_outputs=lambda lp: check_outputs(lp, labels_flat), loss_kw=loss_kw,
    )
    loss = _PrecomputedGradient.apply(value.loss, logits, outputs[5])
    return LossOutput(loss, value.metrics, None)


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
    impl: str,
    valid: torch.Tensor,
    temperature: float | torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    check_outputs,
    entropy_coef: float | torch.Tensor | None = None,
    **loss_kw,
) -> LossOutput:
    """The fused-linear loss (the registered ``policy_loss_from_hidden_fused`` op of ``impl``) computes lp, H
    and grad_hidden / grad_weight / grad_bias in one call (C++: per row chunk, logits = hidden @ weight.T +
    bias, turned into dLoss/dlogits in place, then two GEMMs); then the loss value and metrics from the
    reference formulas over the per-token log-probs and entropies (O(N))."""
    h, labels_flat, temp_t, temp_scalar = backend.flatten_rows(hidden, labels, temperature,
                                                                unit_stride=False)
    kernel = backend.kernel_op("policy_loss_from_hidden_fused", impl)
    b = None if bias is None else bias.detach()

    def run_kernel(columns, loss_kind, kl_kind, params):
        return kernel(h.detach(), weight.detach(), b, labels_flat, temp_t, temp_scalar, ignore_index, columns,
                      loss_kind, kl_kind, params, chunk_rows)

    value, outputs = _single_pass(
        run_kernel, token_shape=hidden.shape[:-1], valid=valid, dtype=h.dtype, entropy_coef=entropy_coef,
        check_outputs=lambda lp: check_outputs(lp, labels_flat), loss_kw=loss_kw,
    )
    grad_h, grad_w, grad_b = outputs[5:]
    loss = _PrecomputedLinearGradients.apply(
        value.loss, hidden, weight, bias, grad_h.view(hidden.shape), grad_w, None if bias is None else grad_b
    )
    return LossOutput(loss, value.metrics, None)
