"""Import hygiene (docs/contributing.md): ``import reasonrl`` needs neither Triton nor the compiled extension,
never imports triton, never initialises CUDA and never writes torch._dynamo / torch._inductor configuration; a
failed load of ``reasonrl._C`` is a warning, the CPU op then falls back to the reference, and an explicit
``impl="cpp"`` raises.

Each check runs in a fresh interpreter (the test process has already imported everything). Triton and the
extension are made unavailable before ``import reasonrl`` in two ways:

* ``missing``: ``sys.modules[name] = None``: exactly what an uninstalled package looks like to both
  ``import`` (ModuleNotFoundError) and ``importlib.util.find_spec`` (None);
* ``broken``: a meta-path finder that finds the module but whose loader fails: ImportError for triton (a
  wheel without a usable driver) and OSError "undefined symbol" for reasonrl._C (an extension built against
  another torch). The finder also records every attempt to import triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, json, sys, warnings

    MODE = sys.argv[1]
    BLOCKED = ("triton", "reasonrl._C")
    attempts = []

    def blocked(name):
        return name == "reasonrl._C" or name == "triton" or name.startswith("triton.")

    class FailingLoader(importlib.abc.Loader):
        def create_module(self, spec):
            if spec.name == "reasonrl._C":
                raise OSError(spec.name + ": undefined symbol: _ZN3c104impl8GPUTrace (simulated)")
            raise ImportError("simulated broken " + spec.name, name=spec.name)

        def exec_module(self, module):
            raise AssertionError("unreachable")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                attempts.append(name)
            if MODE == "broken" and blocked(name):
                return importlib.machinery.ModuleSpec(name, FailingLoader())
            return None

    sys.meta_path.insert(0, Blocker())
    if MODE == "missing":
        for name in BLOCKED:
            sys.modules[name] = None

    import torch
    # torch._dynamo imports triton when it is installed, so the plain "does reasonrl import triton" check
    # runs without it, and the configuration check in a separate process.
    CHECK_CONFIG = MODE != "plain-triton"
    if CHECK_CONFIG:
        import torch._dynamo
        import torch._inductor.config

    def snapshot():
        if not CHECK_CONFIG:
            return None
        return (repr(sorted(torch._dynamo.config.get_config_copy().items())),
                repr(sorted(torch._inductor.config.get_config_copy().items())))

    triton_preloaded = sys.modules.get("triton") is not None

    before = snapshot()
    attempts.clear()  # only what reasonrl does counts (torch may probe for triton itself)
    result = {}
    with warnings.catch_warnings(record=True) as import_warnings:
        warnings.simplefilter("always")
        import reasonrl
    result["import_warnings"] = [str(w.message) for w in import_warnings]
    result["triton_attempted_at_import"] = list(attempts)
    result["triton_imported_by_reasonrl"] = not triton_preloaded and sys.modules.get("triton") is not None
    result["ext_loaded_at_import"] = sys.modules.get("reasonrl._C") is not None
    result["cuda_initialized"] = torch.cuda.is_initialized()
    result["config_unchanged"] = snapshot() == before
    """
)

BLOCKED_SCRIPT = PRELUDE + textwrap.dedent(
    """
    from reasonrl.reference import token_logprobs_reference
    x = torch.randn(4, 50)
    y = torch.tensor([0, 49, -100, 7])
    with warnings.catch_warnings(record=True) as call_warnings:
        warnings.simplefilter("always")
        out = reasonrl.token_logprobs(x, y, want_entropy=True)
    ref = token_logprobs_reference(x, y, want_entropy=True)
    result["call_warnings"] = [(w.category.__name__, str(w.message)) for w in call_warnings]
    result["fallback_equals_reference"] = bool(torch.equal(out.logprobs, ref.logprobs)
                                               and torch.equal(out.entropy, ref.entropy))
    for impl in ("cpp", "triton"):
        try:
            reasonrl.token_logprobs(x, y, impl=impl)
            result["explicit_" + impl] = "no error"
        except Exception as exc:
            result["explicit_" + impl] = type(exc).__name__ + ": " + str(exc)
    result["cuda_initialized_after_call"] = torch.cuda.is_initialized()
    result["config_unchanged_after_call"] = snapshot() == before
    print("RESULT" + json.dumps(result))
    """
)

PLAIN_SCRIPT = PRELUDE + textwrap.dedent(
    """
    out = reasonrl.token_logprobs(torch.randn(4, 50), torch.tensor([0, 49, -100, 7]), want_entropy=True)
    result["triton_attempted_after_cpu_call"] = list(attempts)
    result["triton_imported_after_cpu_call"] = not triton_preloaded and sys.modules.get("triton") is not None
    result["cuda_initialized_after_call"] = torch.cuda.is_initialized()
    result["config_unchanged_after_call"] = snapshot() == before
    print("RESULT" + json.dumps(result))
    """
)


def _run(script: str, mode: str) -> dict:
    env = dict(os.environ)
    # The interpreter flag would make Triton "available" on CPU; a plain user environment does not set it.
    env["TRITON_INTERPRET"] = "1"  # on purpose: even then, triton must not be imported by a CPU call
    env.pop("REASONRL_IMPL", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, f"subprocess failed ({mode}):\n{proc.stdout}\n{proc.stderr}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _check_import_hygiene(res: dict) -> None:
    assert res["triton_attempted_at_import"] == [], (
        f"import reasonrl tried to import {res['triton_attempted_at_import']}"
    )
    assert not res["triton_imported_by_reasonrl"], "import reasonrl imported triton"
    assert not res["cuda_initialized"], "import reasonrl initialised CUDA"
    assert res["config_unchanged"], "import reasonrl changed torch._dynamo / torch._inductor config"
    assert not res["ext_loaded_at_import"], "reasonrl._C is documented to load on first use, not at import"
    assert res["import_warnings"] == [], f"import reasonrl warned: {res['import_warnings']}"


@pytest.mark.parametrize("mode", ["missing", "broken"])
def test_import_without_triton_and_extension(mode):
    res = _run(BLOCKED_SCRIPT, mode)
    _check_import_hygiene(res)
    # First CPU call: falls back to the reference, with a RuntimeWarning (not silence) naming the cause.
    assert res["fallback_equals_reference"]
    runtime = [msg for cat, msg in res["call_warnings"] if cat == "RuntimeWarning"]
    assert any("reasonrl._C" in m for m in runtime), (
        f"no RuntimeWarning about reasonrl._C: {res['call_warnings']}"
    )
    assert any("reference" in m for m in runtime), (
        f"no RuntimeWarning about the fallback: {res['call_warnings']}"
    )
    # Explicit requests never fall back.
    assert res["explicit_cpp"].startswith("RuntimeError"), res["explicit_cpp"]
    assert res["explicit_triton"].startswith("RuntimeError"), res["explicit_triton"]
    assert not res["cuda_initialized_after_call"]
    assert res["config_unchanged_after_call"]


# plain-triton: torch._dynamo not imported first, so an import of triton by reasonrl is visible;
# plain-config: torch._dynamo / torch._inductor imported first, so their configuration can be compared.
@pytest.mark.parametrize("mode", ["plain-triton", "plain-config"])
def test_import_and_cpu_call_do_not_touch_triton_or_cuda(mode):
    """With everything installed: neither ``import reasonrl`` nor a CPU call (impl auto -> cpp) imports
    triton, initialises CUDA or changes compiler configuration."""
    res = _run(PLAIN_SCRIPT, mode)
    _check_import_hygiene(res)
    if mode == "plain-triton":
        assert res["triton_attempted_after_cpu_call"] == [], res["triton_attempted_after_cpu_call"]
        assert not res["triton_imported_after_cpu_call"], "a CPU call imported triton"
    else:
        assert res["config_unchanged_after_call"], "a CPU call changed torch._dynamo / torch._inductor config"
    assert not res["cuda_initialized_after_call"]
