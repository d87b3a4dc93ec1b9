"""Data-parallel training (docs/trainer.md section 10): two gloo processes on the CPU against one process at
the same global batch and seed.

The workers (``torch.multiprocessing.spawn``, a ``file://`` store in a temporary directory, one CPU thread
each) build a Trainer on the embedded model, run the steps and save what the comparison needs: the
parameters, the step metrics and the completions of their share. Rank 1 perturbs its loaded weights first:
the Trainer must start every rank from rank 0's. The comparisons run here against one
process with ``rollout.seed_per_prompt=true`` (the per-prompt seeds a distributed run always uses).

Tolerance (the fp32 rule of docs/ops.md section 8 applied to training steps): the distributed run differs
from the single process only in the order of floating-point sums (per-rank micro-batches, the gradient
all-reduce), so its error must be at most 2x the error that a pure change of summation order makes in one
process (the same run with another micro-batch size) plus a small atol. Checked on

* the gradients of the first optimiser step (before AdamW): max |dg| <= 2 x noise + 1e-6 x max |g|;
* the parameters after both steps, as ||p - p_single|| / ||p_single - p_0|| (the error relative to what the
  two steps moved) <= 2 x noise + 1e-5. Not the max |dp|: AdamW divides every gradient element by its own
  RMS, so an element whose gradient is at the rounding level moves by lr x (rounding / |g|) in either run;
  the max measures those elements (observed: 3e-5 in one element of ~10^6, mean 4e-9), not the reduction;
* the reduced metrics (gradient norm, loss, rewards, KL...) within 1e-4 relative: AdamW is blind to a
  global scale of the gradient, the gradient norm is not.

The rollouts of both steps must be identical token for token (sampling from per-prompt seeds), which also
keeps the comparison from passing on two runs that drifted apart.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import pytest
import torch

from reasonrl.trainer import load_config
from reasonrl.trainer.distributed import DistContext, prompt_seed, share_positions
from reasonrl.trainer.trainer import Trainer, load_model_and_tokenizer

WORLD = 2

# A run small enough for a shared 2-core machine: 4 prompts x 2 completions of at most 32 tokens, 2 steps.
# mini_batches=2 and micro_batch_size=1 exercise the per-mini-batch rank layout and gradient accumulation
# (GA 2 per rank, 4 in one process). Truncated completions keep their loss so that every step trains.
_BASE = [
    "steps=2",
    "prompts_per_step=4",
    "rollout.group_size=2",
    "rollout.max_new_tokens=32",
    "rollout.mask_truncated_completions=false",
    "optim.lr=1e-3",
    "optim.mini_batches=2",
    "optim.micro_batch_size=1",
    "optim.max_grad_norm=0",
    "eval.size=4",
    "eval.max_new_tokens=16",
    "log.progress=false",
    "log.plot=false",
    "log.tensorboard=off",
    "threads=1",
]


def token_reward(completion_ids, **kwargs):
    """A dense reward that does not run the model: the untrained task verifier (all zeros) and the length
    (every completion truncated at the same budget) would give zero advantages, nothing to compare."""
    return [(sum(ids) % 7) / 7 for ids in completion_ids]


# FSDP2: the GRPO preset (grpo loss, k3 KL) with a reward that does not run the sharded model.
_FSDP = [f"rewards=[{{name: '{__name__}:token_reward'}}]", "steps=1"]
_FSDP_PACKED = [*_FSDP, "packing=true"]


def _config(tmp_path, preset: str, *extra: str):
    return load_config(preset=preset, overrides=[*_BASE, f"log.out_dir={tmp_path}", *extra])


def _run(cfg, steps: int, perturb: bool = False, resume: bool = False):
    """``steps`` trainer steps on the embedded model: (trainer, [metrics], [completion ids per step],
    {name: gradient of the first optimiser step}). ``perturb``: noise on the loaded weights (the Trainer
    must replace them by rank 0's). ``resume``: continue from the latest checkpoint first."""
    model, tok = load_model_and_tokenizer("embedded")
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    first_grads: dict[str, torch.Tensor] = {}

    def record(optimizer, args, kwargs):
        if not first_grads:
            for name, p in trainer.model.named_parameters():
                full = getattr(p.grad, "full_tensor", None)
                first_grads[name] = (full() if callable(full) else p.grad).detach().clone()

    trainer.optimizer.register_step_pre_hook(record)
    if resume:
        assert trainer.resume("latest") is not None
    metrics, completions = [], []
    for _ in range(steps):
        metrics.append(trainer.step())
        completions.append(trainer.last_record.completion_ids)
    return trainer, metrics, completions, first_grads


def _full_params(model) -> dict[str, torch.Tensor]:
    """Name -> the whole parameter (DTensor shards gathered under FSDP2; a collective there)."""
    out = {}
    for name, p in model.named_parameters():
        full = getattr(p, "full_tensor", None)
        out[name] = (full() if callable(full) else p).detach().clone()
    return out


def _worker(rank: int, init: str, out_dir: str, preset: str, extra: list[str], steps: int, save: bool,
            resume_at: int | None = None):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    try:
        cfg = load_config(preset=preset, overrides=[*_BASE, f"log.out_dir={out_dir}/run", *extra])
        if resume_at is None:
            trainer, metrics, completions, grads = _run(cfg, steps, perturb=rank == 1)
        else:  # a checkpoint after resume_at steps, then a new Trainer (fresh weights) resumes from it
            first, metrics, completions, grads = _run(cfg, resume_at, perturb=rank == 1)
            first.save_checkpoint()
            trainer, m2, c2, _ = _run(cfg, steps - resume_at, perturb=rank == 1, resume=True)
            metrics, completions = metrics + m2, completions + c2
        params = _full_params(trainer.model)
        ckpt = str(trainer.save_checkpoint()) if save else None
        torch.save(
            {"params": params, "metrics": metrics, "completions": completions, "grads": grads, "ckpt": ckpt},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, preset: str, extra: list[str], steps: int, save: bool = False,
           resume_at: int | None = None) -> list[dict]:
    import torch.multiprocessing as mp

    init = f"file://{tmp_path}/store"
    try:
        mp.spawn(_worker, args=(init, str(tmp_path), preset, extra, steps, save, resume_at), nprocs=WORLD,
                 join=True)
    except Exception:
        errors = [p.read_text() for p in sorted(tmp_path.glob("error*.txt"))]
        raise AssertionError("a worker failed:\n" + "\n".join(errors)) from None
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _max_err(a: dict, b: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name in a:
        e = float((a[name] - b[name]).abs().max())
        if e > worst:
            worst, where = e, name
    return worst, where


def _norm_diff(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[n] - b[n]).double() ** 2).sum() for n in a)))


def _check_against_single(tmp_path, results, preset: str, extra: list[str], steps: int):
    single_cfg = _config(tmp_path / "single", preset, "rollout.seed_per_prompt=true", *extra)
    single, single_metrics, single_completions, single_grads = _run(single_cfg, steps)
    # The rank shares of every step, put back in global order, are the single process's rollouts.
    K = single_cfg.rollout.group_size
    for s in range(steps):
        merged: list = [None] * single_cfg.prompts_per_step
        for r, res in enumerate(results):
            pos = share_positions(single_cfg.prompts_per_step, WORLD, r, single_cfg.optim.mini_batches)
            for i, j in enumerate(pos):
                merged[j] = res["completions"][s][i * K : (i + 1) * K]
        flat = [c for group in merged for c in group]
        assert flat == single_completions[s], (
            f"step {s + 1}: the ranks' rollouts are not the single process's"
        )
    assert any(len(c) > 1 for c in single_completions[0])
    # Every rank holds the same parameters (gradients reduced, identical optimiser steps).
    p0, p1 = results[0]["params"], results[1]["params"]
    assert _max_err(p0, p1)[0] == 0.0, "the ranks' parameters differ"
    ref = _full_params(single.model)
    before = _full_params(load_model_and_tokenizer("embedded")[0])
    moved = _max_err(ref, before)[0]
    assert moved > 1e-4, f"the single-process run did not train (max parameter change {moved})"
    # The pure summation-order noise of fp32 in one process: the same run with another micro-batch size.
    noise_cfg = _config(
        tmp_path / "noise", preset, "rollout.seed_per_prompt=true", "optim.micro_batch_size=2", *extra
    )
    noise, _, noise_completions, noise_grads = _run(noise_cfg, steps)
    assert noise_completions == single_completions
    # Gradients of the first optimiser step (after the all-reduce / reduce-scatter), before AdamW.
    g_scale = max(float(g.abs().max()) for g in single_grads.values())
    g_noise = _max_err(noise_grads, single_grads)[0]
    g_err, where = _max_err(results[0]["grads"], single_grads)
    assert g_err <= 2 * g_noise + 1e-6 * g_scale, (
        f"first gradient, distributed vs single process: max |dg| = {g_err:.3e} at {where} > 2 x "
        f"{g_noise:.3e} (fp32 summation-order noise) + 1e-6 x {g_scale:.3e}"
    )
    # Parameters after every step, relative to how far the steps moved them.
    moved_norm = _norm_diff(ref, before)
    p_noise = _norm_diff(_full_params(noise.model), ref) / moved_norm
    p_err = _norm_diff(p0, ref) / moved_norm
    assert p_err <= 2 * p_noise + 1e-5, (
        f"parameters, distributed vs single process: ||dp|| / ||p_single - p_0|| = {p_err:.3e} > 2 x "
        f"{p_noise:.3e} (fp32 summation-order noise) + 1e-5 (max |dp| = {_max_err(p0, ref)[0]:.3e})"
    )
    # The reduced metrics are the single process's metrics of the whole batch.
    for s in range(steps):
        dm, sm = results[0]["metrics"][s], single_metrics[s]
        assert dm == results[1]["metrics"][s], "the ranks' reduced metrics differ"
        assert dm["tokens"] == sm["tokens"]
        for key in ("reward", "completion_length", "frac_truncated", "advantage_abs_mean", "loss", "kl"):
            if key in sm:
                assert dm[key] == pytest.approx(sm[key], rel=1e-4, abs=1e-6), (s, key)
        assert dm["grad_norm"] == pytest.approx(sm["grad_norm"], rel=1e-3), s
    return ref


def test_ddp_two_processes_match_one_process(tmp_path):
    """2-process gloo DDP (DRO preset: R3 + length reward, Dr. GRPO loss, k3 KL), 2 steps: the parameters,
    rollouts and reduced metrics of one process at the same global batch and seed."""
    results = _spawn(tmp_path, "dro", [], steps=2)
    _check_against_single(tmp_path, results, "dro", [], steps=2)


def test_ddp_resume_continues_like_one_uninterrupted_process(tmp_path):
    """2-process DDP: one step, a checkpoint (rank 0 writes), a new Trainer on every rank resumes from it
    (rank 1 starts from other weights: the checkpoint must replace them), one more step: the rollouts,
    metrics and parameters of one uninterrupted process over both steps; packed sequences on both sides."""
    extra = [_FSDP[0], "packing=true"]  # packed forward passes too (docs/trainer.md section 11)
    results = _spawn(tmp_path, "grpo", extra, steps=2, resume_at=1)
    _check_against_single(tmp_path, results, "grpo", extra, steps=2)


def test_fsdp2_two_processes_one_step(tmp_path):
    """2-process gloo FSDP2 (fully_shard per decoder layer + root; the fused loss on the gathered lm_head),
    one step, then a checkpoint of the full parameters written by rank 0: both equal one process's."""
    results = _spawn(tmp_path, "grpo", ["distributed.mode=fsdp2", *_FSDP], steps=1, save=True)
    ref = _check_against_single(tmp_path, results, "grpo", _FSDP, steps=1)
    from safetensors.torch import load_file

    ckpt = results[0]["ckpt"]
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    assert sorted(saved) == sorted(ref), "the FSDP2 checkpoint does not hold every parameter"
    for name, p in results[0]["params"].items():
        assert torch.equal(saved[name], p), name
    state = json.loads(open(os.path.join(ckpt, "trainer_state.json")).read())
    assert state["step"] == 1


def test_fsdp2_packed_one_step(tmp_path):
    """FSDP2 with packed forward passes: the packed decoder call goes through the FSDP2-aware root forward
    (the lm_head gathered), and one step equals one packed process."""
    results = _spawn(tmp_path, "grpo", ["distributed.mode=fsdp2", *_FSDP_PACKED], steps=1)
    _check_against_single(tmp_path, results, "grpo", _FSDP_PACKED, steps=1)


# ----------------------------------------------------------------------------------------------------------
# No processes: the rank layout, the seeds and the configuration errors
# ----------------------------------------------------------------------------------------------------------


def test_share_positions_whole_groups_per_mini_batch():
    # 8 prompts, 2 mini-batches of 4, 2 ranks: rank r holds run r of each mini-batch block.
    assert share_positions(8, 2, 0, 2) == [0, 1, 4, 5]
    assert share_positions(8, 2, 1, 2) == [2, 3, 6, 7]
    assert share_positions(6, 3, 2, 1) == [4, 5]
    every = sorted(j for r in range(4) for j in share_positions(16, 4, r, 2))
    assert every == list(range(16))
    with pytest.raises(ValueError, match=r"prompts_per_step \(6\) must be a multiple of world_size \(4\)"):
        share_positions(6, 4, 0, 1)
    with pytest.raises(ValueError, match=r"world_size x optim.mini_batches \(2 x 2\)"):
        share_positions(6, 2, 0, 2)


def test_prompt_seeds_depend_on_step_and_position_only():
    seeds = {prompt_seed(s, j) for s in range(50) for j in range(50)}
    assert len(seeds) == 2500 and all(0 <= x < 2**63 for x in seeds)
    assert prompt_seed(3, 7) == prompt_seed(3, 7)


def test_config_errors_name_the_setting(tmp_path):
    ctx = DistContext(mode="ddp", world_size=2, rank=1)
    with pytest.raises(ValueError, match=r"prompts_per_step \(3\) must be a multiple of world_size \(2\)"):
        ctx.check_config(_config(tmp_path, "dro", "prompts_per_step=3", "optim.mini_batches=1"))
    with pytest.raises(ValueError, match=r"optim.micro_batch_size \(2\) must divide each rank's share"):
        ctx.check_config(
            _config(
                tmp_path,
                "dro",
                "prompts_per_step=2",
                "optim.mini_batches=1",
                "rollout.group_size=3",
                "optim.micro_batch_size=2",
            )
        )
    fsdp = DistContext(mode="fsdp2", world_size=2)
    with pytest.raises(ValueError, match=r"fsdp2: the reward\(s\) \['r3'\] score with the policy model"):
        fsdp.check_config(_config(tmp_path, "dro"))
    with pytest.raises(Exception, match="distributed.mode must be auto, off, ddp or fsdp2"):
        _config(tmp_path, "dro", "distributed.mode=zero3")


def test_world_size_without_launcher_is_a_clear_error(tmp_path, monkeypatch):
    from reasonrl.trainer.distributed import setup_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK is not set; launch with torchrun"):
        setup_distributed(_config(tmp_path, "dro"), "cpu")
    with pytest.raises(ValueError, match="distributed.mode=off, but WORLD_SIZE is 2"):
        setup_distributed(_config(tmp_path, "dro", "distributed.mode=off"), "cpu")

