"""Parity of reasonrl's verl drop-ins with verl 0.9.1's own code (docs/integrations-verl.md).

* The registered ``reasonrl_<mode>`` losses against verl's ``compute_policy_loss_<mode>`` for every mode both
  support (vanilla, gspo, sapo, cispo, gpg) x every ``loss_agg_mode`` x (no global batch info | verl's global
  batch info with dp_size 2) x (with | without rollout IS weights): value, gradient with respect to the
  log-probs and metrics. In float64 both are exact formulas: agreement to the float64 line of the tolerance
  table. In float32: the relative-error rule against verl in float64.
* :func:`reasonrl.integrations.verl.agg_loss` against verl's ``agg_loss`` for every mode.
* The ``reasonrl`` fused-kernel backend against verl's own backends on the same model: verl's ``torch``
  backend (chunked ``FusedLinearForPPO``, which runs on CPU) and verl's plain reference
  (``logprobs_from_logits`` / ``entropy_from_logits`` on the logits). verl's ``triton`` backend
  (``linear_cross_entropy``) needs CUDA and is compared on GPU only.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("tensordict")

from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402

from reasonrl.integrations import verl as rverl  # noqa: E402
from reasonrl.testing import tiny_causal_lm, tolerance  # noqa: E402

AGG_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]


def _actor(mode: str, **extra) -> FSDPActorConfig:
    kw = dict(
        strategy="fsdp",
        ppo_mini_batch_size=4,
        ppo_micro_batch_size_per_gpu=2,
        use_dynamic_bsz=False,
        rollout_n=2,
        clip_ratio=0.2,
        clip_ratio_low=0.15,
        clip_ratio_high=0.28,
        policy_loss={"loss_mode": mode},
    )
    kw.update(extra)
    return FSDPActorConfig(**kw)


def _inputs(dtype, *, seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).to(dtype)
    old = (lp.double() + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous().to(dtype)
    lengths = torch.tensor([9, 5, 1, 0, 7, 3])[:B]  # one empty sequence: verl excludes it from seq means
    # A float mask: with verl's bool response_mask, its ``n_i + 1e-8`` of seq-mean-token-mean is evaluated in
    # float32 (an int64 count plus a Python float) and rounds to n_i (a 1e-8 relative difference); a float
    # mask gives the documented formula, which reasonrl implements (docs/losses.md section 10.3).
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    rho = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2).to(dtype) * mask
    return lp, old, adv, mask, rho


def _call(fn, lp, old, adv, mask, agg, cfg, rho):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = fn(
        old_log_prob=old,
        log_prob=lp,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=agg,
        config=cfg,
        rollout_is_weights=rho,
    )
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


def _set_info(cfg, mask, global_info: bool):
    if global_info:  # what verl's ppo_loss writes before calling the loss (dp_size 2: counts over 2 ranks)
        cfg.global_batch_info.update(
            dp_size=2,
            batch_num_tokens=int(mask.sum()) * 2 + 3,
            global_batch_size=mask.shape[0] * 2,
            loss_scale_factor=None,
        )
    else:
        cfg.global_batch_info.update(
            dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None
        )


@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global-dp2"])
@pytest.mark.parametrize("with_rho", [False, True], ids=["no-is", "is"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", rverl.LOSS_MODES)
def test_registered_policy_loss_matches_verl(mode, agg, with_rho, global_info):
    cfg = _actor(mode)
    verl_fn = core_algos.get_policy_loss_fn(mode)
    ours_fn = core_algos.get_policy_loss_fn(f"reasonrl_{mode}")
    lp, old, adv, mask, rho = _inputs(torch.float64)
    _set_info(cfg, mask, global_info)
    rho = rho if with_rho else None
    want = _call(verl_fn, lp, old, adv, mask, agg, cfg, rho)
    got = _call(ours_fn, lp, old, adv, mask, agg, cfg, rho)
    atol = tolerance("stat", torch.float64).atol_scale
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=atol * (1 + float(want[0].abs())))
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=atol * (1 + float(want[1].abs().max())))
    assert set(got[2]) == set(want[2])
    for key, value in want[2].items():
        assert got[2][key] == pytest.approx(value, rel=1e-7, abs=1e-9), key

    # float32 inputs: the relative-error rule against verl in float64.
    lp32, old32, adv32, _, rho32 = _inputs(torch.float32)
    rho32 = rho32 if with_rho else None
    got32 = _call(ours_fn, lp32, old32, adv32, mask, agg, cfg, rho32)
    ref32 = _call(verl_fn, lp32, old32, adv32, mask, agg, cfg, rho32)
    stat32 = tolerance("stat", torch.float32).atol_scale
    for i in (0, 1):
        err = (got32[i].double() - want[i]).abs().max().item()
        err_ref = (ref32[i].double() - want[i]).abs().max().item()
        assert err <= 2 * err_ref + stat32 * (1 + want[i].abs().max().item()), (i, err, err_ref)


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        rverl.make_policy_loss("clip_cov")


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize(
    "info",
    [
        dict(),
        dict(dp_size=2, batch_num_tokens=40, global_batch_size=12),
        dict(dp_size=1, loss_scale_factor=4.0),
    ],
    ids=["local", "dp2", "scale"],
)
def test_agg_loss_matches_verl(agg, info):
    lp, _, _, mask, _ = _inputs(torch.float64, seed=3)
    mat = lp.clone().requires_grad_(True)
    want = core_algos.agg_loss(mat, mask, agg, **info)
    got = rverl.agg_loss(mat, mask, agg, **info)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=1e-12)
    (g_want,) = torch.autograd.grad(want, mat)
    (g_got,) = torch.autograd.grad(rverl.agg_loss(mat, mask, agg, **info), mat)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


# ---- the fused log-prob + entropy backend -----------------------------------------------------------------


def _tiny_qwen2(dtype):
    return tiny_causal_lm("qwen2", 301, seed=0, dtype=dtype, layers=1, heads=2, kv_heads=1)


def _backend_model(backend: str, dtype):
    """A fresh model class per backend: verl's patch replaces ``model.__class__.forward``."""
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    model = _tiny_qwen2(dtype)
    model.__class__ = type(f"Qwen2_{backend}", (type(model),), {})
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
    return model


def _outputs(model, ids, temperature):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), return_dict=True, temperature=temperature)
    g_lp = torch.linspace(-1, 1, out.log_probs.numel(), dtype=torch.float64).reshape(out.log_probs.shape)
    loss = (out.log_probs.double() * g_lp).sum() + 0.3 * out.entropy.double().sum()
    params = [model.lm_head.weight, model.model.layers[0].mlp.down_proj.weight]
    grads = torch.autograd.grad(loss, params)
    return out.log_probs.detach().double(), out.entropy.detach().double(), [g.double() for g in grads]


def _logits_reference(model, ids, temperature):
    """verl's plain path: logits, then verl's logprobs_from_logits / entropy_from_logits."""
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits / temperature
    labels = torch.roll(ids, shifts=-1, dims=-1)
    return _reduce(model, logprobs_from_logits(logits, labels), entropy_from_logits(logits))


def _reduce(model, lp, ent):
    g_lp = torch.linspace(-1, 1, lp.numel(), dtype=torch.float64).reshape(lp.shape)
    loss = (lp.double() * g_lp).sum() + 0.3 * ent.double().sum()
    params = [model.lm_head.weight, model.model.layers[0].mlp.down_proj.weight]
    grads = torch.autograd.grad(loss, params)
    return lp.detach().double(), ent.detach().double(), [g.double() for g in grads]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_backend_matches_verl(temperature):
    ids = torch.randint(0, 301, (3, 17), generator=torch.Generator().manual_seed(5))
    # Oracle: verl's logits reference in float64. Peers in float32: verl's logits reference and its chunked
    # torch backend. reasonrl's backend obeys the rule against the logits reference (so does verl's backend).
    oracle = _logits_reference(_tiny_qwen2(torch.float64), ids, temperature)
    ref32 = _logits_reference(_tiny_qwen2(torch.float32), ids, temperature)
    torch_backend = _outputs(_backend_model("torch", torch.float32), ids, temperature)
    ours = _outputs(_backend_model("reasonrl", torch.float32), ids, temperature)
    names = ["log_probs", "entropy", "grad lm_head", "grad down_proj"]
    flat = lambda r: [r[0], r[1], *r[2]]  # noqa: E731
    for name, o, r, t, x in zip(
        names, flat(oracle), flat(ref32), flat(torch_backend), flat(ours), strict=True
    ):
        scale = tolerance("stat" if name in names[:2] else "grad_param", torch.float32).atol_scale
        atol = scale * (1 + o.abs().max().item()) if name in names[:2] else scale * o.abs().max().item()
        err, err_ref = (x - o).abs().max().item(), (r - o).abs().max().item()
        assert err <= 2 * err_ref + atol, f"{name}: err {err:.3g} > 2 x {err_ref:.3g} + {atol:.3g}"
        # verl's own chunked torch backend obeys the same bound: the comparison is like for like.
        assert (t - o).abs().max().item() <= 2 * err_ref + atol, f"{name}: verl torch backend out of bound"


@pytest.mark.gpu
def test_fused_backend_matches_verl_triton_gpu():
    if not torch.cuda.is_available():
        pytest.skip("verl's triton linear_cross_entropy needs CUDA")
    ids = torch.randint(0, 301, (3, 17), generator=torch.Generator().manual_seed(5), device="cuda")
    models = {b: _backend_model(b, torch.float32).cuda() for b in ("triton", "reasonrl")}
    a, b = (_outputs(models[k], ids, 1.0) for k in ("triton", "reasonrl"))
    for x, y in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]], strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_fused_backend_refuses_vlm_like_configs():
    model = _tiny_qwen2(torch.float32)
    model.__class__ = type("Qwen2_softcap", (type(model),), {})
    model.config = copy.deepcopy(model.config)
    model.config.final_logit_softcapping = 30.0
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    with pytest.raises(NotImplementedError, match="soft-capping"):
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="reasonrl")
