"""Tests of the reference policy loss (reasonrl/reference/policy_loss.py; docs/losses.md sections 3-12).

(a) TRL parity. The installed TRL's own ``GRPOTrainer._compute_loss`` (and through it its
    ``get_off_policy_mask``, ``get_high_entropy_mask`` and ``get_gamma_weights``) runs on a stand-in trainer
    whose model call returns our per-token log-probs and entropies; loss, gradients (log-probs and entropies)
    and logged metrics are compared in float64. Only the vLLM importance-sampling ratio and its metrics, which
    live in ``_generate_and_score_completions`` (not callable without a generation backend), are transcribed.
    Targets TRL 1.16.x; skipped, with the reason, for other versions.
(b) verl parity: verl 0.9.x's registered policy losses, ``agg_loss``, ``kl_penalty``, the rollout-correction
    weights and the engine worker's ``ppo_loss`` (fed verl's own no-padding layout, which is reasonrl's
    packed layout). verl needs ray, tensordict and omegaconf to import; skipped, with the reason, otherwise.
(c) Spec identities and edge cases: delta vs dual clip (section 7), the gradient table of section 7 for both
    advantage signs, ratios exactly at every clamp bound (section 6), the equivalences of section 10.5, fully
    masked sequences and batches, padded vs packed layouts, config validation and presets.
"""

from __future__ import annotations

import dataclasses
import math
import types
import warnings
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from reasonrl.losses import (
    AdaptiveEntropyController,
    Extreme,
    ISCorrection,
    LossNormalizers,
    PolicyLoss,
    PolicyLossConfig,
    Sum,
    policy_loss,
    rollout_is_weights,
    top_entropy_mask,
)

F64 = torch.float64
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
ALL_LOSS_TYPES = (*TRL_LOSS_TYPES, "reinforce")
CLIP_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")
RTOL = 1e-9  # float64 against float64: only summation order differs
ATOL = 1e-12


def close(actual, expected, name: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    __tracebackhide__ = True
    actual = torch.as_tensor(actual, dtype=F64)
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Batch:
    """Padded float64 inputs [B, T]; values at masked positions are finite garbage that must not matter."""

    lp: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor
    samp: torch.Tensor
    H: torch.Tensor
    A: torch.Tensor  # [B] or [B, T]
    mask: torch.Tensor  # bool
    lengths: torch.Tensor  # completion length of each row (holes inside are masked tool tokens)


def make_batch(seed: int = 0, *, per_token_adv: bool = False, lengths=(8, 5, 0, 3, 7, 6), width: int = 8,
               nan_sample: bool = True) -> Batch:
    """Six sequences of up to 8 tokens: one full, one empty (n_i = 0), masked tool tokens inside completions,
    ratios spread across the clip bounds (old = lp + 0.35 N(0, 1)), advantages of both signs, and one
    valid token the inference engine could not score (NaN sampling log-prob)."""
    g = torch.Generator().manual_seed(seed)
    num_seqs = len(lengths)
    lengths = torch.tensor(lengths)
    mask = torch.arange(width) < lengths[:, None]
    mask &= torch.rand(num_seqs, width, generator=g) >= 0.15
    mask[0, 0] = True

    def normal(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    lp = -3 * torch.rand(num_seqs, width, generator=g, dtype=F64)
    old = lp + 0.35 * normal(num_seqs, width)
    ref = lp + 0.3 * normal(num_seqs, width)
    samp = old + 0.2 * normal(num_seqs, width)
    # fp32-representable entropies: TRL takes the top-entropy quantile in fp32.
    H = (3 * torch.rand(num_seqs, width, generator=g)).to(F64)
    A = normal(num_seqs, width) if per_token_adv else normal(num_seqs)
    A[0], A[1] = A[0].abs() + 0.1, -A[1].abs() - 0.1
    for t in (lp, old, ref, samp, H):
        t[~mask] = 0.5
    if nan_sample:
        row = next(r for r in (3, 4, 0) if mask[r].any())
        samp[row, int(mask[row].nonzero()[0])] = float("nan")
    return Batch(lp, old, ref, samp, H, A, mask, lengths)


def _cfg(kwargs) -> PolicyLossConfig:
    """A config whose TRL-style warnings are not the point of the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PolicyLossConfig(**kwargs)


def run_ours(cfg: PolicyLossConfig, b: Batch, *, old: bool = True, samp: bool = False, is_weights=None,
             normalizers: LossNormalizers | None = None, entropy_coef=None):
    """policy_loss on the padded batch: (loss, grad wrt lp, grad wrt H, LossOutput)."""
    lp = b.lp.clone().requires_grad_(True)
    H = b.H.clone().requires_grad_(True)
    out = policy_loss(lp, advantages=b.A, mask=b.mask, old_logprobs=b.old if old else None,
                      ref_logprobs=b.ref, sampling_logprobs=b.samp if samp else None, is_weights=is_weights,
                      entropies=H,
                      normalizers=normalizers or LossNormalizers(), config=cfg, entropy_coef=entropy_coef,
                      return_per_token=True)
    g_lp, g_h = torch.autograd.grad(out.loss, [lp, H], allow_unused=True)
    return out.loss.detach(), _zeros_if_none(g_lp, lp), _zeros_if_none(g_h, H), out


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def seq_fraction_extreme(pairs, op):
    """TRL's clip_ratio/low_min and high_max: nanmin / nanmax of the per-sequence fractions."""
    frac = pairs.sum / pairs.count
    frac = frac[pairs.count > 0]
    return frac.min() if op == "min" else frac.max()


# ----------------------------------------------------------------------------------------------------------
# (a) TRL parity
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl():
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    if not trl.__version__.startswith("1.16."):
        pytest.skip(f"TRL parity targets TRL 1.16.x (docs/losses.md); installed {trl.__version__}")
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    return SimpleNamespace(GRPOConfig=trl.GRPOConfig, GRPOTrainer=grpo_trainer.GRPOTrainer)


@pytest.fixture(scope="module")
def grpo_config(trl, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trl"))

    def make(**kwargs):
        with warnings.catch_warnings():  # transformers / TRL deprecation notices
            warnings.simplefilter("ignore")
            return trl.GRPOConfig(output_dir=out, report_to=[], bf16=False, use_cpu=True, **kwargs)

    return make


class _OneProcess:
    """The accelerate.Accelerator surface that GRPOTrainer._compute_loss uses, for one process; the number
    of processes is a free parameter (it only divides num_items_in_batch)."""

    sync_gradients = True

    def __init__(self, num_processes: int = 1):
        self.num_processes = num_processes

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    def gather(self, tensor):
        return tensor.reshape(1) if tensor.dim() == 0 else tensor

    def reduce(self, tensor, reduction="sum"):
        return tensor


def trl_vllm_is_ratio(old, samp, mask, mode, clip_min, clip_max):
    """TRL 1.16.0 trl/trainer/grpo_trainer.py lines 2660-2707 (_generate_and_score_completions), transcribed:
    the vLLM importance-sampling ratio, (B, T) for token modes and (B, 1) for sequence modes."""
    per_token_logps_diff = (old - samp) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    if mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


def trl_sampling_metrics(old, samp, mask, ratio, mode):
    """TRL 1.16.0 grpo_trainer.py lines 2860-2887, transcribed (one process)."""
    mask = mask.bool()
    delta = torch.abs(old - samp)
    delta = delta[mask & ~torch.isnan(delta)]
    flat = ratio.flatten() if mode.startswith("sequence") else ratio[mask]
    return {"logp_diff_mean": delta.mean(), "logp_diff_max": delta.max(), "is_min": flat.min(),
            "is_mean": flat.mean(), "is_max": flat.max()}


def run_trl(trl, args, b: Batch, *, old: bool = True, samp: bool = False, ga: int = 1, training: bool = True,
            num_processes: int = 1, num_items=None):
    """TRL's GRPOTrainer._compute_loss on the batch: (loss, grad wrt lp, grad wrt H, logged metrics)."""
    lp = b.lp.clone().requires_grad_(True)
    H = b.H.clone().requires_grad_(True)
    trainer = trl_stand_in(trl, args, ga=ga, training=training, num_processes=num_processes)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (lp, H, None)
    loss = trl.GRPOTrainer._compute_loss(trainer, None,
                                         trl_inputs(args, b, old=old, samp=samp, num_items=num_items))
    g_lp, g_h = torch.autograd.grad(loss, [lp, H], allow_unused=True)
    logged = {k: v[-1] for k, v in trainer._metrics["train" if training else "eval"].items()}
    return loss.detach(), _zeros_if_none(g_lp, lp), _zeros_if_none(g_h, H), logged


def trl_stand_in(trl, args, *, ga: int = 1, training: bool = True, num_processes: int = 1):
    """The attributes GRPOTrainer.__init__ derives from args (TRL 1.16.0 grpo_trainer.py lines 782-983), on
    a stand-in object that GRPOTrainer._compute_loss runs on; the model call is set per batch."""
    Trainer = trl.GRPOTrainer
    trainer = SimpleNamespace(
        args=args, loss_type=args.loss_type, beta=args.beta,
        importance_sampling_level=args.importance_sampling_level, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        use_vllm=args.use_vllm, vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        max_completion_length=args.max_completion_length, entropy_coef=args.entropy_coef,
        use_adaptive_entropy=False, _entropy_bonus_enabled=args.entropy_coef != 0.0, aux_loss_enabled=False,
        current_gradient_accumulation_steps=ga, model=SimpleNamespace(training=training),
        accelerator=_OneProcess(num_processes),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_off_policy_mask=Trainer.get_off_policy_mask, get_gamma_weights=Trainer.get_gamma_weights,
    )
    trainer.get_high_entropy_mask = types.MethodType(Trainer.get_high_entropy_mask, trainer)
    return trainer


def trl_inputs(args, b: Batch, *, old: bool = True, samp: bool = False, num_items=None) -> dict:
    """The inputs dict _compute_loss reads, built from a Batch."""
    num_seqs, width = b.lp.shape
    inputs = {
        "prompt_ids": torch.zeros(num_seqs, 1, dtype=torch.long),
        "prompt_mask": torch.ones(num_seqs, 1, dtype=torch.long),
        "completion_ids": torch.zeros(num_seqs, width, dtype=torch.long),
        "completion_mask": b.mask.long(),
        "advantages": b.A,
        "num_items_in_batch": torch.as_tensor(b.mask.sum() if num_items is None else num_items, dtype=F64),
        "ref_per_token_logps": b.ref,
    }
    if old:
        inputs["old_per_token_logps"] = b.old
    if samp:
        inputs["sampling_per_token_logps"] = b.samp
    if args.use_vllm and args.vllm_importance_sampling_correction:
        inputs["importance_sampling_ratio"] = trl_vllm_is_ratio(
            b.old, b.samp, b.mask.long(), args.vllm_importance_sampling_mode,
            args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max)
    return inputs


def compare_trl(trl_result, ours_result, cfg: PolicyLossConfig, *, ga: int = 1,
                training: bool = True) -> None:
    __tracebackhide__ = True
    loss_t, g_lp_t, g_h_t, logged = trl_result
    loss_o, g_lp_o, g_h_o, out = ours_result
    # TRL builds SAPO's temperatures as float32 tensors (tau_neg = 1.05 rounds by 5e-8, docs/losses.md 7).
    rtol = 1e-6 if cfg.loss_type == "sapo" else RTOL
    close(loss_o, loss_t, "loss", rtol)
    close(g_lp_o, g_lp_t, "grad logprobs", rtol)
    close(g_h_o, g_h_t, "grad entropies", rtol)
    m = out.metrics
    expected = {"entropy": m.entropy.mean()}
    if cfg.beta != 0:
        expected["kl"] = m.kl.mean()
    if cfg.loss_type in CLIP_FAMILY:
        expected.update({
            "clip_ratio/low_mean": m.clip_low.mean(), "clip_ratio/high_mean": m.clip_high.mean(),
            "clip_ratio/region_mean": m.clip_region.mean(),
            "clip_ratio/low_min": seq_fraction_extreme(m.clip_low_per_seq, "min"),
            "clip_ratio/high_max": seq_fraction_extreme(m.clip_high_per_seq, "max"),
        })
    elif cfg.loss_type == "cispo":
        expected["cispo_clip_ratio"] = m.cispo_clip.mean()
    elif cfg.loss_type == "vespo":
        expected["vespo/phi_seq_mean"] = m.vespo_phi.mean()
    if cfg.entropy_coef != 0:
        # TRL logs its policy loss before the 1/GA division for these types (docs/losses.md 12).
        scale = ga if training and cfg.loss_type in ("grpo", "bnpo", "dr_grpo", "sapo", "luspo") else 1
        expected["policy_loss"] = m.policy_loss * scale
    assert set(expected) <= set(logged), f"TRL logged {sorted(logged)}"
    for name, value in expected.items():
        # TRL averages its clip indicators as float32 (``.float()``).
        close(value, logged[name], f"metric {name}", rtol=1e-6, atol=1e-9)


# One feature at a time on an off-policy batch, then all of them together: each is its own branch of
# _compute_loss, and "all" checks the order in which masks, IS ratio, KL and bonus are applied.
TRL_FEATURES = {
    "plain": {},
    "on_policy": {},  # no old_per_token_logps: ratio 1 with the gradient of lp
    "per_token_advantages": {},
    "delta": dict(delta=1.6, epsilon_high=0.28),
    "kl": dict(beta=0.04),
    "kl_no_bias_correction": dict(beta=0.04, use_bias_correction_kl=False),
    "entropy_bonus": dict(entropy_coef=0.01),
    "top_entropy": dict(top_entropy_quantile=0.3, entropy_coef=0.01),
    "off_policy_mask": dict(off_policy_mask_threshold=0.02),
    "vllm_is": dict(use_vllm=True, vllm_importance_sampling_mode="token_truncate"),  # VESPO: token modes only
    "all": dict(delta=1.6, epsilon_high=0.28, beta=0.04, entropy_coef=0.01, top_entropy_quantile=0.3,
                off_policy_mask_threshold=0.02, use_vllm=True, vllm_importance_sampling_mode="token_mask",
                vllm_importance_sampling_clip_min=0.8, vllm_importance_sampling_clip_max=1.25),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("feature", list(TRL_FEATURES))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_trl_parity(trl, grpo_config, loss_type, level, feature):
    args = grpo_config(loss_type=loss_type, importance_sampling_level=level, **TRL_FEATURES[feature])
    cfg = PolicyLossConfig.from_trl(args)
    seed = zlib.crc32(f"{loss_type}-{level}-{feature}".encode()) % 1000  # a different batch per case
    b = make_batch(seed=seed, per_token_adv=feature == "per_token_advantages")
    old = feature != "on_policy"
    samp = cfg.off_policy_mask_threshold is not None or cfg.is_correction is not None
    num_items = b.mask.sum()
    norm = LossNormalizers(num_items_in_batch=num_items)
    compare_trl(run_trl(trl, args, b, old=old, samp=samp, num_items=num_items),
                run_ours(cfg, b, old=old, samp=samp, normalizers=norm), cfg)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_trl_parity_normalizers(trl, grpo_config, loss_type, training):
    """GA = 4, steps_per_generation = 2, two processes: TRL rescales num_items_in_batch to one accumulation
    window in training only (docs/losses.md 10.1); the entropy bonus and policy_loss metric scale with GA."""
    ga, spg, procs, num_items = 4, 2, 2, 37.0
    args = grpo_config(loss_type=loss_type, gradient_accumulation_steps=ga, steps_per_generation=spg,
                       entropy_coef=0.01, beta=0.02)
    cfg = PolicyLossConfig.from_trl(args)
    b = make_batch(seed=7)
    norm = LossNormalizers(num_items_in_batch=num_items * ga / spg if training else num_items,
                           grad_accum_steps=ga, num_processes=procs, training=training)
    compare_trl(run_trl(trl, args, b, ga=ga, training=training, num_processes=procs, num_items=num_items),
                run_ours(cfg, b, normalizers=norm), cfg, ga=ga, training=training)


# Every TRL mode, with open and closed bounds, including bounds that act on these ratios (|old - samp| ~ 0.2
# per token, so sequence ratios reach ~0.5-2).
VLLM_MODES = [
    ("token_truncate", None, 3.0), ("token_truncate", 0.9, 1.1), ("token_mask", 0.8, 1.25),
    ("token_mask", 0.9, None), ("sequence_truncate", None, 1.2), ("sequence_mask", None, 3.0),
    ("sequence_mask", 0.7, 1.5),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("loss_type,mode,clip_min,clip_max", [
    (loss_type, *case) for loss_type in ("dapo", "grpo", "vespo") for case in VLLM_MODES
    if not (loss_type == "vespo" and case[0].startswith("sequence"))  # TRL rejects these (so do we)
])
def test_trl_parity_vllm_importance_sampling(trl, grpo_config, loss_type, mode, clip_min, clip_max):
    args = grpo_config(loss_type=loss_type, use_vllm=True, vllm_importance_sampling_mode=mode,
                       vllm_importance_sampling_clip_min=clip_min, vllm_importance_sampling_clip_max=clip_max)
    cfg = PolicyLossConfig.from_trl(args)
    level, is_mode = mode.split("_")
    assert cfg.is_correction == ISCorrection(level=level, mode=is_mode, c_min=clip_min, c_max=clip_max)
    b = make_batch(seed=11)
    trl_result = run_trl(trl, args, b, samp=True)
    ours = run_ours(cfg, b, samp=True, normalizers=LossNormalizers(num_items_in_batch=b.mask.sum()))
    compare_trl(trl_result, ours, cfg)

    ratio = trl_vllm_is_ratio(b.old, b.samp, b.mask.long(), mode, clip_min, clip_max)
    rho, is_metrics = rollout_is_weights(b.old, b.samp, mask=b.mask, config=cfg.is_correction)
    close(rho, ratio.expand_as(rho), "rollout_is_weights vs TRL's ratio (every position)")
    expected = trl_sampling_metrics(b.old, b.samp, b.mask, ratio, mode)
    m = ours[3].metrics
    for mine, name in [(m.logp_diff_mean.mean(), "logp_diff_mean"), (m.logp_diff_max.value, "logp_diff_max"),
                       (m.is_weight_min.value, "is_min"), (m.is_weight_mean.mean(), "is_mean"),
                       (m.is_weight_max.value, "is_max"), (is_metrics.weight_mean.mean(), "is_mean")]:
        close(mine, expected[name], f"sampling metric {name}")


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.3, 1.0])
def test_trl_high_entropy_mask(trl, rho):
    """top_entropy_mask against TRL's get_high_entropy_mask (one process), including rho = 0 (the maximum
    only) and rho = 1 (everything)."""
    b = make_batch(seed=3)
    stand_in = SimpleNamespace(accelerator=_OneProcess())
    expected = trl.GRPOTrainer.get_high_entropy_mask(stand_in, b.H, b.mask.long(), 1 - rho)
    assert torch.equal(top_entropy_mask(b.H, rho=rho, mask=b.mask), expected)


# ----------------------------------------------------------------------------------------------------------
# (b) verl parity
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verl():
    verl = pytest.importorskip(
        "verl", reason="verl 0.9.x is not importable (pip install --no-deps verl==0.9.1 plus ray, "
                       "tensordict, omegaconf, codetiming)")
    if not verl.__version__.startswith("0.9."):
        pytest.skip(f"verl parity targets verl 0.9.x (docs/losses.md); installed {verl.__version__}")
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights
    from verl.utils import tensordict_utils
    from verl.workers.config import ActorConfig
    from verl.workers.config import PolicyLossConfig as VerlPolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    return SimpleNamespace(core_algos=core_algos, rollout_weights=compute_rollout_correction_weights,
                           tu=tensordict_utils, ActorConfig=ActorConfig,
                           VerlPolicyLossConfig=VerlPolicyLossConfig, ppo_loss=ppo_loss)


def verl_actor(v, loss_mode: str, **kwargs):
    return v.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                         policy_loss=v.VerlPolicyLossConfig(loss_mode=loss_mode), **kwargs)


VERL_MODES = ("vanilla", "gspo", "sapo", "cispo", "gpg")
# verl adds 1e-8 to integer token counts (seq-mean-token-mean, masked_mean): with a bool mask the sum is
# float32 and the 1e-8 vanishes, where reasonrl keeps it (docs/losses.md 10.3): relative differences <= 1e-8.
VERL_RTOL = 1e-7


@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("loss_mode", VERL_MODES)
def test_verl_policy_loss_parity(verl, loss_mode, agg, global_info):
    """Each registered verl policy loss x every loss_agg_mode, with the global batch info of the 0.9.1
    engine (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) or the local fallback;
    precomputed rollout IS weights; pg_loss, its gradient and the pg metrics."""
    b = make_batch(seed=5)
    actor = verl_actor(verl, loss_mode, clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=agg,
                       loss_scale_factor=6 if global_info else None)
    dp, n_glob, s_glob = 1, None, None
    if global_info:
        dp, n_glob, s_glob = 2, int(b.mask.sum()) * 2 + 3, 13
        actor.global_batch_info.update(dp_size=dp, batch_num_tokens=n_glob, global_batch_size=s_glob,
                                       loss_scale_factor=actor.loss_scale_factor)
    a_tok = b.A[:, None].expand_as(b.lp).contiguous()
    rho = 0.5 + torch.rand(b.lp.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    lp = b.lp.clone().requires_grad_(True)
    fn = verl.core_algos.get_policy_loss_fn(loss_mode)
    pg_loss, pg_metrics = fn(old_log_prob=b.old, log_prob=lp, advantages=a_tok, response_mask=b.mask,
                             loss_agg_mode=agg, config=actor, rollout_is_weights=rho * b.mask)
    (g_verl,) = torch.autograd.grad(pg_loss, [lp])

    cfg = PolicyLossConfig.from_verl(actor)
    norm = LossNormalizers(num_items_in_batch=n_glob, global_num_seqs=s_glob, num_processes=dp)
    lp2 = b.lp.clone().requires_grad_(True)
    out = policy_loss(lp2, advantages=a_tok, mask=b.mask, old_logprobs=b.old, is_weights=rho,
                      normalizers=norm, config=cfg)
    (g_ours,) = torch.autograd.grad(out.loss, [lp2])
    close(out.loss, pg_loss, "pg_loss", VERL_RTOL)
    close(g_ours, g_verl, "grad logprobs", VERL_RTOL)
    # verl's masked_mean divides by count + 1e-8.
    for key, mine in [("pg_clipfrac", out.metrics.pg_clipfrac), ("ppo_kl", out.metrics.ppo_kl),
                      ("pg_clipfrac_lower", out.metrics.pg_clipfrac_lower)]:
        if f"actor/{key}" in pg_metrics:
            close(mine.mean(), pg_metrics[f"actor/{key}"], f"metric {key}", VERL_RTOL, atol=1e-9)


# Every loss mode, every aggregation mode and a spread of KL types, each once (a full product would repeat
# the policy-loss test above); both with the engine's global batch info and with the local fallback.
PPO_LOSS_CASES = [
    ("vanilla", "token-mean", "low_var_kl"),
    ("gspo", "seq-mean-token-mean", "k3+"),
    ("sapo", "token-mean", "kl"),
    ("cispo", "seq-mean-token-sum", "mse"),
    ("gpg", "seq-mean-token-sum-norm", "abs+"),
    ("vanilla", "token-sum", "k1+"),
]


@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global"])
@pytest.mark.parametrize("loss_mode,agg,kl_type", PPO_LOSS_CASES)
def test_verl_ppo_loss_parity_packed(verl, loss_mode, agg, kl_type, global_info):
    """verl 0.9.1 workers/utils/losses.ppo_loss (policy loss + entropy bonus + KL loss) on verl's no-padding
    layout: each sequence is prompt + response, the log-prob of response token j sits at row
    prompt_len - 1 + j of its segment. That is reasonrl's packed layout with cu_seqlens over the segments and
    a mask on those rows; both log-prob and entropy gradients are compared."""
    g = torch.Generator().manual_seed(17)
    prompt_len, width = 2, 5
    resp_len = torch.tensor([5, 2, 0, 4])
    num_seqs = len(resp_len)
    in_response = torch.arange(width) < resp_len[:, None]
    response_mask = in_response & (torch.rand(num_seqs, width, generator=g) > 0.2)
    response_mask[0, 0] = True
    seg_len = prompt_len + resp_len
    cu = torch.cat([torch.zeros(1, dtype=torch.long), seg_len.cumsum(0)])
    n_rows = int(cu[-1])
    rows = [(i, j, int(cu[i]) + prompt_len - 1 + j) for i in range(num_seqs) for j in range(int(resp_len[i]))]

    def padded(scale=1.0, shift=0.0):
        return shift + scale * torch.randn(num_seqs, width, generator=g, dtype=F64)

    old, adv, ref, rho = padded(), padded(), padded(), padded(0.2, 1.0).abs()
    lp_packed = torch.randn(n_rows, generator=g, dtype=F64)
    ent_packed = 2 * torch.rand(n_rows, generator=g, dtype=F64)

    def to_packed(x):
        out = torch.zeros(n_rows, dtype=F64)
        for i, j, r in rows:
            out[r] = x[i, j]
        return out

    mask_packed = torch.zeros(n_rows, dtype=torch.bool)
    for i, j, r in rows:
        mask_packed[r] = response_mask[i, j]

    actor = verl_actor(verl, loss_mode, clip_ratio=0.2, clip_ratio_high=0.28, loss_agg_mode=agg,
                       use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type=kl_type, entropy_coeff=0.01,
                       loss_scale_factor=9 if global_info else None)
    info = dict(dp_size=1, batch_num_tokens=None, global_batch_size=None)
    if global_info:
        info = dict(dp_size=2, batch_num_tokens=int(response_mask.sum()) * 2 + 1, global_batch_size=10)
    from tensordict import TensorDict

    data = TensorDict({
        "prompts": torch.zeros(num_seqs, prompt_len, dtype=torch.long),
        "responses": torch.zeros(num_seqs, width, dtype=torch.long),
        "attention_mask": torch.cat([torch.ones(num_seqs, prompt_len, dtype=torch.long),
                                     in_response.long()], dim=1),
        "response_mask": response_mask.long(), "old_log_probs": old, "advantages": adv, "ref_log_prob": ref,
        "rollout_is_weights": rho * response_mask,
    }, batch_size=[num_seqs])
    verl.tu.assign_non_tensor(data, **info)
    lp_v = lp_packed.clone().requires_grad_(True)
    ent_v = ent_packed.clone().requires_grad_(True)
    loss_v, metrics_v = verl.ppo_loss(actor, {"log_probs": lp_v, "entropy": ent_v}, data)
    g_lp_v, g_ent_v = torch.autograd.grad(loss_v, [lp_v, ent_v])

    cfg = PolicyLossConfig.from_verl(actor)
    norm = LossNormalizers(num_items_in_batch=info["batch_num_tokens"],
                           global_num_seqs=info["global_batch_size"], num_processes=info["dp_size"],
                           padded_length=width)
    lp_o = lp_packed.clone().requires_grad_(True)
    ent_o = ent_packed.clone().requires_grad_(True)
    out = policy_loss(lp_o, cu_seqlens=cu.to(torch.int32), mask=mask_packed, advantages=to_packed(adv),
                      old_logprobs=to_packed(old), ref_logprobs=to_packed(ref), is_weights=to_packed(rho),
                      entropies=ent_o, normalizers=norm, config=cfg)
    g_lp_o, g_ent_o = torch.autograd.grad(out.loss, [lp_o, ent_o])
    close(out.loss, loss_v, "loss", VERL_RTOL)
    close(g_lp_o, g_lp_v, "grad logprobs", VERL_RTOL)
    close(g_ent_o, g_ent_v, "grad entropies", VERL_RTOL)
    m = out.metrics

    def value(key):
        return metrics_v[key].values[0]

    close(m.policy_loss - cfg.beta * m.kl_agg, value("actor/pg_loss"), "pg_loss", VERL_RTOL)
    close(m.kl_agg, value("kl_loss"), "kl_loss", VERL_RTOL)
    close(m.entropy_agg, value("actor/entropy_loss"), "entropy_loss", VERL_RTOL)


@pytest.mark.parametrize("kl_type", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "kl+", "k1+", "abs+",
                                     "mse+", "k2+", "k3+", "low_var_kl+"])
def test_verl_kl_penalty_parity(verl, kl_type):
    """Every verl kl_loss_type through from_verl's mapping; |ref - lp| up to 25 exercises the +-20 input and
    +-10 output clamps of low_var_kl."""
    g = torch.Generator().manual_seed(2)
    lp = (-3 * torch.rand(40, generator=g, dtype=F64)).requires_grad_(True)
    ref = lp.detach() + torch.linspace(-25, 25, 40, dtype=F64)
    kld = verl.core_algos.kl_penalty(lp, ref, kl_type)
    (g_verl,) = torch.autograd.grad(kld.sum(), [lp])

    est = PolicyLossConfig.from_verl({"kl_loss_type": kl_type}).kl_estimator
    # reinforce with A = 0 has no policy term; token-sum makes the loss sum(kappa).
    cfg = PolicyLossConfig(loss_type="reinforce", beta=1.0, kl_estimator=est, kl_bias_correction=False,
                           loss_agg_mode="token-sum")
    lp2 = lp.detach().clone().requires_grad_(True)
    out = policy_loss(lp2[None], advantages=torch.zeros(1, dtype=F64), ref_logprobs=ref[None],
                      normalizers=LossNormalizers(), config=cfg)
    (g_ours,) = torch.autograd.grad(out.loss, [lp2])
    close(out.loss, kld.sum(), "sum of kappa")
    close(g_ours, g_verl, "grad")


@pytest.mark.parametrize("batch_normalize", [False, True])
@pytest.mark.parametrize("threshold", [2.0, "1.1", "0.6_1.4"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_verl_rollout_is_weights_parity(verl, level, threshold, batch_normalize):
    """rollout_correction -> ISCorrection (from_verl) -> rollout_is_weights against verl's
    compute_rollout_correction_weights (TIS for a float / float string, IcePop for "lower_upper"), on valid
    tokens (verl has no NaN handling, so every token is scored here)."""
    b = make_batch(seed=9, nan_sample=False)
    rc = {"rollout_is": level, "rollout_is_threshold": threshold,
          "rollout_is_batch_normalize": batch_normalize}
    ic = PolicyLossConfig.from_verl({}, rollout_correction=rc).is_correction
    expected, _ = verl.rollout_weights(b.old - b.samp, b.mask.to(F64), rollout_is=level,
                                       rollout_is_threshold=threshold,
                                       rollout_is_batch_normalize=batch_normalize)
    rho, _ = rollout_is_weights(b.old, b.samp, mask=b.mask, config=ic)
    close(rho[b.mask], expected[b.mask], "rho on valid tokens", VERL_RTOL)


# ----------------------------------------------------------------------------------------------------------
# (c) Spec identities
# ----------------------------------------------------------------------------------------------------------

W_GRID = (0.3, 0.75, 0.95, 1.0, 1.1, 1.25, 1.4, 2.5, 3.5, 6.0)  # across 1 - eps_l, 1 + eps_h and K = 3
A_GRID = (-1.3, -0.2, 0.0, 0.4, 1.7)  # both advantage signs and zero


def grid_inputs():
    """One sequence whose tokens cover W_GRID x A_GRID (old = 0, lp = log w), per-token advantages."""
    w = torch.tensor(W_GRID, dtype=F64).repeat_interleave(len(A_GRID))
    adv = torch.tensor(A_GRID, dtype=F64).repeat(len(W_GRID))
    return torch.log(w)[None], torch.zeros(1, w.numel(), dtype=F64), adv[None]


def token_grad(cfg: PolicyLossConfig, lp, old, adv, **kwargs):
    """Per-token loss and d(sum of per-token loss)/d lp under token-sum aggregation (coefficient 1)."""
    cfg = dataclasses.replace(cfg, loss_agg_mode="token-sum")
    lp = lp.clone().requires_grad_(True)
    out = policy_loss(lp, advantages=adv, old_logprobs=old, normalizers=LossNormalizers(), config=cfg,
                      return_per_token=True, **kwargs)
    (g,) = torch.autograd.grad(out.loss, [lp])
    return out.per_token_loss.detach(), g, out


def test_delta_cap_equals_dual_clip_on_grid():
    """Section 7: with K > 1 + eps_h, TRL's delta = K and verl's dual clip C = K give the same loss and the
    same gradient, -A * min(max(w, clip(w)), K) for A < 0 and the plain clipped loss for A >= 0."""
    lp, old, adv = grid_inputs()
    base = PolicyLossConfig(epsilon_high=0.28)
    loss_d, g_d, _ = token_grad(dataclasses.replace(base, delta=3.0), lp, old, adv)
    loss_c, g_c, _ = token_grad(dataclasses.replace(base, dual_clip=True, dual_clip_c=3.0), lp, old, adv)
    close(loss_d, loss_c, "delta vs dual clip: loss", rtol=0, atol=0)
    close(g_d, g_c, "delta vs dual clip: gradient", rtol=0, atol=0)
    w, a = lp.exp(), adv
    clipped = w.clamp(0.8, 1.28)
    expected = torch.where(a < 0, -a * torch.maximum(w, clipped).clamp(max=3.0),
                           -torch.minimum(w * a, clipped * a))
    close(loss_d, expected, "closed form")


def test_gradient_table_both_advantage_signs():
    """Section 7, third column, at token level on a grid of ratios x advantages of both signs (no point
    exactly on a bound; those are test_gradient_at_clip_boundaries)."""
    lp, old, adv = grid_inputs()
    w, a = lp.exp(), adv
    lo, hi, K, R = 0.8, 1.28, 3.0, 1.5

    def u(delta=None, dual=None):
        blocked = ((a > 0) & (w > hi)) | ((a < 0) & (w < lo))
        if delta is not None:
            blocked |= ((a > 0) & (w > delta)) | ((a < 0) & (w > delta))
        if dual is not None:
            blocked |= (a < 0) & (w > dual)
        return (~blocked).to(F64)

    s_pos, s_neg = torch.sigmoid(1.0 * (w - 1)), torch.sigmoid(1.05 * (w - 1))
    s = torch.where(a > 0, s_pos, s_neg)
    cases = {
        "dapo": (PolicyLossConfig(epsilon_high=0.28), -a * w * u()),
        "dapo+delta": (PolicyLossConfig(epsilon_high=0.28, delta=K), -a * w * u(delta=K)),
        "dapo+dual_clip": (PolicyLossConfig(epsilon_high=0.28, dual_clip=True, dual_clip_c=K),
                           -a * w * u(dual=K)),
        "cispo upper": (PolicyLossConfig(loss_type="cispo", cispo_ratio_max=R), -w.clamp(max=R) * a),
        "cispo two_sided": (PolicyLossConfig(loss_type="cispo", cispo_mode="two_sided", epsilon_high=0.28),
                            -w.clamp(lo, hi) * a),
        "sapo": (PolicyLossConfig(loss_type="sapo"), -4 * s * (1 - s) * w * a),
        "reinforce": (PolicyLossConfig(loss_type="reinforce"), -a.expand_as(w)),
    }
    for name, (cfg, expected) in cases.items():
        _, grad, _ = token_grad(cfg, lp, old, adv)
        close(grad, expected, f"{name} gradient")


def test_vespo_gradient_is_minus_phi_times_advantage():
    """VESPO (section 7): phi_i is detached, so d l / d lp = -phi_i A; phi(W) = e^lam W^k e^{-lam W}."""
    lp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -0.1, -0.2]], dtype=F64)
    old = lp - torch.tensor([[0.1, -0.2, 0.05], [0.3, 0.2, 0.1]], dtype=F64)
    adv = torch.tensor([0.7, -1.1], dtype=F64)
    _, grad, out = token_grad(PolicyLossConfig(loss_type="vespo"), lp, old, adv)
    log_w = (lp - old).sum(-1)
    k, lam = torch.tensor([2.0, 3.0], dtype=F64), torch.tensor([3.0, 2.0], dtype=F64)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    close(grad, -(phi * adv)[:, None].expand_as(lp), "gradient")
    close(out.metrics.vespo_phi.sum, phi.sum(), "phi")


def _ratio_of(lp, old, cfg=None) -> float:
    """The importance weight the reference itself computes for a single token (exactly, bit for bit)."""
    out = policy_loss(lp, advantages=torch.ones(1, dtype=F64), old_logprobs=old,
                      normalizers=LossNormalizers(), config=cfg or PolicyLossConfig())
    return float(out.metrics.ratio_max.value)


@pytest.mark.parametrize("bound", ["low", "high", "delta", "dual_clip", "seq_log_ratio_max",
                                   "log_ratio_clamp"])
def test_gradient_at_clip_boundaries(bound):
    """Section 6: a clamp passes the gradient when the ratio is exactly on the bound and blocks it strictly
    beyond. The bound is set to the reference's own w (so equality is exact), then the token is moved 1e-6
    beyond it."""
    old = torch.zeros(1, 1, dtype=F64)
    if bound == "low":
        lp, a, beyond = math.log(0.8), -1.0, -1e-6
        w = _ratio_of(torch.tensor([[lp]], dtype=F64), old)
        cfg = PolicyLossConfig(epsilon_low=1 - w)
    elif bound == "high":
        lp, a, beyond = math.log(1.2), 1.0, 1e-6
        w = _ratio_of(torch.tensor([[lp]], dtype=F64), old)
        cfg = PolicyLossConfig(epsilon_high=w - 1)
    elif bound in ("delta", "dual_clip"):
        lp, a, beyond = math.log(2.5), -1.0, 1e-6
        w = _ratio_of(torch.tensor([[lp]], dtype=F64), old)
        cfg = PolicyLossConfig(delta=w) if bound == "delta" else PolicyLossConfig(dual_clip=True,
                                                                                  dual_clip_c=w)
    elif bound == "seq_log_ratio_max":  # one token: omega = lp exactly
        lp, a, beyond = 0.3, 1.0, 1e-6
        cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence_token",
                               seq_log_ratio_max=lp, epsilon_high=1.0)
    else:
        lp, a, beyond = 0.15, 1.0, 1e-6
        cfg = PolicyLossConfig(log_ratio_clamp=lp, epsilon_high=0.5)
    adv = torch.full((1, 1), a, dtype=F64)
    at = torch.tensor([[lp]], dtype=F64)
    _, g_at, out = token_grad(cfg, at, old, adv)
    w_at = out.metrics.ratio_max.value
    close(g_at.reshape(()), -a * w_at, f"{bound}: gradient at the bound")
    _, g_beyond, _ = token_grad(cfg, at + beyond, old, adv)
    assert float(g_beyond) == 0.0, f"{bound}: gradient beyond the bound is {float(g_beyond)}"


def test_sequence_level_equals_sequence_token_with_seq_mean_token_mean():
    """Section 6: with a per-sequence advantage, "sequence" + grpo normalisation and "sequence_token" +
    seq-mean-token-mean (S_glob = B) give the same value and gradient (up to verl's 1e-8)."""
    b = make_batch(seed=21)
    seq = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", epsilon_high=0.28)
    tok = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence_token", epsilon_high=0.28,
                           loss_agg_mode="seq-mean-token-mean")
    r_seq = run_ours(seq, b)
    r_tok = run_ours(tok, b, normalizers=LossNormalizers(global_num_seqs=b.lp.shape[0]))
    close(r_tok[0], r_seq[0], "loss", rtol=1e-7)
    close(r_tok[1], r_seq[1], "grad", rtol=1e-7)


@pytest.mark.parametrize("trl_type,verl_mode,version", [
    ("dapo", "token-mean", "0.9"),
    ("bnpo", "token-mean", "legacy"),
    ("grpo", "seq-mean-token-mean", "0.9"),
    ("dr_grpo", "seq-mean-token-sum-norm", "0.9"),
    ("luspo", "seq-mean-token-sum", "0.9"),
])
def test_aggregation_equivalences(trl_type, verl_mode, version):
    """Section 10.5 with GA = 2, P = 2, equal micro-batches: S_glob = B GA P, N_glob shared, L_max = L_const;
    the policy and KL terms both (the entropy bonus differs by design, section 11.1)."""
    b = make_batch(seed=4)
    num_seqs, width = b.lp.shape
    ga, procs = 2, 2
    common = dict(epsilon_high=0.28, beta=0.05, kl_bias_correction=False, max_completion_length=width)
    norm_trl = LossNormalizers(num_items_in_batch=50.0, grad_accum_steps=ga, num_processes=procs)
    norm_verl = LossNormalizers(num_items_in_batch=50.0, global_num_seqs=num_seqs * ga * procs,
                                grad_accum_steps=1 if version == "0.9" else ga, num_processes=procs)
    if version == "legacy":  # the legacy formulas are per micro-batch and local
        norm_trl = dataclasses.replace(norm_trl, num_processes=1)
        norm_verl = dataclasses.replace(norm_verl, num_processes=1)
    r_trl = run_ours(_cfg(dict(loss_type=trl_type, **common)), b, normalizers=norm_trl)
    verl_cfg = _cfg(dict(loss_type=trl_type, loss_agg_mode=verl_mode, agg_version=version, **common))
    r_verl = run_ours(verl_cfg, b, normalizers=norm_verl)
    close(r_verl[0], r_trl[0], "loss", rtol=1e-7)
    close(r_verl[1], r_trl[1], "grad", rtol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------------

# Every loss type and level (they differ in how per-sequence quantities are formed) with every feature on,
# for the TRL normalisation and the verl modes that divide by sequence statistics.
EDGE_CONFIGS = [
    dict(loss_type=lt, importance_sampling_level=level, beta=0.1, entropy_coef=0.01, top_entropy_quantile=0.5,
         off_policy_mask_threshold=0.1,
         is_correction=ISCorrection(level="token", mode="mask", c_min=0.5, c_max=2))
    for lt in ALL_LOSS_TYPES for level in ("token", "sequence", "sequence_token")
] + [
    dict(loss_type="dapo", dual_clip=True, beta=0.1, entropy_coef=0.01, loss_agg_mode=mode,
         agg_version=version)
    for mode in AGG_MODES for version in ("0.9", "legacy")
    if not (mode == "token-sum" and version == "legacy")
]


@pytest.mark.parametrize("kwargs", EDGE_CONFIGS, ids=lambda k: "-".join(str(v) for v in k.values()
                                                                      if isinstance(v, str)))
def test_fully_masked_batch_and_nan_padding(kwargs):
    """A fully masked batch gives loss 0 with zero, finite gradients and finite metrics; NaN at masked
    positions of every input never reaches the loss (sections 7, 10: all denominators clamped)."""
    cfg = _cfg(kwargs)
    b = make_batch(seed=1)
    nan = float("nan")
    mask = torch.zeros_like(b.mask)
    lp = torch.full_like(b.lp, nan).requires_grad_(True)
    H = torch.full_like(b.H, nan).requires_grad_(True)
    all_nan = torch.full_like(b.lp, nan)
    out = policy_loss(lp, advantages=torch.full_like(b.A, nan), mask=mask, old_logprobs=all_nan,
                      ref_logprobs=all_nan, sampling_logprobs=all_nan, entropies=H,
                      normalizers=LossNormalizers(), config=cfg)
    assert float(out.loss.detach()) == 0.0
    g_lp, g_h = torch.autograd.grad(out.loss, [lp, H], allow_unused=True)
    for g in (g_lp, g_h):
        assert g is None or (torch.isfinite(g).all() and not g.any())
    for field in dataclasses.fields(out.metrics):
        value = getattr(out.metrics, field.name)
        if isinstance(value, Sum):
            assert torch.isfinite(value.mean()).all(), field.name


@pytest.mark.parametrize("kwargs", EDGE_CONFIGS, ids=lambda k: "-".join(str(v) for v in k.values()
                                                                      if isinstance(v, str)))
def test_fully_masked_sequence_and_nan_padding(kwargs):
    """A batch with an empty sequence and NaN at every masked position: finite loss and gradients, zero
    gradient on masked tokens, and the same result as with finite padding."""
    cfg = _cfg(kwargs)
    b = make_batch(seed=2)
    dirty = dataclasses.replace(b, **{name: getattr(b, name).masked_fill(~b.mask, float("nan"))
                                      for name in ("lp", "old", "ref", "samp", "H")})
    clean = run_ours(cfg, b, samp=True)
    loss, g_lp, g_h, _ = run_ours(cfg, dirty, samp=True)
    assert torch.isfinite(loss) and torch.isfinite(g_lp).all() and torch.isfinite(g_h).all()
    assert not g_lp[~b.mask].any() and not g_lp[2].any()  # row 2 is the empty sequence
    close(loss, clean[0], "loss")
    close(g_lp, clean[1], "grad")


def to_packed(b: Batch):
    """Each row's first lengths[i] positions as one segment (holes stay masked), cu_seqlens, and the index of
    every packed row in the padded [B, T] batch."""
    idx = [(i, t) for i in range(len(b.lengths)) for t in range(int(b.lengths[i]))]
    rows = torch.tensor([i for i, _ in idx]), torch.tensor([t for _, t in idx])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), b.lengths.cumsum(0)])
    return rows, cu


@pytest.mark.parametrize("kwargs", EDGE_CONFIGS, ids=lambda k: "-".join(str(v) for v in k.values()
                                                                      if isinstance(v, str)))
def test_packed_layout_matches_padded(kwargs):
    """docs/ops.md section 1: the same sequences padded [B, T] + mask or packed [N] + cu_seqlens + mask (with
    an empty segment) give the same loss, gradients, per-token loss and metrics."""
    cfg = _cfg(kwargs)
    b = make_batch(seed=6)
    assert int(b.lengths.max()) == b.lp.shape[1]  # same T_pad for seq-mean-token-sum-norm
    loss_p, g_lp_p, g_h_p, out_p = run_ours(cfg, b, samp=True)
    rows, cu = to_packed(b)
    lp = b.lp[rows].clone().requires_grad_(True)
    H = b.H[rows].clone().requires_grad_(True)
    out = policy_loss(lp, cu_seqlens=cu, mask=b.mask[rows], advantages=b.A, old_logprobs=b.old[rows],
                      ref_logprobs=b.ref[rows], sampling_logprobs=b.samp[rows], entropies=H,
                      normalizers=LossNormalizers(), config=cfg, return_per_token=True)
    g_lp, g_h = torch.autograd.grad(out.loss, [lp, H], allow_unused=True)
    close(out.loss, loss_p, "loss")
    close(g_lp, g_lp_p[rows], "grad logprobs")
    close(_zeros_if_none(g_h, H), g_h_p[rows], "grad entropies")
    close(out.per_token_loss, out_p.per_token_loss[rows], "per-token loss")
    for field in dataclasses.fields(out.metrics):
        mine, theirs = getattr(out.metrics, field.name), getattr(out_p.metrics, field.name)
        assert (mine is None) == (theirs is None), field.name
        if mine is None:
            continue
        parts = {Sum: ("sum", "count"), Extreme: ("value",)}.get(type(mine))
        if parts is None:
            close(mine, theirs, f"metric {field.name}")
        for part in parts or ():
            close(getattr(mine, part), getattr(theirs, part), f"metric {field.name}.{part}")


def test_empty_batch():
    """B = 0 (padded) and N = 0 with empty segments (packed): loss 0, zero gradients."""
    cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.1, entropy_coef=0.1,
                           top_entropy_quantile=0.5)
    for lp, kwargs in [(torch.zeros(0, 4, dtype=F64), dict(advantages=torch.zeros(0, dtype=F64))),
                       (torch.zeros(0, dtype=F64), dict(advantages=torch.zeros(2, dtype=F64),
                                                        cu_seqlens=torch.zeros(3, dtype=torch.int32)))]:
        lp.requires_grad_(True)
        out = policy_loss(lp, ref_logprobs=lp.detach(), entropies=lp.detach(), normalizers=LossNormalizers(),
                          config=cfg, **kwargs)
        assert float(out.loss.detach()) == 0.0
        out.loss.backward()
        assert lp.grad is not None and lp.grad.numel() == 0


def test_per_token_loss_sums_to_policy_loss_and_module_matches_functional():
    b = make_batch(seed=8)
    cfg = PolicyLossConfig(loss_type="grpo", beta=0.05, entropy_coef=0.02, top_entropy_quantile=0.5)
    loss, g_lp, _, out = run_ours(cfg, b)
    close(out.per_token_loss.sum(), out.metrics.policy_loss, "sum of per-token loss")
    close(out.loss, out.metrics.policy_loss - 0.02 * out.metrics.entropy_agg, "loss = policy - eta H")
    module = PolicyLoss(cfg)
    lp = b.lp.clone().requires_grad_(True)
    mod_out = module(lp, advantages=b.A, mask=b.mask, old_logprobs=b.old, ref_logprobs=b.ref, entropies=b.H,
                     normalizers=LossNormalizers())
    close(mod_out.loss, loss, "module loss")
    # entropy_coef overrides the config (adaptive control), also as a tensor
    out_t = policy_loss(b.lp, advantages=b.A, mask=b.mask, old_logprobs=b.old, ref_logprobs=b.ref,
                        entropies=b.H, normalizers=LossNormalizers(), config=cfg,
                        entropy_coef=torch.tensor(0.5, dtype=F64))
    close(out_t.loss, out.metrics.policy_loss - 0.5 * out.metrics.entropy_agg, "tensor entropy_coef")


def test_metric_pairs_combine_across_micro_batches():
    """Sum pairs add and extremes combine exactly: two micro-batches give the whole batch's token metrics."""
    b = make_batch(seed=12)
    cfg = PolicyLossConfig(beta=0.05, epsilon_high=0.28)
    whole = run_ours(cfg, b)[3].metrics
    halves = []
    for rows in (slice(0, 3), slice(3, 6)):
        fields = ("lp", "old", "ref", "samp", "H", "A", "mask", "lengths")
        part = dataclasses.replace(b, **{k: getattr(b, k)[rows] for k in fields})
        halves.append(run_ours(cfg, part)[3].metrics)
    for name in ("num_tokens", "ppo_kl", "ratio_mean", "kl", "entropy", "clip_low", "clip_high",
                 "clip_region"):
        combined = getattr(halves[0], name) + getattr(halves[1], name)
        close(combined.sum, getattr(whole, name).sum, f"{name}.sum")
        close(combined.count, getattr(whole, name).count, f"{name}.count")
    for name in ("ratio_min", "ratio_max"):
        combined = getattr(halves[0], name).combine(getattr(halves[1], name))
        close(combined.value, getattr(whole, name).value, name)


def test_gradcheck():
    """torch.autograd.gradcheck in float64 on small shapes, for variants whose gradient is the derivative of
    their value: stop-gradient constructs (sequence_token, CISPO's and VESPO's detached weights, the '+' KL
    estimators) are by design not, and are covered by the gradient-table tests instead. Random points lie
    away from the clip kinks."""
    b = make_batch(seed=13, lengths=(3, 2, 0), width=3, nan_sample=False)
    configs = [
        PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", epsilon_high=0.28, beta=0.1,
                         entropy_coef=0.05),
        PolicyLossConfig(loss_type="sapo", beta=0.1, kl_estimator="low_var_kl",
                         loss_agg_mode="seq-mean-token-mean"),
        PolicyLossConfig(loss_type="dapo", dual_clip=True, log_ratio_clamp=20.0, beta=0.1, kl_estimator="abs",
                         top_entropy_quantile=0.5, entropy_coef=0.05),
    ]
    for cfg in configs:
        def fn(lp, H, cfg=cfg):
            return policy_loss(lp, advantages=b.A, mask=b.mask, old_logprobs=b.old, ref_logprobs=b.ref,
                               entropies=H, normalizers=LossNormalizers(), config=cfg).loss

        inputs = (b.lp.clone().requires_grad_(True), b.H.clone().requires_grad_(True))
        assert torch.autograd.gradcheck(fn, inputs)


def test_nan_in_valid_logprob_propagates():
    b = make_batch(seed=14)
    b.lp[0, 0] = float("nan")
    assert torch.isnan(run_ours(PolicyLossConfig(), b)[0])


# ----------------------------------------------------------------------------------------------------------
# Top-entropy mask and rollout IS weights (sections 8.2, 8.3)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.0, 0.25, 0.3, 0.5, 1.0])
def test_top_entropy_mask_matches_torch_quantile(rho):
    """theta is torch.quantile's linear interpolation; 0.25 and 0.5 land on integer ranks for 21 values."""
    g = torch.Generator().manual_seed(0)
    H = torch.rand(3, 9, generator=g, dtype=F64)
    mask = torch.rand(3, 9, generator=g) < 0.8
    mask.view(-1)[mask.view(-1).nonzero()[21:].view(-1)] = False  # exactly 21 valid values
    assert int(mask.sum()) == 21
    theta = torch.quantile(H[mask], 1 - rho)
    assert torch.equal(top_entropy_mask(H, rho=rho, mask=mask), mask & (H >= theta))
    assert not top_entropy_mask(H, rho=rho, mask=torch.zeros_like(mask)).any()


def test_top_entropy_mask_process_group():
    """The all-gather path (a one-rank gloo group) selects exactly what the local path does."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    b = make_batch(seed=15)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rows, cu = to_packed(b)
        got = top_entropy_mask(b.H[rows], rho=0.3, mask=b.mask[rows], cu_seqlens=cu,
                               process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    assert torch.equal(got, top_entropy_mask(b.H, rho=0.3, mask=b.mask)[rows])


def test_rollout_is_weights_semantics():
    """NaN sampling log-prob -> ratio 1; sequence level is the product of token ratios; mask keeps the
    bounds inclusively; log clamp; batch normalisation to mean 1 over valid tokens."""
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0]], dtype=F64)
    samp = torch.tensor([[-1.2, float("nan"), -0.4, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    tok = ISCorrection(level="token", mode="truncate", c_max=None, c_min=0.0)
    rho, m = rollout_is_weights(old, samp, mask=mask, config=tok)
    close(rho[0, :3], torch.exp(torch.tensor([0.2, 0.0, -0.1], dtype=F64)), "token ratios (NaN -> 1)")
    assert float(m.logp_diff_mean.count) == 2.0  # the unscored token is excluded from |old - samp|
    seq, _ = rollout_is_weights(old, samp, mask=mask, config=dataclasses.replace(tok, level="sequence"))
    close(seq, torch.full_like(seq, math.exp(0.1)), "sequence ratio = product")
    upper = float(rho[0, 0])
    kept, _ = rollout_is_weights(old, samp, mask=mask,
                                 config=ISCorrection(level="token", mode="mask", c_max=upper))
    assert float(kept[0, 0]) == upper  # exactly on the bound: kept
    cut, _ = rollout_is_weights(old, samp, mask=mask, config=ISCorrection(level="token", mode="mask",
                                                                          c_max=upper * (1 - 1e-12)))
    assert float(cut[0, 0]) == 0.0
    clamped, _ = rollout_is_weights(old, samp, mask=mask, config=dataclasses.replace(tok, log_clamp=0.05))
    close(clamped[0, :3], torch.exp(torch.tensor([0.05, 0.0, -0.05], dtype=F64)), "log clamp")
    normed, _ = rollout_is_weights(old, samp, mask=mask,
                                   config=dataclasses.replace(tok, batch_normalize=True))
    close(normed[mask].mean(), 1.0, "batch-normalised mean")


# ----------------------------------------------------------------------------------------------------------
# Config: validation and presets (section 3)
# ----------------------------------------------------------------------------------------------------------

# (kwargs, the option names the ValueError must mention)
INVALID = [
    (dict(loss_type="ppo"), ["loss_type"]),
    (dict(importance_sampling_level="seq"), ["importance_sampling_level"]),
    (dict(cispo_mode="lower"), ["cispo_mode"]),
    (dict(kl_estimator="k4"), ["kl_estimator"]),
    (dict(loss_agg_mode="mean"), ["loss_agg_mode"]),
    (dict(loss_agg_mode="token-mean", policy_agg_mode="mean"), ["policy_agg_mode"]),
    (dict(agg_version="0.8"), ["agg_version"]),
    (dict(epsilon_low=1.0), ["epsilon_low"]),
    (dict(epsilon_low=-0.1), ["epsilon_low"]),
    (dict(epsilon_high=-0.1), ["epsilon_high"]),
    (dict(delta=2.0, dual_clip=True), ["delta", "dual_clip"]),
    (dict(delta=1.0), ["delta"]),
    (dict(dual_clip=True, dual_clip_c=1.0), ["dual_clip_c"]),
    (dict(top_entropy_quantile=1.5), ["top_entropy_quantile"]),
    (dict(top_entropy_quantile=-0.1), ["top_entropy_quantile"]),
    (dict(beta=-0.1), ["beta"]),
    (dict(loss_type="dr_grpo", max_completion_length=None), ["dr_grpo", "max_completion_length"]),
    (dict(sapo_tau_pos=0.0), ["sapo_tau_pos"]),
    (dict(sapo_tau_neg=-1.0), ["sapo_tau_neg"]),
    (dict(cispo_ratio_max=0.0), ["cispo_ratio_max"]),
    (dict(policy_agg_mode="seq-mean-token-mean"), ["policy_agg_mode", "loss_agg_mode"]),
    (dict(loss_agg_mode="token-sum", agg_version="legacy"), ["token-sum", "legacy"]),
    (dict(loss_type="vespo", is_correction=ISCorrection(level="sequence")), ["vespo", "level"]),
]


@pytest.mark.parametrize("kwargs,names", INVALID, ids=[str(k) for k, _ in INVALID])
def test_config_validation_errors(kwargs, names):
    pattern = "(?s)" + "".join(f"(?=.*{n})" for n in names)
    with pytest.raises(ValueError, match=pattern):
        PolicyLossConfig(**kwargs)


def test_is_correction_validation_errors():
    with pytest.raises(ValueError, match="(?s)(?=.*c_min)(?=.*c_max)"):
        ISCorrection(c_min=2.0, c_max=1.0)
    with pytest.raises(ValueError, match="(?s)(?=.*c_min)(?=.*c_max)(?=.*truncate)"):
        ISCorrection(mode="truncate", c_max=None)
    with pytest.raises(ValueError, match="level"):
        ISCorrection(level="tok")


@pytest.mark.parametrize("kwargs,text", [
    (dict(delta=1.1), "delta"),
    (dict(dual_clip=True, dual_clip_c=1.2), "dual_clip_c"),
    (dict(importance_sampling_level="sequence"), "GSPO"),
    (dict(loss_type="luspo"), "luspo"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), "VESPO"),
])
def test_config_warnings(kwargs, text):
    with pytest.warns(UserWarning, match=text):
        PolicyLossConfig(**kwargs)


def test_default_config_is_trl_default_and_silent(recwarn):
    cfg = PolicyLossConfig()
    assert not recwarn.list
    assert (cfg.loss_type, cfg.epsilon_low, cfg.epsilon_high_value, cfg.beta, cfg.kl_bias_correction) == (
        "dapo", 0.2, 0.2, 0.0, True)
    assert dataclasses.replace(cfg, epsilon_low=0.3).epsilon_high_value == 0.3  # None follows epsilon_low


def test_from_trl_presets(grpo_config):
    default = PolicyLossConfig.from_trl(grpo_config())
    assert default == PolicyLossConfig()  # PolicyLossConfig's defaults are GRPOConfig's
    cispo = PolicyLossConfig.from_trl(grpo_config(loss_type="cispo"))
    assert cispo.cispo_ratio_max == 0.2 and cispo.cispo_mode == "upper"  # TRL's cap = epsilon (reproduced)
    assert PolicyLossConfig.from_trl(grpo_config(loss_type="cispo", epsilon_high=5.0)).cispo_ratio_max == 5.0
    assert PolicyLossConfig.from_trl(grpo_config(use_vllm=False)).is_correction is None
    assert PolicyLossConfig.from_trl(grpo_config(use_vllm=True)).is_correction == ISCorrection(
        level="sequence", mode="mask", c_min=None, c_max=3.0)
    assert PolicyLossConfig.from_trl(grpo_config(use_vllm=True, vllm_importance_sampling_correction=False)
                                     ).is_correction is None
    capped = PolicyLossConfig.from_trl(grpo_config(
        use_vllm=True, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_cap=2.5))
    assert capped.is_correction == ISCorrection(level="token", mode="truncate", c_max=2.5)
    full = PolicyLossConfig.from_trl(grpo_config(
        loss_type="sapo", importance_sampling_level="sequence", epsilon=0.1, epsilon_high=0.3, delta=None,
        beta=0.02, use_bias_correction_kl=False, entropy_coef=0.03, top_entropy_quantile=0.2,
        off_policy_mask_threshold=0.5,
        sapo_temperature_pos=0.9, sapo_temperature_neg=1.2, vespo_k_pos=1.5, temperature=0.7,
        max_completion_length=300))
    expected = dict(loss_type="sapo", importance_sampling_level="sequence", epsilon_low=0.1, epsilon_high=0.3,
                    beta=0.02, kl_bias_correction=False, entropy_coef=0.03, top_entropy_quantile=0.2,
                    off_policy_mask_threshold=0.5, sapo_tau_pos=0.9, sapo_tau_neg=1.2, vespo_k_pos=1.5,
                    temperature=0.7, max_completion_length=300, kl_estimator="k3", loss_agg_mode=None)
    assert {k: getattr(full, k) for k in expected} == expected


VERL_PRESETS = {
    "vanilla": dict(loss_type="dapo", dual_clip=True, dual_clip_c=3.0, log_ratio_clamp=20.0),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence_token", seq_log_ratio_max=10.0,
                 log_ratio_clamp=None, dual_clip=False),
    "sapo": dict(loss_type="sapo", log_ratio_clamp=20.0, policy_agg_mode="seq-mean-token-mean"),
    "cispo": dict(loss_type="cispo", cispo_mode="two_sided", log_ratio_clamp=20.0),
    "gpg": dict(loss_type="reinforce"),
}


@pytest.mark.parametrize("container", ["dict", "namespace", "omegaconf"])
@pytest.mark.parametrize("loss_mode", list(VERL_PRESETS))
def test_from_verl_presets(loss_mode, container):
    actor = {"policy_loss": {"loss_mode": loss_mode}, "clip_ratio": 0.25, "clip_ratio_low": None,
             "clip_ratio_high": 0.3, "use_kl_loss": True, "kl_loss_coef": 0.01, "kl_loss_type": "k3",
             "entropy_coeff": 0.002, "loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": 512}
    if container == "namespace":
        actor = SimpleNamespace(**{**actor, "policy_loss": SimpleNamespace(**actor["policy_loss"])})
    elif container == "omegaconf":
        omegaconf = pytest.importorskip("omegaconf")
        actor = omegaconf.OmegaConf.create(actor)
    cfg = PolicyLossConfig.from_verl(actor)
    for field, value in VERL_PRESETS[loss_mode].items():
        assert getattr(cfg, field) == value, field
    assert (cfg.epsilon_low, cfg.epsilon_high, cfg.beta, cfg.kl_estimator, cfg.kl_bias_correction,
            cfg.entropy_coef, cfg.loss_agg_mode, cfg.loss_scale_factor, cfg.is_correction) == (
        0.25, 0.3, 0.01, "low_var_kl", False, 0.002, "seq-mean-token-sum-norm", 512, None)


def test_from_verl_defaults_kl_and_rollout_correction():
    cfg = PolicyLossConfig.from_verl({})  # verl's ActorConfig defaults: vanilla, token-mean, no KL loss
    assert (cfg.loss_type, cfg.dual_clip, cfg.loss_agg_mode, cfg.beta, cfg.kl_estimator, cfg.epsilon_low,
            cfg.epsilon_high) == ("dapo", True, "token-mean", 0.0, "low_var_kl", 0.2, 0.2)
    for verl_kl, ours in [("kl", "k1"), ("mse", "k2"), ("abs", "abs"), ("k3+", "low_var_kl+"), ("kl+", "k1+"),
                          ("k2+", "k2"), ("low_var_kl", "low_var_kl")]:
        assert PolicyLossConfig.from_verl({"kl_loss_type": verl_kl}).kl_estimator == ours
    rc = PolicyLossConfig.from_verl
    assert rc({}, rollout_correction={"rollout_is": None}).is_correction is None
    assert rc({}, rollout_correction={"rollout_is": "token", "rollout_is_threshold": 2.0}).is_correction == \
        ISCorrection(level="token", mode="truncate", c_min=None, c_max=2.0, log_clamp=20.0)
    assert rc({}, rollout_correction={"rollout_is": "sequence", "rollout_is_threshold": "0.5_5.0",
                                      "rollout_is_batch_normalize": True}).is_correction == \
        ISCorrection(level="sequence", mode="mask", c_min=0.5, c_max=5.0, log_clamp=20.0,
                     batch_normalize=True)
    assert rc({}, rollout_correction={}).is_correction.level == "sequence"  # RolloutCorrectionConfig default
    for bad in ({"policy_loss": {"loss_mode": "clip_cov"}}, {"kl_loss_type": "full"}):
        with pytest.raises(NotImplementedError):
            rc(bad)
    for bad_rc in ({"rollout_rs": "token"}, {"bypass_mode": True}):
        with pytest.raises(NotImplementedError):
            rc({}, rollout_correction=bad_rc)


# ----------------------------------------------------------------------------------------------------------
# Input errors (docs/ops.md section 7)
# ----------------------------------------------------------------------------------------------------------


def test_input_errors():
    b = make_batch(seed=16)
    norm, cfg = LossNormalizers(), PolicyLossConfig()
    kw = dict(mask=b.mask, normalizers=norm)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(b.lp, advantages=torch.zeros(5, dtype=F64), config=cfg, **kw)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(b.lp, advantages=b.A, mask=b.mask[:, :3], normalizers=norm, config=cfg)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(b.lp, advantages=b.A, old_logprobs=b.old[:, :3], config=cfg, **kw)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(b.lp, advantages=b.A, config=PolicyLossConfig(beta=0.1), **kw)
    with pytest.raises(ValueError, match="entropies"):
        policy_loss(b.lp, advantages=b.A, config=PolicyLossConfig(entropy_coef=0.1), **kw)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        policy_loss(b.lp, advantages=b.A, mask=b.mask, normalizers=LossNormalizers(num_processes=2),
                    config=cfg)
    with pytest.raises(ValueError, match="global_num_seqs"):
        policy_loss(b.lp, advantages=b.A, mask=b.mask, normalizers=LossNormalizers(num_processes=2),
                    config=PolicyLossConfig(loss_agg_mode="seq-mean-token-mean"))
    with pytest.raises(ValueError, match="cu_seqlens"):
        policy_loss(b.lp.reshape(-1), advantages=b.A, config=cfg, normalizers=norm)
    with pytest.raises(ValueError, match="cu_seqlens"):
        policy_loss(b.lp.reshape(-1), advantages=b.A, cu_seqlens=torch.tensor([0, 4, 3, 48, 48, 48, 48]),
                    config=cfg, normalizers=norm)
    with pytest.raises(ValueError, match="is_correction"):
        policy_loss(b.lp, advantages=b.A, old_logprobs=b.old, sampling_logprobs=b.samp, is_weights=b.A,
                    config=PolicyLossConfig(is_correction=ISCorrection()), **kw)
    with pytest.raises(ValueError, match="vespo"):
        policy_loss(b.lp, advantages=b.A, is_weights=b.A.abs(), config=PolicyLossConfig(loss_type="vespo"),
                    **kw)
    with pytest.raises(TypeError, match="logprobs"):
        policy_loss(b.mask.long(), advantages=b.A, config=cfg, **kw)


@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.5])
def test_adaptive_entropy_controller_matches_trl(trl, grpo_config, top_entropy_quantile):
    """Section 11.2: TRL's use_adaptive_entropy, driven over 6 accumulation windows of 2 micro-batches whose
    entropies move across the target, and AdaptiveEntropyController fed LossMetrics.entropy_effective: same
    applied coefficient (hence the same loss and gradients), same coefficient and window entropy after
    every optimiser step."""
    ga = 2
    args = grpo_config(loss_type="dapo", epsilon_high=0.28, entropy_coef=0.02, use_adaptive_entropy=True,
                       entropy_target=1.0, entropy_coef_delta=0.015, entropy_coef_min=0.0,
                       entropy_coef_max=0.04, top_entropy_quantile=top_entropy_quantile)
    cfg = PolicyLossConfig.from_trl(args)
    trainer = trl_stand_in(trl, args, ga=ga)
    trainer.use_adaptive_entropy, trainer._entropy_bonus_enabled = True, True
    trainer._last_world_entropy, trainer._entropy_window_stats = float("inf"), None
    ctl = AdaptiveEntropyController(initial_coef=args.entropy_coef, target=args.entropy_target,
                                    delta=args.entropy_coef_delta, coef_min=args.entropy_coef_min,
                                    coef_max=args.entropy_coef_max)
    scales = [0.1, 0.2, 0.4, 0.3, 0.15, 0.5, 0.35, 0.1, 0.2, 0.25, 0.6, 0.05]  # mean H from ~0.2 to ~1.4 nats
    applied = []
    for step, scale in enumerate(scales):
        b = make_batch(seed=100 + step)
        # Entropies exact in fp32: TRL takes the top-entropy quantile of .float() entropies (the mask would
        # otherwise depend on fp64 -> fp32 rounding at the threshold).
        b = dataclasses.replace(b, H=(b.H * scale).float().double())
        trainer.accelerator.sync_gradients = step % ga == ga - 1
        lp, H = b.lp.clone().requires_grad_(True), b.H.clone().requires_grad_(True)
        trainer._get_per_token_logps_and_entropies = lambda *a, lp=lp, H=H, **k: (lp, H, None)
        loss_t = trl.GRPOTrainer._compute_loss(trainer, None, trl_inputs(args, b))
        g_t = torch.autograd.grad(loss_t, [lp, H])
        applied.append(ctl.coef)
        # TRL rescales num_items_in_batch to one accumulation window (section 10.1).
        norms = LossNormalizers(num_items_in_batch=b.mask.sum() * ga / args.steps_per_generation,
                                grad_accum_steps=ga)
        loss_o, g_lp_o, g_h_o, out = run_ours(cfg, b, entropy_coef=ctl.coef, normalizers=norms)
        close(loss_o, loss_t, f"micro-step {step}: loss")
        close(g_lp_o, g_t[0], f"micro-step {step}: grad logprobs")
        close(g_h_o, g_t[1], f"micro-step {step}: grad entropies")
        ctl.observe(out.metrics.entropy_effective)
        if trainer.accelerator.sync_gradients:
            ctl.step()
            close(ctl.entropy_coef, trainer.entropy_coef, f"step {step}: coefficient")
            close(ctl.last_window_entropy, trainer._last_world_entropy, f"step {step}: window entropy")
    # The trajectory exercised every branch: no bonus first, then on, raised, capped and lowered.
    assert applied[0] == 0.0 and max(applied) > 0.0 and len(set(applied)) >= 3, applied


def test_adaptive_entropy_controller_checkpoint_and_errors():
    ctl = AdaptiveEntropyController(initial_coef=0.01, target=0.5, delta=0.01)
    assert ctl.coef == 0.0 and ctl.step() == math.inf  # no observation: unchanged
    ctl.observe(Sum(torch.tensor(0.8), torch.tensor(4.0)))
    assert ctl.step() == pytest.approx(0.2) and ctl.coef == pytest.approx(0.02)
    restored = AdaptiveEntropyController(initial_coef=0.0, target=0.5, delta=0.01)
    restored.load_state_dict(ctl.state_dict())
    assert restored.coef == ctl.coef and restored.last_window_entropy == ctl.last_window_entropy
    with pytest.raises(ValueError, match="entropy"):
        ctl.observe(None)
    with pytest.raises(ValueError, match="coef_min"):
        AdaptiveEntropyController(initial_coef=0.0, coef_min=1.0, coef_max=0.5)
