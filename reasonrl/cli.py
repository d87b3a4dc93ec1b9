"""Command line: ``reasonrl info | bench | demo``.

* ``info``  versions, which backends are active on this machine and why the others are not.
* ``bench`` the benchmarks (``reasonrl.bench``, installed with the package from the checkout's bench/);
  arguments after ``bench`` are passed to ``reasonrl.bench.run_all``; results go to ``--out-dir``
  (default: the current directory).
* ``demo``  what ``make demo`` runs: ``info``, then the quick profile of the fused policy-loss benchmark
  (the training step's hot path; ``reasonrl bench`` runs every benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys


def _print_info() -> None:
    from reasonrl._backend import backend_report

    report = backend_report()
    ext = report.pop("extension")
    backends = report.pop("backends")
    print("reasonrl", __import__("reasonrl").__version__)
    for key, value in report.items():
        print(f"  {key:18s} {value}")
    if isinstance(ext, dict):
        parallel = ext.pop("parallel", "")
        print(f"  {'extension':18s} reasonrl._C loaded: " + json.dumps(ext))
        backend_line = [ln.strip() for ln in parallel.splitlines() if "parallel backend" in ln]
        if backend_line:
            print(f"  {'':18s} {backend_line[0]}")
    else:
        print(f"  {'extension':18s} {ext}")
    print("backends:")
    for name, status in backends.items():
        print(f"  {name:18s} {status}")


def _run_bench(argv: list[str]) -> int:
    from reasonrl.bench.run_all import run

    return run(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reasonrl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and active backends")
    sub.add_parser("bench", help="run the benchmarks (options: reasonrl bench --help)", add_help=False)
    sub.add_parser("demo", help="info, then the quick profile of the policy-loss benchmark")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        _print_info()
        return 0
    if args.command == "bench":
        return _run_bench(rest)
    if args.command == "demo":
        _print_info()
        print()
        return _run_bench(["--demo", "--profile", "quick", *rest])
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
