"""``group_advantages``: group-relative advantages of the GRPO family (docs/ops.md section 4).

Public entry point :func:`group_advantages` and the trainer presets :func:`advantage_preset`. The op is not on
the hot path (O(B) work once per batch), so it has exactly one implementation, the vectorised plain-PyTorch
one in ``reasonrl/reference/group_advantages.py``: ``impl="auto"`` and ``impl="reference"`` run it, an
explicit ``"cpp"`` / ``"triton"`` raises ``RuntimeError`` (there is no kernel to honour the
request). ``REASONRL_IMPL`` naming a kernel does not make this op fail: the variable only chooses among
implementations that exist, and here there is one.

This module checks the arguments (docs/ops.md section 7: ``ValueError`` / ``TypeError`` naming the argument,
the expected and the received value) and, with ``validate=True``, the values that need a host sync.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from reasonrl import _backend as backend
from reasonrl.reference.group_advantages import (
    ESTIMATORS,
    Advantages,
    advantage_preset,
    group_advantages_reference,
)

__all__ = ["Advantages", "group_advantages", "advantage_preset"]

SCALES = ("group", "batch", "none")
MULTI_REWARDS = ("sum_then_normalize", "normalize_then_sum")
GDPO_FINALS = ("trl", "verl")
SINGLETONS = ("zero", "verl")
NAN_POLICIES = ("missing", "raise")

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


OP = "group_advantages"
backend.declare_op(
    OP, reference_only="it is not on the hot path (O(B) work once per batch); use impl='auto' or 'reference'"
)


# ----------------------------------------------------------------------------------------------------------
# Argument checking (docs/ops.md section 7)
# ----------------------------------------------------------------------------------------------------------


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"group_advantages: {name} must be one of {allowed}, got {value!r}")


def _real(name: str, value, *, minimum: float | None = None, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"group_advantages: {name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"group_advantages: {name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"group_advantages: {name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"group_advantages: {name} must be >= {minimum}, got {value}")


def _tensor(name: str, value, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"group_advantages: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device != device:
        raise ValueError(f"group_advantages: {name} is on {value.device} but rewards are on {device}")
    return value


def _shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(
            f"group_advantages: {name} must have shape {what} = {expected}, got {tuple(t.shape)}"
        )


def _check_args(
    rewards,
    group_size,
    group_ids,
    estimator,
    scale,
    eps,
    reward_weights,
    multi_reward,
    gdpo_final,
    lengths,
    singleton,
    whiten_eps,
    gpg_f_norm,
    gamma,
    token_mask,
    cu_seqlens,
    nan_policy,
):
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"group_advantages: rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        raise TypeError(f"group_advantages: rewards must be a floating tensor, got {rewards.dtype}")
    if rewards.dim() not in (1, 2):
        raise ValueError(
            f"group_advantages: rewards must have shape [B] or [B, R], got {tuple(rewards.shape)}"
        )
    if rewards.dim() == 2 and rewards.shape[1] == 0:
        raise ValueError(
            f"group_advantages: rewards [B, R] needs R >= 1 reward functions, got {tuple(rewards.shape)}"
        )
    device = rewards.device
    num_rows = rewards.shape[0]
    num_funcs = rewards.shape[1] if rewards.dim() == 2 else 1

    _choice("estimator", estimator, ESTIMATORS)
    _choice("scale", scale, SCALES)
    _choice("multi_reward", multi_reward, MULTI_REWARDS)
    _choice("gdpo_final", gdpo_final, GDPO_FINALS)
    _choice("singleton", singleton, SINGLETONS)
    _choice("nan_policy", nan_policy, NAN_POLICIES)
    _real("eps", eps, minimum=0.0)
    _real("whiten_eps", whiten_eps, minimum=0.0)
    _real("gpg_f_norm", gpg_f_norm, positive=True)
    _real("gamma", gamma)

    if (group_size is None) == (group_ids is None):
        raise ValueError(
            "group_advantages: pass exactly one of group_size (contiguous groups) and group_ids [B]; got "
            + ("both" if group_size is not None else "neither")
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_advantages: group_size must be an int, got {type(group_size).__name__}")
        if group_size < 1:
            raise ValueError(f"group_advantages: group_size must be >= 1, got {group_size}")
        if num_rows % group_size:
            raise ValueError(
                f"group_advantages: B = rewards.shape[0] = {num_rows} is not divisible by "
                f"group_size = {group_size}"
            )
    else:
        _tensor("group_ids", group_ids, device)
        if group_ids.dtype not in _INT_DTYPES:
            raise TypeError(f"group_advantages: group_ids must be an integer tensor, got {group_ids.dtype}")
        _shape("group_ids", group_ids, (num_rows,), "[B]")

    if reward_weights is not None:
        if not isinstance(reward_weights, torch.Tensor):
            if isinstance(reward_weights, (list, tuple)) and all(
                isinstance(v, Real) and not isinstance(v, bool) for v in reward_weights
            ):
                reward_weights = torch.tensor([float(v) for v in reward_weights], device=device)
            else:
                raise TypeError(
                    "group_advantages: reward_weights must be a tensor or a sequence of numbers, got "
                    f"{type(reward_weights).__name__}"
                )
        _tensor("reward_weights", reward_weights, device)
        if reward_weights.dtype == torch.bool or reward_weights.is_complex():
            raise TypeError(
                f"group_advantages: reward_weights must be real numbers, got {reward_weights.dtype}"
            )
        _shape("reward_weights", reward_weights, (num_funcs,), "[R]")

    if lengths is not None:
        _tensor("lengths", lengths, device)
        if lengths.dtype == torch.bool or lengths.is_complex():
            raise TypeError(
                f"group_advantages: lengths must be an integer or floating tensor, got {lengths.dtype}"
            )
        _shape("lengths", lengths, (num_rows,), "[B]")
    if estimator == "opo" and lengths is None:
        raise ValueError(
            "group_advantages: estimator='opo' needs lengths [B] (its baseline is length-weighted)"
        )

    if multi_reward == "normalize_then_sum" and estimator not in ("grpo", "dr_grpo"):
        raise ValueError(
            "group_advantages: multi_reward='normalize_then_sum' (GDPO) is defined for estimator 'grpo' or "
            f"'dr_grpo', got estimator={estimator!r}"
        )

    per_token = estimator == "reinforce_plus_plus" and gamma != 1.0
    if not per_token:
        if token_mask is not None or cu_seqlens is not None:
            raise ValueError(
                "group_advantages: token_mask / cu_seqlens are only used by "
                "estimator='reinforce_plus_plus' with gamma != 1 (per-token returns); got "
                f"estimator={estimator!r}, gamma={gamma}. Pass lengths [B] for token-weighted whitening"
            )
    elif cu_seqlens is not None:  # packed [N]
        _tensor("cu_seqlens", cu_seqlens, device)
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"group_advantages: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        _shape("cu_seqlens", cu_seqlens, (num_rows + 1,), "[B + 1]")
        if token_mask is not None:
            _tensor("token_mask", token_mask, device)
            if token_mask.dim() != 1:
                raise ValueError(
                    "group_advantages: with cu_seqlens (packed layout) token_mask must have shape [N], got "
                    f"{tuple(token_mask.shape)} (a padded [B, T] mask with cu_seqlens mixes two layouts)"
                )
    else:  # padded [B, T]
        if token_mask is None:
            raise ValueError(
                f"group_advantages: estimator='reinforce_plus_plus' with gamma={gamma} != 1 computes "
                "per-token returns and needs token_mask [B, T] (padded layout) or cu_seqlens [B + 1] "
                "(packed layout)"
            )
        _tensor("token_mask", token_mask, device)
        if token_mask.dim() != 2 or token_mask.shape[0] != num_rows:
            raise ValueError(
                f"group_advantages: token_mask must have shape [B, T] with B = {num_rows}, got "
                f"{tuple(token_mask.shape)}"
            )
    if token_mask is not None and token_mask.is_complex():
        raise TypeError(
            f"group_advantages: token_mask must be bool, integer or floating, got {token_mask.dtype}"
        )
    return reward_weights


def _first(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def _validate_values(rewards, reward_weights, lengths, token_mask, cu_seqlens, nan_policy):
    """The checks that need a host sync (only with validate=True)."""
    inf = torch.isinf(rewards)
    if bool(inf.any()):
        raise ValueError(
            "group_advantages: rewards must not contain +-inf (NaN means 'not scored'); found "
            f"{int(inf.sum())}, first at index {_first(inf)}"
        )
    if nan_policy == "raise":
        nan = torch.isnan(rewards)
        if bool(nan.any()):
            raise ValueError(
                f"group_advantages: nan_policy='raise' and rewards contain {int(nan.sum())} NaN, first at "
                f"index {_first(nan)}; use nan_policy='missing' to treat NaN as an unscored completion"
            )
    if reward_weights is not None and not bool(torch.isfinite(reward_weights.double()).all()):
        raise ValueError(
            "group_advantages: reward_weights must be finite, got " + str(reward_weights.tolist())
        )
    if lengths is not None:
        lf = lengths.double()
        bad = ~torch.isfinite(lf) | (lf < 0)
        if bool(bad.any()):
            raise ValueError(
                f"group_advantages: lengths must be finite and >= 0, got {float(lf[bad][0])} at row "
                f"{_first(bad)[0]}"
            )
    if token_mask is not None and token_mask.dtype != torch.bool:
        bad = (token_mask != 0) & (token_mask != 1)
        if bool(bad.any()):
            raise ValueError(
                f"group_advantages: token_mask must hold only 0 and 1, found another value at {_first(bad)}"
            )
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        if int(cu[0]) != 0:
            raise ValueError(f"group_advantages: cu_seqlens[0] must be 0, got {int(cu[0])}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                "group_advantages: cu_seqlens must be non-decreasing, got " + str(cu.tolist()[:16])
            )
        if token_mask is not None and int(cu[-1]) != token_mask.shape[0]:
            raise ValueError(
                f"group_advantages: cu_seqlens[B] = {int(cu[-1])} must equal N = token_mask.shape[0] = "
                f"{token_mask.shape[0]}"
            )


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    estimator: str = "grpo",
    scale: str = "group",
    eps: float = 1e-4,
    reward_weights: torch.Tensor | None = None,
    multi_reward: str = "sum_then_normalize",
    gdpo_final: str = "trl",
    lengths: torch.Tensor | None = None,
    singleton: str = "zero",
    whiten_eps: float = 1e-8,
    gpg_f_norm: float = 1.0,
    gamma: float = 1.0,
    token_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    nan_policy: str = "missing",
    impl: str = "auto",
    validate: bool | None = True,
) -> Advantages:
    """Group-relative advantages of ``rewards (B,)`` or ``(B, R)`` (docs/ops.md section 4). No gradient.

    Args:
        rewards: ``[B]`` or ``[B, R]`` floating tensor (R reward functions). NaN = "this function did not
            score this completion"; a row with every entry NaN is unscorable. +-inf raises ``ValueError``.
        group_size: G, groups are contiguous blocks of G rows (TRL layout); B % G must be 0.
        group_ids: ``[B]`` integer ids, rows of a group need not be adjacent (verl ``uid`` layout). Exactly
            one of ``group_size`` / ``group_ids``. Output order is input order either way.
        estimator: ``"grpo" | "dr_grpo" | "rloo" | "reinforce_plus_plus" | "reinforce_plus_plus_baseline" |
            "gpg" | "opo"`` (docs/ops.md 4.2). ``dr_grpo`` is ``grpo`` with ``scale="none"`` (overrides
            ``scale``).
        scale: ``grpo``'s divisor: group std (``"group"``), batch std (``"batch"``) or none (``"none"``).
        eps: added to the std (TRL 1e-4, verl 1e-6; see :func:`advantage_preset`).
        reward_weights: ``[R]`` weights of the reward functions (default ones).
        multi_reward: ``"sum_then_normalize"`` (TRL default) or ``"normalize_then_sum"`` (GDPO; ``grpo`` /
            ``dr_grpo`` only).
        gdpo_final: final normalisation of GDPO: ``"trl"`` (batch mean/std) or ``"verl"`` (token-weighted
            whitening).
        lengths: ``[B]`` response tokens per row: required by ``opo``; the whitening weights of
            ``reinforce_plus_plus*`` and ``gdpo_final="verl"`` (None: weight 1, with a logged warning).
        singleton: groups with at most one scorable member: ``"zero"`` (TRL, advantage 0) or ``"verl"``
            (baseline 0, std 1).
        whiten_eps: added to the variance in the whitening (verl 1e-8).
        gpg_f_norm: ``gpg``'s divisor f_norm (> 0).
        gamma: discount of ``reinforce_plus_plus``; gamma != 1 gives per-token returns, needs a token layout
            and whitens over the valid tokens with weight 1 each (``lengths`` is then not used).
        token_mask: ``[B, T]`` (padded) or ``[N]`` (packed, with ``cu_seqlens``) mask of valid response
            tokens; only for ``reinforce_plus_plus`` with gamma != 1.
        cu_seqlens: ``[B + 1]`` int32/int64 offsets of the packed layout (docs/ops.md 1.2); same restriction.
        nan_policy: ``"missing"`` (NaN rows are excluded from every statistic, advantage 0) or ``"raise"``.
        impl: ``"auto"`` or ``"reference"`` (the only implementation); ``"cpp" | "triton"`` raise
            ``RuntimeError``.
        validate: check values (+-inf, NaN under ``"raise"``, lengths, masks, cu_seqlens, whitening W > 1)
            with host syncs. ``None`` uses the global setting (``reasonrl.set_validation``). With False those
            inputs give undefined results.

    Returns:
        ``Advantages(advantages, group_mean, group_std, zero_std_rows, num_rows)``: ``advantages`` ``[B]``
        fp32 (fp64 for fp64 rewards; ``[B, T]`` / ``[N]`` for per-token returns), always finite;
        ``group_mean`` / ``group_std`` ``[B]``; ``zero_std_rows`` a 0-d int64 tensor; ``num_rows`` = B. TRL's
        ``frac_reward_zero_std`` is ``zero_std_rows / num_rows``.
    """
    args = dict(locals())  # every argument by name: checked, then handed to the reference as they are
    args["reward_weights"] = _check_args(**{k: v for k, v in args.items() if k not in ("impl", "validate")})
    backend.resolve_impl(OP, impl, rewards.device, rewards.dtype)
    args["validate"] = backend.resolve_validate(validate)
    if args["validate"]:
        _validate_values(rewards, args["reward_weights"], lengths, token_mask, cu_seqlens, nan_policy)
    for name in ("eps", "whiten_eps", "gpg_f_norm", "gamma"):
        args[name] = float(args[name])
    del args["impl"], args["nan_policy"]  # one implementation; "raise" was enforced by the checks above
    return group_advantages_reference(**args)
