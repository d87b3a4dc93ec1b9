"""Packed sequences (docs/trainer.md section 11): the packed trainer computes what the padded trainer does.

Each case runs one :meth:`Trainer.step` three times on the same scripted rollouts (completions of different
lengths, some truncated) and the same initial weights: packed in fp32, padded in fp32, and padded in float64
(the oracle). The old / reference log-probs, the entropies, the sum of the micro-batch losses, the accumulated
gradients and the parameters after the optimiser step of the packed run must meet the fp32 rule of
docs/ops.md section 8 (reasonrl/testing.py): err(packed vs oracle) <= 2 x err(padded fp32 vs oracle) + atol.
A packed run that let one sequence attend to another, shifted a label, or dropped a token would be off by
far more than rounding (``test_cross_attention_is_caught`` shows the check sees it).
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from reasonrl.testing import assert_param_grad_close, assert_stat_close, ulp
from reasonrl.trainer import ConfigError, Rollouts, Trainer, load_config
from reasonrl.trainer.packing import (
    block_diagonal_causal_mask,
    decoder_inputs,
    pack_rows,
    pack_sequences,
    packed_hidden_states,
    row_layout,
    token_budget_slices,
)

MAX_NEW = 24


class ScriptedBackend:
    """Deterministic rollouts: random tokens, lengths 1..MAX_NEW (so the packed segments all differ), EOS at
    the end of the completions that stopped; the rest truncated at MAX_NEW."""

    def __init__(self, vocab: int, eos: int, seed: int = 0):
        self.vocab, self.eos, self.rng = vocab, eos, random.Random(seed)

    def sync_weights(self, model):
        pass

    def generate(self, prompt_ids, params):
        out, trunc = [], []
        for _ in range(len(prompt_ids) * params.num_samples):
            n = self.rng.randint(1, params.max_new_tokens)
            ids = [self.rng.randrange(3, self.vocab) for _ in range(n)]
            stopped = n < params.max_new_tokens
            if stopped:
                ids[-1] = self.eos
            out.append(ids)
            trunc.append(not stopped)
        return Rollouts(out, trunc)


def _length_reward(completions, completion_ids, **kwargs):
    """A deterministic reward with a spread inside every group (the advantages are not all zero)."""
    return torch.tensor([(len(c) % 7) / 7.0 for c in completion_ids])


def _tiny_model(kind: str, tok):
    import transformers

    torch.manual_seed(1234)
    common = dict(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    # Qwen2: tied embeddings and q/k/v biases.
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True, **common))


# Ways to split the batch: the DRO preset (Dr. GRPO loss, KL to the reference) with the same row
# micro-batches in both layouts; and a globally normalised loss (dapo) where the packed run uses token-budget
# micro-batches of unequal sizes and the padded run the whole batch in one call.
SPLITS = {
    "rows": dict(
        preset="dro",
        common=["loss.beta=0.01", "optim.micro_batch_size=4"],
        packed=[],
        padded=[],
    ),
    # The full-logits path (loss_impl=logits) packed the same way: [N, V] logits with cu_seqlens.
    "logits": dict(
        preset="grpo",
        common=["loss_impl=logits", "loss.loss_type=grpo", "loss.beta=0.0", "optim.micro_batch_size=8"],
        packed=[],
        padded=[],
    ),
    "tokens": dict(
        preset="grpo",
        common=["loss.loss_type=dapo", "loss.beta=0.0"],
        # ... each packed into ONE row (packing_row_tokens above the budget): the [1, N] layout.
        packed=["optim.micro_batch_tokens=120", "packing_row_tokens=4096"],
        padded=["optim.micro_batch_size=0"],
    ),
}


@functools.cache
def _tokenizer():
    from reasonrl.trainer.trainer import load_model_and_tokenizer

    return load_model_and_tokenizer("embedded")[1]


@functools.cache
def _run(kind: str, split: str, packing: bool, dtype: str, out_dir: str) -> dict:
    """One trainer step; returns the record, the accumulated gradients, the parameters before and after."""
    tok = _tokenizer()
    model = _tiny_model(kind, tok)
    if dtype == "float64":
        model = model.double()
    s = SPLITS[split]
    overrides = [
        "steps=1",
        "prompts_per_step=2",
        "rollout.group_size=8",
        f"rollout.max_new_tokens={MAX_NEW}",
        "rollout.mask_truncated_completions=true",
        "eval.size=2",
        "optim.lr=1e-3",
        "optim.max_grad_norm=0",
        f"log.out_dir={out_dir}",
        "log.progress=false",
        "log.plot=false",
        "log.tensorboard=off",
        f"packing={'true' if packing else 'false'}",
        *s["common"],
        *(s["packed"] if packing else s["padded"]),
    ]
    cfg = load_config(preset=s["preset"], overrides=overrides)
    trainer = Trainer(
        cfg,
        model=model,
        tokenizer=tok,
        rewards=[("length", _length_reward, 1.0)],
        backend=ScriptedBackend(len(tok), tok.eos_token_id),
    )
    grads: dict = {}

    applied = {}

    def hook(optimizer, args, kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})
        applied["lr"] = optimizer.param_groups[0]["lr"]  # the scheduler's value for this step

    trainer.optimizer.register_step_pre_hook(hook)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = trainer.last_record
    return dict(trainer=trainer, rec=rec, grads=grads, before=before, after=after, lr=applied["lr"])


def _three(kind, split, tmp_path_factory):
    d = str(tmp_path_factory.getbasetemp() / f"packing-{kind}-{split}")
    return (
        _run(kind, split, True, "float32", d + "-packed"),
        _run(kind, split, False, "float32", d + "-padded"),
        _run(kind, split, False, "float64", d + "-oracle"),
    )


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_logprobs_loss_and_gradients_match_padded(kind, split, tmp_path_factory):
    packed, padded, oracle = _three(kind, split, tmp_path_factory)
    rp, rd, ro = packed["rec"], padded["rec"], oracle["rec"]
    # Same rollouts and the same padded record layout in the three runs.
    assert rp.completion_ids == rd.completion_ids == ro.completion_ids
    assert torch.equal(rp.input_ids, rd.input_ids) and torch.equal(rp.loss_mask, rd.loss_mask)
    assert len({len(c) for c in rp.completion_ids}) > 4, "the rollouts should have many different lengths"
    valid = rd.labels != -100  # every completion token (the log-probs are computed for all of them)
    f32 = torch.float32
    assert_stat_close(
        rp.old_logprobs, ro.old_logprobs, rd.old_logprobs, dtype=f32, name="old_logprobs", valid=valid
    )
    assert_stat_close(rp.entropies, ro.entropies, rd.entropies, dtype=f32, name="entropies", valid=valid)
    # Outside the completion tokens both layouts report 0 (nothing is computed there).
    assert not bool(rp.old_logprobs[~valid].any()) and not bool(rp.entropies[~valid].any())
    if split == "rows":
        assert rp.ref_logprobs is not None
        assert_stat_close(
            rp.ref_logprobs, ro.ref_logprobs, rd.ref_logprobs, dtype=f32, name="ref_logprobs", valid=valid
        )
    # The step's loss: the sum of its micro-batch losses (one optimiser step here).
    losses = [torch.tensor([sum(r.micro_losses[0])], dtype=torch.float64) for r in (rp, ro, rd)]
    assert_stat_close(losses[0], losses[1], losses[2], dtype=f32, name="loss")
    if split == "tokens":  # the token budget split the batch into unequal micro-batches
        sizes = [len(m) for m in packed["trainer"]._micro_slices(range(len(rp.completion_ids)))]
        assert len(sizes) > 2 and len(set(sizes)) > 1, sizes
        assert len(rp.micro_losses[0]) == len(sizes) and len(rd.micro_losses[0]) == 1
    for name, g in padded["grads"].items():
        assert_param_grad_close(
            packed["grads"][name], oracle["grads"][name], g, dtype=f32, name=f"grad {name}"
        )


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_step_parameters_match_padded(kind, tmp_path_factory):
    """The parameters after one AdamW step, within the fp32 rule carried through the step.

    AdamW's first step moves a parameter by u(g) = lr g / (|g| + eps) (bias-corrected moments m = g,
    v = g^2; weight decay 0 here), a monotone function of its gradient g. The gradients meet the rule
    (err <= delta = 2 x err(padded fp32) + atol, tested above), so each parameter may differ from the oracle's
    by at most max |u(g_oracle +- delta) - u(g_oracle)|, plus the fp32 rounding of the update and of the
    parameter. Where
    |g| >> eps this is far below lr (the step saturates), so a wrong or missing update fails; near g = 0
    Adam amplifies rounding (u'(0) = lr / eps) and the bound says by how much.
    """
    packed, padded, oracle = _three(kind, "rows", tmp_path_factory)
    group = oracle["trainer"].optimizer.param_groups[0]
    lr, eps = oracle["lr"], group["eps"]
    assert group["weight_decay"] == 0.0 and lr > 0
    moved = 0.0
    for name, p0 in oracle["before"].items():
        assert torch.equal(packed["before"][name].double(), p0)  # the same initial weights
        g_o, g_d = oracle["grads"][name], padded["grads"][name].double()
        delta = 2 * float((g_d - g_o).abs().max()) + 1e-6 * float(g_o.abs().max())

        def u(g):
            return lr * g / (g.abs() + eps)

        allowed = torch.maximum((u(g_o + delta) - u(g_o)).abs(), (u(g_o - delta) - u(g_o)).abs())
        # + the fp32 arithmetic of the update itself (about 8 roundings of 2^-24 relative: the moments, the
        # bias corrections, sqrt, + eps, the division, x lr) and of the parameter (2 ulps).
        allowed = allowed + 8 * 2.0**-24 * u(g_o).abs() + 2 * ulp(oracle["after"][name], torch.float32)
        err = (packed["after"][name].double() - oracle["after"][name]).abs()
        worst = int((err - allowed).argmax())
        assert bool((err <= allowed).all()), (
            f"parameter {name} after the step: |packed - oracle| = {float(err.flatten()[worst]):.3e} > "
            f"allowed {float(allowed.flatten()[worst]):.3e} at flat index {worst} (oracle gradient "
            f"{float(g_o.flatten()[worst]):.3e}, delta {delta:.3e}, lr {lr:g}, eps {eps:g})"
        )
        moved = max(moved, float((packed["after"][name].double() - p0).abs().max()))
    assert moved > 0.5 * lr  # the step did move the parameters


def test_cross_attention_is_caught():
    """Without the block-diagonal mask (a plain causal mask over the packed row) the hidden states of every
    segment but the first change by far more than the fp32 rule allows: the comparison above can fail."""
    tok = _tokenizer()
    model = _tiny_model("llama", tok).eval()
    lengths = [7, 3, 11, 5]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, len(tok), (n,), generator=g)
    batch = pack_rows(ids, lengths, range(len(lengths)))
    from reasonrl.models import hidden_states_and_lm_head

    with torch.no_grad():
        mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
        padded, _, _ = hidden_states_and_lm_head(model, ids, mask.long())
        good, _, _ = packed_hidden_states(model, batch)
        leaky, _, _ = hidden_states_and_lm_head(model, batch.input_ids, None)  # positions 0..N-1, causal
    want = padded[batch.row, batch.col]
    assert float((good - want).abs().max()) < 1e-5
    first = lengths[0]
    assert float((leaky[0, first:] - want[first:]).abs().max()) > 1e-2


def test_pack_rows_layout():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    b = pack_rows(ids, [3, 2, 4], range(1, 3))
    assert b.input_ids.tolist() == [[8, 9, 1, 2, 3, 4]]
    assert b.position_ids.tolist() == [[0, 1, 0, 1, 2, 3]]
    assert b.cu_seqlens.tolist() == [0, 2, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.max_length == 4 and b.num_tokens == 6
    labels = torch.tensor([[6, 7, -100], [9, -100, -100], [2, 3, 4]])
    y = b.gather(labels, -100)
    assert y.tolist() == [9, -100, 2, 3, 4, -100]  # each segment's last row has no next token
    back = b.scatter(y.float(), 3)  # the inverse on the label positions; 0 elsewhere
    assert back.tolist() == [[9.0, 0.0, 0.0], [2.0, 3.0, 4.0]]
    with pytest.raises(ValueError, match="row length"):
        pack_rows(ids, [3, 0, 4], range(3))


def test_block_diagonal_mask_and_decoder_inputs():
    seg = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, -1, -2]])
    m = block_diagonal_causal_mask(seg)
    assert m.shape == (2, 1, 5, 5)
    expect0 = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m[0, 0], expect0)
    # Empty slots (negative ids) attend only to themselves; no token attends to them.
    assert m[1, 0, 3].tolist() == [False, False, False, True, False] and not bool(m[1, 0, :3, 3:].any())
    add = block_diagonal_causal_mask(seg, dtype=torch.float32)
    assert torch.equal(add == 0, m) and float(add.min()) == torch.finfo(torch.float32).min

    tok = _tokenizer()
    model = _tiny_model("llama", tok)
    batch = pack_rows(torch.tensor([[3, 4, 5], [6, 7, 0], [8, 0, 0]]), [3, 2, 1], range(3))
    model.config._attn_implementation = "flash_attention_2"  # only the inputs are built here, nothing runs
    ids, kw, src = decoder_inputs(model, batch)
    assert ids.tolist() == [[3, 4, 5, 6, 7, 8]] and src is None and kw["attention_mask"] is None
    assert kw["max_length_q"] == kw["max_length_k"] == 3 and kw["position_ids"].tolist() == [
        [0, 1, 2, 0, 1, 0]
    ]
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and kw["cu_seq_lens_k"] is batch.cu_seqlens
    model.config._attn_implementation = "eager"
    ids, kw, src = decoder_inputs(model, batch)  # rows of width 3: [3 4 5] and [6 7 8]
    assert ids.tolist() == [[3, 4, 5], [6, 7, 8]] and kw["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert kw["attention_mask"].dtype == torch.float32 and kw["attention_mask"].shape == (2, 1, 3, 3)
    assert torch.equal(ids.reshape(-1)[src], batch.input_ids[0])


def test_row_layout_first_fit_decreasing():
    lengths = [5, 2, 6, 3, 1, 3]
    ids = torch.zeros(len(lengths), 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + 10 * i
    batch = pack_rows(ids, lengths, range(len(lengths)))
    lay = row_layout(batch, 7)
    assert lay.input_ids.shape == (3, 7)  # [6, 1], [5, 2], [3, 3] and one empty slot
    flat = lay.input_ids.reshape(-1)
    assert torch.equal(flat[lay.src], batch.input_ids[0])
    assert lay.fill == 20 / 21 and int((lay.segments < 0).sum()) == 1
    seg = lay.segments.reshape(-1)
    assert sorted(seg[seg >= 0].tolist()) == sorted(i for i, n in enumerate(lengths) for _ in range(n))
    assert len(set(seg[seg < 0].tolist())) == int((seg < 0).sum())  # every empty slot its own segment
    with pytest.raises(ValueError, match="longest segment"):
        row_layout(batch, 5)


def test_token_budget_slices():
    lengths = [5, 5, 5, 12, 1, 1, 3]
    assert token_budget_slices(range(7), lengths, 10) == [range(0, 2), range(2, 3), range(3, 4), range(4, 7)]
    assert token_budget_slices(range(2, 5), lengths, 100) == [range(2, 5)]
    assert token_budget_slices(range(0, 0), lengths, 10) == []
    with pytest.raises(ValueError, match="budget"):
        token_budget_slices(range(3), lengths, 0)


def test_config_checks(tmp_path):
    base = [f"log.out_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="needs packing=true"):
        load_config(preset="grpo", overrides=base + ["optim.micro_batch_tokens=64", "loss.loss_type=dapo"])
    # Dr. GRPO divides by the local micro-batch size: unequal token-budget micro-batches would not add up.
    with pytest.raises(ConfigError, match="dr_grpo"):
        load_config(preset="dro", overrides=base + ["packing=true", "optim.micro_batch_tokens=64"])
    with pytest.raises(ConfigError, match="entropy bonus"):
        load_config(
            preset="grpo",
            overrides=base
            + ["packing=true", "optim.micro_batch_tokens=64", "loss.loss_type=dapo"]
            + ["loss.entropy_coef=0.01"],
        )
    ok = load_config(
        preset="dro",
        overrides=base
        + ["packing=true", "optim.micro_batch_tokens=64", "loss.loss_agg_mode=seq-mean-token-sum-norm"],
    )
    assert ok.packing and ok.optim.micro_batch_tokens == 64
    with pytest.raises(ConfigError, match="packing_attention"):
        load_config(overrides=base + ["packing_attention=flash"])


def test_flash_attention_refused_without_flash(tmp_path):
    """packing_attention=flash_attention_2 on a CPU fp32 model is a clear error, not a silent fallback."""
    tok = _tokenizer()
    cfg = load_config(
        preset="grpo",
        overrides=[f"log.out_dir={tmp_path}", "packing=true", "packing_attention=flash_attention_2"],
    )
    with pytest.raises(ValueError, match="flash-attn"):
        Trainer(
            cfg,
            model=_tiny_model("llama", tok),
            tokenizer=tok,
            rewards=[("length", _length_reward, 1.0)],
            backend=ScriptedBackend(len(tok), tok.eos_token_id),
            dataset=[{"prompt": "1 + 1", "reference": "2"}],
        )


def test_r3_scoring_packed_has_no_padding(monkeypatch):
    """R3's scoring engine in packed mode: one decoder call on the bin-packed rows, only the scored positions
    reach the lm_head, and the log-probs equal the padded path's."""
    from reasonrl.rewards import _scoring

    tok = _tokenizer()
    model = _tiny_model("qwen2", tok).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (6, 11)]
    conts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (4, 9, 1, 13, 7)]
    owner, first = [0, 0, 1, 1, 1], [1, 3, 0, 5, 2]
    seen, lm_rows = [], []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    real = _scoring.linear_token_logprobs

    def watch(hidden, *args, **kwargs):
        lm_rows.append(hidden.shape[0])
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(_scoring, "linear_token_logprobs", watch)
    try:
        with _scoring.scoring_mode(model):
            packed = _scoring.score_rows(model, prompts, conts, owner, first, prefix_sharing="packed")
            seen_packed, rows_packed = list(seen), list(lm_rows)
            padded = _scoring.score_rows(model, prompts, conts, owner, first, prefix_sharing="none")
    finally:
        hook.remove()
    seqs = [prompts[o] + c for o, c in zip(owner, conts, strict=True)]
    layout = row_layout(pack_sequences(seqs, "cpu"), max(len(x) for x in seqs))
    # One decoder call on the bin-packed rows: fewer slots than the padded [5, 24] layout.
    assert seen_packed == [tuple(layout.input_ids.shape)] and layout.input_ids.numel() < 5 * 24
    assert rows_packed == [sum(len(c) - s for c, s in zip(conts, first, strict=True))]
    for a, b in zip(packed, padded, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_packing_packs_r3_unless_set():
    from reasonrl.trainer import RewardSpec
    from reasonrl.trainer.packing import reward_specs_for_packing

    specs = [RewardSpec("r3"), RewardSpec("r3", options={"prefix_sharing": "none"}), RewardSpec("task")]
    packed = reward_specs_for_packing(specs)
    assert [s.options.get("prefix_sharing") for s in packed] == ["packed", "none", None]
    assert specs[0].options == {}  # the config's specs are not modified
