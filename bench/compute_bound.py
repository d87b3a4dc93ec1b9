"""Is the CPU ``token_logprobs`` forward bound by memory or by its arithmetic? (docs/benchmarks.md, "Memory or
arithmetic").

Times the forward with entropy per logit on two inputs made of the same kind of rows, side by side in one
run, for reasonrl and for the strongest compiled formulation (``minimal-compiled`` of
bench/bench_token_logprobs.py):

* ``streaming``: the benchmark's [N, V] (default [4096, 32000] fp32, 500 MiB), two input sets used in turn,
  so every call reads its logits from memory;
* ``resident``: the first R rows of the same logits, one input set re-read by every call, R chosen so that
  it fills at most a quarter of the last-level cache: every call reads its logits from the cache.

A kernel bound by memory bandwidth runs several times faster per logit on the resident input; one bound by its
arithmetic runs at about the same rate on both, and then no change to its memory traffic can make it faster.
The ratio of the two rates is printed per provider, with the resident time scaled to N rows ("what the
streaming case would take if memory were free").

Usage: ``python -m reasonrl.bench.compute_bound [--shape 4096x32000] [--threads 2] [--out-dir DIR]``
(about a minute on 2 cores). Honours ``ATEN_CPU_CAPABILITY`` like every benchmark; the ISA used is recorded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from . import report
from .bench_token_logprobs import _build_minimal_compiled, _build_reasonrl
from .harness import inductor_cache_per_isa
from .inputs import LogitsInputSpec, last_level_cache_bytes, make_logits_inputs
from .timing import time_cpu

CPU = torch.device("cpu")
BUILDERS = {"reasonrl": _build_reasonrl, "minimal-compiled": _build_minimal_compiled}


def resident_rows(v: int, itemsize: int, threads: int) -> int:
    """Rows of one input set that fill at most a quarter of the last-level cache (at least 2 per thread)."""
    return max(2 * threads, last_level_cache_bytes(CPU) // 4 // (v * itemsize))


def measure(n: int, v: int, threads: int) -> dict[str, Any]:
    spec = LogitsInputSpec(n=n, v=v, dtype="float32")
    sets, _ = make_logits_inputs(spec, CPU, n_sets=2)
    r = min(n, resident_rows(v, 4, threads))
    cases = {
        "streaming": ([(s.logits, s.labels) for s in sets], n),
        "resident": ([(sets[0].logits[:r].clone(), sets[0].labels[:r].clone())], r),
    }
    rows = []
    for name, build in BUILDERS.items():
        fn = build(spec, CPU)
        for case, (inputs, n_rows) in cases.items():
            fn(*inputs[0])  # compiles (minimal-compiled) outside the timing
            t = time_cpu(lambda k, fn=fn, inputs=inputs: fn(*inputs[k]), len(inputs),
                         min_repeats=10 if case == "streaming" else 200)
            rows.append({"provider": name, "case": case, "rows": n_rows, "median_ms": t.median_ms,
                         "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "repeats": t.repeats,
                         "ns_per_logit": t.median_ms * 1e6 / (n_rows * v)})
    return {"shape": [n, v], "dtype": "float32", "resident_rows": r,
            "last_level_cache_bytes": last_level_cache_bytes(CPU), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    n, v = result["shape"]
    r = result["resident_rows"]
    lines = [f"# token_logprobs forward: memory or arithmetic? ({env['device_name']})", "",
             f"{report.run_line(result['timestamp'], env)}"
             f" · torch CPU capability: {result['torch_cpu_capability']}", "",
             f"fp32, streaming [{n}, {v}] (two input sets in turn) vs resident [{r}, {v}]"
             f" (one set, {r * v * 4 / 2**20:.1f} MiB, last-level cache"
             f" {result['last_level_cache_bytes'] / 2**20:.0f} MiB).", "",
             "| provider | streaming ms | resident ms (scaled to N rows) | ns/logit streaming"
             " | ns/logit resident | streaming / resident |", "|---|---|---|---|---|---|"]
    by = {(r["provider"], r["case"]): r for r in result["rows"]}
    for name in BUILDERS:
        s, c = by[(name, "streaming")], by[(name, "resident")]
        lines.append(f"| {name} | {s['median_ms']:.1f} | {c['ns_per_logit'] * n * v / 1e6:.1f} | "
                     f"{s['ns_per_logit']:.3f} | {c['ns_per_logit']:.3f} | "
                     f"{s['ns_per_logit'] / c['ns_per_logit']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reasonrl.bench.compute_bound",
                                 description="Is the CPU token_logprobs forward bound by memory or "
                                             "by its arithmetic?")
    ap.add_argument("--shape", default="4096x32000", help="NxV of the streaming case (default 4096x32000)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--out-dir", type=Path, default=Path("."), help="folder for the JSON / Markdown results")
    args = ap.parse_args(argv)
    n, v = (int(x) for x in args.shape.lower().split("x"))
    inductor_cache_per_isa()
    torch.set_num_threads(args.threads)
    result = measure(n, v, args.threads)
    result.update(timestamp=report.timestamp(), environment=report.environment(CPU),
                  torch_cpu_capability=torch.backends.cpu.get_cpu_capability())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"compute-bound-{report.device_slug(CPU)}-{result['timestamp']}"
    text = markdown(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
