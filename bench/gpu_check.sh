#!/usr/bin/env bash
# The one prepared GPU check: run on a GPU machine from the repository root, e.g. through a remote runner:
#   run(command="bash bench/gpu_check.sh", timeout_s=480)
# It installs reasonrl on the GPU machine (the CPU extension; the GPU kernels are Triton), runs the GPU test
# suite and the benchmarks, and leaves everything under $OUT: pytest log, benchmark JSON / Markdown / PNG.
# Budget: at most ~9.5 minutes (install + 3 min of tests + 6 min of benchmarks: token_logprobs,
# policy_loss, linear), run with timeout_s=600; a rerun needs a fresh budget.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# A fresh Triton cache: at the end, the kernels this run compiled are summarised (registers, stack, load
# widths, cp.async pipelining, MMA kind) by the same reader as the ahead-of-time check of docs/gpu-kernels.md.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/reasonrl-gpu-check-triton-cache}
rm -rf "$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/device.txt"
time python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5 | tee "$OUT/install.log"
python3 -m reasonrl.cli info | tee "$OUT/info.txt"
timeout 180 python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
timeout 360 python3 -m reasonrl.cli bench --profile quick --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
python3 -m reasonrl.bench.sm90_report --from-cache "$TRITON_CACHE_DIR" > "$OUT/triton_kernels.txt" 2>&1
ls -la "$OUT"
