"""Triton fused-linear policy loss (docs/losses.md section 13.1, last paragraph): the loss and its gradients
with respect to hidden, weight and bias, computed in ONE forward call, never materialising the N x V logits.

A fused-linear loss cannot keep a row of logits on chip across the vocabulary, so it runs the two GEMM sweeps
the spec describes (8NVH FLOP):

1. ``linear_logprobs_fwd`` (kernels/linear_logprobs.py): logits tiles + online statistics, 2NVH: lp, H, LSE
   and the (max, log-sum) statistics per row;
2. ``_token_grad_kernel``: the per-token functor of the fused loss (``_token_grad`` of kernels/policy_loss.py,
   the same code the logits-input kernel runs per row) turns lp and the row's ``token_inputs`` into the
   upstream gradients g_lp, g_H of every token (O(N));
3. ``linear_logprobs_bwd``: recomputes the logits tiles and produces grad_hidden, grad_weight, grad_bias
   from (g_lp, g_H), 6NVH, deterministic.

The autograd backward then only scales the three gradients. Compared with an unfused linear log-prob op
plus a loss, nothing is saved for a later backward and no second forward runs. Rows are not compacted here
(the linear kernels skip row blocks without a valid row); the C++ path compacts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reasonrl.kernels.linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd
from reasonrl.kernels.policy_loss import (
    COL_A,
    COL_COEF_KL,
    COL_COEF_PG,
    COL_GRAD_H,
    COL_OLD,
    COL_REF,
    NUM_INPUTS,
    _token_grad,
    loss_launch_args,
)


@triton.jit(do_not_specialize=["n"])
def _token_grad_kernel(
    lp_ptr, inputs_ptr, g_lp_ptr, g_h_ptr, n,
    eps_low, eps_high, delta_cap, dual_clip_c, log_ratio_clamp, cispo_max, tau_pos, tau_neg,
    LOSS_KIND: tl.constexpr, KL_BASE: tl.constexpr, KL_ST: tl.constexpr, HAS_OLD: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, DUAL_CLIP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_n = offs < n
    lp = tl.load(lp_ptr + offs, mask=in_n, other=0.0)
    row = inputs_ptr + offs.to(tl.int64) * NUM_INPUTS
    g_lp = _token_grad(
        lp, tl.load(row + COL_A, mask=in_n, other=0.0), tl.load(row + COL_OLD, mask=in_n, other=0.0),
        tl.load(row + COL_REF, mask=in_n, other=0.0), tl.load(row + COL_COEF_PG, mask=in_n, other=0.0),
        tl.load(row + COL_COEF_KL, mask=in_n, other=0.0),
        eps_low, eps_high, delta_cap, dual_clip_c, log_ratio_clamp, cispo_max, tau_pos, tau_neg,
        LOSS_KIND, KL_BASE, KL_ST, HAS_OLD, BIAS_CORRECTION, DUAL_CLIP,
    )  # fmt: skip
    g_h = tl.load(row + COL_GRAD_H, mask=in_n, other=0.0)
    bad = lp != lp  # NaN rows (invalid label / temperature, NaN logits): no gradient, reported upstream
    tl.store(g_lp_ptr + offs, tl.where(bad, 0.0, g_lp), mask=in_n)
    tl.store(g_h_ptr + offs, tl.where(bad, 0.0, g_h), mask=in_n)


def linear_policy_loss(hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index,
                       token_inputs, loss_kind, kl_kind, params, *, launch=None, arch=None):  # fmt: skip
    """Returns (logprobs, entropy, lse, grad_logprobs, grad_entropy, grad_hidden, grad_weight, grad_bias) like
    the C++ op ``reasonrl::policy_loss_from_hidden_fused`` (grad_bias empty without a bias)."""
    launch = launch or (lambda kernel: kernel)
    n = hidden.shape[0]
    if tuple(token_inputs.shape) != (n, NUM_INPUTS.value) or token_inputs.dtype != torch.float32:
        raise ValueError(f"linear_policy_loss: token_inputs must be float32 [N, {NUM_INPUTS.value}] = "
                         f"[{n}, {NUM_INPUTS.value}], got {token_inputs.dtype} {tuple(token_inputs.shape)}")
    lp, ent, _rank, lse, stats = linear_logprobs_fwd(
        hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, True, False,
        launch=launch, arch=arch,
    )
    g_lp = torch.zeros((n,), device=hidden.device, dtype=torch.float32)
    g_h = torch.zeros((n,), device=hidden.device, dtype=torch.float32)
    if n > 0:
        floats, flags = loss_launch_args(loss_kind, kl_kind, params)
        block = 1024
        launch(_token_grad_kernel)[(triton.cdiv(n, block),)](
            lp, token_inputs.contiguous(), g_lp, g_h, n, *floats, **flags, BLOCK=block, num_warps=4,
        )  # fmt: skip
    grad_hidden, grad_weight, grad_bias = linear_logprobs_bwd(
        g_lp, g_h, hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, stats, ent,
        launch=launch, arch=arch,
    )
    if grad_bias is None:
        grad_bias = torch.empty((0,), device=weight.device, dtype=weight.dtype)
    return lp, ent, lse, g_lp, g_h, grad_hidden, grad_weight, grad_bias
