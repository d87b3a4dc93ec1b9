"""Drop-in for TRL's ``GRPOTrainer`` (TRL 1.16): log-probs, entropies and the loss on reasonrl's fused ops.

Two ways in, with the same behaviour (docs/integrations-trl.md):

    from reasonrl.integrations.trl import GRPOTrainer      # instead of `from trl import GRPOTrainer`

    trainer = trl.GRPOTrainer(...)                          # or: patch a trainer someone else built
    reasonrl.integrations.trl.patch(trainer)

What changes, and nothing else does (generation, rewards, advantages, the vLLM importance-sampling ratio,
buffering over ``steps_per_generation`` / ``num_iterations``, logging and checkpointing stay TRL's code):

* ``_get_per_token_logps_and_entropies`` (the old-policy and reference passes, and any caller of it): the
  backbone runs once, then ``reasonrl.linear_token_logprobs`` scores the completion positions from the last
  hidden states and the lm_head. TRL's CPU fallback projects every position in ``4096 x 32768`` fp32 tiles
  (512 MiB); the reasonrl op skips masked rows and works in a 64 MiB chunk.
* ``_compute_loss``: the whole loss is ``reasonrl.losses.policy_loss_from_hidden`` with
  ``PolicyLossConfig.from_trl(args)`` (docs/losses.md section 3.2), i.e. every loss option of TRL's own
  ``GRPOConfig``: ``loss_type`` (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo), ``epsilon`` /
  ``epsilon_high``, ``delta``, ``beta`` with ``use_bias_correction_kl``, ``importance_sampling_level``,
  ``top_entropy_quantile``, ``off_policy_mask_threshold``, ``entropy_coef`` and the adaptive control
  (``reasonrl.losses.AdaptiveEntropyController``, TRL's rule), the vLLM importance-sampling ratio (TRL
  computes it at generation time; it is passed as ``is_weights``), ``temperature``, ``max_completion_length``,
  and the normalisers of ``num_iterations`` / ``steps_per_generation`` / gradient accumulation (docs/losses.md
  section 10.1). ``mask_truncated_completions`` and tool masks reach the loss through TRL's masks. When every
  term is token-local the gradients with respect to the hidden states and the lm_head are formed during the
  forward call (one sweep, docs/losses.md section 13.1); otherwise the two-phase path (section 13.2).
* The same metrics under the same names: ``entropy``, ``kl``, ``clip_ratio/{low_mean,high_mean,region_mean,
  low_min,high_max}``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``policy_loss`` and ``entropy_coef``.

The loss runs INSIDE the model's forward (the forward of the causal LM gets a ``reasonrl_fn`` keyword, as
TRL's gets ``fused_lm_head``), so DDP / FSDP / DeepSpeed see an ordinary forward and the lm_head parameters
are gathered when the fused op reads them (FSDP2 DTensor ``full_tensor()``, DeepSpeed ZeRO-3 through TRL's own
``maybe_gather_lm_head_ctx``). See docs/integrations-trl.md for what ZeRO-3 / FSDP need.

PEFT: LoRA adapters anywhere, including on the lm_head (which TRL refuses): the adapter's low-rank term is
folded into the fused op exactly, dropout included, as extra columns of the hidden states and the weight
(``[h, s * A(dropout(h))] @ [W, B]^T = h W^T + s * B(A(dropout(h)))``).

Not supported (a clear error at construction, or TRL's own path where noted): MoE router auxiliary loss
(``router_aux_loss_coef``), models whose logits are not a plain linear map of the hidden states (logit
soft-capping, ``logit_scale``), DoRA and other LoRA variants on the lm_head, ``top_entropy_quantile < 1`` with
several processes (the fused loss takes the entropy quantile over the local micro-batch), and, under DeepSpeed
ZeRO-3, the configurations that need the two-phase path. Multimodal batches (``pixel_values`` etc.) fall back
to TRL's own path for that batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
import warnings
from typing import Any

import torch
import trl
from trl.trainer import grpo_trainer as _trl_grpo

from reasonrl.losses import (
    AdaptiveEntropyController,
    LossNormalizers,
    LossOutput,
    PolicyLossConfig,
    Sum,
    policy_loss_from_hidden,
)
from reasonrl.models import hidden_states_and_lm_head
from reasonrl.ops import linear_token_logprobs

__all__ = ["GRPOTrainer", "patch", "policy_loss_config"]

# Inputs of TRL's `_get_per_token_logps_and_entropies` / `_compute_loss` that carry a multimodal batch: with
# any of them set, TRL's own path runs (the vision tower is part of the model's forward, not of the text
# decoder).
_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)
# TRL's loss types whose logged `policy_loss` is taken before the 1 / GA division (docs/losses.md section 12).
_POLICY_LOSS_BEFORE_GA = ("grpo", "bnpo", "dr_grpo", "sapo", "luspo")
_CLIP_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Keywords the PEFT / HF wrappers pass through a causal LM's forward that the decoder stack does not take.
_NOT_FOR_DECODER = ("labels", "return_dict", "logits_to_keep", "num_items_in_batch", "shift_labels")


def policy_loss_config(args: Any) -> PolicyLossConfig:
    """The reasonrl loss configuration the drop-in runs for a TRL ``GRPOConfig``.

    ``PolicyLossConfig.from_trl(args)`` (docs/losses.md section 3.2) without its ``is_correction``: TRL
    computes the vLLM importance-sampling ratio at generation time (and logs its ``sampling/*`` metrics
    there), so the drop-in passes TRL's ratio to the loss as ``is_weights`` instead of recomputing it.
    """
    with warnings.catch_warnings():  # TRL has already logged the same configuration warnings
        warnings.simplefilter("ignore", UserWarning)
        return dataclasses.replace(PolicyLossConfig.from_trl(args), is_correction=None)


# ------------------------------------------------------------------------------------------------------------
# The lm_head as (extra hidden columns, weight, bias): plain Linear, or a PEFT LoRA layer folded in exactly.
# ------------------------------------------------------------------------------------------------------------


def _lora_layer(head: torch.nn.Module):
    """``head`` if it is a PEFT LoRA ``Linear`` (duck-typed: lora_A / lora_B / base_layer), else None."""
    if all(hasattr(head, a) for a in ("lora_A", "lora_B", "base_layer", "scaling")):
        return head
    return None


def _head_operands(head: torch.nn.Module, hidden: torch.Tensor):
    """``(hidden', weight, bias)`` with ``hidden' @ weight.T + bias`` equal to ``head(hidden)``.

    A LoRA layer adds ``s * B(A(dropout(h)))`` for each active adapter: the low-rank input ``s *
    A(dropout(h))`` ([N, r]) becomes extra columns of the hidden states and ``B.weight`` ([V, r]) extra
    columns of the weight, so the fused op sees one [V, H + r] matrix. It costs one copy of the weight per
    call (the same as merging the adapter) and gradients reach A and B through ordinary autograd around the
    op. Disabled adapters (``disable_adapter()``, TRL's reference pass) and merged adapters use the base layer
    alone.
    """
    lora = _lora_layer(head)
    if lora is None:
        return hidden, head.weight, getattr(head, "bias", None)
    base = lora.base_layer
    weight, bias = base.weight, base.bias
    if lora.disable_adapters or lora.merged:
        return hidden, weight, bias
    cols, wcols, biases = [hidden], [weight], [] if bias is None else [bias]
    for name in lora.active_adapters:
        if name not in lora.lora_A.keys():
            continue
        if name in getattr(lora, "lora_variant", {}) or getattr(lora, "use_dora", {}).get(name, False):
            raise NotImplementedError(
                f"reasonrl.integrations.trl: the lm_head adapter {name!r} is a LoRA variant (DoRA, ...), "
                "whose output is not a linear map of the hidden states; plain LoRA on the lm_head is "
                "supported"
            )
        a, b = lora.lora_A[name], lora.lora_B[name]
        scale = lora.scaling[name]
        z = a(lora.lora_dropout[name](hidden.to(a.weight.dtype))) * scale
        cols.append(z.to(hidden.dtype))
        wcols.append(b.weight.to(weight.dtype))
        if b.bias is not None:  # lora_bias=True: PEFT scales the adapter's bias too
            biases.append((b.bias * scale).to(weight.dtype))
    if len(cols) == 1:
        return hidden, weight, bias
    bias_total = functools.reduce(torch.add, biases) if biases else None
    return torch.cat(cols, dim=-1), torch.cat(wcols, dim=1), bias_total


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A FSDP2 DTensor gathered to a regular tensor (differentiable; the gradient is redistributed)."""
    if t is not None and hasattr(t, "full_tensor") and type(t).__name__ == "DTensor":
        return t.full_tensor()
    return t


def _gather_ctx(*params):
    """TRL's ZeRO-3 gather of the lm_head parameters for a direct read (a null context otherwise)."""
    gather = getattr(trl.trainer.utils, "maybe_gather_lm_head_ctx", None)
    return contextlib.nullcontext() if gather is None else gather(*params)


def _run_on_hidden(model, fn, keep: int, cast_fp32: bool, input_ids=None, attention_mask=None, **kwargs):
    """Backbone forward, then ``fn(hidden [B, keep, H'], weight [V, H'], bias)`` on the positions that predict
    the last ``keep`` tokens. Runs inside the causal LM's forward (see :func:`_install_forward`)."""
    for key in _NOT_FOR_DECODER:
        kwargs.pop(key, None)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    hidden, _, _ = hidden_states_and_lm_head(model, input_ids, attention_mask, **kwargs)
    # Position t predicts token t + 1: the last `keep` tokens come from positions [T - keep - 1, T - 1).
    hidden = hidden[:, -keep - 1:-1]
    head = model.get_output_embeddings()
    base = head.base_layer if _lora_layer(head) is not None else head
    with _gather_ctx(base.weight, getattr(base, "bias", None)):
        h, weight, bias = _head_operands(head, hidden)
        weight, bias = _full(weight), _full(bias)
        # The dtype the matmul runs in: TRL's `cast_lm_head_to_fp32` -> fp32; under autocast the autocast
        # dtype (as TRL's chunked head and nn.Linear under autocast do); otherwise the hidden states' dtype.
        # The casts are differentiable (an fp32 master weight gets an fp32 gradient) and the op accumulates in
        # fp32 regardless.
        if cast_fp32:
            dtype = torch.float32
        elif torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
        else:
            dtype = h.dtype
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(h.device.type, enabled=False):
            return fn(h, weight, bias)


def _install_forward(model: torch.nn.Module, cast_fp32: bool) -> None:
    """Give the causal LM ``model`` a ``reasonrl_fn`` forward keyword (kept across PEFT / DDP / FSDP wrapping,
    as TRL's ``fused_lm_head`` keyword is); without it the forward is unchanged (generation is untouched)."""
    if getattr(model, "_reasonrl_forward_installed", False):
        return
    inner = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: `generate` validates its kwargs against it
    def forward(self, *args, reasonrl_fn=None, reasonrl_keep=None, **kwargs):
        if reasonrl_fn is None:
            return inner(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        return _run_on_hidden(self, reasonrl_fn, reasonrl_keep, cast_fp32, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._reasonrl_forward_installed = True


def _logprobs_fn(hidden, weight, bias, *, labels, temperature, want_entropy):
    out = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                want_entropy=want_entropy)
    valid = labels != -100
    lp = out.logprobs.masked_fill(~valid, 0.0)  # TRL's fused head returns 0 where the label is -100
    ent = None if out.entropy is None else out.entropy.masked_fill(~valid, 0.0)
    return lp, ent


def _loss_fn(hidden, weight, bias, **kwargs) -> LossOutput:
    return policy_loss_from_hidden(hidden, weight, kwargs.pop("labels"), bias=bias, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# The trainer mixin
# ------------------------------------------------------------------------------------------------------------


def _controller_view(attr: str, stored: str, default: float) -> property:
    """A trainer attribute that is a view of the adaptive entropy controller's ``attr`` once the controller
    exists (``_reasonrl_entropy``), and before that a plain value stored under ``stored`` (``default`` until
    one is assigned)."""

    def get(self) -> float:
        ctl = self.__dict__.get("_reasonrl_entropy")
        return self.__dict__.get(stored, default) if ctl is None else getattr(ctl, attr)

    def set_(self, value: float) -> None:
        ctl = self.__dict__.get("_reasonrl_entropy")
        if ctl is None:
            self.__dict__[stored] = value
        else:
            setattr(ctl, attr, float(value))

    return property(get, set_)


class _ReasonRLGRPOMixin:
    """Overrides of TRL 1.16's ``GRPOTrainer``; combined with it (or a subclass of it) by :class:`GRPOTrainer`
    and :func:`patch`."""

    # TRL keeps the adaptive entropy state in `entropy_coef` / `_last_world_entropy` (assigned in its
    # __init__, saved and restored with checkpoints); here they are views of the reasonrl controller, so TRL's
    # checkpoint code keeps working. Before the controller exists (during TRL's __init__) they are plain
    # stored values.

    entropy_coef = _controller_view("entropy_coef", "_reasonrl_coef", 0.0)
    _last_world_entropy = _controller_view("last_window_entropy", "_reasonrl_last", math.inf)

    # ---- log-probs of the old-policy / reference passes ----------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **multimodal):
        if compute_aux_loss or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            am = attention_mask[start:start + batch_size]
            # TRL scores the completion tokens whose attention mask is set; the rest get 0.
            labels = ids[:, -logits_to_keep:].masked_fill(am[:, -logits_to_keep:] == 0, -100)
            fn = functools.partial(_logprobs_fn, labels=labels, temperature=self.temperature,
                                   want_entropy=compute_entropy)
            with self.accelerator.autocast():
                lp, ent = model(input_ids=ids, attention_mask=am, reasonrl_fn=fn,
                                reasonrl_keep=logits_to_keep)
            logps.append(lp)
            entropies.append(ent)
        return (torch.cat(logps, dim=0), torch.cat(entropies, dim=0) if compute_entropy else None, None)

    # ---- the loss ------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if any(inputs.get(k) is not None for k in _MULTIMODAL_KEYS):
            return super()._compute_loss(model, inputs)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        labels = completion_ids.masked_fill(completion_mask == 0, -100)

        mode = "train" if self.model.training else "eval"
        training = mode == "train"
        ga = self.current_gradient_accumulation_steps if training else 1
        # docs/losses.md section 10.1: TRL's count spans the generation batch; one accumulation window's
        # share.
        n_items = inputs["num_items_in_batch"]
        if not isinstance(n_items, torch.Tensor):
            n_items = torch.tensor(float(n_items))
        n_items = n_items.float()
        n_glob = n_items * ga / self.args.steps_per_generation if training else n_items
        normalizers = LossNormalizers(num_items_in_batch=n_glob, grad_accum_steps=ga,
                                      num_processes=self.accelerator.num_processes, training=training)

        cfg = self._reasonrl_config
        ctl = self._reasonrl_entropy
        if self._entropy_bonus_enabled:
            # TRL applies the coefficient of the end of the previous optimizer step, gated in adaptive mode.
            eta = ctl.coef if self.use_adaptive_entropy else ctl.entropy_coef
        else:
            eta = 0.0
        is_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_weights = inputs["importance_sampling_ratio"]
            if is_weights.dim() == 2 and is_weights.shape[1] == 1:  # sequence modes: (B, 1)
                is_weights = is_weights.squeeze(1)
        fn = functools.partial(
            _loss_fn, labels=labels, advantages=inputs["advantages"], mask=mask, normalizers=normalizers,
            config=cfg,
            old_logprobs=inputs.get("old_per_token_logps"),
            ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            sampling_logprobs=inputs.get("sampling_per_token_logps"), is_weights=is_weights, entropy_coef=eta,
        )
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, reasonrl_fn=fn,
                        reasonrl_keep=keep)
        self._reasonrl_log(out, mode, ga)
        return out.loss

    def _reasonrl_mean(self, s: Sum) -> float:
        totals = self.accelerator.reduce(torch.stack([s.sum.float(), s.count.float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _reasonrl_log(self, out: LossOutput, mode: str, ga: int) -> None:
        """TRL's metrics, names and reductions (GRPOTrainer._compute_loss), from the loss's (sum, count)
        pairs."""
        m, metrics, lt = out.metrics, self._metrics[mode], self.loss_type
        if self._entropy_bonus_enabled:
            policy_loss = m.policy_loss * (ga if lt in _POLICY_LOSS_BEFORE_GA else 1)
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            ctl = self._reasonrl_entropy
            if self.use_adaptive_entropy and mode == "train":
                ctl.observe(m.entropy_effective)
                if self.accelerator.sync_gradients:
                    ctl.step()  # one all-reduce of (sum, count) over the ranks, then TRL's update rule
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
        if self.beta != 0.0:
            metrics["kl"].append(self._reasonrl_mean(m.kl))
        metrics["entropy"].append(self._reasonrl_mean(m.entropy))
        if lt in _CLIP_FAMILY:
            metrics["clip_ratio/low_mean"].append(self._reasonrl_mean(m.clip_low))
            metrics["clip_ratio/high_mean"].append(self._reasonrl_mean(m.clip_high))
            metrics["clip_ratio/region_mean"].append(self._reasonrl_mean(m.clip_region))
            # Per-sequence clipped fractions; an empty sequence gives 0 / 0 = NaN, which nanmin / nanmax skip
            # (TRL).
            low = m.clip_low_per_seq.sum / m.clip_low_per_seq.count
            high = m.clip_high_per_seq.sum / m.clip_high_per_seq.count
            metrics["clip_ratio/low_min"].append(_trl_grpo.nanmin(self.accelerator.gather(low)).item())
            metrics["clip_ratio/high_max"].append(_trl_grpo.nanmax(self.accelerator.gather(high)).item())
        elif lt == "cispo":
            metrics["cispo_clip_ratio"].append(self._reasonrl_mean(m.cispo_clip))
        elif lt == "vespo":
            metrics["vespo/phi_seq_mean"].append(self._reasonrl_mean(m.vespo_phi))


def _install(trainer) -> None:
    """Check what the drop-in supports, then set up the loss config, the entropy controller and the
    forwards."""
    args = trainer.args
    name = type(trainer).__name__
    if trainer.aux_loss_enabled:
        raise NotImplementedError(
            f"{name}: the MoE router auxiliary loss (router_aux_loss_coef) is not supported by the reasonrl "
            "drop-in; use trl.GRPOTrainer for MoE models or set router_aux_loss_coef=0"
        )
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0)):
        if getattr(text_config, attr, neutral) not in (None, neutral):
            raise NotImplementedError(
                f"{name}: the model's {attr} makes its logits a non-linear or scaled map of the hidden "
                "states, which reasonrl's fused lm_head does not apply yet; use trl.GRPOTrainer for this "
                "model"
            )
    cfg = policy_loss_config(args)
    if trainer.accelerator.num_processes > 1 and cfg.top_entropy_quantile < 1.0:
        raise NotImplementedError(
            f"{name}: top_entropy_quantile < 1 with {trainer.accelerator.num_processes} processes: the "
            "fused loss takes the entropy quantile over the local micro-batch, TRL over all ranks; run on "
            "one process or use trl.GRPOTrainer"
        )
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    two_phase = (cfg.importance_sampling_level != "token" or cfg.loss_type == "vespo"
                 or cfg.off_policy_mask_threshold is not None or cfg.top_entropy_quantile < 1.0)
    if is_deepspeed_zero3_enabled() and two_phase:
        raise NotImplementedError(
            f"{name}: under DeepSpeed ZeRO-3, sequence-level importance sampling, vespo, the off-policy mask "
            "and the top-entropy mask need the lm_head weight again in the backward, after ZeRO-3 has "
            "re-partitioned it; the drop-in supports ZeRO-3 with token-local configurations only "
            "(docs/integrations-trl.md)"
        )
    head = base.get_output_embeddings()
    if _lora_layer(head) is not None and args.cast_lm_head_to_fp32:
        raise ValueError(f"{name}: cast_lm_head_to_fp32=True is not supported with a PEFT adapter on the "
                         "lm_head (as in TRL)")
    trainer._reasonrl_config = cfg
    # The coefficient TRL's __init__ (or a restored checkpoint) left, and its last window entropy.
    coef = trainer.__dict__.pop("entropy_coef", trainer.__dict__.pop("_reasonrl_coef", args.entropy_coef))
    last = trainer.__dict__.pop("_last_world_entropy", trainer.__dict__.pop("_reasonrl_last", math.inf))
    ctl = AdaptiveEntropyController(initial_coef=coef, target=args.entropy_target,
                                    delta=args.entropy_coef_delta, coef_min=args.entropy_coef_min,
                                    coef_max=args.entropy_coef_max)
    ctl.last_window_entropy = float(last)
    trainer._reasonrl_entropy = ctl
    _install_forward(base, args.cast_lm_head_to_fp32)
    if trainer.ref_model is not None:
        _install_forward(trainer.accelerator.unwrap_model(trainer.ref_model), args.cast_lm_head_to_fp32)


@contextlib.contextmanager
def _allow_lm_head_adapter():
    """TRL's __init__ refuses a PEFT adapter on the lm_head (its fused head reads ``lm_head.weight`` and would
    ignore the adapter). reasonrl folds the adapter in, so the check is skipped while the drop-in's own
    ``__init__`` runs: TRL tests ``isinstance(head, BaseTunerLayer)``, which then sees a class nothing derives
    from."""
    original = getattr(_trl_grpo, "BaseTunerLayer", None)
    if original is None:
        yield
        return
    _trl_grpo.BaseTunerLayer = type("_NoTunerLayer", (), {})
    try:
        yield
    finally:
        _trl_grpo.BaseTunerLayer = original


class GRPOTrainer(_ReasonRLGRPOMixin, trl.GRPOTrainer):
    """TRL's ``GRPOTrainer`` with reasonrl's fused log-probs, entropies and loss: same constructor, same
    ``GRPOConfig``, same metrics (module docstring; docs/integrations-trl.md)."""

    def __init__(self, *args, **kwargs):
        with _allow_lm_head_adapter():
            super().__init__(*args, **kwargs)
        _install(self)


@functools.cache
def _patched_class(cls: type) -> type:
    return type(f"ReasonRL{cls.__name__}", (_ReasonRLGRPOMixin, cls), {"__module__": __name__})


def patch(trainer):
    """Switch an existing ``trl.GRPOTrainer`` (or a subclass instance) to reasonrl's fused path, in place.

    Call it after construction and before ``train()`` (after a resume, too: the adaptive entropy state is
    carried over). The instance's class becomes a subclass of its class with the drop-in's overrides; returns
    the trainer. A trainer already patched (or a ``reasonrl.integrations.trl.GRPOTrainer``) is returned
    unchanged.
    """
    if isinstance(trainer, _ReasonRLGRPOMixin):
        return trainer
    if not isinstance(trainer, trl.GRPOTrainer):
        raise TypeError(f"patch: expected a trl.GRPOTrainer, got {type(trainer).__name__}")
    trainer.__class__ = _patched_class(type(trainer))
    _install(trainer)
    return trainer
