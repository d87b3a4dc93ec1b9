"""The policy-loss workload shared by bench_policy_loss (from logits) and bench_policy_loss_hidden (from
hidden states and the lm_head): the loss config, the packed layout, the rollout inputs of a GRPO step and
the float64 oracle.

The DAPO loss of a GRPO step on packed sequences of ``SEQ_LEN`` tokens (cu_seqlens), ~10% of tokens
``ignore_index``, per-sequence advantages of both signs, old-policy log-probs within a few percent of the
current policy (ratios on both sides of the clip bounds), reference log-probs for a k3 KL term (beta 0.04),
temperature 0.9, ``num_items_in_batch`` = the valid tokens, given explicitly. No entropy bonus, so that
Liger runs the same loss (reasonrl still computes the entropy, for the metric).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

SEQ_LEN = 256  # tokens per packed sequence


def loss_config():
    from reasonrl.losses import PolicyLossConfig

    return PolicyLossConfig(
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=0.04,
        kl_estimator="k3",
        kl_bias_correction=False,
        temperature=0.9,
    )


@dataclass
class Rollout:
    """The per-token and per-sequence inputs of the loss besides the logits (or hidden states)."""

    cu_seqlens: torch.Tensor  # [B + 1]
    advantages: torch.Tensor  # [B]
    old_logprobs: torch.Tensor  # [N] fp32
    ref_logprobs: torch.Tensor  # [N] fp32
    num_items: int


def make_rollout(logprobs: torch.Tensor, valid: torch.Tensor, seed: int) -> Rollout:
    """Old-policy log-probs = current + 0.1 N(0, 1) noise, reference = old - 0.05 |N(0, 1)|, advantages
    N(0, 1) per sequence of ``SEQ_LEN`` tokens, all drawn from a generator seeded with ``seed``."""
    n, device = logprobs.shape[0], logprobs.device
    gen = torch.Generator(device=device).manual_seed(seed)
    old = logprobs + 0.1 * torch.randn(n, generator=gen, device=device)
    ref = old - 0.05 * torch.randn(n, generator=gen, device=device).abs()
    return Rollout(
        cu_seqlens=torch.arange(0, n + 1, SEQ_LEN, device=device),
        advantages=torch.randn(n // SEQ_LEN, generator=gen, device=device),
        old_logprobs=old.float(),
        ref_logprobs=ref.float(),
        num_items=int(valid.sum()),
    )


def oracle_chunks(
    rollout: Rollout,
    labels: torch.Tensor,
    vocab: int,
    ignore_index: int,
    leaves_and_logits: Callable[[slice], tuple[tuple[torch.Tensor, ...], torch.Tensor]],
) -> Iterator[tuple[slice, torch.Tensor, tuple[torch.Tensor, ...]]]:
    """The loss in float64, one sequence-aligned row chunk at a time: yields (rows, the chunk's loss, the
    gradients of the chunk's leaves). Exact: the loss is a sum of per-token terms whose coefficients
    ``num_items_in_batch`` fixes, so the chunks' losses and gradients add up to the whole batch's.

    ``leaves_and_logits(rows)`` returns the float64 autograd leaves of the chunk and its [rows, V] logits.
    """
    from reasonrl.losses import LossNormalizers, policy_loss
    from reasonrl.reference import token_logprobs_reference

    cfg = loss_config()
    norms = LossNormalizers(num_items_in_batch=rollout.num_items)
    n = labels.shape[0]
    rows_per_chunk = max(SEQ_LEN, (1 << 24) // vocab // SEQ_LEN * SEQ_LEN)
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(n, start + rows_per_chunk))
        seqs = slice(start // SEQ_LEN, rows.stop // SEQ_LEN)
        leaves, logits = leaves_and_logits(rows)
        y = labels[rows]
        out = token_logprobs_reference(logits, y, temperature=cfg.temperature, ignore_index=ignore_index,
                                       want_entropy=True)
        loss = policy_loss(
            out.logprobs,
            advantages=rollout.advantages[seqs].double(),
            mask=y != ignore_index,
            cu_seqlens=rollout.cu_seqlens[seqs.start : seqs.stop + 1] - start,
            old_logprobs=rollout.old_logprobs[rows].double(),
            ref_logprobs=rollout.ref_logprobs[rows].double(),
            entropies=out.entropy,
            normalizers=norms,
            config=cfg,
        ).loss
        yield rows, loss.detach(), torch.autograd.grad(loss, leaves)


def rel_err(actual: torch.Tensor | float, oracle: torch.Tensor | float) -> float:
    """max |actual - oracle| / max |oracle| (a scalar loss: the relative error)."""
    if not torch.is_tensor(actual) or actual.dim() == 0:
        return abs(float(actual) - float(oracle)) / max(abs(float(oracle)), 1e-12)
    return float((actual.double() - oracle).abs().max()) / max(float(oracle.abs().max()), 1e-30)
