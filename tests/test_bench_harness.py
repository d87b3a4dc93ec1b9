"""The benchmark harness (reasonrl.bench.harness) on a fake benchmark: the status of every row (ok, incorrect,
error, not installed, unsupported), timing only for providers that passed the gate, the memory step's error
reported on the row, and the command line (profile / --shapes / --dtype / --modes). Fast: no real op runs."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from reasonrl.bench import harness
from reasonrl.bench.inputs import LogitsInputSpec

CPU = torch.device("cpu")


@dataclass
class _Inputs:
    x: torch.Tensor


def _double(spec, device):
    return lambda x: 2 * x


def _triple(spec, device):  # wrong result: must be "incorrect" and never timed
    return lambda x: 3 * x


def _fails_in_gate(spec, device):
    def fn(x):
        raise RuntimeError("kernel exploded")

    return fn


class _Fake(harness.Benchmark):
    op, module, modes = "fake_op", "reasonrl.bench._no_such_benchmark", ("fwd", "full")
    spec_cls, inputs_cls = LogitsInputSpec, _Inputs
    profiles = {"quick": {"cpu": [(8, 16, "float32"), (8, 16, "bfloat16")], "cuda": [(8, 16, "float32")]},
                "full": {"cpu": [(32, 64, "float32")], "cuda": [(32, 64, "float32")]}}
    providers = {p.name: p for p in (
        harness.Provider("reasonrl", _double, strict=True),
        harness.Provider("wrong", _triple),
        harness.Provider("broken", _fails_in_gate),
        harness.Provider("absent", _double, module="a_module_that_is_not_installed"),
        harness.Provider("gpu-only", _double, cuda_only=True),
    )}
    peer_dists = ()

    def make_inputs(self, spec, device):
        return [_Inputs(torch.full((spec.n,), float(k + 1))) for k in range(2)], {"n_sets": 2}

    def gate(self, p, fn, inp, modes, device, oracle):
        return harness.GateRun(fn(inp.x), {m: 0.01 for m in modes})

    def check(self, spec, inp, results, device, oracle):
        verdicts = {}
        for name, out in results.items():
            err = float((out - 2 * inp.x).abs().max())
            verdicts[name] = {m: harness.Verdict(err == 0.0, err, {"err": err}) for m in self.modes}
        return verdicts

    def timed(self, p, fn, sets, mode):
        return (lambda k: fn(sets[k].x)), []

    def work(self, spec, p, mode, ceilings, device):
        return harness.Work(4 * spec.n, "GB/s", 1e-6)

    def measure_memory(self, p, fn, inp, modes, device, warm):
        return {m: (0, 0) for m in modes}


def test_run_case_statuses():
    spec = LogitsInputSpec(8, 16, "float32")
    rows, case = harness.run_case(_Fake(), spec, list(_Fake.providers.values()), ["fwd"], CPU, {}, threads=1)
    by_name = {r["provider"]: r for r in rows}
    assert [r["provider"] for r in rows] == list(_Fake.providers)  # provider order kept, none dropped
    assert by_name["reasonrl"]["status"] == "ok" and by_name["reasonrl"]["median_ms"] > 0
    assert by_name["reasonrl"]["repeats"] >= 3 and by_name["reasonrl"]["bytes"] == 32
    assert by_name["wrong"]["status"] == "incorrect" and "median_ms" not in by_name["wrong"]
    assert by_name["wrong"]["max_err"] == 1.0  # |3x - 2x| on input set 0 (x = 1)
    assert by_name["broken"]["status"] == "error" and "kernel exploded" in by_name["broken"]["status_detail"]
    assert by_name["absent"]["status"] == "not installed"
    assert by_name["gpu-only"]["status"] == "unsupported"
    # The CPU memory step runs `python -m <module> --_memcase`; a module that does not exist is an error on
    # the row, not a crash of the run.
    assert "mem_error" in by_name["reasonrl"] and "mem_delta_mib" not in by_name["reasonrl"]
    assert case["case"] == "8x16 fp32" and case["inputs"] == {"n_sets": 2} and case["wall_s"] > 0


def test_command_line_cases():
    bench = _Fake()
    parse = harness.parser(bench).parse_args
    profile = harness.cases(bench, parse([]), CPU)
    assert [(s.n, s.v, s.dtype) for s in profile] == [(8, 16, "float32"), (8, 16, "bfloat16")]
    custom = harness.cases(bench, parse(["--shapes", "4x5,6x7", "--dtype", "float16"]), CPU)
    assert [(s.n, s.v, s.dtype) for s in custom] == [(4, 5, "float16"), (6, 7, "float16")]
    # A shape the profile does not list takes the profile's first dtype.
    assert [s.dtype for s in harness.cases(bench, parse(["--shapes", "4x5"]), CPU)] == ["float32"]
    with pytest.raises(SystemExit):
        parse(["--shapes", "4x5x6"])  # NxHxV is the hidden-state benchmarks' form
    with pytest.raises(SystemExit):
        parse(["--providers", "reasonrl,nobody"])


def test_modes_of_other_benchmarks_are_skipped(capsys):
    # `reasonrl bench --modes bwd` reaches every benchmark: one without that mode runs nothing and succeeds.
    assert harness.main(_Fake(), ["--modes", "bwd"]) == 0
    assert "none of the requested modes applies" in capsys.readouterr().err


def test_speedup_is_against_the_fastest_compiled_baseline():
    from reasonrl.bench import report

    def row(provider, ms, status="ok"):
        return dict(op="op", case="c", mode="fwd", provider=provider, median_ms=ms, status=status)

    rows = [row("eager", 100.0), row("compiled-a", 40.0), row("compiled-b", 25.0), row("ours", 10.0),
            row("compiled-c", 5.0, status="error")]
    report.fill_speedups(rows, "eager", ("compiled-a", "compiled-b", "compiled-c"))
    ours = rows[3]
    assert ours["compiled_baseline"] == "compiled-b"  # the failed, faster one does not count
    assert ours["speedup_vs_compiled"] == 2.5 and ours["speedup_vs_eager"] == 10.0
    assert rows[4]["speedup_vs_compiled"] is None
    report.fill_speedups(rows, "eager", "compiled-a")  # one baseline by name, as before
    assert ours["speedup_vs_compiled"] == 4.0


class _Tokens(_Fake):
    """A benchmark whose work is not bytes: its own unit and scale, no ceiling, an extra per-row rate and its
    own --shapes form."""

    shape_form = "GxLAYERS"

    def work(self, spec, p, mode, ceilings, device):
        return harness.Work(1000 * spec.n, "tok/s", None, scale=1.0)

    def row_metrics(self, spec, p, mode, median_ms):
        return {"rows_per_s": spec.n / (median_ms / 1e3)}


def test_custom_unit_and_row_metrics():
    spec = LogitsInputSpec(8, 16, "float32")
    rows, _ = harness.run_case(_Tokens(), spec, [_Tokens.providers["reasonrl"]], ["fwd"], CPU, {}, threads=1)
    (row,) = rows
    assert row["status"] == "ok" and row["unit"] == "tok/s" and row["amount"] == 8000
    assert row["throughput"] == pytest.approx(8000 / (row["median_ms"] / 1e3))
    assert row["pct_ceiling"] is None and row["floor_ms"] is None
    assert row["rows_per_s"] == pytest.approx(8 / (row["median_ms"] / 1e3))
    assert "GxLAYERS" in harness.parser(_Tokens()).format_help()


@pytest.mark.slow
def test_phase_entropy_benchmark_end_to_end(tmp_path):
    """bench_phase_entropy on a tiny case: every provider passes the float64 gate and is timed; the results
    files are written (the numbers themselves are not checked: no timing is meaningful in a test)."""
    import json

    from reasonrl._backend import unavailable_reason
    from reasonrl.bench import bench_phase_entropy

    if unavailable_reason("cpp", CPU, torch.float32) is not None:
        pytest.skip("the compiled extension is not loaded")
    status = bench_phase_entropy.main(["--shapes", "4x300", "--modes", "fwd,full", "--out-dir", str(tmp_path),
                                       "--providers", "reasonrl,reference-eager", "--threads", "1"])
    assert status == 0
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert {(r["provider"], r["mode"], r["status"]) for r in report["rows"]} == {
        (p, m, "ok") for p in ("reasonrl", "reference-eager") for m in ("fwd", "full")}
    assert all(r["median_ms"] > 0 and r["unit"] == "GB/s" for r in report["rows"])
    # The ISA variant of the row kernels is recorded, in the JSON and above the tables.
    build = report["environment"]["reasonrl_build"]
    isa = build["cpu_isa_selected"]
    assert isa in build["cpu_isas_built"]
    assert f"reasonrl CPU kernels: {isa}" in next(tmp_path.glob("*.md")).read_text()


def test_inductor_cache_has_one_folder_per_cpu_isa(monkeypatch):
    """A graph compiled under ATEN_CPU_CAPABILITY=avx2 must never be reused under AVX-512 or back (the cache
    key ignores the variable): the harness points TORCHINDUCTOR_CACHE_DIR at a folder named after the ISA in
    use, and leaves a folder the user chose alone."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    harness.inductor_cache_per_isa()
    isa = torch.backends.cpu.get_cpu_capability().lower()
    assert harness.os.environ["TORCHINDUCTOR_CACHE_DIR"] == f"{default_cache_dir()}-{isa}"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/mine")
    harness.inductor_cache_per_isa()
    assert harness.os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/mine"


def test_compute_bound_end_to_end(tmp_path):
    """bench/compute_bound.py at a small shape: both providers, both cases, the table and the files."""
    from reasonrl.bench import compute_bound

    assert compute_bound.resident_rows(32000, 4, 2) * 32000 * 4 <= max(
        compute_bound.last_level_cache_bytes(CPU) // 4, 4 * 32000 * 4)
    assert compute_bound.main(["--shape", "64x512", "--threads", "1", "--out-dir", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("compute-bound-*.json")).read_text())
    assert {(r["provider"], r["case"]) for r in result["rows"]} == {
        (p, c) for p in ("reasonrl", "minimal-compiled") for c in ("streaming", "resident")}
    assert all(r["median_ms"] > 0 and r["ns_per_logit"] > 0 for r in result["rows"])
    text = next(tmp_path.glob("compute-bound-*.md")).read_text()
    assert "| reasonrl |" in text and "| minimal-compiled |" in text
