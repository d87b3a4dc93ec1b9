"""Benchmarks of reasonrl ops (performance.md section 4): ``python -m bench.bench_<op>`` or ``bench.run_all``.

Results land in ``bench/results/`` (git-ignored).
"""
