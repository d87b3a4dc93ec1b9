"""LASER / LASER-D / LASER-DE (docs/rewards.md section 4): base reward and format rules, the shaped rewards of
every method on hand-made examples (both LASER-DE variants), difficulty buckets, the adaptive target lengths
of the monitor under both coverage rules, and the repetition filter."""

from __future__ import annotations

import pytest

from reasonrl.rewards import LaserConfig, LaserLengthMonitor, LaserReward
from reasonrl.rewards.laser import difficulty_buckets, is_repetitive, laser_base_reward

OK = "<think>reasoning</think> so \\boxed{42}"
WRONG = "<think>reasoning</think> so \\boxed{41}"
INVALID = "<think>reasoning without an end"


def test_base_reward_and_format():
    cfg = LaserConfig(verifier="numeric")
    assert laser_base_reward(OK, "42", cfg) == (1.0, "correct")
    assert laser_base_reward(WRONG, "42", cfg) == (-0.5, "wrong")
    assert laser_base_reward(INVALID + " \\boxed{42}", "42", cfg) == (-1.0, "invalid")  # no </think>
    assert laser_base_reward("reasoning</think> \\boxed{42}", "42", cfg) == (-1.0, "invalid")  # no <think>
    # the chat template opened <think> in the prompt
    got = laser_base_reward("reasoning</think> \\boxed{42}", "42", cfg, prompt="...<think>\n")
    assert got == (1.0, "correct")
    no_prompt = LaserConfig(verifier="numeric", think_start_in_prompt=False)
    got = laser_base_reward("reasoning</think> \\boxed{42}", "42", no_prompt, prompt="<think>")
    assert got[1] == "invalid"
    # \boxed only inside the reasoning: invalid
    assert laser_base_reward("<think>\\boxed{42}</think> 42", "42", cfg) == (-1.0, "invalid")
    # the last \boxed after </think> counts; 1e-6 relative tolerance
    assert laser_base_reward("<think></think>\\boxed{1} \\boxed{42.00000001}", "42", cfg)[1] == "correct"
    assert laser_base_reward("<think></think>\\boxed{42.01}", "42", cfg)[1] == "wrong"
    assert laser_base_reward(None, "42", cfg) == (-1.0, "invalid")


def test_buckets():
    correct = [True] * 6 + [False] * 2 + [True] * 3 + [False] * 5 + [True] * 2 + [False] * 6
    gids = [0] * 8 + [1] * 8 + [2] * 8
    buckets, acc = difficulty_buckets(correct, gids)
    assert buckets[0] == "easy" and buckets[8] == "medium" and buckets[16] == "hard"
    assert acc == {0: 0.75, 1: 0.375, 2: 0.25}
    b, _ = difficulty_buckets([True] * 5 + [False] * 3, [0] * 8)  # 5/8 < 2/3: medium
    assert b[0] == "medium"


def test_laser_fixed_target():
    rw = LaserReward(method="laser", target_length=10, verifier="numeric")
    out = rw([OK, OK, WRONG, INVALID], ["42"] * 4, completion_lengths=[10, 11, 5, 5])
    assert out.rewards.tolist() == [1.5, 1.0, -0.5, -1.0]
    assert out.diagnostics["target"] == [10] * 4


def _batch():
    # one group of K = 4: 3 correct (easy: 3/4 >= 2/3); lengths straddle the target 100
    comps = [OK, OK, WRONG, INVALID, OK, WRONG, WRONG, INVALID]
    lengths = [90, 150, 150, 150, 90, 90, 150, 50]
    return comps, lengths


def test_laser_d_uses_monitor_targets_and_batch_fallback():
    comps, lengths = _batch()
    # group 0: 2 correct of 4 -> medium; group 1: 1 correct of 4 -> hard
    mon = LaserLengthMonitor(LaserConfig())
    mon.targets = {"easy": None, "medium": 100, "hard": None}
    rw = LaserReward(method="laser_d", verifier="numeric", monitor=mon)
    out = rw(comps, ["42"] * 8, completion_lengths=lengths, group_size=4)
    assert out.diagnostics["bucket"] == ["medium"] * 4 + ["hard"] * 4
    assert out.diagnostics["target"] == [100] * 4 + [150] * 4  # hard: no target -> longest in the batch
    assert out.rewards.tolist() == [1.5, 1.0, -0.5, -1.0, 1.5, -0.5, -0.5, -1.0]


def test_laser_de_paper_and_code_variants():
    comps = [OK, OK, WRONG, WRONG, INVALID, INVALID]
    lengths = [90, 150, 90, 150, 90, 150]
    ids = [[1, 2, 3] * 30] * 6  # repetitive token streams
    ids[3] = list(range(150))  # the long wrong answer is not repetitive
    mon = LaserLengthMonitor()
    mon.targets = {"easy": 100, "medium": 100, "hard": 100}
    paper = LaserReward(method="laser_de", de_variant="paper", verifier="numeric", monitor=mon)
    out = paper(comps, ["42"] * 6, completion_lengths=lengths, group_ids=[0] * 6)
    # long wrong -0.5 -> 0.0; long invalid -1.0 -> -0.5; short wrong / invalid unchanged
    assert out.rewards.tolist() == [1.5, 1.0, -0.5, 0.0, -1.0, -0.5]
    code = LaserReward(method="laser_de", de_variant="code", verifier="numeric", monitor=mon)
    out = code(comps, ["42"] * 6, completion_ids=ids, completion_lengths=lengths, group_ids=[0] * 6)
    # code: only a long WRONG (not invalid) answer gets the bonus, and only when not repetitive
    assert out.rewards.tolist() == [1.5, 1.0, -0.5, 0.0, -1.0, -1.0]
    assert out.diagnostics["repetitive"][3] is False
    ids[3] = [7, 8, 9, 10] * 40  # now repetitive
    out = code(comps, ["42"] * 6, completion_ids=ids, completion_lengths=lengths, group_ids=[0] * 6)
    assert out.rewards.tolist()[3] == -0.5 and out.diagnostics["repetitive"][3] is True


def test_monitor_candidates_and_coverage_rules():
    assert LaserLengthMonitor(LaserConfig(target_length=500, max_length=4096)).candidates() == \
        [500, 1024, 2048, 3072, 4096]
    assert LaserLengthMonitor(LaserConfig(target_length=2048, max_length=4096)).candidates() == \
        [2048, 3072, 4096]
    # Two easy prompts (7/8 correct) = 16 responses, 3 of them <= 500: P(500) = 3/16 = 0.1875.
    # paper: |C_easy| = 6 -> 0.1875 * 6 >= 1 -> L_A = 500; code: |C_easy| = 5 -> 0.94 < 1 -> next candidate.
    lengths = [100, 200, 300] + [900] * 5 + [3000] * 8
    correct = [True] * 7 + [False] + [True] * 7 + [False]
    gids = [0] * 8 + [1] * 8
    # One medium prompt (3/8): lengths 600..1300; P(1024) = 5/8 -> paper (|C|=3) and code (|C|=2) both qualify
    # at 1024, but P(500) = 0 qualifies for neither.
    lengths += [600, 700, 800, 900, 1000, 1100, 1200, 1300]
    correct += [True] * 3 + [False] * 5
    gids += [2] * 8
    # One hard prompt (0/8): |C| = 1 needs P = 1: the longest response 5000 > L_max -> no candidate -> None
    lengths += [100] * 7 + [5000]
    correct += [False] * 8
    gids += [3] * 8
    paper = LaserLengthMonitor(LaserConfig(target_length=500, max_length=4096))
    assert paper.update(lengths, correct, gids, step=0) == {"easy": 500, "medium": 1024, "hard": None}
    code = LaserLengthMonitor(LaserConfig(target_length=500, max_length=4096, coverage_rule="code"))
    assert code.update(lengths, correct, gids) == {"easy": 1024, "medium": 1024, "hard": None}
    assert paper.coverage["easy"][500] == pytest.approx(3 / 16)
    # medium with P(1024) = 3/8: paper needs 1/3 (ok), code needs 1/2 (fails -> 2048)
    lengths2 = [600, 700, 800] + [1500] * 5
    assert LaserLengthMonitor(LaserConfig(target_length=500, max_length=4096)).update(
        lengths2, [True] * 3 + [False] * 5, [0] * 8)["medium"] == 1024
    assert LaserLengthMonitor(LaserConfig(target_length=500, max_length=4096, coverage_rule="code")).update(
        lengths2, [True] * 3 + [False] * 5, [0] * 8)["medium"] == 2048
    assert paper.due(0) and paper.due(40) and not paper.due(7)
    assert len(paper.sample_prompts(list(range(2000)), seed=1)) == 500
    assert paper.sample_prompts(list(range(2000)), seed=1) == paper.sample_prompts(list(range(2000)), seed=1)


def test_repetition_filter():
    assert is_repetitive([1, 2, 3, 4] * 30)                      # dense 4-gram repeats
    assert not is_repetitive(list(range(150)))
    assert is_repetitive([1, 2, 3] * 4)                           # short: a 2-gram, gaps 3 < 12 / 3
    assert not is_repetitive([1, 2, 3, 4, 5])
    far = list(range(200)) + list(range(1000, 1004)) + list(range(300, 400)) + list(range(1000, 1004))
    # one 4-gram twice, far apart: needs 3 occurrences, and no 8-gram recurs
    assert not is_repetitive(far)
    eight = list(range(100)) + list(range(500, 508)) + list(range(200, 300)) + list(range(500, 508))
    assert is_repetitive(eight)                                   # a recurring 2n-gram (8-gram)


def test_errors():
    with pytest.raises(ValueError, match="method"):
        LaserConfig(method="larse")
    with pytest.raises(ValueError, match="max_length"):
        LaserConfig(target_length=4096, max_length=2048)
    with pytest.raises(ValueError, match="de_variant"):
        LaserConfig(de_variant="both")
    rw = LaserReward(method="laser_d")
    with pytest.raises(ValueError, match="group"):
        rw([OK], ["42"], completion_lengths=[5])
    with pytest.raises(ValueError, match="group_size"):
        rw([OK, OK, OK], ["42"] * 3, completion_lengths=[5] * 3, group_size=2)
    with pytest.raises(ValueError, match="completion_ids"):
        rw([OK], ["42"], group_size=1)


def test_length_step_sets_the_candidate_grid():
    cfg = LaserConfig(target_length=24, length_step=8, max_length=64)
    assert LaserLengthMonitor(cfg).candidates() == [24, 32, 40, 48, 56, 64]
    with pytest.raises(ValueError, match="length_step"):
        LaserConfig(length_step=0)


def test_after_step_feeds_the_monitor_from_training_batches():
    """The trainer hook: the targets are recomputed at step 0 and every monitor_interval steps from the
    training rollouts seen since the last update, and are then used by the reward."""
    cfg = LaserConfig(method="laser_d", target_length=24, length_step=8, max_length=64, monitor_interval=2,
                      verifier="numeric")
    rw = LaserReward(cfg)
    # One easy prompt (4 of 4 correct), lengths 20, 30, 30, 30; paper rule |C_easy| = ceil(2K/3) = 3 with
    # K = 4: P(24) = 1/4 -> 3/4 < 1; P(32) = 1 -> L_A(easy) = 32.
    comps = [OK] * 4
    out = rw(comps, ["42"] * 4, completion_lengths=[20, 30, 30, 30], group_size=4)
    assert out.diagnostics["target"] == [30] * 4  # no target yet: the batch's longest response
    assert rw.after_step(out, step=0, group_size=4) == {"easy": 32, "medium": None, "hard": None}
    assert rw.monitor.last_step == 0
    out = rw(comps, ["42"] * 4, completion_lengths=[40, 40, 40, 20], group_size=4)
    assert out.diagnostics["target"] == [32] * 4
    assert out.rewards.tolist() == [1.0, 1.0, 1.0, 1.5]
    assert rw.after_step(out, step=1, group_size=4) is None  # not due: kept for the next update
    out2 = rw(comps, ["42"] * 4, completion_lengths=[20, 20, 20, 20], group_size=4)
    # step 2: the batches of steps 1 and 2 (two groups, 8 responses, 5 of them <= 24) -> P(24) = 5/8
    # and |C_easy| = 3 -> 15/8 >= 1 -> 24.
    assert rw.after_step(out2, step=2, group_size=4)["easy"] == 24
    fixed = LaserReward(LaserConfig(method="laser", verifier="numeric"))
    assert fixed.after_step(out2, step=0, group_size=4) is None


def test_trainer_calls_the_after_step_hook(tmp_path):
    """Trainer.step passes every reward's output to its ``after_step`` (LASER-D's monitor), with the 0-based
    step index."""
    import torch

    from reasonrl.rewards import RewardOutput
    from reasonrl.trainer import Trainer, load_config

    seen = []

    class Hooked:
        def __call__(self, completions, **kwargs):
            return RewardOutput(torch.tensor([float(len(c) % 3) for c in completions]))

        def after_step(self, output, *, step, group_size):
            seen.append((step, group_size, tuple(output.rewards.shape)))

    cfg = load_config(overrides=["steps=2", "prompts_per_step=2", "rollout.group_size=2",
                                 "rollout.max_new_tokens=16", "eval.size=2", "eval.max_new_tokens=8",
                                 f"log.out_dir={tmp_path}", "log.progress=false", "log.plot=false",
                                 "log.tensorboard=off", "threads=1"])
    tr = Trainer(cfg, rewards=[("hooked", Hooked(), 1.0)])
    tr.step()
    tr.step()
    assert seen == [(0, 2, (4,)), (1, 2, (4,))]
