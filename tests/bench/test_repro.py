"""``reasonrl repro`` (bench/repro.py, docs/repro.md): the unbiased pass@k estimator, the verdict rule, and
the ``--quick`` study end to end (every arm, one seed, a few tiny steps): the JSON, the table and the plots
exist, and a second invocation skips the finished runs."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from reasonrl.bench import repro


def test_pass_at_k_is_the_unbiased_estimator():
    # Brute force: the probability that a uniformly random k-subset of n samples holds a correct one.
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert repro.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert repro.pass_at_k(8, 1, 1) == pytest.approx(1 / 8)
    assert repro.ks_for(8) == [1, 2, 4, 8] and repro.ks_for(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="pass_at_k"):
        repro.pass_at_k(4, 5, 1)


def test_verdict_rule_uses_two_standard_errors():
    def st(xs):
        return repro._stats(xs)

    assert repro._cmp(st([0.30, 0.31, 0.29]), st([0.40, 0.41, 0.39]), "gt")[0] == "reproduced"
    assert repro._cmp(st([0.40, 0.41, 0.39]), st([0.30, 0.31, 0.29]), "gt")[0] == "opposite"
    assert repro._cmp(st([0.30, 0.40, 0.20]), st([0.32, 0.42, 0.22]), "gt")[0].startswith("not resolved")
    assert repro._cmp(st([0.30, 0.40, 0.20]), st([0.32, 0.42, 0.22]), "eq")[0] == "consistent"
    # Paired over seeds (same prompts and sampling seeds per seed): a constant shift is resolved.
    a, b = repro._stats([0.30, 0.40, 0.20], [0, 1, 2]), repro._stats([0.32, 0.42, 0.22], [0, 1, 2])
    verdict, detail = repro._cmp(a, b, "gt")
    assert verdict == "reproduced" and "paired over 3 seeds" in detail
    assert repro._cmp(st([0.30]), st([0.40]), "gt")[0] == "undecided"  # one seed: no spread
    assert repro._cmp(st([]), st([0.40]), "gt")[0] == "pending"
    s = st([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["se"] == pytest.approx(1 / math.sqrt(3))


def test_quick_study_writes_outputs_and_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "repro"
    assert repro.main(["--quick", "--out-dir", str(out)]) == 0
    pngs = ("repro_accuracy.png", "repro_training.png", "repro_filter_time.png")
    for name in ("repro.json", "repro.md", *pngs):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "repro.json").read_text())
    assert {(r["arm"], r["seed"]) for r in report["runs"]} == {(arm, 0) for arm in repro.ARMS}
    for r in report["runs"]:
        assert 0.0 <= r["sampled"]["pass_at_k"]["1"] <= r["sampled"]["pass_at_k"]["4"] <= 1.0
        if r["arm"] != "base":
            assert len(r["curves"]) == repro.QUICK["steps"] and r["curves"][0]["cot_length"] > 0
    filt = next(r for r in report["runs"] if r["arm"] == "dro_r3_filter")
    assert filt["filters"] and filt["filter_s"] > 0
    md = (out / "repro.md").read_text()
    assert "| 1. base (no RL) | 1/1 |" in md and "Pending runs: none." in md
    assert len(report["verdicts"]) >= 9
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/seed0.json")}
    assert len(stamps) == len(repro.ARMS)
    capsys.readouterr()
    assert repro.main(["--quick", "--out-dir", str(out)]) == 0
    assert f"{len(repro.ARMS)} runs already done, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_partial_study_renders_with_seeds_done(tmp_path):
    """A study with only some runs finished renders (n seeds done, pending runs listed)."""
    out = tmp_path / "repro"
    assert repro.main(["--quick", "--arms", "base", "--out-dir", str(out)]) == 0
    repro.render(out, dict(repro.QUICK), [0, 1], True)
    md = (out / "repro.md").read_text()
    assert "| 1. base (no RL) | 1/2 |" in md and "| 3. DRO-R3 | 0/2 |" in md
    assert "base seed 1" in md and "dro_r3 seed 0" in md
