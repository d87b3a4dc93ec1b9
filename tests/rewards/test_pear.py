"""PEARReward (docs/rewards.md section 3): hand-computed values from the paper's Eq. 5-7, the spec's edge
cases (no marker, empty answer phase, marker first, multi-token marker), both layouts, the clip option,
and the model-computed entropies against a slow full-logits computation."""

from __future__ import annotations

import math

import pytest
import torch

from reasonrl.rewards import PEARConfig, PEARReward
from reasonrl.rewards.pear import gsm8k_strict_answer
from reasonrl.testing import tiny_causal_lm

M = 9  # id of the </think> token in these examples


def _run(ids, ents, texts, golds, **cfg):
    rw = PEARReward(think_end_ids=(M,), **cfg)
    return rw(texts, golds, completion_ids=ids, entropy=[torch.tensor(e) for e in ents])


def test_hand_examples():
    ids = [[1, 2, M, 3, 4], [1, 2, 3], [1, 2, M], [M, 1, 2], [1, 2, M, 3, 4], [1, M, 2]]
    ents = [[1.0, 3.0, 0.5, 0.2, 0.4], [0.1, 0.2, 0.3], [0.5, 1.5, 7.0], [5.0, 1.0, 2.0],
            [1.0, 3.0, 0.5, 0.2, 0.4], [0.2, 9.0, 0.1]]
    texts = ["... #### 42", "#### 7", "#### 7", "#### 7", "#### 41", "no final line"]
    golds = ["42", "7", "7", "7", "42", "5"]
    out = _run(ids, ents, texts, golds)
    # 0: H_think = (1 + 3) / 2 = 2, H_answer = (0.2 + 0.4) / 2 = 0.3, P = 1.7, r = min(1, 1 - 1.7) = -0.7
    # 1: no marker: every token is "think": H_think = 0.2, H_answer = 0, P = 0.2, r = 0.8
    # 2: empty answer phase: H_think = 1.0, H_answer = 0, P = 1.0, r = 0.0
    # 3: marker first: H_think = 0, H_answer = 1.5, P = max(0, -1.5) = 0, r = 1
    # 4: wrong answer: format_score 0;  5: no "####": format_score 0
    assert out.rewards.tolist() == pytest.approx([-0.7, 0.8, 0.0, 1.0, 0.0, 0.0], abs=1e-6)
    assert out.diagnostics["status"] == ["correct"] * 4 + ["incorrect", "no_answer"]
    assert out.diagnostics["has_marker"].tolist() == [True, False, True, True, True, True]
    assert out.diagnostics["h_think"].tolist() == pytest.approx([2.0, 0.2, 1.0, 0.0, 2.0, 0.2], abs=1e-6)
    assert out.diagnostics["h_answer"].tolist() == pytest.approx([0.3, 0.0, 0.0, 1.5, 0.3, 0.1], abs=1e-6)
    assert out.diagnostics["think_tokens"].tolist() == [2, 3, 2, 0, 2, 1]
    assert out.diagnostics["answer_tokens"].tolist() == [2, 0, 0, 2, 2, 1]


def test_alpha_score_format_clip():
    ids, ents = [[1, 2, M, 3, 4]], [[1.0, 3.0, 0.5, 0.2, 0.4]]
    assert _run(ids, ents, ["#### 42"], ["42"], alpha=0.0).rewards.tolist() == pytest.approx([-1.0])
    assert _run(ids, ents, ["#### 42"], ["42"], alpha=-1.0).rewards.tolist() == pytest.approx([-1.3])
    # the caveat: below a wrong answer (format_score 0) unless clipped
    assert _run(ids, ents, ["#### 42"], ["42"], clip_to_format_score=True).rewards.tolist() == [0.0]
    out = _run(ids, ents, ["#### 1"], ["42"], format_score=-0.25)
    assert out.rewards.tolist() == [-0.25]
    out = _run([[1, M]], [[0.1, 0.0]], ["#### 42"], ["42"], score=2.0)  # min(1, 2 - 0.1) = 1
    assert out.rewards.tolist() == [1.0]


def test_multi_token_marker_and_padded_layout():
    rw = PEARReward(think_end_ids=(M, 8))
    ids = torch.tensor([[1, M, 8, 2, 0, 0], [M, 1, M, 8, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    ent = torch.tensor([[0.6, 9.0, 9.0, 0.2, 7.0, 7.0], [1.0, 3.0, 9.0, 9.0, 0.5, 0.5]])
    out = rw(["#### 3", "#### 3"], ["3", "3"], completion_ids=ids, completion_mask=mask, entropy=ent)
    # row 0: think [0.6], answer [0.2] -> P = 0.4. row 1: the lone M at 0 is not the 2-token marker, which
    # starts at index 2: think [1.0, 3.0], answer [0.5, 0.5] -> P = 1.5
    assert out.rewards.tolist() == pytest.approx([0.6, -0.5], abs=1e-6)
    ragged = rw(["#### 3", "#### 3"], ["3", "3"], completion_ids=[[1, M, 8, 2], [M, 1, M, 8, 5, 6]],
                entropy=[ent[0, :4], ent[1]])
    torch.testing.assert_close(ragged.rewards, out.rewards)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_phases_run_the_registered_op(monkeypatch, impl):
    """PEAR finds the marker and averages the phases with the registered ops (docs/ops.md section 6): the C++
    kernels on CPU by default; every implementation gives the same rewards and diagnostics."""
    from reasonrl import _backend as backend

    if backend.unavailable_reason(impl, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(f"impl={impl} is not available here")
    calls = []
    original = backend.kernel_op
    monkeypatch.setattr(backend, "kernel_op", lambda name, i: calls.append((name, i)) or original(name, i))
    monkeypatch.setenv("REASONRL_IMPL", impl)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 12, (n,), generator=gen).tolist() for n in (40, 7, 0, 25, 60)]
    ents = [torch.rand(len(x), generator=gen).tolist() for x in ids]
    texts, golds = ["#### 3"] * 5, ["3"] * 5
    out = _run(ids, ents, texts, golds)
    if impl == "cpp":
        assert ("find_boundary_fwd", "cpp") in calls and ("phase_entropy_fwd", "cpp") in calls
    else:
        assert calls == []
    monkeypatch.setenv("REASONRL_IMPL", "reference")
    ref = _run(ids, ents, texts, golds)
    torch.testing.assert_close(out.rewards, ref.rewards, rtol=0, atol=1e-6)
    for key in ("boundary", "think_tokens", "answer_tokens", "has_marker"):
        assert torch.equal(out.diagnostics[key], ref.diagnostics[key]), key
    for key in ("h_think", "h_answer"):
        torch.testing.assert_close(out.diagnostics[key], ref.diagnostics[key], rtol=1e-6, atol=1e-7)


def test_gsm8k_strict_and_boxed_fallback():
    assert gsm8k_strict_answer("so #### 1,234") == (1234.0, False)
    assert gsm8k_strict_answer("#### -5") == (-5.0, False)
    assert gsm8k_strict_answer("#### 3 then #### 4") == (4.0, False)  # the last one
    assert gsm8k_strict_answer("#### the answer is 4") is None  # strict: the number must follow
    assert gsm8k_strict_answer("\\boxed{12}") is None
    assert gsm8k_strict_answer("\\boxed{12}", boxed_fallback=True) == (12.0, False)
    out = _run([[1, M, 2]], [[0.0, 0.0, 0.0]], ["\\boxed{5}"], ["5"], boxed_fallback=True)
    assert out.rewards.tolist() == [1.0]
    # comparison is exact (relative tolerance 0): 5.0000001 != 5
    assert _run([[1, M, 2]], [[0.0] * 3], ["#### 5.0000001"], ["5"]).diagnostics["status"] == ["incorrect"]
    out = _run([[1, M, 2]], [[0.0] * 3], ["#### 5"], ["n/a"])
    assert math.isnan(out.rewards.item()) and out.diagnostics["status"] == ["bad_gold"]


def test_errors():
    with pytest.raises(ValueError, match="alpha"):
        PEARConfig(alpha=float("nan"))
    with pytest.raises(ValueError, match="think_end_ids"):
        PEARConfig(think_end_ids=())
    with pytest.raises(ValueError, match="temperature"):
        PEARConfig(temperature=0.0)
    rw = PEARReward(think_end_ids=(M,))
    with pytest.raises(ValueError, match="entropy"):
        rw(["#### 1"], ["1"], completion_ids=[[1, 2]], entropy=[torch.zeros(3)])
    with pytest.raises(ValueError, match="entropy="):
        rw(["#### 1"], ["1"], completion_ids=[[1, 2]])
    with pytest.raises(ValueError, match="references"):
        rw(["#### 1"], [], completion_ids=[[1, 2]], entropy=[torch.zeros(2)])
    with pytest.raises(ValueError, match="think_end_ids"):
        PEARReward()(["#### 1"], ["1"], completion_ids=[[1, 2]], entropy=[torch.zeros(2)])


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("prefix_sharing", ["kv_cache", "none"])
def test_model_entropies_match_full_logits(prefix_sharing):
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", 50, dtype=torch.float64)
    prompts = [[3, 4, 5], [3, 4, 5], [7]]
    comps = [[1, 2, M, 3], [4, M], [6, 6, 6, M, 1, 2]]
    rw = PEARReward(think_end_ids=(M,), model=model, temperature=0.7, prefix_sharing=prefix_sharing)
    out = rw(["#### 1"] * 3, ["1"] * 3, completion_ids=comps, prompt_ids=prompts)
    for i, (q, c) in enumerate(zip(prompts, comps, strict=True)):
        with torch.no_grad():
            logits = model(torch.tensor([q + c])).logits[0, len(q) - 1: len(q) + len(c) - 1] / 0.7
        p = logits.softmax(-1)
        h = -(p * logits.log_softmax(-1)).sum(-1)
        b = c.index(M)
        h_think = h[:b].mean().item() if b else 0.0
        h_ans = h[b + 1:].mean().item() if b + 1 < len(c) else 0.0
        assert out.diagnostics["h_think"][i].item() == pytest.approx(h_think, rel=1e-6)
        assert out.diagnostics["h_answer"][i].item() == pytest.approx(h_ans, rel=1e-6, abs=1e-7)
        assert out.rewards[i].item() == pytest.approx(min(1.0, 1.0 - max(0.0, h_think - h_ans)), rel=1e-5)
