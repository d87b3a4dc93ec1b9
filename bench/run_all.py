"""Run every registered benchmark: ``python -m reasonrl.bench.run_all [--only OP] [benchmark options]``.

``reasonrl bench`` calls :func:`run`. Options other than ``--only`` / ``--demo`` are passed to each
benchmark's ``main(argv)``, whose command line is the harness's (``bench/harness.py``): ``--profile``,
``--modes`` (a benchmark skips the modes it does not have), ``--dtype``, ``--providers``, ``--out-dir``,
``--threads``, and ``--shapes`` (NxV for the logits benchmarks, NxHxV for the hidden-state ones: use it
with ``--only``). Each benchmark writes its own ``<device>-<timestamp>`` results.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# op name -> module exposing main(argv: list[str] | None) -> int
BENCHMARKS: dict[str, str] = {
    "token_logprobs": ".bench_token_logprobs",
    "policy_loss": ".bench_policy_loss",
    "linear": ".bench_linear",
    "policy_loss_hidden": ".bench_policy_loss_hidden",
    "r3_reward": ".bench_r3_reward",
    "phase_entropy": ".bench_phase_entropy",
    # TRL's GRPOTrainer loss step: TRL's path, use_liger_kernel=True, reasonrl's drop-in (needs trl; not in
    # the demo selection: several minutes on 2 cores)
    "trl_step": ".bench_trl_step",
}
# What `make demo` (`reasonrl demo`, which passes --demo) runs: it must stay under 3 minutes on 2 cores. The
# policy-loss quick profile (the training step's hot path, every baseline) takes ~2 min there; the others
# (token_logprobs ~2m45s, linear ~5 min, policy_loss_hidden ~5 min) run with `reasonrl bench` / `make bench`.
DEMO_BENCHMARKS: tuple[str, ...] = ("policy_loss",)


def run(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks in turn; 0 when all of them returned 0, else 1."""
    parser = argparse.ArgumentParser(prog="reasonrl bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS),
                        help="run only this benchmark (repeatable; default: all)")
    parser.add_argument("--demo", action="store_true", help=f"the `make demo` selection: {DEMO_BENCHMARKS}")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    status = 0
    for name in args.only or (list(DEMO_BENCHMARKS) if args.demo else list(BENCHMARKS)):
        module = importlib.import_module(BENCHMARKS[name], __package__)
        status |= 1 if module.main(list(rest)) else 0
    return status


if __name__ == "__main__":
    sys.exit(run())
