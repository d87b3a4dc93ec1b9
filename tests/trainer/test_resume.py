"""Checkpoints and resume (docs/trainer.md section 7.1): a run killed between two checkpoints and resumed ends
with the same parameters and optimiser state, bit for bit, as the uninterrupted run; a damaged latest
checkpoint is skipped with a warning and the previous one is used."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reasonrl.trainer import CheckpointError, CheckpointWarning, Trainer, load_config
from reasonrl.trainer.checkpoint import MANIFEST, list_checkpoints, verify_checkpoint

REPO = Path(__file__).resolve().parents[2]

#: A run of about 0.3 s per step on a quiet core: 2 prompts x 4 completions of at most 24 tokens.
TINY = [
    "prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "eval.size=2",
    "eval.max_new_tokens=8",
    "optim.lr=2e-4",
    "rollout.mask_truncated_completions=false",  # truncated completions still train: every step updates
    "threads=1",
    "log.progress=false",
    "log.plot=false",
    "log.tensorboard=off",
]


def _assert_same_state(a_model, a_opt: dict, b_model, b_opt: dict) -> None:
    """Parameters, buffers and the optimiser state (moments, step counts, param groups) are bit-identical."""
    sa, sb = a_model.state_dict(), b_model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"parameter {k} differs"
    assert a_opt["optimizer"]["param_groups"] == b_opt["optimizer"]["param_groups"]
    assert a_opt["optimizer"]["state"].keys() == b_opt["optimizer"]["state"].keys()
    assert a_opt["optimizer"]["state"], "the optimiser has no state: no step was taken"
    for i, st in a_opt["optimizer"]["state"].items():
        other = b_opt["optimizer"]["state"][i]
        assert st.keys() == other.keys()
        for key, v in st.items():
            assert torch.equal(v, other[key]), f"optimiser state {i}.{key} differs"
    assert a_opt["scheduler"] == b_opt["scheduler"]


def _opt_state(trainer) -> dict:
    return {"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict()}


def _without_timings(history: list[dict]) -> list[dict]:
    drop = ("time/", "tokens_per_s")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in history]


def _same_history(a: list[dict], b: list[dict]) -> None:
    # NaN != NaN: compare the JSON texts (NaN is written the same way on both sides).
    assert json.dumps(_without_timings(a)) == json.dumps(_without_timings(b))


# ----------------------------------------------------------------------------------------------------------
# Kill with SIGKILL between two checkpoints, resume with `python -m reasonrl train --resume`
# ----------------------------------------------------------------------------------------------------------


def _cli(out_dir: Path, *extra: str) -> list[str]:
    args = ["--preset", "dro", *TINY, "steps=6", "log.save_every=2", "log.save_total_limit=2"]
    return [sys.executable, "-m", "reasonrl", "train", *args, f"log.out_dir={out_dir}", *extra]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_sigkill_between_checkpoints_then_resume_is_bit_identical(tmp_path, embedded):
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_cli(run), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not any((p / MANIFEST).exists() for p in list_checkpoints(ckpts)):
            assert proc.poll() is None, (
                "the run ended before its first checkpoint:\n" + (tmp_path / "first.log").read_text()
            )
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not (run / "summary.json").exists(), "the run finished before the kill"
    killed_at = [int(p.name[5:]) for p in list_checkpoints(ckpts) if (p / MANIFEST).exists()]
    assert killed_at and max(killed_at) < 6

    res = subprocess.run(_cli(run, "--resume"), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((run / "summary.json").read_text())
    resumed_from = Path(summary["resumed_from"])
    assert resumed_from.parent == ckpts and 2 <= int(resumed_from.name[5:]) < 6
    assert "resumed from" in res.stdout
    assert not list(ckpts.glob(".tmp-*")), "a temporary folder of the killed writer was left behind"

    # The uninterrupted run, in this process (one thread, like the subprocesses).
    cfg = load_config(
        preset="dro", overrides=[*TINY, "steps=6", "log.save_every=0", f"log.out_dir={tmp_path / 'ref'}"]
    )
    ref = Trainer(cfg, model=copy.deepcopy(embedded[0]), tokenizer=embedded[1])
    ref.train()

    final = ckpts / "step-000006"
    verify_checkpoint(final)
    resumed = copy.deepcopy(embedded[0])
    from safetensors.torch import load_file

    resumed.load_state_dict(load_file(str(final / "model.safetensors")))
    opt = torch.load(final / "optimizer.pt", weights_only=True)
    _assert_same_state(ref.model, _opt_state(ref), resumed, opt)
    # metrics.jsonl continues without duplicates: the steps after the last checkpoint, logged by the killed
    # run, were dropped on resume and logged again, with the same values.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 7))
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    _same_history(ref_rows, rows)


# ----------------------------------------------------------------------------------------------------------
# In process: interrupt after a checkpoint, a fresh Trainer resumes (resume config key)
# ----------------------------------------------------------------------------------------------------------


class _Interrupt(BaseException):
    pass


def _set_laser_targets(trainer) -> None:
    """A LASER-D monitor evaluation (docs/rewards.md 4.4) giving every bucket the target 8 tokens, so that the
    length term binds on the embedded task (without targets, the longest response of the batch is used)."""
    monitor = trainer.rewards[0][1].monitor
    lengths, correct = [4, 6, 8, 5, 7, 3, 2, 8, 6], [True] * 3 + [True, False, False] + [False] * 3
    monitor.update(lengths, correct, [0, 0, 0, 1, 1, 1, 2, 2, 2], step=0)  # easy, medium, hard prompts
    assert all(t is not None for t in monitor.targets.values())


CASES = {
    # R3 with a lagged reward policy (refreshed every 3 optimiser steps: between checkpoints), KL to the
    # frozen reference (dro: beta 0.001), adaptive entropy control, two mini-batches, the R3 filter.
    "dro_lagged_entropy_filter": (
        "dro",
        [
            "rewards=[{name: r3, options: {reward_policy: lagged, lag_steps: 3}}]",
            "entropy_control.enabled=true",
            "entropy_control.initial_coef=0.01",
            "entropy_control.target=5.0",
            "optim.mini_batches=2",
            "r3_filter.enabled=true",
            "r3_filter.interval_steps=2",
            "r3_filter.pool_size=6",
            "r3_filter.options={carry_over_fraction: 0.5, num_samples: 4}",
        ],
    ),
    # LASER-D: its length monitor holds the adaptive targets.
    "laser_d_monitor": ("laser", ["rewards.0.options.target_length=8", "rollout.max_new_tokens=40"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_process_matches_uninterrupted(case, tmp_path, embedded):
    preset, extra = CASES[case]

    def cfg(out, *more):
        return load_config(
            preset=preset,
            overrides=[*TINY, "steps=4", "log.save_every=2", *extra, f"log.out_dir={out}", *more],
        )

    ref = Trainer(cfg(tmp_path / "ref"), model=copy.deepcopy(embedded[0]), tokenizer=embedded[1])
    if preset == "laser":
        _set_laser_targets(ref)
    ref.train()

    first = Trainer(cfg(tmp_path / "run"), model=copy.deepcopy(embedded[0]), tokenizer=embedded[1])
    if preset == "laser":
        _set_laser_targets(first)
    inner = first.step

    def step():
        if first.step_count == 3:
            raise _Interrupt
        return inner()

    first.step = step
    with pytest.raises(_Interrupt):
        first.train()
    assert first.last_checkpoint.name == "step-000002"

    # A fresh Trainer, built as the run was (same config and initial model), resumes through the config key.
    again = Trainer(
        cfg(tmp_path / "run", "resume=latest"), model=copy.deepcopy(embedded[0]), tokenizer=embedded[1]
    )
    summary = again.train()
    assert summary["resumed_from"] == str(tmp_path / "run" / "checkpoints" / "step-000002")
    assert again.step_count == ref.step_count == 4
    _assert_same_state(ref.model, _opt_state(ref), again.model, _opt_state(again))
    _same_history(ref.history, again.history)
    assert again._cursor == ref._cursor
    if case.startswith("dro"):
        r_ref, r_again = ref.rewards[0][1], again.rewards[0][1]
        assert r_ref._steps == r_again._steps == 8
        for k, v in r_ref._copy.state_dict().items():
            assert torch.equal(v, r_again._copy.state_dict()[k]), f"lagged R3 copy {k} differs"
        assert again.entropy_ctl.state_dict() == ref.entropy_ctl.state_dict()
        assert ref.entropy_ctl.state_dict()["entropy_coef"] != 0.01  # the controller moved
        assert [it["index"] for it in again._filter_set] == [it["index"] for it in ref._filter_set]
        assert any(h["kind"] == "filter" for h in again.history)
    else:
        assert again.rewards[0][1].monitor.targets == ref.rewards[0][1].monitor.targets
        statuses = [s for h in ref.history for s in ([h["accuracy"]] if "accuracy" in h else [])]
        assert any(a > 0 for a in statuses), "no correct completion: the LASER targets never mattered"


def test_resume_restores_every_rng():
    """Python random, NumPy and torch continue where the checkpoint left them."""
    import random

    import numpy as np

    from reasonrl.trainer.checkpoint import capture_rng_state, restore_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    expect = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(state)
    got = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))
    assert got[:3] == expect[:3] and torch.equal(got[3], expect[3])


# ----------------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory, embedded):
    """An uninterrupted 3-step run with a checkpoint after every step; returns (run folder, final state)."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    cfg = load_config(
        preset="dro",
        overrides=[*TINY, "steps=3", "log.save_every=1", "log.save_total_limit=3", f"log.out_dir={out}"],
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg, model=copy.deepcopy(embedded[0]), tokenizer=embedded[1])
        trainer.train()
    finally:
        torch.set_num_threads(before)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-00000{i}" for i in (1, 2, 3)]
    return out, trainer


def _truncate(p: Path) -> None:
    f = p / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _flip_byte(p: Path) -> None:
    f = p / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    f.write_bytes(bytes(data))


def _drop_manifest(p: Path) -> None:
    (p / MANIFEST).unlink()


def _drop_file(p: Path) -> None:
    (p / "rng_state.pt").unlink()


DAMAGE = {
    "truncated": (_truncate, "truncated"),
    "hash_mismatch": (_flip_byte, "SHA-256"),
    "no_manifest": (_drop_manifest, "no manifest.json"),
    "missing_file": (_drop_file, "rng_state.pt is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_previous(damage, tmp_path, three_checkpoints, embedded):
    src, finished = three_checkpoints
    run = tmp_path / "run"
    shutil.copytree(src, run)
    ckpts = run / "checkpoints"
    hurt, reason = DAMAGE[damage]
    hurt(ckpts / "step-000003")
    with pytest.raises(CheckpointError, match=reason):
        verify_checkpoint(ckpts / "step-000003")

    cfg = load_config(
        preset="dro",
        overrides=[*TINY, "steps=3", "log.save_every=1", "log.save_total_limit=3", f"log.out_dir={run}"],
    )
    trainer = Trainer(cfg, model=copy.deepcopy(embedded[0]), tokenizer=embedded[1])
    with pytest.warns(CheckpointWarning, match=rf"skipping damaged checkpoint .*step-000003: .*{reason}"):
        used = trainer.resume("latest")
    assert used == ckpts / "step-000002" and trainer.step_count == 2
    # The damaged one is set aside (kept for inspection, out of the rotation and of later resumes).
    assert not (ckpts / "step-000003").exists() and list(ckpts.glob(".corrupt-step-000003-*"))
    # The run continues from step 2 to the same end as the uninterrupted run, and writes step 3 again.
    trainer.train()
    _assert_same_state(finished.model, _opt_state(finished), trainer.model, _opt_state(trainer))
    verify_checkpoint(ckpts / "step-000003")


def test_named_damaged_checkpoint_raises(tmp_path, three_checkpoints, embedded):
    src, _ = three_checkpoints
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _truncate(run / "checkpoints" / "step-000002")
    cfg = load_config(preset="dro", overrides=[*TINY, "steps=3", f"log.out_dir={run}"])
    trainer = Trainer(cfg, model=copy.deepcopy(embedded[0]), tokenizer=embedded[1])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="step-000002: model.safetensors has .* bytes"):
        trainer.resume(run / "checkpoints" / "step-000002")  # named explicitly: no silent fallback
    assert trainer.step_count == 0
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())
    # A run folder resolves to its newest intact checkpoint.
    assert trainer.resume(run) == run / "checkpoints" / "step-000003"


def test_every_checkpoint_damaged_starts_fresh_with_warning(tmp_path, three_checkpoints, embedded):
    src, _ = three_checkpoints
    run = tmp_path / "run"
    shutil.copytree(src, run)
    for p in list_checkpoints(run / "checkpoints"):
        _drop_manifest(p)
    cfg = load_config(preset="dro", overrides=[*TINY, "steps=3", f"log.out_dir={run}"])
    trainer = Trainer(cfg, model=copy.deepcopy(embedded[0]), tokenizer=embedded[1])
    with pytest.warns(CheckpointWarning) as caught:
        assert trainer.resume("latest") is None
    messages = [str(w.message) for w in caught]
    assert sum("skipping damaged checkpoint" in m for m in messages) == 3
    assert "no intact checkpoint" in messages[-1] and "starting at step 0" in messages[-1]
    assert trainer.step_count == 0
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no intact checkpoint"):
        trainer.resume(run)


def test_resume_checks_the_trainer_fits(tmp_path, three_checkpoints, embedded):
    """Other rewards, another reference model: an error before anything is changed; another config: a
    warning naming the keys."""
    src, _ = three_checkpoints
    ckpt = src / "checkpoints" / "step-000002"
    base = [*TINY, "steps=3", f"log.out_dir={tmp_path}"]
    other = Trainer(
        load_config(preset="dro", overrides=[*base, "rewards=[{name: task}]"]),
        model=copy.deepcopy(embedded[0]),
        tokenizer=embedded[1],
    )
    with pytest.raises(CheckpointError, match=r"rewards are \['r3'\], the trainer's \['task'\]"):
        other.resume(ckpt)
    trained = copy.deepcopy(embedded[0])
    with torch.no_grad():
        next(trained.parameters()).add_(1e-3)
    wrong_ref = Trainer(load_config(preset="dro", overrides=base), model=trained, tokenizer=embedded[1])
    with pytest.raises(CheckpointError, match="reference model differs"):
        wrong_ref.resume(ckpt)
    assert wrong_ref.step_count == 0
    changed = Trainer(
        load_config(preset="dro", overrides=[*base, "optim.max_grad_norm=0.5"]),
        model=copy.deepcopy(embedded[0]),
        tokenizer=embedded[1],
    )
    with pytest.warns(CheckpointWarning, match="optim.max_grad_norm"):
        changed.resume(ckpt)
    assert changed.step_count == 2


def test_cli_resume_flag_sets_the_config_key(tmp_path, capsys):
    from reasonrl.cli import main

    assert main(["train", "--print-config", "--resume"]) == 0
    assert "resume: latest" in capsys.readouterr().out
    assert main(["train", "--print-config", "--resume", str(tmp_path)]) == 0
    assert f"resume: {tmp_path}" in capsys.readouterr().out
    assert main(["train", "--print-config", "--resume", "steps=7"]) == 0
    out = capsys.readouterr().out
    assert "resume: latest" in out and "steps: 7" in out


def test_leftovers_of_a_dead_writer_are_cleaned(tmp_path, three_checkpoints, embedded):
    """A temporary folder of a writer that died is removed on resume; a checkpoint it had renamed aside to
    replace it (and never replaced) is put back."""
    src, _ = three_checkpoints
    run = tmp_path / "run"
    shutil.copytree(src, run)
    ckpts = run / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ckpts / f".tmp-step-000004-{dead.pid}").mkdir()
    (ckpts / f".tmp-step-000004-{dead.pid}" / "model.safetensors").write_bytes(b"half")
    os.rename(ckpts / "step-000003", ckpts / f".old-step-000003-{dead.pid}")
    cfg = load_config(preset="dro", overrides=[*TINY, "steps=3", f"log.out_dir={run}"])
    trainer = Trainer(cfg, model=copy.deepcopy(embedded[0]), tokenizer=embedded[1])
    assert trainer.resume("latest") == ckpts / "step-000003"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002", "step-000003"]
    verify_checkpoint(ckpts / "step-000003")


def test_reward_state_dicts_round_trip(embedded):
    from reasonrl.rewards import LaserConfig, LaserReward, R3Reward

    model = copy.deepcopy(embedded[0])
    r3 = R3Reward(model, embedded[1], reward_policy="lagged", lag_steps=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    r3.step()
    r3.step()  # refreshes the lagged copy from the moved policy
    fresh = R3Reward(copy.deepcopy(embedded[0]), embedded[1], reward_policy="lagged", lag_steps=2)
    fresh.load_state_dict(r3.state_dict())
    assert fresh._steps == 2
    for k, v in r3.scoring_model.state_dict().items():
        assert torch.equal(v, fresh.scoring_model.state_dict()[k])
    current = R3Reward(model, embedded[1])
    with pytest.raises(ValueError, match="'lagged' entry"):
        fresh.load_state_dict(current.state_dict())

    laser = LaserReward(LaserConfig(method="laser_d", target_length=8))
    laser.monitor.update([4, 9, 30, 2], [True, True, False, False], [0, 0, 1, 1], step=5)
    other = LaserReward(LaserConfig(method="laser_d", target_length=8))
    other.load_state_dict(laser.state_dict())
    assert other.monitor.targets == laser.monitor.targets and other.monitor.last_step == 5
    assert other.monitor.coverage == laser.monitor.coverage
