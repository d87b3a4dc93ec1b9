"""Hugging Face model helpers for the fused lm_head path (docs/ops.md section 3).

:func:`hidden_states_and_lm_head` runs the base model of a causal LM (Llama / Qwen2 style: a decoder stack
followed by a linear ``lm_head``) and returns its last hidden states with the lm_head's weight and bias,
never computing the ``[B, T, V]`` logits. Feed them to :func:`reasonrl.linear_token_logprobs`.

Nothing here imports transformers: the helper only relies on the ``PreTrainedModel`` interface
(``get_decoder`` / ``base_model_prefix`` and ``get_output_embeddings``).
"""

from __future__ import annotations

import torch

__all__ = ["hidden_states_and_lm_head"]


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The base model (decoder stack) of a causal LM: ``get_decoder()``, else
    ``model.<base_model_prefix>``."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        dec = get_decoder()
        if isinstance(dec, torch.nn.Module) and dec is not model:
            return dec
    prefix = getattr(model, "base_model_prefix", "model")
    dec = getattr(model, prefix, None)
    if isinstance(dec, torch.nn.Module) and dec is not model:
        return dec
    raise TypeError(f"hidden_states_and_lm_head: cannot find the base model of {type(model).__name__} "
                    "(expected get_decoder() or a .model attribute, as Llama / Qwen2 causal LMs have)")


def hidden_states_and_lm_head(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Last hidden states and lm_head parameters of a causal LM, without computing logits.

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and models built the same
            way: base model + linear ``lm_head``).
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` or None.
        **kwargs: passed to the base model's forward (``position_ids``, ``past_key_values``, ...);
            ``use_cache`` defaults to False.

    Returns:
        ``(hidden [B, T, H], weight [V, H], bias [V] or None)``, such that ``hidden @ weight.T (+ bias)``
        equals ``model(input_ids, attention_mask).logits``. ``weight`` is the lm_head's Parameter itself (for
        tied embeddings, the same Parameter as the input embedding), so gradients reach the model through it.
        Position t of ``hidden`` predicts token t + 1: shift the labels as for the logits.

    Raises:
        NotImplementedError: for models whose logits are not a plain linear map of the hidden states (Gemma-2
            style ``final_logit_softcapping``, Cohere style ``logit_scale``): the result would not equal
            ``model(...).logits``.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise NotImplementedError("hidden_states_and_lm_head: final_logit_softcapping is not supported yet")
    if getattr(text_config, "logit_scale", 1.0) not in (None, 1.0):
        raise NotImplementedError("hidden_states_and_lm_head: a logit_scale other than 1 is not "
                                  "supported yet")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"hidden_states_and_lm_head: {type(model).__name__} has no linear lm_head "
                        "(get_output_embeddings() returned no module with a weight)")
    kwargs.setdefault("use_cache", False)
    out = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, head.weight, getattr(head, "bias", None)
