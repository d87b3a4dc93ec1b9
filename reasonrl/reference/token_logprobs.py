"""Reference implementation of ``token_logprobs`` (docs/ops.md section 2): plain PyTorch, written for clarity.

This is THE oracle every fused implementation (C++ ``cpp``, Triton ``triton``) is tested against. It
materialises the full softmax of every row, so it uses O(N x V) fp32 memory: never use it where memory
matters. Run it in float64 (``compute_dtype=torch.float64``) to obtain the oracle of docs/ops.md section 8.

For a row with raw logits x, label y and temperature tau::

    z = x / tau,  LSE = logsumexp(z),  lp = z_y - LSE,  H = -sum_j p_j log p_j,  p = softmax(z)
    rank = 1 + #{j != y : x_j > x_y}     (raw logits in their own precision, strict inequality)

Rows whose label equals ``ignore_index`` produce zeros (and a zero gradient). Rows whose label is out of
``[0, V)`` or whose temperature is not finite and at least the smallest normal number of the compute dtype
(only reachable with ``validate=False`` at the public API) produce NaN log-prob, entropy and LSE and a zero
gradient, so that a loss built on them is loudly NaN instead of plausibly wrong.

Invariants that hold exactly, in every dtype (docs/numerics.md): z - m is 0 at the maximum and <= 0
elsewhere (m is the maximum of the same rounded z), so s >= 1, lp <= 0 and H >= 0; a row with one finite
logit (V = 1 included) has lp = 0, H = 0 and a zero gradient.

Gradients flow to ``logits`` through ``logprobs`` and ``entropy`` by ordinary autograd; ``lse`` and the
temperature are detached.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["TokenLogprobs", "token_logprobs_reference"]


class TokenLogprobs(NamedTuple):
    """Outputs of every ``token_logprobs`` implementation; a field is None when it was not requested."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    rank: torch.Tensor | None
    lse: torch.Tensor | None


def token_logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    want_entropy: bool = False,
    want_rank: bool = False,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> TokenLogprobs:
    """Per-token log-probabilities (and entropy / rank / LSE) of ``labels`` under ``softmax(logits / T)``.

    Args:
        logits: ``[..., V]`` float tensor (any floating dtype, any strides).
        labels: ``[...]`` int tensor of vocabulary ids, or ``ignore_index``.
        temperature: Python float, 0-d tensor, or ``[...]`` tensor (one value per row); all > 0.
        compute_dtype: dtype of the arithmetic; default float32 (float64 for float64 input).
            ``torch.float64`` gives the oracle.

    Returns:
        ``TokenLogprobs`` with ``[...]`` tensors in ``compute_dtype`` (rank int32).
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lead_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    x = logits.reshape(-1, vocab).to(compute_dtype)
    y = labels.reshape(-1).long()

    valid = y != ignore_index
    in_range = (y >= 0) & (y < vocab)
    good = valid & in_range  # rows with a real label
    safe_y = torch.where(good, y, torch.zeros_like(y))

    # The temperature is a constant of the op (docs/ops.md 2.3): detached, so no gradient reaches it.
    if isinstance(temperature, torch.Tensor):
        tau = temperature.detach().to(device=x.device, dtype=compute_dtype)
        tau = tau.reshape(-1) if tau.dim() > 0 else tau.reshape(1).expand(x.shape[0])
    else:
        tau = torch.full((x.shape[0],), float(temperature), dtype=compute_dtype, device=x.device)
    # A temperature that is not finite and normal (only reachable with validate=False) makes its row NaN:
    # a subnormal one has no finite reciprocal (docs/numerics.md).
    tau_ok = torch.isfinite(tau) & (tau >= torch.finfo(compute_dtype).tiny)
    z = x / torch.where(tau_ok, tau, torch.ones_like(tau)).unsqueeze(-1)
    good = good & tau_ok

    # log_softmax written out: log p = (z - m) - log sum exp(z - m). z - m is exact near the maximum, which
    # makes this the most accurate fp32 formulation (the rule "kernel error <= 2 x the fp32 reference's
    # error" stays strict), and written as row reductions plus pointwise terms it lets torch.compile fuse
    # everything into streaming reductions with no [N, V] buffer (aten's log_softmax gets its output
    # materialised: measured 578 ms vs 184 ms compiled at fp32 [4096, 32000]), so "the reference under
    # torch.compile" is the strong baseline it is meant to be. m is detached: the result does not depend on
    # it, and autograd need not route a (mathematically zero) gradient through the arg-max.
    m = z.detach().amax(dim=-1, keepdim=True)
    zs = z - m
    log_s = zs.exp().sum(dim=-1, keepdim=True).log()
    zero = torch.zeros((), dtype=compute_dtype, device=x.device)
    nan = torch.full((), float("nan"), dtype=compute_dtype, device=x.device)

    lp = (zs.gather(-1, safe_y.unsqueeze(-1)) - log_s).squeeze(-1)
    # Out-of-range labels / bad temperature: NaN (loud); ignored rows: 0. torch.where keeps the gradient
    # of those rows at 0.
    lp = torch.where(good, lp, torch.where(valid, nan, zero))

    entropy = None
    if want_entropy:
        logp = zs - log_s
        p = logp.exp()
        # A -inf logit has p == 0 and logp == -inf: its term must be 0, not 0 * -inf = NaN, in the
        # forward AND the backward (masking the product would still give d(p*logp)/dp = -inf * 0).
        safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
        h = -(p * safe_logp).sum(-1)
        entropy = torch.where(good, h, torch.where(valid, nan, zero)).reshape(lead_shape)

    rank = None
    if want_rank:
        # Raw logits in their own precision (16-bit types upcast exactly): fp64 logits are compared in fp64,
        # so 1 + 1e-12 ranks above 1.
        xf = logits.reshape(-1, vocab)
        xf = xf.double() if xf.dtype == torch.float64 else xf.float()
        x_label = xf.gather(-1, safe_y.unsqueeze(-1))
        # Strict inequality: the label column itself is never counted, ties with it do not count.
        r = 1 + (xf > x_label).sum(-1)
        rank = torch.where(good, r, torch.zeros_like(r)).to(torch.int32).reshape(lead_shape)

    lse = None
    if return_lse:
        lse_all = (m + log_s.detach()).squeeze(-1)
        lse = torch.where(good, lse_all, torch.where(valid, nan, zero)).reshape(lead_shape)

    return TokenLogprobs(lp.reshape(lead_shape), entropy, rank, lse)
