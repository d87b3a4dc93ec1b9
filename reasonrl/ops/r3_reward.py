"""``r3_reward``: DRO's reasoning-reflection reward from reference log-probs (docs/ops.md section 5).

Implementations (the choice is ``reasonrl._backend.select_impl``: ``auto`` takes C++ on CPU tensors and
Triton on CUDA tensors, falling back to the reference; an explicit choice that cannot run raises):

* ``reference``: ``reasonrl/reference/r3_reward.py``, the oracle;
* ``cpp``: ``torch.ops.reasonrl.r3_reward_fwd`` (csrc/cpu/r3_reward.cpp), one parallel task per group of
  prompts, nothing of size [G, K, L] materialised, fp64 arithmetic for fp64 input;
* ``triton``: ``torch.ops.reasonrl.r3_reward_fwd_triton`` (kernels/r3_reward.py), one program per prompt,
  fp32 / bf16 / fp16 input.

Forward only (no autograd: the reward is not differentiated). The arguments are checked here, with the
reference's own checks (docs/ops.md section 7: errors name the argument); with ``validate`` also the values
that need a host sync (mask values, offsets, a prompt with no valid reference token). The kernels get the
masks as bool / uint8, the offsets as int64, the baseline in the compute dtype and the top-k size of every
prompt resolved here (``resolve_topk``, the reference's rounding), so all implementations share one
definition of k_g.
"""

from __future__ import annotations

import torch

from reasonrl import _backend as backend
from reasonrl.reference.r3_reward import (
    R3Output,
    check_r3_args,
    check_r3_layout,
    r3_reward_reference,
    resolve_topk,
)

__all__ = ["R3Output", "r3_reward", "WEIGHTING_CODES", "REDUCTION_CODES"]

OP = "r3_reward"
# Codes shared with csrc/cpu/r3_reward.cpp (enum Weighting / Reduction) and kernels/r3_reward.py.
WEIGHTING_CODES = {"linear": 0, "softmax": 1, "topk": 2, "uniform": 3}
REDUCTION_CODES = {"weighted_mean": 0, "sum": 1}


def _fake_fwd(ref_logprobs, ref_mask, ref_cu_seqlens, rollout_mask, baseline, k_g, weighting, softmax_tau,
              reduction, propagation_gamma, min_valid_rollouts):
    acc = backend.accumulation_dtype(ref_logprobs.dtype)
    g, k = rollout_mask.shape
    per_token = ((ref_logprobs.shape[1],) if ref_cu_seqlens is not None
                 else (ref_logprobs.shape[0], ref_logprobs.shape[2]))
    return (ref_logprobs.new_empty((g, k), dtype=acc), ref_logprobs.new_empty(per_token, dtype=acc),
            ref_logprobs.new_empty(per_token, dtype=acc), ref_logprobs.new_empty((g,), dtype=torch.int32))


def _cpp_ops():
    """The fake (meta) function of the C++ op (its schema comes from csrc/reasonrl.cpp); no autograd."""
    return (backend.attach_cpp("r3_reward_fwd", _fake_fwd),)


def _triton_ops():
    """Define the Triton op on first use (importing triton is deferred until someone asks for it)."""
    from reasonrl.kernels import r3_reward as kernels

    @torch.library.triton_op("reasonrl::r3_reward_fwd_triton", mutates_args=())
    def fwd(
        ref_logprobs: torch.Tensor,
        ref_mask: torch.Tensor | None,
        ref_cu_seqlens: torch.Tensor | None,
        rollout_mask: torch.Tensor,
        baseline: torch.Tensor | None,
        k_g: torch.Tensor,
        weighting: int,
        softmax_tau: float,
        reduction: int,
        propagation_gamma: float | None,
        min_valid_rollouts: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        reward, weights, sigma, n_valid = _fake_fwd(ref_logprobs, ref_mask, ref_cu_seqlens, rollout_mask,
                                                    baseline, k_g, weighting, softmax_tau, reduction,
                                                    propagation_gamma, min_valid_rollouts)
        weights.zero_()
        sigma.zero_()
        # The top-k membership of every column (int8), written and re-read by the same program.
        top = torch.zeros(sigma.shape, dtype=torch.int8, device=sigma.device)
        kernels.r3_reward_fwd(
            ref_logprobs, None if ref_mask is None else ref_mask.view(torch.uint8), ref_cu_seqlens,
            rollout_mask.view(torch.uint8), baseline, k_g, weighting, softmax_tau, reduction,
            propagation_gamma, min_valid_rollouts, reward, weights, sigma, top, n_valid,
            launch=torch.library.wrap_triton,
        )
        return reward, weights, sigma, n_valid

    return (fwd,)


backend.declare_op(OP, cpp=_cpp_ops, triton=_triton_ops)


def _kernel_args(ref_logprobs, ref_mask, ref_cu_seqlens, rollout_mask, baseline_logprobs, topk, validate):
    """Check the layout (and, with ``validate``, the values) as the reference does; return the kernels'
    arguments ``(lp, mask [G, L] bool | None, cu [G + 1] int64 | None, rollout [G, K] bool, baseline | None,
    k_g)``."""
    lp = ref_logprobs.detach()
    acc = backend.accumulation_dtype(lp.dtype)
    base = None if baseline_logprobs is None else baseline_logprobs.detach().to(device=lp.device, dtype=acc)
    cu, mask, roll, lengths = check_r3_layout(lp, base, ref_mask, ref_cu_seqlens, rollout_mask, validate)
    k_g = resolve_topk(topk, lengths).contiguous()
    return lp, mask, cu, roll, None if base is None else base.contiguous(), k_g


def r3_reward(
    ref_logprobs: torch.Tensor,
    *,
    ref_mask: torch.Tensor | None = None,
    ref_cu_seqlens: torch.Tensor | None = None,
    rollout_mask: torch.Tensor | None = None,
    weighting: str = "linear",
    softmax_tau: float = 1.0,
    topk: float | int = 0.1,
    reduction: str = "weighted_mean",
    baseline_logprobs: torch.Tensor | None = None,
    propagation_gamma: float | None = None,
    min_valid_rollouts: int = 2,
    impl: str = "auto",
    validate: bool | None = None,
) -> R3Output:
    """R3 rewards of K rollouts per prompt (docs/ops.md section 5); every option as in
    :func:`reasonrl.reference.r3_reward_reference`. ``impl``: ``auto`` / ``cpp`` / ``triton`` /
    ``reference``. Returns ``R3Output(reward [G, K], weights, sigma, num_valid_rollouts [G] int32)`` in the
    compute dtype (fp64 for fp64 input, else fp32). Forward only."""
    check_r3_args(ref_logprobs, baseline_logprobs, weighting, softmax_tau, topk, reduction, propagation_gamma,
                  min_valid_rollouts)
    validate = backend.resolve_validate(validate, ref_logprobs)
    impl = backend.select_impl(OP, impl, ref_logprobs.device.type, ref_logprobs.dtype)
    if impl == "reference":
        return r3_reward_reference(
            ref_logprobs, ref_mask=ref_mask, ref_cu_seqlens=ref_cu_seqlens, rollout_mask=rollout_mask,
            weighting=weighting, softmax_tau=softmax_tau, topk=topk, reduction=reduction,
            baseline_logprobs=baseline_logprobs, propagation_gamma=propagation_gamma,
            min_valid_rollouts=min_valid_rollouts, validate=validate)
    lp, mask, cu, roll, base, k_g = _kernel_args(ref_logprobs, ref_mask, ref_cu_seqlens, rollout_mask,
                                                 baseline_logprobs, topk, validate)
    gamma = None if propagation_gamma is None else float(propagation_gamma)
    out = backend.kernel_op("r3_reward_fwd", impl)(
        lp, mask, cu, roll, base, k_g, WEIGHTING_CODES[weighting], float(softmax_tau),
        REDUCTION_CODES[reduction], gamma, int(min_valid_rollouts))
    return R3Output(*out)
