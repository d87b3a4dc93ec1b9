"""Benchmarks of reasonrl ops (docs/performance.md section 4), installed as ``reasonrl.bench``.

``reasonrl bench`` or ``python -m reasonrl.bench.bench_<op>``; results land in ``--out-dir`` (default: the
current directory; ``make demo`` uses bench/results/, which git ignores).

Layout: one thin ``bench_<op>.py`` per benchmark (its providers, inputs and correctness checks, declared as a
``harness.Benchmark``) on one harness: ``harness`` (providers, the per-case protocol, command line),
``inputs`` (specs and rotating input sets, from the generators of ``reasonrl.testing``), ``timing``,
``memory``, ``ceilings``, ``accuracy`` (the docs/ops.md section 8 bounds) and ``report`` (JSON, Markdown,
terminal tables, PNG). ``common`` re-exports the public helpers under their historical names.
"""

from pathlib import Path

# The folder holding this package: the source checkout for ``python -m bench.<name>`` run from it, the
# installed ``reasonrl`` package for ``python -m reasonrl.bench.<name>`` / ``reasonrl bench``.
PACKAGE_PARENT = Path(__file__).resolve().parents[1]

if __name__ == "bench":  # imported as a top-level package from the checkout root, not as reasonrl.bench
    from reasonrl._toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)  # an installed `bench` package wins (reasonrl/_toplevel.py)
