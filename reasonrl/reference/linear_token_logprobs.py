"""Reference implementation of ``linear_token_logprobs`` (docs/ops.md section 3):
plain PyTorch, written for clarity.

Exactly ``token_logprobs_reference(hidden @ weight.T + bias, labels, ...)`` with the logits computed in the
compute dtype (fp32 for fp32 / bf16 / fp16 inputs, fp64 for fp64 inputs or ``compute_dtype=torch.float64``,
the oracle of docs/ops.md section 8): the operands are upcast exactly before the matmul, so the logits are the
fp32 (fp64) accumulator and are never rounded to the input dtype, as the contract requires.

It materialises the full ``[N, V]`` logits (and autograd keeps several such tensors): never use it where
memory matters. Gradients flow to ``hidden``, ``weight`` and ``bias`` by ordinary autograd and come back in
their own dtypes (rounded once from the compute dtype).
"""

from __future__ import annotations

import torch

from reasonrl.reference.token_logprobs import TokenLogprobs, token_logprobs_reference

__all__ = ["linear_token_logprobs_reference"]


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    want_entropy: bool = False,
    want_rank: bool = False,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> TokenLogprobs:
    """Per-token log-probabilities (and entropy / rank / LSE) of ``labels`` under
    ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[..., H]`` float tensor.
        weight: ``[V, H]`` float tensor (the lm_head).
        labels: ``[...]`` int tensor of vocabulary ids, or ``ignore_index``.
        bias: ``[V]`` or None.
        temperature: Python float, 0-d tensor, or ``[...]`` tensor (one value per row); all > 0.
        compute_dtype: dtype of the matmul and of everything after it; default float32 (float64 for
            float64 input). ``torch.float64`` gives the oracle.

    Returns:
        ``TokenLogprobs`` with ``[...]`` tensors in ``compute_dtype`` (rank int32).
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    return token_logprobs_reference(
        logits,
        labels,
        temperature=temperature,
        ignore_index=ignore_index,
        want_entropy=want_entropy,
        want_rank=want_rank,
        return_lse=return_lse,
        compute_dtype=compute_dtype,
    )
