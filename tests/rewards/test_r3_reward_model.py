"""R3Reward (docs/rewards.md section 2) on tiny random Llama and Qwen2 models built from configs (no
downloads): equal to a slow per-sequence computation with the model's plain forward (full logits, log_softmax,
gather) for every reward-policy option, prefix sharing on and off, baseline, propagation and truncation; the
model's parameters, training flags and RNG state are left unchanged; invalid rollouts and why."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from reasonrl.reference import r3_reward_reference
from reasonrl.rewards import R3Config, R3Reward
from reasonrl.testing import tiny_causal_lm

transformers = pytest.importorskip("transformers")

V = 61
M = 60            # </think>
SEP = (58, 59)    # answer prefix "\n\n"
MASKED = (57, M)  # "<think></think>"
EOS = 1


def tiny(kind: str, dtype=torch.float64, max_pos=128):
    return tiny_causal_lm(kind, V, seed=0 if kind == "llama" else 1, dtype=dtype, max_positions=max_pos)


def batch():
    """Three prompts (K = 4, 3, 3 via group_ids), ragged prompts / traces / references; rollouts without the
    marker (invalid) and with trailing EOS after the answer."""
    gen = torch.Generator().manual_seed(7)

    def toks(k):
        return torch.randint(2, 56, (k,), generator=gen).tolist()

    q = [toks(5), toks(9), toks(1)]
    y = [toks(4), toks(1), toks(6)]
    rows = []  # (group, completion ids)
    for g, (k, lens) in enumerate([(4, [3, 8, 5, 6]), (3, [2, 4, 7]), (3, [6, 1, 9])]):
        for i in range(k):
            c = toks(lens[i]) + [M] + toks(2 + i) + ([EOS, EOS] if i % 2 else [])
            rows.append((g, c))
    rows[2] = (0, [5, 6, 7, 8])           # no marker: invalid
    rows[8] = (2, [9, M, 9, 9, 9, 9, 9])  # very short trace
    gids = [g for g, _ in rows]
    return ([q[g] for g in gids], [c for _, c in rows], [y[g] for g in gids], gids)


def slow_logprobs(model, q, c_trace, y, temperature=1.0, sep=SEP):
    seq = torch.tensor([q + list(c_trace) + list(sep) + y])
    with torch.no_grad():
        logits = model(seq).logits[0].double() / temperature
    lp = logits.log_softmax(-1)
    start = len(q) + len(c_trace) + len(sep)
    pos = torch.arange(start - 1, start - 1 + len(y))
    return lp[pos, torch.tensor(y)]


def slow_r3(model, prompts, comps, refs, gids, cfg: R3Config, max_len=None):
    """Per-sequence forward + the reference op + r_len, all by hand. Returns (rewards, r3, status)."""
    n = len(comps)
    groups = {}
    for r, g in enumerate(gids):
        groups.setdefault(g, []).append(r)
    rewards, r3s, status = [math.nan] * n, [math.nan] * n, ["ok"] * n
    for rows in groups.values():
        q, y = prompts[rows[0]], refs[rows[0]]
        lps, valid = [], []
        for r in rows:
            c = comps[r]
            if M not in c:
                status[r] = "no_marker"
                lps.append(torch.zeros(len(y), dtype=torch.float64))
                valid.append(False)
                continue
            trace = c[: c.index(M) + 1]
            if max_len is not None and len(q) + len(trace) + len(SEP) + len(y) > max_len:
                if cfg.truncation == "cot_left":
                    trace = trace[len(q) + len(trace) + len(SEP) + len(y) - max_len:]
                else:
                    status[r] = "too_long"
                    lps.append(torch.zeros(len(y), dtype=torch.float64))
                    valid.append(False)
                    continue
            lps.append(slow_logprobs(model, q, trace, y, cfg.score_temperature))
            valid.append(True)
        base = None
        if cfg.baseline == "masked_cot":
            base = slow_logprobs(model, q, MASKED, y, cfg.score_temperature)[None].float()
        out = r3_reward_reference(torch.stack(lps)[None].float(), rollout_mask=torch.tensor([valid]),
                                  weighting=cfg.weighting, topk=cfg.topk, reduction=cfg.reduction,
                                  baseline_logprobs=base, propagation_gamma=cfg.gamma)
        for k, r in enumerate(rows):
            if not valid[k]:
                continue
            c = comps[r]
            ans = c[c.index(M) + 1:]
            while ans and ans[-1] == EOS:
                ans = ans[:-1]
            r_len = 1 - cfg.len_penalty_beta * abs(len(y) - len(ans)) / len(y)
            r3s[r] = out.reward[0, k].item()
            rewards[r] = cfg.weight_r3 * r3s[r] + cfg.weight_len * r_len
    return rewards, r3s, status


def _close(a, b, tol=2e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    ok = ~torch.isnan(a)
    assert (a[ok] - b[ok]).abs().max().item() <= tol * (1 + b[ok].abs().max().item()), (a, b)


def make(model, **cfg):
    base = dict(think_end_ids=(M,), answer_prefix_ids=SEP, masked_cot_ids=MASKED, eos_token_id=EOS)
    base.update(cfg)
    return R3Reward(model, config=R3Config(**base))


# Both architectures x both prefix-sharing paths, with the options that change which positions are scored.
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("prefix_sharing", ["kv_cache", "none", "packed"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(weighting="topk", topk=2, baseline="masked_cot", propagation=True, score_temperature=0.8),
    dict(weighting="softmax", reduction="sum", max_batch_tokens=40),  # several micro-batches
], ids=["default", "topk-baseline-propagation", "softmax-sum-microbatch"])
def test_matches_slow_forward(kind, prefix_sharing, options):
    model = tiny(kind)
    prompts, comps, refs, gids = batch()
    rw = make(model, prefix_sharing=prefix_sharing, **options)
    out = rw(prompt_ids=prompts, completion_ids=comps, reference_ids=refs, group_ids=gids)
    rewards, r3s, status = slow_r3(model, prompts, comps, refs, gids, rw.config)
    _close(out.diagnostics["r3"], r3s)
    _close(out.rewards, rewards)
    assert out.diagnostics["status"] == status
    assert out.diagnostics["status"][2] == "no_marker" and math.isnan(out.rewards[2].item())
    assert out.diagnostics["num_valid_rollouts"] == [3, 3, 3]
    for r, lp in enumerate(out.diagnostics["logprobs"]):
        if status[r] == "ok":
            c = comps[r]
            ref = slow_logprobs(model, prompts[r], c[: c.index(M) + 1], refs[r], rw.config.score_temperature)
            torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fp32_model(kind):
    model = tiny(kind, torch.float32)
    prompts, comps, refs, gids = batch()
    out = make(model)(prompt_ids=prompts, completion_ids=comps, reference_ids=refs, group_ids=gids)
    rewards, _, _ = slow_r3(model, prompts, comps, refs, gids, make(model).config)
    _close(out.rewards, rewards, tol=1e-4)


@pytest.mark.parametrize("policy", ["current", "reference", "lagged"])
def test_reward_policies(policy):
    model = tiny("llama")
    initial = copy.deepcopy(model)
    prompts, comps, refs, gids = batch()
    rw = make(model, reward_policy=policy, lag_steps=2)
    with torch.no_grad():  # an optimiser step on the policy
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    call = dict(prompt_ids=prompts, completion_ids=comps, reference_ids=refs, group_ids=gids)
    first = rw(**call).rewards
    expect_model = model if policy == "current" else initial
    _close(first, slow_r3(expect_model, prompts, comps, refs, gids, rw.config)[0])
    rw.step()
    second = rw(**call).rewards
    _close(second, first, tol=0)  # lag 2: one step does not refresh the copy
    rw.step()
    third = rw(**call).rewards
    expect_model = initial if policy == "reference" else model
    _close(third, slow_r3(expect_model, prompts, comps, refs, gids, rw.config)[0])
    if policy != "current":
        assert rw.scoring_model is not model
        assert not any(p.requires_grad for p in rw.scoring_model.parameters())


def test_model_state_untouched():
    model = tiny("qwen2")
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    params = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.grad for p in model.parameters()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    prompts, comps, refs, gids = batch()
    make(model, baseline="masked_cot")(prompt_ids=prompts, completion_ids=comps, reference_ids=refs,
                                       group_ids=gids)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert [p.grad for p in model.parameters()] == grads_before


def test_dropout_model_is_scored_in_eval_mode():
    model = tiny("llama")
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    prompts, comps, refs, gids = batch()
    rw = make(model)
    a = rw(prompt_ids=prompts, completion_ids=comps, reference_ids=refs, group_ids=gids).rewards
    b = rw(prompt_ids=prompts, completion_ids=comps, reference_ids=refs, group_ids=gids).rewards
    _close(a, b, tol=0)
    assert model.training


def test_prefix_is_encoded_once_per_prompt():
    model = tiny("llama")
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].numel()))
    prompts, comps, refs, gids = batch()
    prompts = [p + list(range(2, 42)) for p in prompts]  # long prompts make the difference visible
    try:
        for mode in ("kv_cache", "none"):
            seen.clear()
            make(model, prefix_sharing=mode)(prompt_ids=prompts, completion_ids=comps, reference_ids=refs,
                                             group_ids=gids)
            tokens = sum(seen)
            if mode == "kv_cache":
                shared = tokens
    finally:
        hook.remove()
    # 3 prompts of ~45 tokens once each vs 9 valid rows each re-encoding their prompt
    assert shared < 0.6 * tokens, (shared, tokens)


@pytest.mark.parametrize("truncation", ["invalid", "cot_left"])
def test_truncation_policy(truncation):
    model = tiny("llama")
    prompts, comps, refs, gids = batch()
    max_len = 16
    rw = make(model, max_length=max_len, truncation=truncation)
    out = rw(prompt_ids=prompts, completion_ids=comps, reference_ids=refs, group_ids=gids)
    rewards, r3s, status = slow_r3(model, prompts, comps, refs, gids, rw.config, max_len=max_len)
    assert out.diagnostics["status"] == status
    if truncation == "invalid":
        assert "too_long" in status
    else:
        assert any(out.diagnostics["truncated"]) and "too_long" not in status
    _close(out.rewards, rewards)
    # default max_length = the model's max_position_embeddings
    small = tiny("llama", max_pos=16)
    out = make(small)(prompt_ids=prompts, completion_ids=comps, reference_ids=refs, group_ids=gids)
    assert "too_long" in out.diagnostics["status"]


class CharTokenizer:
    """One token per character (ids 2..), enough to test the text path and the chat template hook."""

    eos_token_id = EOS
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(ch) % 50) for ch in text]}

    def encode(self, text, add_special_tokens=False):
        return self(text)["input_ids"]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_text_inputs_match_ids():
    model = tiny("qwen2")
    tok = CharTokenizer()
    rw = R3Reward(model, tok, think_end="</think>", answer_prefix="\n\n")
    prompts = ["what is x?"] * 3 + [[{"role": "user", "content": "and y?"}]] * 2
    comps = ["<think>so x is 4</think>x = 4", "<think>hmm</think> 4", "no marker", "<think>y</think>5",
             [{"role": "assistant", "content": "<think>yy</think>5"}]]
    refs = ["x = 4"] * 3 + ["y = 5"] * 2
    out = rw(prompts, comps, refs)
    assert out.diagnostics["status"] == ["ok", "ok", "no_marker", "ok", "ok"]
    assert out.diagnostics["group"] == [0, 0, 0, 1, 1]
    q0 = tok.encode("what is x?")
    ids = dict(prompt_ids=[q0] * 3 + [tok.encode("<user>and y?<assistant>")] * 2,
               completion_ids=[tok.encode(c if isinstance(c, str) else c[0]["content"]) for c in comps],
               reference_ids=[tok.encode(r) for r in refs])
    rw_ids = R3Reward(model, tok, think_end_ids=tuple(tok.encode("</think>")), answer_prefix="\n\n")
    _close(out.rewards, rw_ids(**ids).rewards, tol=1e-6)
    assert out.diagnostics["answer_tokens"][:2] == [5, 2]


def test_separator_is_not_counted_in_the_outcome_length():
    """r_len compares |y| with the sampled outcome after the separator (docs/rewards.md 2.1, 2.2): a
    completion that writes "</think>" + "\n\n" + y exactly has r_len = 1, for token ids and for text."""
    model = tiny("qwen2")
    tok = CharTokenizer()
    rw = R3Reward(model, tok, think_end="</think>", answer_prefix="\n\n")
    comps = ["<think>so x is 4</think>\n\nx = 4", "<think>hmm</think>x = 4", "<think>a</think>\n\nx = 44"]
    out = rw(["what is x?"] * 3, comps, ["x = 4"] * 3)
    assert out.diagnostics["answer_tokens"] == [5, 5, 6]
    assert out.diagnostics["r_len"][:2].tolist() == [1.0, 1.0]
    ids = dict(prompt_ids=[tok.encode("what is x?")] * 3, completion_ids=[tok.encode(c) for c in comps],
               reference_ids=[tok.encode("x = 4")] * 3)
    rw_ids = R3Reward(model, tok, think_end_ids=tuple(tok.encode("</think>")), answer_prefix="\n\n")
    assert rw_ids(**ids).diagnostics["answer_tokens"] == [5, 5, 6]


def test_errors_and_degenerate_groups():
    model = tiny("llama")
    with pytest.raises(ValueError, match="weighting"):
        R3Config(weighting="sigmoid")
    with pytest.raises(ValueError, match="reward_policy"):
        R3Config(reward_policy="synced")
    with pytest.raises(ValueError, match="len_penalty_beta"):
        R3Config(len_penalty_beta=-1)
    with pytest.raises(ValueError, match="think_end_ids"):
        R3Config(think_end_ids=(-1,))
    with pytest.raises(ValueError, match="truncation"):
        R3Config(truncation="right")
    rw = make(model)
    with pytest.raises(ValueError, match="tokenizer"):
        rw(["text prompt"], [[1, M]], reference_ids=[[3]])
    with pytest.raises(ValueError, match="different"):
        rw(prompt_ids=[[3], [4]], completion_ids=[[M], [M]], reference_ids=[[5], [5]], group_size=2)
    with pytest.raises(ValueError, match="completion_ids"):
        rw(prompt_ids=[[3], [3]], completion_ids=[[M]], reference_ids=[[5], [5]])
    # an empty reference and a group where every rollout lacks the marker: NaN, never an exception
    out = rw(prompt_ids=[[3], [3], [4], [4]], completion_ids=[[M, 7], [7, M], [7], [8]],
             reference_ids=[[], [], [5], [5]], group_size=2)
    assert out.diagnostics["status"] == ["empty_reference"] * 2 + ["no_marker"] * 2
    assert torch.isnan(out.rewards).all()
    # one valid rollout: sigma = 0, uniform weights, finite reward
    out = rw(prompt_ids=[[3], [3]], completion_ids=[[M, 7], [7]], reference_ids=[[5, 6], [5, 6]],
             group_size=2)
    assert math.isfinite(out.rewards[0].item()) and math.isnan(out.rewards[1].item())
    assert out.diagnostics["sigma"][0].tolist() == [0.0, 0.0]
    assert out.diagnostics["weights"][0].tolist() == [0.5, 0.5]
