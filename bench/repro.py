"""A small-scale reproduction of the papers' claims on the embedded task (docs/repro.md).

    reasonrl repro [--quick] [--seeds 3] [--jobs 1] [--out-dir bench/results/repro] [--render-only]

Trains the embedded tiny model (reasonrl/assets/tiny-arith, about 1.3M parameters) on the embedded arithmetic
task under each arm, with the same budget for every arm (steps, prompts per step, rollouts per prompt, token
limit, optimiser), and evaluates it on the held-out split:

1. ``base``          the model without RL;
2. ``dro_aggr``      GRPO on DRO's aggregate-certainty reward (uniform weights, plain sum; DRO-Aggr);
3. ``dro_r3``        GRPO on the R3 reward with the library defaults (DRO-R3);
4. ``correctness``   GRPO on the task verifier's 0/1 reward (the paper's "ideal verifier");
5. ``dro_r3_filter`` arm 3 plus R3 dynamic data filtering (both stages, carry-over);
6. ``pear``          PEAR on the correctness reward; ``laser_d``: LASER-D on the correctness reward.

Only the reward (and, for arm 5, the filter) differs between arms; every other setting is the common
recipe :data:`RECIPE` (why each value: docs/repro.md section 2). Evaluation, per run: greedy held-out accuracy
every ``eval_every`` steps (curves, time to a target accuracy), and at the end ``n`` sampled completions per
held-out prompt at the training temperature, giving pass@1 and pass@k (unbiased estimator of Chen et al.
2021, ``1 - C(n - c, k) / C(n, k)``) for k = 1, 2, 4, ..., n, the mean response length and the mean
chain-of-thought length (tokens up to and including ``</think>``).

Each run writes ``runs/<arm>/seed<s>.json`` under the output folder when it finishes (atomically); a later
invocation skips the runs whose JSON exists with the same budget, so the study can be completed across
sittings (an interrupted run restarts from its beginning). After every finished run the script re-renders
``repro.json`` (all runs and the per-arm aggregates), ``repro.md`` (the table and the verdict on each of the
papers' orderings, with the spread that decides it) and the PNG plots, so partial results always render
(with "n seeds done").
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ARMS = ("base", "dro_aggr", "dro_r3", "correctness", "dro_r3_filter", "pear", "laser_d")
ARM_LABELS = {
    "base": "1. base (no RL)",
    "dro_aggr": "2. DRO-Aggr (aggregate certainty)",
    "dro_r3": "3. DRO-R3",
    "correctness": "4. correctness (0/1 verifier)",
    "dro_r3_filter": "5. DRO-R3 + R3 filtering",
    "pear": "6a. PEAR (on correctness)",
    "laser_d": "6b. LASER-D (on correctness)",
}

#: The common recipe (every arm), sized for about 90 minutes on a 2-core CPU with ``--jobs 2`` (about
#: 2.5 s per step of 128 completions on one core; docs/repro.md section 2 has the arithmetic).
RECIPE: dict[str, Any] = {
    "steps": 60,
    "prompts_per_step": 16,
    "group_size": 8,
    "temperature": 0.7,
    "max_new_tokens": 64,
    "lr": 5e-5,
    "levels": [1, 2],
    "eval_size": 200,
    "eval_every": 10,
    "sample_prompts": 100,
    "sample_n": 8,
    "filter_pool": 128,
}

#: ``--quick``: one seed, a few tiny steps (the CI smoke run: every arm and every output, not a measurement).
QUICK: dict[str, Any] = {
    **RECIPE,
    "steps": 2,
    "prompts_per_step": 4,
    "group_size": 4,
    "eval_size": 16,
    "eval_every": 1,
    "sample_prompts": 8,
    "sample_n": 4,
    "filter_pool": 8,
}

#: The reward (and filter) of each arm, as TrainerConfig fields; everything else is the recipe.
#: LASER-D's length scale: L_T = 24 tokens with a candidate grid of 8 up to the 64-token limit (the paper's
#: 4096 / 1024 / 16384 scaled to completions of 20-40 tokens); its monitor is refreshed every 10 steps.
ARM_REWARDS: dict[str, list[dict]] = {
    "dro_aggr": [{"name": "r3", "weight": 1.0, "options": {"weighting": "uniform", "reduction": "sum"}}],
    "dro_r3": [{"name": "r3", "weight": 1.0, "options": {}}],
    "correctness": [{"name": "task", "weight": 1.0, "options": {}}],
    "dro_r3_filter": [{"name": "r3", "weight": 1.0, "options": {}}],
    "pear": [{"name": "pear", "weight": 1.0, "options": {"alpha": 1.0, "boxed_fallback": True}}],
    "laser_d": [
        {
            "name": "laser",
            "weight": 1.0,
            "options": {
                "method": "laser_d",
                "target_length": 24,
                "length_step": 8,
                "max_length": 64,
                "monitor_interval": 10,
                "verifier": "numeric",
            },
        }
    ],
}


def trainer_overrides(arm: str, seed: int, budget: dict, out_dir: str) -> dict:
    """The TrainerConfig (as a nested dict for ``load_config``) of one training run."""
    b = budget
    rewards = copy.deepcopy(ARM_REWARDS[arm])
    if arm == "pear":
        rewards[0]["options"]["temperature"] = b["temperature"]
    cfg: dict[str, Any] = {
        "seed": seed,
        "steps": b["steps"],
        "prompts_per_step": b["prompts_per_step"],
        "threads": 1,
        "task": {"levels": list(b["levels"]), "seed": 0},
        "rollout": {
            "group_size": b["group_size"],
            "temperature": b["temperature"],
            "top_p": 1.0,
            "max_new_tokens": b["max_new_tokens"],
            "mask_truncated_completions": True,
        },
        "rewards": rewards,
        "advantages": {"preset": "trl", "estimator": "grpo", "scale": "group"},
        "loss": {"loss_type": "dr_grpo", "epsilon_low": 0.2, "epsilon_high": 0.2, "beta": 0.0},
        "optim": {
            "lr": b["lr"],
            "warmup_ratio": 0.0,
            "schedule": "constant",
            "updates_per_batch": 1,
            "mini_batches": 2,
        },
        "eval": {"size": b["eval_size"], "every": b["eval_every"], "max_new_tokens": b["max_new_tokens"]},
        "log": {"out_dir": out_dir, "progress": False, "tensorboard": "off", "plot": False},
    }
    if arm == "dro_r3_filter":
        cfg["r3_filter"] = {
            "enabled": True,
            "pool_size": b["filter_pool"],
            "options": {"num_samples": b["group_size"], "seed": seed},
        }
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Evaluation helpers
# ----------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``,
    computed as a product so that it stays exact for any n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_for(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def cot_length(ids: list[int], marker: int) -> int | None:
    """Tokens of the chain of thought: up to and including the first ``</think>``; None without it."""
    return ids.index(marker) + 1 if marker in ids else None


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def sampled_eval(
    model, tokenizer, items: list[dict], *, n: int, temperature: float, max_new_tokens: int, seed: int
) -> dict:
    """``n`` sampled completions per held-out item at ``temperature``: pass@k for k in :func:`ks_for`, the
    mean response and chain-of-thought lengths, the format-failure rate."""
    import torch

    from reasonrl.tasks.arithmetic import THINK_END, verify
    from reasonrl.trainer.rollout import HFGenerateBackend, SamplingParams

    marker = tokenizer(THINK_END, add_special_tokens=False)["input_ids"][0]
    backend = HFGenerateBackend(model, tokenizer, batch_size=16)
    prompt_ids = [list(tokenizer(it["prompt"], add_special_tokens=False)["input_ids"]) for it in items]
    with torch.no_grad():
        roll = backend.generate(
            prompt_ids,
            SamplingParams(
                num_samples=n, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed
            ),
        )
    texts = tokenizer.batch_decode(roll.completion_ids, skip_special_tokens=True)
    ks = ks_for(n)
    sums = dict.fromkeys(ks, 0.0)
    bad = 0
    for i, it in enumerate(items):
        status = [verify(t, it["answers"]) for t in texts[i * n : (i + 1) * n]]
        c = sum(s == "correct" for s in status)
        bad += sum(s == "bad_format" for s in status)
        for k in ks:
            sums[k] += pass_at_k(n, c, k)
    lengths = [len(c) for c in roll.completion_ids]
    cots = [cot_length(c, marker) for c in roll.completion_ids]
    return {
        "n": n,
        "prompts": len(items),
        "temperature": temperature,
        "pass_at_k": {str(k): sums[k] / len(items) for k in ks},
        "response_length": _mean(lengths),
        "cot_length": _mean(cots),
        "frac_bad_format": bad / len(texts),
        "frac_truncated": sum(roll.truncated) / len(roll.truncated),
    }


# ----------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------


def _timed_trainer_class():
    from reasonrl.tasks.arithmetic import THINK_END
    from reasonrl.trainer import Trainer

    class TimedTrainer(Trainer):
        """The trainer plus the study's bookkeeping: training time excluding evaluations (filter rounds
        included) stamped on every eval record, and the chain-of-thought length of every step's rollouts."""

        def begin(self):
            self.t0 = time.perf_counter()
            self.eval_s = 0.0
            self.filter_s = 0.0
            self.marker = self.tokenizer(THINK_END, add_special_tokens=False)["input_ids"][0]

        def train_clock(self) -> float:
            return time.perf_counter() - self.t0 - self.eval_s

        def evaluate(self, items=None):
            t = time.perf_counter()
            res = super().evaluate(items)
            self.eval_s += time.perf_counter() - t
            res["train_s"] = round(self.train_clock(), 2)
            return res

        def _maybe_filter(self):
            t = time.perf_counter()
            super()._maybe_filter()
            self.filter_s += time.perf_counter() - t

        def step(self):
            m = super().step()
            rec = self.last_record
            m["cot_length"] = _mean([cot_length(c, self.marker) for c in rec.completion_ids])
            m["train_s"] = round(self.train_clock(), 2)
            return m

    return TimedTrainer


def run_one(arm: str, seed: int, budget: dict, out: Path) -> dict:
    """Train (unless ``base``) and evaluate one (arm, seed); returns the run's record (also written)."""
    import torch

    from reasonrl.trainer import load_config
    from reasonrl.trainer.trainer import load_model_and_tokenizer, task_datasets

    run_dir = out / "runs" / arm / f"seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run restarts from its beginning
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    b = budget
    record: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "budget": b,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if arm == "base":
        cfg = load_config(overrides=trainer_overrides("dro_r3", seed, b, str(run_dir)))
        torch.set_num_threads(1)
        model, tok = load_model_and_tokenizer("embedded")
        _, heldout = task_datasets(cfg, 1)
        from reasonrl.trainer import Trainer

        tr = Trainer(cfg, model=model, tokenizer=tok, dataset=[{"prompt": "x"}], eval_dataset=heldout)
        greedy = tr.evaluate()
        record.update(
            before=greedy,
            after=greedy,
            curves=[],
            evals=[{"step": 0, **greedy}],
            train_s=0.0,
            filter_s=0.0,
            filters=[],
        )
    else:
        cfg = load_config(overrides=trainer_overrides(arm, seed, b, str(run_dir)))
        tr = _timed_trainer_class()(cfg)
        tr.begin()
        summary = tr.train()
        keep = (
            "step",
            "reward",
            "accuracy",
            "completion_length",
            "cot_length",
            "frac_reward_zero_std",
            "entropy",
            "frac_truncated",
            "train_s",
            "r3",
            "r_len",
        )
        curves = [{k: h[k] for k in keep if k in h} for h in tr.history if h.get("kind") == "train"]
        evals = [
            {k: h[k] for k in ("step", "train_s", "heldout_accuracy", "heldout_completion_length") if k in h}
            for h in tr.history
            if h.get("kind") == "eval"
        ]
        filters = [
            {k: h[k] for k in ("step", "pool", "kept", "survivors", "carried")}
            for h in tr.history
            if h.get("kind") == "filter"
        ]
        record.update(
            before=summary["before"],
            after=summary["after"],
            curves=curves,
            evals=evals,
            filters=filters,
            train_s=round(evals[-1]["train_s"], 2),
            filter_s=round(tr.filter_s, 2),
        )
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the study keeps numbers, not weights
        model, tok = tr.model, tr.tokenizer
    _, heldout = task_datasets(cfg, 1)
    record["sampled"] = sampled_eval(
        model,
        tok,
        heldout[: b["sample_prompts"]],
        n=b["sample_n"],
        temperature=b["temperature"],
        max_new_tokens=b["max_new_tokens"],
        seed=10_007 + seed,
    )
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path = out / "runs" / arm / f"seed{seed}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return record


def load_done(out: Path, budget: dict) -> dict[tuple[str, int], dict]:
    """Finished runs with this budget: ``{(arm, seed): record}``."""
    done = {}
    for p in sorted((out / "runs").glob("*/seed*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("budget") == budget and rec.get("arm") in ARMS:
            done[(rec["arm"], int(rec["seed"]))] = rec
    return done


# ----------------------------------------------------------------------------------------------------------
# Aggregation, verdicts, rendering
# ----------------------------------------------------------------------------------------------------------


def _stats(xs: list, seeds: list[int] | None = None) -> dict:
    """Mean, sample std and standard error of the values that are not None; ``by_seed`` keeps them per seed
    (when ``seeds`` is given) for the paired comparisons of :func:`_diff`."""
    pairs = [(s, float(x)) for s, x in zip(seeds or [None] * len(xs), xs, strict=True) if x is not None]
    vals = [x for _, x in pairs]
    n = len(vals)
    by_seed = {str(s): x for s, x in pairs if s is not None}
    if not n:
        return {"n": 0, "mean": None, "std": None, "se": None, "by_seed": by_seed}
    m = sum(vals) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in vals) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": m, "std": sd, "se": None if sd is None else sd / math.sqrt(n), "by_seed": by_seed}


def _cot_trend(rec: dict) -> tuple[float | None, float | None]:
    """Mean CoT length of the rollouts over the first and the last fifth of training."""
    c = [r.get("cot_length") for r in rec["curves"] if r.get("cot_length") is not None]
    if not c:
        return None, None
    w = max(1, len(c) // 5)
    return _mean(c[:w]), _mean(c[-w:])


def time_to_target(rec: dict, target: float) -> tuple[float, int] | None:
    """``(training seconds, sampled completions)`` at the first held-out evaluation whose greedy accuracy
    reaches ``target`` (the evaluation before training does not count); None when none does. Seconds count
    filter rounds and exclude evaluations, but depend on the machine's load at the time; completions (the
    training rollouts plus the filter's traces, ``pool x group_size`` per round) do not."""
    b = rec["budget"]
    for e in rec["evals"]:
        if (
            e["step"] > 0
            and e.get("heldout_accuracy") is not None
            and e["heldout_accuracy"] >= target - 1e-12
        ):
            filt = sum(f["pool"] * b["group_size"] for f in rec.get("filters", []) if f["step"] < e["step"])
            return float(e.get("train_s", 0.0)), e["step"] * b["prompts_per_step"] * b["group_size"] + filt
    return None


def aggregate(done: dict, seeds: list[int]) -> dict:
    arms = {}
    for arm in ARMS:
        recs = [done[(arm, s)] for s in seeds if (arm, s) in done]
        a: dict[str, Any] = {
            "seeds_done": len(recs),
            "seeds_planned": len(seeds),
            "seeds": [r["seed"] for r in recs],
        }
        sd = [r["seed"] for r in recs]
        a["greedy_acc"] = _stats([r["after"]["heldout_accuracy"] for r in recs], sd)
        ks = sorted({int(k) for r in recs for k in r["sampled"]["pass_at_k"]})
        a["pass_at_k"] = {
            str(k): _stats([r["sampled"]["pass_at_k"].get(str(k)) for r in recs], sd) for k in ks
        }
        a["response_length"] = _stats([r["sampled"]["response_length"] for r in recs], sd)
        a["cot_length_eval"] = _stats([r["sampled"]["cot_length"] for r in recs], sd)
        a["cot_length_train"] = _stats([_mean([c.get("cot_length") for c in r["curves"]]) for r in recs], sd)
        trend = [_cot_trend(r) for r in recs]
        a["cot_length_first"] = _stats([t[0] for t in trend], sd)
        a["cot_length_last"] = _stats([t[1] for t in trend], sd)
        a["cot_length_change"] = _stats([None if t[0] is None else t[1] - t[0] for t in trend], sd)
        a["train_s"] = _stats([r["train_s"] for r in recs], sd)
        a["filter_s"] = _stats([r.get("filter_s", 0.0) for r in recs], sd)
        a["wall_s"] = _stats([r["wall_s"] for r in recs], sd)
        arms[arm] = a
    # Arm 5 against arm 3: time to the accuracy that arm 3 reaches at its full budget (mean over its seeds).
    tgt = arms["dro_r3"]["greedy_acc"]["mean"]
    ttt = {}
    if tgt is not None:
        for arm in ("dro_r3", "dro_r3_filter"):
            recs = [done[(arm, s)] for s in seeds if (arm, s) in done]
            hits = [time_to_target(r, tgt) for r in recs]
            times = [None if h is None else h[0] for h in hits]
            comps = [None if h is None else h[1] for h in hits]
            sd = [r["seed"] for r in recs]
            ttt[arm] = {
                "target_accuracy": tgt,
                "reached": sum(t is not None for t in times),
                "runs": len(times),
                "times": times,
                "completions": comps,
                "stats": _stats(times, sd),
                "completion_stats": _stats(comps, sd),
            }
    return {"arms": arms, "time_to_target": ttt}


def _diff(a: dict, b: dict) -> tuple[float | None, float | None, str, int]:
    """mean(b) - mean(a), its standard error and how it was formed. Paired over the seeds both arms finished
    when there are at least 2 (seed s of every arm trains on the same prompts with the same sampling seeds and
    is evaluated with the same sampling seed, so per-seed differences cancel the shared noise); else Welch
    over the seed means; SE None with fewer than 2 seeds."""
    if a["mean"] is None or b["mean"] is None:
        return None, None, "", 0
    common = sorted(set(a.get("by_seed", {})) & set(b.get("by_seed", {})))
    if len(common) >= 2:
        ds = [b["by_seed"][s] - a["by_seed"][s] for s in common]
        st = _stats(ds)
        return st["mean"], st["se"], f"paired over {len(common)} seeds", len(common) - 1
    d = b["mean"] - a["mean"]
    if a["std"] is None or b["std"] is None:
        return d, None, "", 0
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return d, se, "Welch", min(a["n"], b["n"]) - 1  # the conservative degrees of freedom


#: Two-sided 95 % critical values of Student's t by degrees of freedom (1.96 beyond the table).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _cmp(a: dict, b: dict, want: str) -> tuple[str, str]:
    """Verdict on ``b`` vs ``a``: want ``"gt"`` (b > a), ``"lt"`` or ``"eq"``. A difference counts when it is
    more than t(0.975, df) standard errors (:func:`_diff`) from zero: 12.7 with 2 seeds, 4.3 with 3 (a
    2-SE rule on 2 or 3 seeds would call noise a result)."""
    d, se, how, df = _diff(a, b)
    if d is None:
        return "pending", "no finished runs"
    if se is None:
        return "undecided", f"Δ = {d:+.3f} (fewer than 2 seeds: no spread)"
    crit = T975.get(df, 1.96)
    rel = f", {100 * d / abs(a['mean']):+.1f}% of a" if a["mean"] else ""
    txt = f"Δ = {d:+.3f} ± {se:.3f} (SE, {how}; resolved beyond ±{crit * se:.3f}{rel})"
    sig = abs(d) > crit * se
    if want == "eq":
        return ("consistent" if not sig else "not reproduced"), txt
    if not sig:
        return "not resolved (within the 95% interval)", txt
    ok = d > 0 if want == "gt" else d < 0
    return ("reproduced" if ok else "opposite"), txt


#: The arm-vs-arm claims of the study, in report order: (claim, arm a, arm b, want, metric), judged by
#: :func:`_cmp` on the metric's statistics of arm b against arm a. The time-to-target claim of R3 filtering
#: follows the chain-of-thought claims; the claims of the length rewards close the report.
CLAIMS = (
    ("base < DRO-Aggr (held-out pass@1)", "base", "dro_aggr", "gt", "pass@1"),
    ("DRO-Aggr < DRO-R3 (held-out pass@1)", "dro_aggr", "dro_r3", "gt", "pass@1"),
    ("DRO-R3 ≈ correctness (held-out pass@1)", "correctness", "dro_r3", "eq", "pass@1"),
    ("base < correctness (RL moves accuracy at all)", "base", "correctness", "gt", "pass@1"),
    # The chain of thought on the held-out prompts (same prompts and sampling seed for every arm) against the
    # base model's: the paper's aggregate-certainty rewards collapse it, R3's does not.
    ("aggregate certainty shrinks the chain of thought (held-out CoT tokens vs base)", "base", "dro_aggr",
     "lt", "cot length"),
    ("R3 does not shrink the chain of thought (held-out CoT tokens vs base)", "base", "dro_r3", "eq",
     "cot length"),
)
LENGTH_CLAIMS = tuple(
    claim
    for arm, name in (("pear", "PEAR"), ("laser_d", "LASER-D"))
    for claim in (
        (f"{name} shortens responses vs correctness", "correctness", arm, "lt", "response length"),
        (f"{name} keeps accuracy vs correctness (pass@1)", "correctness", arm, "eq", "pass@1"),
    )
)


def verdicts(agg: dict) -> list[dict]:
    A = agg["arms"]
    p1 = {arm: A[arm]["pass_at_k"].get("1", {"mean": None, "std": None, "n": 0}) for arm in ARMS}
    stats_of = {
        "pass@1": lambda arm: p1[arm],
        "cot length": lambda arm: A[arm]["cot_length_eval"],
        "response length": lambda arm: A[arm]["response_length"],
    }

    def verdict(claim, arm_a, arm_b, want, metric):
        v, txt = _cmp(stats_of[metric](arm_a), stats_of[metric](arm_b), want)
        return {"claim": claim, "a": arm_a, "b": arm_b, "metric": metric, "verdict": v, "detail": txt}

    out = [verdict(*claim) for claim in CLAIMS]
    t = agg["time_to_target"]
    if t.get("dro_r3") and t.get("dro_r3_filter"):
        a, b = t["dro_r3"], t["dro_r3_filter"]
        base = A["base"]["greedy_acc"]["mean"]
        if not b["runs"]:
            v = "pending"
        elif base is not None and a["target_accuracy"] <= base + 1e-9:
            # Every run starts at or above the target: the time to it is the time to the first evaluation.
            v = f"not measurable (arm 3 ends at or below the base model's {100 * base:.1f}%)"
        elif b["reached"] < b["runs"] or a["reached"] < a["runs"]:
            v = "not resolved (target not reached by every run)"
        else:
            v = _cmp(a["completion_stats"], b["completion_stats"], "lt")[0]
        txt = (
            f"target {a['target_accuracy']:.3f}: arm 3 reached by {a['reached']}/{a['runs']}, "
            f"arm 5 by {b['reached']}/{b['runs']}; sampled completions to target: "
            + _cmp(a["completion_stats"], b["completion_stats"], "lt")[1]
        )
        out.append(
            {
                "claim": "R3 filtering cuts training time to the target accuracy",
                "a": "dro_r3",
                "b": "dro_r3_filter",
                "metric": "seconds to target",
                "verdict": v,
                "detail": txt,
            }
        )
    out += [verdict(*claim) for claim in LENGTH_CLAIMS]
    return out


def _fmt(s: dict, digits=3, pct=False) -> str:
    if s is None or s.get("mean") is None:
        return "–"
    m = s["mean"] * (100 if pct else 1)
    if s.get("std") is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s['std'] * (100 if pct else 1):.{digits}f}"


def render_markdown(agg: dict, verdict_rows: list[dict], budget: dict, seeds: list[int], quick: bool) -> str:
    A = agg["arms"]
    ks = sorted({int(k) for a in A.values() for k in a["pass_at_k"]})
    head = (
        ["arm", "seeds done", "greedy acc %"]
        + [f"pass@{k} %" for k in ks]
        + [
            "response len",
            "CoT len (eval)",
            "CoT len (train: first → last)",
            "train s",
            "filter s",
            "run wall s",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in ARMS:
        a = A[arm]
        cot_tr = (
            "–"
            if a["cot_length_first"]["mean"] is None
            else (f"{a['cot_length_first']['mean']:.1f} → {a['cot_length_last']['mean']:.1f}")
        )
        row = [ARM_LABELS[arm], f"{a['seeds_done']}/{a['seeds_planned']}", _fmt(a["greedy_acc"], 1, True)]
        row += [_fmt(a["pass_at_k"].get(str(k)), 1, True) for k in ks]
        row += [
            _fmt(a["response_length"], 1),
            _fmt(a["cot_length_eval"], 1),
            cot_tr,
            _fmt(a["train_s"], 0),
            _fmt(a["filter_s"], 0),
            _fmt(a["wall_s"], 0),
        ]
        lines.append("| " + " | ".join(row) + " |")
    vt = [
        "| claim (paper) | verdict at this scale | measured (b − a, mean ± SE over seeds) |",
        "|---|---|---|",
    ]
    for v in verdict_rows:
        vt.append(f"| {v['claim']} | **{v['verdict']}** | {v['detail']} |")
    pending = [f"{arm} seed {s}" for arm in ARMS for s in seeds if s not in A[arm]["seeds"]]
    b = budget
    txt = [
        "# reasonrl repro: the papers' orderings on the embedded task"
        + (" (--quick smoke run)" if quick else ""),
        "",
        f"Budget per training run (every arm): {b['steps']} steps x {b['prompts_per_step']} prompts x "
        f"{b['group_size']} rollouts (temperature {b['temperature']}, at most {b['max_new_tokens']} new "
        "tokens), "
        f"lr {b['lr']}, task levels {b['levels']}. Held-out: greedy accuracy on {b['eval_size']} problems; "
        f"pass@k from {b['sample_n']} samples on {b['sample_prompts']} problems at temperature "
        f"{b['temperature']}. Values: mean ± sample std over the seeds done.",
        "",
        *lines,
        "",
        "Verdicts (a difference counts when it lies outside the 95% t interval of the mean per-seed "
        "difference: paired over the seeds both arms finished, since seed s of every arm sees the same "
        "prompts and sampling seeds, else Welch over seed means; 'consistent' = no difference resolved, "
        "which is what 'R3 ≈ correctness' predicts and weaker than equivalence):",
        "",
        *vt,
        "",
    ]
    tt = agg["time_to_target"]
    if tt:
        for arm, t in tt.items():
            times = ", ".join(
                "not reached" if x is None else f"{x:.0f}s / {c} completions"
                for x, c in zip(t["times"], t["completions"], strict=True)
            )
            txt.append(
                f"* time to {100 * t['target_accuracy']:.1f}% greedy held-out accuracy, {arm}: {times}"
            )
        a, f = tt.get("dro_r3"), tt.get("dro_r3_filter")
        if a and f and a["stats"]["mean"] and f["stats"]["mean"] is not None:
            t5, t3 = f["stats"]["mean"], a["stats"]["mean"]
            c5, c3 = f["completion_stats"]["mean"], a["completion_stats"]["mean"]
            tr5, tr3 = _fmt(A["dro_r3_filter"]["train_s"], 0), _fmt(A["dro_r3"]["train_s"], 0)
            txt.append(
                f"* arm 5 vs arm 3, mean over the runs that reached it: {c5:.0f} vs {c3:.0f} sampled "
                f"completions (saved {100 * (1 - c5 / c3):+.0f}%), {t5:.0f}s vs {t3:.0f}s (saved "
                f"{100 * (1 - t5 / t3):+.0f}%; the paper: about 45%); total training time {tr5}s vs {tr3}s, "
                f"of which filter rounds {_fmt(A['dro_r3_filter']['filter_s'], 0)}s. Seconds depend on the "
                "shared machine's load during each run; completions do not."
            )
        txt.append("")
    txt.append("Pending runs: " + (", ".join(pending) if pending else "none") + ".")
    txt.append("")
    return "\n".join(txt)


def render_plots(done: dict, agg: dict, seeds: list[int], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    A = agg["arms"]
    colors = dict(
        zip(
            ARMS,
            ("grey", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:red", "tab:brown"),
            strict=True,
        )
    )
    paths = []

    def annotate(ax, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)

    def save(fig, name: str) -> None:
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(str(p))

    # 1. pass@k per arm.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for arm in ARMS:
        pk = A[arm]["pass_at_k"]
        if not pk:
            continue
        ks = sorted(int(k) for k in pk)
        m = [100 * pk[str(k)]["mean"] for k in ks]
        e = [100 * (pk[str(k)]["std"] or 0.0) for k in ks]
        ax.errorbar(
            ks,
            m,
            yerr=e,
            marker="o",
            capsize=3,
            color=colors[arm],
            label=f"{ARM_LABELS[arm]} ({A[arm]['seeds_done']} seeds)",
        )
    ax.set_xscale("log", base=2)
    annotate(ax, "k", "held-out pass@k (%)", "pass@k (mean ± std over seeds)", 7)
    ax = axes[1]
    xs = [arm for arm in ARMS if A[arm]["response_length"]["mean"] is not None]
    for i, arm in enumerate(xs):
        a = A[arm]
        ax.bar(
            i - 0.2,
            a["response_length"]["mean"],
            0.4,
            yerr=a["response_length"]["std"] or 0,
            color=colors[arm],
            alpha=0.9,
            capsize=3,
        )
        if a["cot_length_eval"]["mean"] is not None:
            ax.bar(
                i + 0.2,
                a["cot_length_eval"]["mean"],
                0.4,
                yerr=a["cot_length_eval"]["std"] or 0,
                color=colors[arm],
                alpha=0.45,
                hatch="//",
                capsize=3,
            )
    ax.set_xticks(
        range(len(xs)), [ARM_LABELS[a].split(" ", 1)[1][:18] for a in xs], rotation=30, ha="right", fontsize=7
    )
    ax.set_ylabel("tokens (held-out samples)")
    ax.set_title("response length (solid) and chain of thought (hatched)")
    ax.grid(alpha=0.3, axis="y")
    save(fig, "repro_accuracy.png")
    # 2. training curves (mean over seeds).
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm in ARMS[1:]:
        recs = [done[(arm, s)] for s in seeds if (arm, s) in done]
        if not recs:
            continue
        for ax, key, title in (
            (axes[0], "accuracy", "train-batch accuracy (sampled)"),
            (axes[1], "cot_length", "rollout chain-of-thought length (tokens)"),
        ):
            steps = sorted({c["step"] for r in recs for c in r["curves"]})
            ys = [_mean([c.get(key) for r in recs for c in r["curves"] if c["step"] == st]) for st in steps]
            w = max(1, len(steps) // 12)  # running mean over w steps
            sm = [_mean([y for y in ys[max(0, i - w + 1) : i + 1] if y is not None]) for i in range(len(ys))]
            ax.plot(steps, sm, color=colors[arm], label=ARM_LABELS[arm])
            ax.set_title(title)
            ax.set_xlabel("step")
        steps = sorted({e["step"] for r in recs for e in r["evals"]})
        ys = [
            _mean([e.get("heldout_accuracy") for r in recs for e in r["evals"] if e["step"] == st])
            for st in steps
        ]
        axes[2].plot(steps, [100 * y for y in ys], "o-", color=colors[arm], label=ARM_LABELS[arm])
    base = A["base"]["greedy_acc"]["mean"]
    if base is not None:
        axes[2].axhline(100 * base, color="grey", ls="--", label="base")
    axes[2].set_title("held-out greedy accuracy (%)")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].legend(fontsize=7)
    save(fig, "repro_training.png")
    # 3. arm 5 vs arm 3: held-out accuracy against training time.
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm in ("dro_r3", "dro_r3_filter"):
        for s in seeds:
            r = done.get((arm, s))
            if r is None:
                continue
            ax.plot(
                [e.get("train_s", 0) for e in r["evals"]],
                [100 * e["heldout_accuracy"] for e in r["evals"]],
                "o-",
                color=colors[arm],
                alpha=0.8,
                label=f"{ARM_LABELS[arm]}, seed {s}",
            )
    t = agg["time_to_target"].get("dro_r3")
    if t:
        ax.axhline(100 * t["target_accuracy"], color="k", ls=":", label="target (arm 3 mean final)")
    annotate(ax, "training seconds (filter rounds included, evaluations excluded)",
             "held-out greedy accuracy (%)", "R3 filtering: accuracy vs training time", 6)
    save(fig, "repro_filter_time.png")
    return paths


def render(out: Path, budget: dict, seeds: list[int], quick: bool) -> dict:
    done = load_done(out, budget)
    agg = aggregate(done, seeds)
    vr = verdicts(agg)
    md = render_markdown(agg, vr, budget, seeds, quick)
    (out / "repro.md").write_text(md)
    pngs = render_plots(done, agg, seeds, out)
    report = {
        "budget": budget,
        "seeds": seeds,
        "quick": quick,
        "aggregate": agg,
        "verdicts": vr,
        "plots": [Path(p).name for p in pngs],
        "runs": [done[k] for k in sorted(done)],
    }
    (out / "repro.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def plan(seeds: list[int], arms: list[str]) -> list[tuple[str, int]]:
    """Seed-major order: every arm's first seed before any second seed, so partial studies cover all arms."""
    return [(arm, s) for s in seeds for arm in arms]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="reasonrl repro", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="one seed, a few tiny steps (CI smoke run)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; 1 with --quick)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (one CPU thread each)")
    ap.add_argument(
        "--out-dir", default=None, help="default bench/results/repro (bench/results/repro-quick with --quick)"
    )
    ap.add_argument("--render-only", action="store_true", help="only re-render the table and plots")
    ap.add_argument("--run", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args(argv)
    budget = dict(QUICK if args.quick else RECIPE)
    out = Path(args.out_dir or ("bench/results/repro-quick" if args.quick else "bench/results/repro"))
    out.mkdir(parents=True, exist_ok=True)
    if args.run:
        run_one(args.run[0], int(args.run[1]), budget, out)
        return 0
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        ap.error(f"unknown arm(s) {bad}; valid: {', '.join(ARMS)}")
    if args.render_only:
        render(out, budget, seeds, args.quick)
        print((out / "repro.md").read_text())
        return 0
    done = load_done(out, budget)
    todo = [r for r in plan(seeds, arms) if r not in done]
    print(f"reasonrl repro: {len(done)} runs already done, {len(todo)} to run, output {out}", flush=True)
    render(out, budget, seeds, args.quick)
    failed = []
    if args.jobs <= 1:
        for arm, s in todo:
            t = time.perf_counter()
            try:
                run_one(arm, s, budget, out)
            except Exception as exc:  # noqa: BLE001 - reported and the study goes on with the other runs
                failed.append((arm, s, repr(exc)))
                print(f"  {arm} seed {s} FAILED: {exc!r}", flush=True)
                continue
            print(f"  {arm} seed {s} done in {time.perf_counter() - t:.0f}s", flush=True)
            render(out, budget, seeds, args.quick)
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        running: list[tuple[subprocess.Popen, str, int, float]] = []
        queue = list(todo)
        while queue or running:
            while queue and len(running) < args.jobs:
                arm, s = queue.pop(0)
                cmd = [
                    sys.executable,
                    "-m",
                    "reasonrl.bench.repro",
                    "--run",
                    arm,
                    str(s),
                    "--out-dir",
                    str(out),
                ]
                if args.quick:
                    cmd.append("--quick")
                log = open(out / f"worker-{arm}-seed{s}.log", "w")  # noqa: SIM115 - closed with the process
                running.append(
                    (
                        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                        arm,
                        s,
                        time.perf_counter(),
                    )
                )
            time.sleep(2)
            for item in list(running):
                proc, arm, s, t = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0:
                    failed.append((arm, s, f"exit {proc.returncode}"))
                    print(
                        f"  {arm} seed {s} FAILED (exit {proc.returncode}; see worker-{arm}-seed{s}.log)",
                        flush=True,
                    )
                else:
                    print(f"  {arm} seed {s} done in {time.perf_counter() - t:.0f}s", flush=True)
                    render(out, budget, seeds, args.quick)
    report = render(out, budget, seeds, args.quick)
    print((out / "repro.md").read_text())
    print(
        f"wrote {out / 'repro.json'}, {out / 'repro.md'}, " + ", ".join(str(out / p) for p in report["plots"])
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
