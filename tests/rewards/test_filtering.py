"""R3 data filtering (docs/rewards.md 2.5): hand-made statistics that say which prompts stay (too hard, no
valid trace, too easy), the carry-over reproducible under a seed and deduplicated, and a full round on a tiny
Llama whose ranks and log-probs equal a slow full-logits computation."""

from __future__ import annotations

import math

import pytest
import torch

from reasonrl.rewards import R3Config, R3FilterConfig, r3_filter_round, r3_filter_select
from reasonrl.rewards.filtering import PromptFilterStats, prompt_filter_stats


def _trace_ranks(worst_two):
    """Ranks of a 10-token reference whose two largest ranks are ``worst_two``."""
    return [1, 2, 1, 3, 1, 1, 2, 1] + list(worst_two)


def test_prompt_stats_by_hand():
    cfg = R3FilterConfig(rank_fraction=0.2)  # n_worst = ceil(0.2 * 10) = 2
    ranks = torch.tensor([_trace_ranks((70, 90)), _trace_ranks((30, 40))])
    lp = torch.tensor([[-1.0] * 10, [-1.0] * 9 + [-3.0]])
    st = prompt_filter_stats(lp, ranks, cfg)
    assert st.num_valid == 2
    assert st.min_rank_score == 35.0   # min(mean(70, 90), mean(30, 40))
    assert st.max_sigma == pytest.approx(1.0)  # population std of (-1, -3)
    one = prompt_filter_stats(lp[:1], ranks[:1], cfg)
    assert one.max_sigma == 0.0 and one.min_rank_score == 80.0
    assert prompt_filter_stats(torch.zeros(0, 10), torch.zeros(0, 10), cfg).decision == "no_valid_trace"
    # rank_fraction 0.1 of 10 tokens -> the single worst rank
    assert prompt_filter_stats(lp, ranks, R3FilterConfig()).min_rank_score == 40.0


def test_selection_stages():
    pool = [f"p{i}" for i in range(7)]
    stats = [
        PromptFilterStats(4, 12.0, 0.9),       # kept (high sigma)
        PromptFilterStats(4, 51.0, 2.0),       # too hard: min D above the cutoff 50
        PromptFilterStats(0, math.inf, 0.0),   # no valid trace
        PromptFilterStats(4, 50.0, 0.5),       # exactly at the cutoff: kept by stage 1
        PromptFilterStats(4, 3.0, 0.1),        # low sigma: too easy
        PromptFilterStats(1, 3.0, 0.0),        # one valid trace, sigma 0: too easy
        PromptFilterStats(4, 7.0, 0.5),        # ties with p3 on sigma
    ]
    out = r3_filter_select(pool, stats, R3FilterConfig(sigma_drop_fraction=0.4))
    # 5 survivors of stage 1 (p0, p3, p4, p5, p6); floor(0.4 * 5) = 2 lowest sigma dropped: p5 (0.0), p4 (0.1)
    assert out.kept == ["p0", "p3", "p6"]
    assert [s.decision for s in out.stats] == ["kept", "too_hard", "no_valid_trace", "kept", "too_easy",
                                               "too_easy", "kept"]
    # default 20%: floor(0.2 * 5) = 1 dropped (the lowest sigma, p5)
    stats2 = [PromptFilterStats(s.num_valid, s.min_rank_score, s.max_sigma) for s in stats]
    assert r3_filter_select(pool, stats2, R3FilterConfig()).kept == ["p0", "p3", "p4", "p6"]
    # ties on sigma at the cut: the later pool item is dropped first (stable order)
    tie = [PromptFilterStats(2, 1.0, 0.5) for _ in range(3)]
    assert r3_filter_select(["a", "b", "c"], tie, R3FilterConfig(sigma_drop_fraction=0.34)).kept == ["a", "b"]


def test_carry_over_seeded_and_deduplicated():
    pool = ["new0", "new1", "old3"]
    stats = [PromptFilterStats(2, 1.0, 1.0 + i) for i in range(3)]
    previous = [f"old{i}" for i in range(40)]
    cfg = R3FilterConfig(sigma_drop_fraction=0.0, carry_over_fraction=0.1, seed=3)
    runs = [r3_filter_select(pool, [PromptFilterStats(s.num_valid, s.min_rank_score, s.max_sigma)
                                    for s in stats], cfg, previous_train_set=previous) for _ in range(2)]
    assert runs[0].kept == runs[1].kept  # reproducible
    assert runs[0].survivors == pool
    carried = runs[0].carried
    assert len(set(carried)) == len(carried) and set(carried) <= set(previous)
    assert "old3" not in carried  # already kept: never duplicated
    # floor(0.1 * 40) = 4 drawn; one fewer carried if the draw hit old3
    assert len(carried) in (3, 4)
    draws = {tuple(r3_filter_select(pool, [PromptFilterStats(2, 1.0, 1.0) for _ in range(3)],
                                    R3FilterConfig(sigma_drop_fraction=0.0, seed=s),
                                    previous_train_set=previous).carried) for s in range(6)}
    assert len(draws) > 1  # the seed drives the draw
    assert r3_filter_select(pool, stats, cfg, previous_train_set=None).carried == []


def test_config_errors():
    with pytest.raises(ValueError, match="rank_fraction"):
        R3FilterConfig(rank_fraction=0.0)
    with pytest.raises(ValueError, match="sigma_drop_fraction"):
        R3FilterConfig(sigma_drop_fraction=1.0)
    with pytest.raises(ValueError, match="interval_steps"):
        R3FilterConfig(interval="steps")
    assert R3FilterConfig(interval="steps", interval_steps=5).due(step=10, epoch_start=False)
    assert R3FilterConfig().due(step=3, epoch_start=True)


transformers = pytest.importorskip("transformers")


def test_full_round_on_tiny_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).double()
    marker, sep = 39, (38,)
    pool = [{"prompt": [3, 4, 5], "reference": [6, 7, 8, 9]},
            {"prompt": [10, 11], "reference": [12]},
            {"prompt": [13], "reference": [14, 15]}]
    traces = {3: [[20, 21, marker, 1], [22, marker], [23, 24, 25, marker]],
              10: [[26, marker], [27, 28, marker, 2], [29, marker]],
              13: [[1, 2], [3, 4], [5, 6]]}  # no marker: no valid trace

    def sample_fn(prompts, n):
        assert n == 3
        return [traces[p[0]] for p in prompts]

    fcfg = R3FilterConfig(num_samples=3, rank_cutoff=20, sigma_drop_fraction=0.0)
    r3cfg = R3Config(think_end_ids=(marker,), answer_prefix_ids=sep)
    out = r3_filter_round(pool, model=model, sample_fn=sample_fn, config=fcfg, r3_config=r3cfg)
    for item, st in zip(pool, out.stats, strict=True):
        q, y = item["prompt"], item["reference"]
        lps, rks = [], []
        for c in traces[q[0]]:
            if marker not in c:
                continue
            c = c[: c.index(marker) + 1]
            seq = torch.tensor([q + c + list(sep) + y])
            with torch.no_grad():
                logits = model(seq).logits[0]
            pos = torch.arange(len(q) + len(c) + len(sep) - 1, seq.shape[1] - 1)
            lab = torch.tensor(y)
            x = logits[pos]
            lps.append(x.log_softmax(-1)[torch.arange(len(y)), lab])
            rks.append(1 + (x > x[torch.arange(len(y)), lab][:, None]).sum(-1))
        if not lps:
            assert st.decision == "no_valid_trace"
            continue
        ref = prompt_filter_stats(torch.stack(lps), torch.stack(rks), fcfg)
        assert st.num_valid == ref.num_valid
        assert st.min_rank_score == ref.min_rank_score
        assert st.max_sigma == pytest.approx(ref.max_sigma, rel=1e-6, abs=1e-9)
        assert st.decision == ("kept" if ref.min_rank_score <= 20 else "too_hard")
    assert out.kept == [item for item, st in zip(pool, out.stats, strict=True) if st.decision == "kept"]
