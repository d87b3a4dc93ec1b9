"""The public helpers of the benchmarks under one name: ``from . import common`` / ``from .common import X``.

They live in focused modules; this one re-exports them under the names they have always had, so that a
benchmark (and code written against earlier versions) can import everything from one place:

* ``inputs``: specs, rotating input sets (docs/performance.md section 4.3), hand-over files for subprocesses;
* ``timing``: the CPU and GPU timing protocols (4.5);
* ``ceilings``: measured bandwidth / matmul / GEMM ceilings and the floor of the counted traffic (4.6);
* ``memory``: peak memory and the fresh-process measurement (4.7);
* ``accuracy``: the bounds of the correctness gate (docs/ops.md section 8, 4.4);
* ``report``: environment metadata, statuses, the results JSON, tables and plot (4.8-4.9);
* ``harness``: providers and the protocol of one case shared by every ``bench_<op>.py``.

Nothing here imports triton, matplotlib or rich at import time: GPU-only and output-only dependencies are
imported where they are used, so a CPU run needs only torch.
"""

from __future__ import annotations

from reasonrl.testing import calibrate_scale as _calibrate_scale  # noqa: F401 (historical private name)

from . import PACKAGE_PARENT
from .accuracy import PEER_RTOL, MaxError, acceptance_bound, peer_bound
from .ceilings import floor_ms, gemm_ceiling, measure_ceilings
from .harness import Benchmark, GateRun, Provider, Verdict, Work
from .inputs import (
    DTYPE_SHORT,
    DTYPES,
    GIB,
    MIB,
    LinearInputs,
    LinearSpec,
    LogitsInputs,
    LogitsInputSpec,
    last_level_cache_bytes,
    load_inputs,
    make_linear_inputs,
    make_logits_inputs,
    n_rotating_sets,
    row_chunks,
    save_inputs,
    scratch_dir,
)
from .memory import (
    MEMCASE_MARKER,
    cpu_peak_supported,
    emit_memcase_result,
    peak_memory,
    run_memory_subprocess,
)
from .report import (
    COLUMNS,
    DEFAULT_OUT_DIR,
    ERROR,
    INCORRECT,
    NOT_INSTALLED,
    OK,
    OOM,
    SCHEMA_VERSION,
    UNSUPPORTED,
    cpu_model,
    device_name,
    device_slug,
    environment,
    fill_speedups,
    git_info,
    markdown_tables,
    new_report,
    package_versions,
    pick_device,
    plot,
    print_tables,
    timestamp,
    write_results,
)
from .timing import QUANTILES, Timing, time_cpu, time_fn, time_gpu

__all__ = [
    "PACKAGE_PARENT", "SCHEMA_VERSION", "DEFAULT_OUT_DIR", "QUANTILES", "MIB", "GIB", "DTYPES", "DTYPE_SHORT",
    "OK", "INCORRECT", "NOT_INSTALLED", "UNSUPPORTED", "OOM", "ERROR", "COLUMNS",
    # environment
    "pick_device", "cpu_model", "device_name", "device_slug", "git_info", "package_versions", "environment",
    # inputs
    "LogitsInputSpec", "LogitsInputs", "make_logits_inputs", "LinearSpec", "LinearInputs",
    "make_linear_inputs", "last_level_cache_bytes", "n_rotating_sets", "save_inputs", "load_inputs",
    "scratch_dir", "row_chunks",
    # timing, ceilings, memory
    "Timing", "time_cpu", "time_gpu", "time_fn", "measure_ceilings", "gemm_ceiling", "floor_ms",
    "cpu_peak_supported", "peak_memory", "MEMCASE_MARKER", "run_memory_subprocess", "emit_memcase_result",
    # accuracy
    "PEER_RTOL", "MaxError", "acceptance_bound", "peer_bound",
    # report
    "fill_speedups", "markdown_tables", "print_tables", "plot", "timestamp", "write_results", "new_report",
    # harness
    "Benchmark", "Provider", "GateRun", "Verdict", "Work",
]
