"""Benchmarks of reasonrl ops (performance.md section 4), installed as ``reasonrl.bench``.

``reasonrl bench`` or ``python -m reasonrl.bench.bench_<op>``; results land in ``--out-dir`` (default: the
current directory; ``make demo`` uses bench/results/, which git ignores).
"""

if __name__ == "bench":  # imported as a top-level package from the checkout root, not as reasonrl.bench
    from reasonrl._toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)  # an installed `bench` package wins (reasonrl/_toplevel.py)
