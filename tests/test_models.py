"""Tests of ``reasonrl.models.hidden_states_and_lm_head`` on tiny Llama / Qwen2 models built from configs
(no hub downloads): ``hidden @ weight.T (+ bias)`` equals ``model(...).logits``, tied embeddings share the
Parameter, and the fused log-probs computed from them match log-softmax of the model's logits."""

from __future__ import annotations

import pytest
import torch

from reasonrl import linear_token_logprobs
from reasonrl.models import hidden_states_and_lm_head
from reasonrl.testing import tiny_causal_lm

transformers = pytest.importorskip("transformers")


def _tiny(kind: str, tied: bool):
    return tiny_causal_lm(kind, 97, tie=tied).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hidden_states_times_lm_head_equal_logits(kind, tied):
    torch.manual_seed(0)
    model = _tiny(kind, tied)
    input_ids = torch.randint(0, 97, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden, weight, bias = hidden_states_and_lm_head(model, input_ids, attention_mask)
    assert hidden.shape == (2, 9, 32) and weight.shape == (97, 32) and bias is None
    assert weight is model.get_output_embeddings().weight
    if tied:
        assert weight is model.get_input_embeddings().weight
    torch.testing.assert_close(hidden @ weight.T, logits, rtol=1e-5, atol=1e-5)


def test_fused_logprobs_and_gradients_reach_the_model():
    """The training use: log-probs of the next tokens from the helper's outputs equal those of the logits, and
    the gradient flows into the (tied) embedding through the lm_head weight."""
    torch.manual_seed(1)
    model = _tiny("qwen2", tied=True)
    input_ids = torch.randint(0, 97, (2, 8))
    labels = input_ids[:, 1:]
    hidden, weight, _ = hidden_states_and_lm_head(model, input_ids)
    out = linear_token_logprobs(hidden[:, :-1], weight, labels, temperature=0.8)
    logits = model(input_ids=input_ids).logits[:, :-1].float() / 0.8
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, expected, rtol=1e-5, atol=1e-5)
    out.logprobs.sum().backward()
    assert model.get_input_embeddings().weight.grad is not None
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_softcapped_models_are_refused():
    model = _tiny("llama", tied=False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="softcapping"):
        hidden_states_and_lm_head(model, torch.zeros(1, 3, dtype=torch.long))
