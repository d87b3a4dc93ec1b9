"""Parity of reasonrl's TRL drop-in with TRL 1.16's own GRPOTrainer (docs/integrations-trl.md).

A tiny random Qwen2 or Llama is trained for 2 optimizer steps on CPU, from the same weights, seed and data:

* TRL's own path in float64 (the oracle; TRL's chunked head folds its logits in fp32, so the oracle carries
  fp32 rounding of the per-token statistics, far below the tolerance);
* TRL's own path in float32;
* reasonrl's drop-in in float32 (``reasonrl.integrations.trl.GRPOTrainer``, or ``patch()`` on a TRL trainer).

Losses, every logged metric and every parameter gradient of both steps obey the relative-error rule of
reasonrl/testing.py: err(drop-in) <= 2 x err(TRL fp32) + atol, errors against the float64 oracle.

The grid is chosen on purpose: every ``loss_type`` TRL 1.16 offers once (alternating the two model families),
then the features that change the loss path: KL with bias correction (and TRL's reference model), the static
and adaptive entropy bonus, the top-entropy mask, the off-policy mask, the two-sided delta clip, GSPO's
sequence level, gradient accumulation, ``mask_truncated_completions`` and the vLLM importance-sampling
correction (token and sequence, truncate and mask; TRL only applies it with vLLM, so a test mixin injects
sampler log-probs and TRL's own ratio, and switches ``use_vllm`` on around the loss of both trainers).
``steps_per_generation=2`` makes the second step off-policy (old log-probs from the generation pass, a ratio
!= 1, clipping).
"""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    TrainerCallback,
)

from reasonrl import testing as rtesting  # noqa: E402
from reasonrl.integrations import trl as rtrl  # noqa: E402
from reasonrl.testing import tolerance, word_tokenizer  # noqa: E402

VOCAB = 48  # small: the EOS token (id 2) ends ~20% of the 10-token completions, so lengths and masks vary
MAX_COMPLETION = 10
PROMPTS = ["t5 t6 t7", "t8 t9", "t10 t11 t12 t13", "t3 t4"]
# Metrics that are timings or schedule values, not results.
_NOT_COMPARED = (
    "step_time",
    "epoch",
    "learning_rate",
    "step",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "total_flos",
)


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over tokens "t0" ... "t{vocab-1}" (no download): t0 unk, t1 pad, t2 eos."""
    return word_tokenizer([f"t{i}" for i in range(vocab)], unk="t0", pad="t1", eos="t2")


def tiny_config(family: str):
    # Qwen2 with tied embeddings (the lm_head weight is the input embedding), Llama untied.
    return rtesting.tiny_config(family, VOCAB, layers=1, heads=2, kv_heads=1, tie=family == "qwen2",
                                pad_token_id=1, eos_token_id=2, bos_token_id=None)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """One saved random model per family (a path, so that TRL can build its reference model from it)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    dirs = {}
    for family, cls in (("qwen2", Qwen2ForCausalLM), ("llama", LlamaForCausalLM)):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(family)
        cls(tiny_config(family)).save_pretrained(path)
        dirs[family] = str(path)
    return dirs


def parity_reward(completion_ids, **kwargs):
    """Share of even token ids: varies within every group, so advantages are non-zero."""
    return [sum(1 for t in ids if t % 2 == 0) / max(1, len(ids)) for ids in completion_ids]


class _GradCapture(TrainerCallback):
    """Every parameter gradient just before each optimizer step (after accumulation)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(
            {
                n: p.grad.detach().to(torch.float64).clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        )


class _FakeVLLM:
    """Test mixin: sampler log-probs as if vLLM had generated (old log-probs + noise, one NaN token as vLLM
    reports for tokens it cannot score), and TRL's importance-sampling ratio computed with TRL's own formula
    (GRPOTrainer._generate_and_score_completions); ``use_vllm`` is on only inside the loss."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        old = out["old_per_token_logps"]
        g = torch.Generator().manual_seed(11)
        samp = old + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64).to(old.dtype)
        samp[0, 0] = float("nan")
        mask = out["completion_mask"]
        diff = torch.nan_to_num((old - samp) * mask, nan=0.0)
        mode = self.vllm_importance_sampling_mode
        log_ratio = diff.sum(dim=-1, keepdim=True) if mode.startswith("sequence") else diff
        ratio = torch.exp(log_ratio)
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if mode.endswith("truncate"):
            ratio = torch.clamp(ratio, min=lo, max=hi)
        else:
            bad = (ratio < (-math.inf if lo is None else lo)) | (ratio > (math.inf if hi is None else hi))
            ratio = ratio.masked_fill(bad, 0.0)
        out["sampling_per_token_logps"] = samp
        out["importance_sampling_ratio"] = ratio
        return out

    def _compute_loss(self, model, inputs):
        self.use_vllm = True
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self.use_vllm = False


class _TRLFakeVLLM(_FakeVLLM, trl.GRPOTrainer):
    pass


class _OursFakeVLLM(_FakeVLLM, rtrl.GRPOTrainer):
    pass


def _args(out_dir: str, **overrides):
    kw = dict(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=MAX_COMPLETION,
        max_steps=2,
        steps_per_generation=2,
        learning_rate=1.0,
        optim="sgd",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=7,
        max_grad_norm=0.0,
        use_cpu=True,
        bf16=False,
        epsilon=0.05,
        disable_dropout=True,
    )
    kw.update(overrides)
    return trl.GRPOConfig(**kw)


def _run(
    path, *, impl: str, dtype: torch.dtype, tmp_path, overrides: dict, fake_vllm: bool, peft_config=None
):
    """Train 2 steps; returns (log_history without the final summary, per-step gradients)."""
    vllm_args = {}
    if fake_vllm:  # only read by the injected ratio and by the loss; generation stays transformers'
        vllm_args = dict(vllm_importance_sampling_correction=True)
    args = _args(str(tmp_path / f"{impl}-{dtype}"), **vllm_args, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    capture = _GradCapture()
    kwargs = dict(
        model=model,
        reward_funcs=parity_reward,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tiny_tokenizer(),
        callbacks=[capture],
        peft_config=peft_config,
    )
    if impl == "trl":
        trainer = (_TRLFakeVLLM if fake_vllm else trl.GRPOTrainer)(**kwargs)
    elif impl == "reasonrl":
        trainer = (_OursFakeVLLM if fake_vllm else rtrl.GRPOTrainer)(**kwargs)
    else:  # "patch": a TRL trainer switched in place (the drop-in's overrides go in front of the instance's
        # class, so the test mixin, which must wrap the loss, is not combined with it)
        assert not fake_vllm
        trainer = rtrl.patch(trl.GRPOTrainer(**kwargs))
        assert isinstance(trainer, rtrl._ReasonRLGRPOMixin)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "train_runtime" not in h]
    assert len(logs) == args.max_steps and len(capture.steps) == args.max_steps
    return logs, capture.steps


def _assert_rule(actual: float, oracle: float, trl32: float, *, atol: float, name: str) -> None:
    err, err_ref = abs(actual - oracle), abs(trl32 - oracle)
    bound = 2.0 * err_ref + atol
    assert err <= bound, (
        f"{name}: drop-in {actual!r} vs oracle {oracle!r} (TRL fp32 {trl32!r}): "
        f"err {err:.3g} > 2 x {err_ref:.3g} + {atol:.3g}"
    )


def _compare(oracle, trl32, ours) -> None:
    (log64, grads64), (log32, grads32), (log_r, grads_r) = oracle, trl32, ours
    stat = tolerance("stat", torch.float32).atol_scale
    for step, (h64, h32, hr) in enumerate(zip(log64, log32, log_r, strict=True)):
        keys = set(h64) - set(_NOT_COMPARED)
        assert keys == set(hr) - set(_NOT_COMPARED), (
            f"step {step}: logged metric names differ: {sorted(keys ^ (set(hr) - set(_NOT_COMPARED)))}"
        )
        for key in sorted(keys):
            if h64[key] is None or hr[key] is None:
                assert h64[key] is None and hr[key] is None, f"step {step} {key}: {h64[key]} vs {hr[key]}"
                continue
            _assert_rule(
                hr[key], h64[key], h32[key], atol=stat * (1 + abs(h64[key])), name=f"step {step} {key}"
            )
    atol_g = tolerance("grad_param", torch.float32).atol_scale
    for step, (g64, g32, gr) in enumerate(zip(grads64, grads32, grads_r, strict=True)):
        assert set(g64) == set(gr)
        # The atol's magnitude is the tensor's own, floored at 1e-3 of the step's largest parameter gradient:
        # a parameter whose gradient nearly cancels (k_proj.bias: only RoPE keeps q . b from being constant
        # across keys) still carries the rounding of the large terms that cancel, so its own max |g| (here
        # 1e-4 to 7e-4 of the largest) understates the fp32 noise of any implementation.
        scale = max(g.abs().max().item() for g in g64.values())
        for name, oracle_g in g64.items():
            err = (gr[name] - oracle_g).abs().max().item()
            err_ref = (g32[name] - oracle_g).abs().max().item()
            bound = 2.0 * err_ref + atol_g * max(oracle_g.abs().max().item(), 1e-3 * scale)
            assert err <= bound, f"step {step} grad {name}: err {err:.3g} > 2 x {err_ref:.3g} + atol"


# (id, model family, GRPOConfig overrides, fake vLLM IS correction, entry point of the drop-in)
CASES = [
    ("grpo", "qwen2", dict(loss_type="grpo"), False, "reasonrl"),
    ("bnpo", "llama", dict(loss_type="bnpo"), False, "patch"),
    ("dr_grpo", "qwen2", dict(loss_type="dr_grpo"), False, "reasonrl"),
    ("dapo-kl", "llama", dict(loss_type="dapo", beta=0.05, epsilon_high=0.08), False, "reasonrl"),
    ("cispo", "qwen2", dict(loss_type="cispo", epsilon_high=1.02), False, "patch"),
    ("sapo", "llama", dict(loss_type="sapo"), False, "reasonrl"),
    ("luspo-seq", "qwen2", dict(loss_type="luspo", importance_sampling_level="sequence"), False, "reasonrl"),
    (
        "vespo-is-token-truncate",
        "llama",
        dict(
            loss_type="vespo",
            vllm_importance_sampling_mode="token_truncate",
            vllm_importance_sampling_clip_max=1.2,
        ),
        True,
        "reasonrl",
    ),
    (
        "grpo-features-is-seq-mask",
        "qwen2",
        dict(
            loss_type="grpo",
            beta=0.02,
            entropy_coef=0.05,
            top_entropy_quantile=0.5,
            off_policy_mask_threshold=0.05,
            delta=1.5,
            vllm_importance_sampling_mode="sequence_mask",
            vllm_importance_sampling_clip_max=3.0,
        ),
        True,
        "reasonrl",
    ),
    (
        "dapo-adaptive-entropy-ga2",
        "llama",
        dict(
            loss_type="dapo",
            entropy_coef=0.01,
            use_adaptive_entropy=True,
            entropy_target=10.0,
            entropy_coef_delta=0.02,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            mask_truncated_completions=True,
            max_steps=2,
        ),
        False,
        "reasonrl",
    ),
    (
        "gspo-is-token-mask",
        "llama",
        dict(
            loss_type="grpo",
            importance_sampling_level="sequence",
            vllm_importance_sampling_mode="token_mask",
            vllm_importance_sampling_clip_min=0.7,
            vllm_importance_sampling_clip_max=1.4,
            top_entropy_quantile=0.8,
        ),
        True,
        "reasonrl",
    ),
]


@pytest.mark.parametrize(
    "family,overrides,fake_vllm,entry", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_trl_parity(model_dirs, tmp_path, family, overrides, fake_vllm, entry):
    path = model_dirs[family]
    common = dict(tmp_path=tmp_path, overrides=overrides, fake_vllm=fake_vllm)
    oracle = _run(path, impl="trl", dtype=torch.float64, **common)
    trl32 = _run(path, impl="trl", dtype=torch.float32, **common)
    ours = _run(path, impl=entry, dtype=torch.float32, **common)
    _compare(oracle, trl32, ours)


def test_trl_parity_lora(model_dirs, tmp_path):
    """LoRA on the attention projections (TRL's reference pass disables the adapter): same parity rule."""
    peft = pytest.importorskip("peft", reason="peft is not installed: the LoRA parity needs it")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    common = dict(
        tmp_path=tmp_path, overrides=dict(loss_type="dapo", beta=0.05), fake_vllm=False, peft_config=cfg
    )
    path = model_dirs["qwen2"]
    oracle = _run(path, impl="trl", dtype=torch.float64, **common)
    trl32 = _run(path, impl="trl", dtype=torch.float32, **common)
    ours = _run(path, impl="reasonrl", dtype=torch.float32, **common)
    _compare(oracle, trl32, ours)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_lora_lm_head_operands_exact(dropout):
    """LoRA on the lm_head (which TRL refuses): the folded operands reproduce the adapter layer's output and
    gradients (A, B, base bias, hidden) exactly, dropout included (same RNG state), with two adapters."""
    peft = pytest.importorskip("peft", reason="peft is not installed")

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(16, 40, bias=True, dtype=torch.float64)

        def forward(self, x):
            return self.lm_head(x)

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["lm_head"], lora_dropout=dropout, lora_bias=True)
    model = peft.get_peft_model(Head(), cfg)
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"]))
    layer = model.base_model.model.lm_head
    layer.set_adapter(["default", "second"])
    for p in layer.parameters():  # LoRA B starts at zero: make the adapters do something
        torch.nn.init.normal_(p) if p.requires_grad else None
    model.train()
    x = torch.randn(5, 7, 16, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 7, 40, dtype=torch.float64)

    def grads(fn):
        torch.manual_seed(3)
        out = fn()
        params = [x] + [p for p in layer.parameters() if p.requires_grad]
        return out.detach(), torch.autograd.grad((out * up).sum(), params)

    want, want_g = grads(lambda: layer(x))

    def folded():
        h, w, b = rtrl._head_operands(layer, x)
        assert w.shape == (40, 16 + 3 + 2)
        return h @ w.T + b

    got, got_g = grads(folded)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with layer.disable_adapter() if hasattr(layer, "disable_adapter") else model.disable_adapter():
        h, w, b = rtrl._head_operands(layer, x)
        assert h is x and w is layer.base_layer.weight


def test_lora_on_lm_head_trains(model_dirs, tmp_path):
    """The drop-in accepts a LoRA adapter on the lm_head (TRL raises) and trains it: the adapter's B matrix
    gets a gradient and changes; the loss and metrics are finite."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="lm_head"):
        _run(
            model_dirs["llama"],
            impl="trl",
            dtype=torch.float32,
            tmp_path=tmp_path,
            overrides={},
            fake_vllm=False,
            peft_config=cfg,
        )
    logs, grads = _run(
        model_dirs["llama"],
        impl="reasonrl",
        dtype=torch.float32,
        tmp_path=tmp_path,
        overrides=dict(loss_type="dapo", beta=0.05),
        fake_vllm=False,
        peft_config=cfg,
    )
    head_b = [n for n in grads[0] if "lm_head" in n and "lora_B" in n]
    assert head_b and all(grads[s][n].abs().max() > 0 for s in range(2) for n in head_b)
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["kl"]) for h in logs)


def test_unsupported_models_raise(model_dirs, tmp_path):
    """A model whose logits are soft-capped is refused at construction, naming the attribute."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        rtrl.GRPOTrainer(
            model=model,
            reward_funcs=parity_reward,
            args=_args(str(tmp_path)),
            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=tiny_tokenizer(),
        )


def test_patch_rejects_other_objects():
    with pytest.raises(TypeError, match="trl.GRPOTrainer"):
        rtrl.patch(object())
