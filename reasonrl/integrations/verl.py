"""verl 0.9.1 drop-ins: reasonrl's policy losses in verl's registry and the fused log-prob + entropy forward.

Importing this module (verl does it for you with ``actor_rollout_ref.model.external_lib:
reasonrl.integrations.verl``, or ``VERL_USE_EXTERNAL_MODULES=reasonrl.integrations.verl`` in every worker)
does two things (docs/integrations-verl.md):

* registers ``reasonrl_vanilla``, ``reasonrl_gspo``, ``reasonrl_sapo``, ``reasonrl_cispo`` and
  ``reasonrl_gpg`` with ``verl.trainer.ppo.core_algos.register_policy_loss``: select one with
  ``actor_rollout_ref.actor.policy_loss.loss_mode: reasonrl_vanilla``. Each has verl's signature
  ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)`` and
  returns ``(pg_loss, metrics)`` with verl's metric names; the loss is ``reasonrl.losses.policy_loss`` with
  ``PolicyLossConfig.from_verl`` of the actor config (docs/losses.md section 3.2) restricted to the policy
  term (verl's ``ppo_loss`` adds the entropy and KL terms itself), honouring ``loss_agg_mode`` and the global
  batch normalisers verl puts in ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``; docs/losses.md section 10.3).
* adds ``reasonrl`` to the values of ``actor_rollout_ref.model.fused_kernel_options.impl_backend`` (with
  ``use_fused_kernels: true``): the actor's and reference's forward then returns ``log_probs`` and ``entropy``
  from ``reasonrl.linear_token_logprobs`` on the last hidden states and the lm_head, never the logits, in
  place of verl's Triton ``linear_cross_entropy`` (``triton``) or chunked torch ``FusedLinearForPPO``
  (``torch``).

:func:`agg_loss` is verl's ``agg_loss`` computed by reasonrl (the loss of ``loss_type="reinforce"`` with
advantage -1 is exactly the aggregation of its per-token input), for callers that aggregate other terms.

Not supported: verl's other loss modes (``clip_cov``, ``kl_cov``, ``geo_mean``, ``dppo_*``, ``dro``,
``bypass_mode``; ``from_verl`` raises), the fused backend for vision-language models (their forward differs)
and for models with logit soft-capping.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from verl.trainer.ppo import core_algos

from reasonrl.losses import LossNormalizers, PolicyLossConfig, policy_loss
from reasonrl.models import hidden_states_and_lm_head
from reasonrl.ops import linear_token_logprobs

__all__ = ["LOSS_MODES", "agg_loss", "forward_with_reasonrl_backend", "make_policy_loss", "register"]

#: verl loss modes with a reasonrl twin, registered as ``reasonrl_<mode>``.
LOSS_MODES = ("vanilla", "gspo", "sapo", "cispo", "gpg")


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict) or hasattr(obj, "keys"):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _normalizers(info: Any, response_mask: torch.Tensor) -> LossNormalizers:
    """``config.global_batch_info`` as LossNormalizers (None values: verl's local fallback when
    dp_size = 1)."""
    dp = int(_get(info, "dp_size", 1) or 1)
    n_tok, n_seq = _get(info, "batch_num_tokens"), _get(info, "global_batch_size")
    return LossNormalizers(
        num_items_in_batch=None if n_tok is None else _count(n_tok, response_mask),
        global_num_seqs=None if n_seq is None else _count(n_seq, response_mask),
        num_processes=dp,
        padded_length=int(response_mask.shape[-1]) if response_mask.dim() == 2 else None,
    )


def _count(value: Any, like: torch.Tensor):
    return value.to(like.device) if isinstance(value, torch.Tensor) else float(value)


def _config(mode: str, actor_config: Any, loss_agg_mode: str) -> PolicyLossConfig:
    """The policy term of verl's ``mode`` for ``actor_config``: from_verl with verl's loss mode and the call's
    ``loss_agg_mode``, without the KL and entropy terms (verl's ppo_loss adds those) and without in-loss
    rollout weights (verl passes its precomputed ``rollout_is_weights``)."""
    policy_cfg = _get(actor_config, "policy_loss", None)
    view = _ActorView(
        actor_config, {**({} if policy_cfg is None else dict(_items(policy_cfg))), "loss_mode": mode}
    )
    cfg = PolicyLossConfig.from_verl(view)
    lsf = _get(
        _get(actor_config, "global_batch_info", {}),
        "loss_scale_factor",
        _get(actor_config, "loss_scale_factor"),
    )
    return dataclasses.replace(
        cfg,
        beta=0.0,
        entropy_coef=0.0,
        is_correction=None,
        loss_agg_mode=loss_agg_mode,
        loss_scale_factor=lsf,
    )


def _items(obj: Any):
    if hasattr(obj, "items"):
        return obj.items()
    return dataclasses.asdict(obj).items() if dataclasses.is_dataclass(obj) else vars(obj).items()


class _ActorView:
    """The actor config with ``policy_loss`` replaced (verl's ActorConfig is frozen)."""

    def __init__(self, base: Any, policy_loss: dict) -> None:
        self._base, self.policy_loss = base, policy_loss

    def __getattr__(self, key: str):
        return _get(self._base, key)


def make_policy_loss(mode: str):
    """A verl policy-loss function computing verl's ``mode`` with reasonrl (registered as
    ``reasonrl_<mode>``)."""
    if mode not in LOSS_MODES:
        raise ValueError(f"make_policy_loss: mode must be one of {LOSS_MODES}, got {mode!r}")

    def compute_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ):
        if config is None:
            raise ValueError(f"reasonrl_{mode}: config (the actor config) is required, as for verl's losses")
        cfg = _config(mode, config, loss_agg_mode)
        out = policy_loss(
            log_prob,
            advantages=advantages,
            mask=response_mask,
            old_logprobs=old_log_prob,
            is_weights=rollout_is_weights,
            normalizers=_normalizers(_get(config, "global_batch_info", {}), response_mask),
            config=cfg,
        )
        if mode == "gpg":  # verl's gpg reports no metrics
            return out.loss, {}
        m = out.metrics
        # verl's metrics are local masked means (host floats, as verl returns them).
        return out.loss, {
            "actor/pg_clipfrac": m.pg_clipfrac.mean().item(),
            "actor/ppo_kl": m.ppo_kl.mean().item(),
            "actor/pg_clipfrac_lower": m.pg_clipfrac_lower.mean().item(),
        }

    compute_policy_loss.__name__ = f"compute_policy_loss_reasonrl_{mode}"
    return compute_policy_loss


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
) -> torch.Tensor:
    """verl 0.9.1's ``core_algos.agg_loss`` (same arguments), computed by reasonrl's aggregation
    (docs/losses.md section 10.3): ``loss_type="reinforce"`` with advantage -1 sums ``c * loss_mat``."""
    cfg = PolicyLossConfig(
        loss_type="reinforce", loss_agg_mode=loss_agg_mode, loss_scale_factor=loss_scale_factor
    )
    info = dict(dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    adv = torch.full(loss_mat.shape[:1], -1.0, dtype=loss_mat.dtype, device=loss_mat.device)
    return policy_loss(
        loss_mat, advantages=adv, mask=loss_mask, normalizers=_normalizers(info, loss_mask), config=cfg
    ).loss


# ------------------------------------------------------------------------------------------------------------
# The fused log-prob + entropy forward (fused_kernel_options.impl_backend: reasonrl)
# ------------------------------------------------------------------------------------------------------------


def _full(t):
    if t is not None and type(t).__name__ == "DTensor":  # FSDP2: gather the lm_head (differentiable)
        return t.full_tensor()
    return t


def forward_with_reasonrl_backend(
    self,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    cache_position=None,
    logits_to_keep=0,
    temperature: float = 1.0,
    shift_labels=None,
    **loss_kwargs,
):
    """verl's ``forward_with_triton_backend`` (models/transformers/dense_common.py) with reasonrl's op: the
    decoder runs, then ``log_probs`` / ``entropy`` of the rolled labels come from
    ``reasonrl.linear_token_logprobs(hidden, lm_head.weight, labels, bias, temperature)`` (both
    differentiable; the [N, V] logits never exist). Labels as verl: ``shift_labels`` if given, else ``labels``
    or ``input_ids``
    rolled by one (the wrapped last position is masked by verl's response mask)."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO

    if return_dict is False:
        raise NotImplementedError("forward_with_reasonrl_backend has to return_dict")
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("forward_with_reasonrl_backend: labels or input_ids must be provided")
    kwargs = dict(
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        cache_position=cache_position,
    )
    hidden, weight, bias = hidden_states_and_lm_head(
        self, input_ids, attention_mask, **{k: v for k, v in kwargs.items() if v is not None}
    )
    weight, bias = _full(weight), _full(bias)
    if (
        weight.dtype != hidden.dtype
    ):  # e.g. an fp32 lm_head with bf16 activations: compute in the activations'
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    if (
        isinstance(temperature, torch.Tensor)
        and temperature.numel() > 1
        and temperature.shape != rolled.shape
    ):
        temperature = temperature.reshape(-1, *([1] * (rolled.dim() - 1))).expand(rolled.shape)
    out = linear_token_logprobs(hidden, weight, rolled, bias=bias, temperature=temperature, want_entropy=True)
    return CausalLMOutputForPPO(log_probs=out.logprobs, entropy=out.entropy)


def _patch_forward_with_backends(original):
    @functools.wraps(original)
    def patch_forward_with_backends(
        model, use_fused_kernels: bool = False, fused_kernels_backend: str = None
    ):
        if not (use_fused_kernels and fused_kernels_backend == "reasonrl"):
            return original(
                model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend
            )
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if model.config is not config or getattr(config, "final_logit_softcapping", None) is not None:
            raise NotImplementedError(
                f"fused_kernels_backend='reasonrl' supports text-only causal LMs without logit soft-capping; "
                f"{type(model).__name__} is not one (use impl_backend: torch or triton)"
            )
        model._verl_fused_kernels_backend = "reasonrl"
        model.__class__.forward = forward_with_reasonrl_backend
        print(f"Using reasonrl backend for fused kernels in {model.__class__.__name__}")

    patch_forward_with_backends._reasonrl = True
    return patch_forward_with_backends


def register() -> None:
    """Register the ``reasonrl_<mode>`` losses and the ``reasonrl`` fused-kernel backend (idempotent; runs at
    import)."""
    for mode in LOSS_MODES:
        core_algos.register_policy_loss(f"reasonrl_{mode}")(make_policy_loss(mode))
    from verl.models.transformers import monkey_patch

    if not getattr(monkey_patch.patch_forward_with_backends, "_reasonrl", False):
        monkey_patch.patch_forward_with_backends = _patch_forward_with_backends(
            monkey_patch.patch_forward_with_backends
        )


register()
