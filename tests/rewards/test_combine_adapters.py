"""WeightedSumReward (components kept in the diagnostics, TRL's NaN rule) and the TRL / verl adapters: the
call shapes those trainers use (TRL 1.16 GRPOTrainer._calculate_rewards keywords; verl compute_score per
response and batched)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from reasonrl.rewards import (
    LaserReward,
    NumericAnswerReward,
    RewardOutput,
    WeightedSumReward,
    as_trl_reward,
    as_verl_score,
)


class Const:
    """A reward returning fixed values (NaN allowed) and one diagnostic."""

    name = "const"

    def __init__(self, values):
        self.values = values

    def __call__(self, completions=None, **kwargs):
        return RewardOutput(torch.tensor(self.values, dtype=torch.float32), {"seen": list(completions)})


def test_weighted_sum_and_nan_policies():
    a, b = Const([1.0, math.nan, math.nan, 2.0]), Const([0.5, 3.0, math.nan, -1.0])
    out = WeightedSumReward({"a": (a, 2.0), "b": (b, -1.0)})(completions=["w", "x", "y", "z"])
    assert out.rewards.tolist()[:2] == [1.5, -3.0] and math.isnan(out.rewards[2].item())
    assert out.rewards[3].item() == 5.0
    assert out.diagnostics["a"].tolist()[0] == 1.0 and out.diagnostics["b/seen"] == ["w", "x", "y", "z"]
    strict = WeightedSumReward({"a": (a, 2.0), "b": b}, nan_policy="propagate")(completions=list("wxyz"))
    assert strict.rewards.tolist()[0] == 2.5 and torch.isnan(strict.rewards[1:3]).all()
    with pytest.raises(ValueError, match="weight"):
        WeightedSumReward({"a": (a, math.inf)})
    with pytest.raises(ValueError, match="nan_policy"):
        WeightedSumReward({"a": a}, nan_policy="zero")
    with pytest.raises(ValueError, match="returned"):
        WeightedSumReward({"a": a, "c": Const([1.0])})(completions=list("wxyz"))


def test_numeric_plus_laser_components():
    comps = ["<think>t</think> \\boxed{42}", "<think>t</think> \\boxed{41}"]
    laser = LaserReward(method="laser", target_length=5, verifier="numeric")
    combo = WeightedSumReward({"num": NumericAnswerReward(), "laser": (laser, 0.5)})
    out = combo(completions=comps, references=["42", "42"], completion_ids=[[1] * 3, [1] * 9])
    assert out.rewards.tolist() == [1.0 + 0.5 * 1.5, 0.0 + 0.5 * -0.5]
    assert out.diagnostics["num/status"] == ["correct", "incorrect"]
    assert out.diagnostics["laser/status"] == ["correct", "wrong"]


def test_trl_adapter_call_shape():
    logged, extra = {}, {}
    fn = as_trl_reward(NumericAnswerReward())
    assert fn.__name__ == "numeric_answer"
    # exactly the keywords GRPOTrainer._calculate_rewards passes (TRL 1.16): dataset columns + runtime hooks
    got = fn(prompts=["q1", "q1"], completions=[[{"role": "assistant", "content": "answer: 3"}],
                                                [{"role": "assistant", "content": "no idea"}]],
             completion_ids=[[5, 6], [7]], answer=["3", "3"], trainer_state=None,
             log_extra=lambda c, v: extra.setdefault(c, v), log_metric=lambda k, v: logged.setdefault(k, v))
    assert got == [1.0, 0.0]
    assert logged["numeric_answer/status_correct"] == 0.5
    assert logged["numeric_answer/status_unparsable"] == 0.5
    assert logged["numeric_answer/gold"] == 3.0
    # bad gold -> None (TRL's "not scored")
    assert fn(prompts=["q"], completions=["answer: 3"], completion_ids=[[1]], solution=["n/a"]) == [None]
    with pytest.raises(ValueError, match="column"):
        as_trl_reward(NumericAnswerReward(), reference_column="gold")(prompts=["q"], completions=["1"],
                                                                       completion_ids=[[1]], answer=["1"])
    # TRL inspects nothing but calls with keywords: the wrapper must accept them all
    params = inspect.signature(fn).parameters
    assert {"prompts", "completions", "completion_ids"} <= set(params)


def test_trl_adapter_inside_grpo_calculate_rewards():
    """Run TRL's own _calculate_rewards with the wrapped reward on a stub trainer (no model needed)."""
    trl = pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    fn = as_trl_reward(NumericAnswerReward())

    class Stub:
        reward_funcs = [fn]
        reward_processing_classes = [None]
        reward_func_names = [fn.__name__]
        environments = None

        class state:  # noqa: N801
            global_step = 0

        class args:  # noqa: N801
            report_to = []

        class accelerator:  # noqa: N801
            device = torch.device("cpu")
            is_main_process = True

        def _log_completion_extra(self, column, values):
            pass

        def _log_metric(self, name, value):
            pass

    inputs = [{"prompt": "q", "answer": "3"}, {"prompt": "q", "answer": "3"}]
    method = GRPOTrainer._calculate_rewards
    method = getattr(method, "__wrapped__", method)  # the profiling decorator
    try:
        rewards = method(Stub(), inputs, ["q", "q"], ["answer: 3", "answer: 4"], [[1], [2]])
    except (AttributeError, TypeError) as err:  # a TRL version whose internals differ from 1.16
        pytest.skip(f"TRL {trl.__version__} _calculate_rewards internals differ: {err}")
    assert rewards.tolist() == [[1.0], [0.0]]


def test_verl_adapter_per_item_and_batch():
    score = as_verl_score(NumericAnswerReward())
    out = score("finqa", "<think>x</think>answer: 25%", "0.25", extra_info={"index": 3})
    assert out["score"] == 1.0 and out["status"] == "correct" and out["unscorable"] == 0
    bad = score("finqa", "answer: 1", "n/a")
    assert bad["score"] == 0.0 and bad["unscorable"] == 1 and bad["status"] == "bad_gold"
    keep_nan = as_verl_score(NumericAnswerReward(), nan_score=None)("finqa", "answer: 1", "n/a")
    assert math.isnan(keep_nan["score"])
    # verl's naive reward manager calls with keywords
    assert score(data_source="x", solution_str="answer: 2", ground_truth="2", extra_info=None)["score"] == 1.0
    batch = as_verl_score(LaserReward(method="laser_d", target_length=1024, verifier="numeric",
                                      tokenizer=lambda t, add_special_tokens=False: {"input_ids": t.split()}),
                          batch=True)
    sols = ["<think>a</think> \\boxed{1}", "<think>a b c</think> \\boxed{2}"]
    res = batch(["d", "d"], sols, ["1", "1"], [{"prompt": "p"}, {"prompt": "p"}])
    assert [r["score"] for r in res] == [1.5, -0.5]
    assert [r["length"] for r in res] == [2, 4] and res[0]["bucket"] == "medium"
