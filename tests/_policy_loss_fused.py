"""Arguments of the registered single-pass policy-loss ops (reasonrl/losses/fused.py, docs/losses.md section
13.1), built the way ``policy_loss_from_logits`` builds them.

Used by tests/losses/test_policy_loss_fused.py and tests/losses/test_policy_loss_fused_gpu.py (importable from
every test module: pytest puts tests/, the folder of the root conftest.py, on ``sys.path``).
"""

from __future__ import annotations

import torch

from reasonrl.losses import LossNormalizers, PolicyLossConfig
from reasonrl.losses import fused as fused_mod
from reasonrl.ops.policy_loss import kernel_codes
from reasonrl.reference.policy_loss import loss_inputs

__all__ = ["kernel_inputs", "from_logits_op_args"]

# The scalar temperature the op-level tests pass (other than 1, so that the 1/T scaling is exercised).
OP_TEMPERATURE = 0.9


def kernel_inputs(
    valid: torch.Tensor,
    *,
    config: PolicyLossConfig,
    normalizers: LossNormalizers,
    dtype: torch.dtype,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-token input table of the fused kernels: the reference's ``loss_inputs`` (``valid`` is both the
    token mask and the loss mask) packed by ``fused.kernel_inputs``, in ``dtype``."""
    inputs = loss_inputs(
        valid,
        advantages=advantages,
        cu_seqlens=cu_seqlens,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        sampling_logprobs=sampling_logprobs,
        is_weights=is_weights,
        normalizers=normalizers,
        config=config,
        dtype=dtype,
        mask=valid,
    )
    return fused_mod.kernel_inputs(
        inputs, config=config, normalizers=normalizers, entropy_coef=config.entropy_coef
    )


def from_logits_op_args(
    logits: torch.Tensor, labels: torch.Tensor, kw: dict, config: PolicyLossConfig, *, valid: torch.Tensor
) -> tuple:
    """``(logits, labels, temperature=None, temperature_scalar, ignore_index, inputs, *codes)`` of the
    from-logits op for a ``policy_loss_from_logits`` call's ``kw`` (advantages, old / ref log-probs and, when
    packed, cu_seqlens; no sampling log-probs or IS weights): tokens outside ``valid`` get label -100, the
    kernel inputs are float64 for float64 logits and float32 otherwise, default normalizers."""
    inputs = kernel_inputs(
        valid,
        config=config,
        normalizers=LossNormalizers(),
        dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
        advantages=kw["advantages"],
        old_logprobs=kw["old_logprobs"],
        ref_logprobs=kw["ref_logprobs"],
        cu_seqlens=kw.get("cu_seqlens"),
    )
    return (
        logits,
        labels.masked_fill(~valid, -100),
        None,
        OP_TEMPERATURE,
        -100,
        inputs,
        *kernel_codes(config, has_old=True),
    )
