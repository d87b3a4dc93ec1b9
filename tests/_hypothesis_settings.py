"""The hypothesis settings of the property tests, reproducible in CI:
``@settings(max_examples=N, **SETTINGS)``.

* ``derandomize=True``: the examples are a function of the test, the same on every run and machine.
* No example database: nothing is written between runs, so a run does not depend on the previous one.
* No deadline: the first call of a shape pays allocation and, for Triton, the interpreter's set-up.
* No shrinking (only the explicit and generate phases): the tensors are built from drawn seeds and sizes,
  so shrinking cannot simplify them, and a failing run must not spend minutes trying; the falsifying
  example is printed as drawn.
* The too-slow and function-scoped-fixture health checks are off: examples are slow by design (under the
  Triton interpreter), and the fixtures used (seeding) are meant to run once per test, not per example.

Used by tests/ops/test_token_logprobs_property.py, tests/ops/test_token_logprobs_invariants.py and
tests/losses/test_config_validation.py (importable from every test module: pytest puts tests/, the folder
of the root conftest.py, on ``sys.path``).
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase

__all__ = ["SETTINGS"]

SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
