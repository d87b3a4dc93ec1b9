"""Command line: ``reasonrl info | bench | train | demo | repro``.

* ``info``  versions, which backends are active on this machine and why the others are not.
* ``bench`` the benchmarks (``reasonrl.bench``, installed with the package from the checkout's bench/);
  arguments after ``bench`` are passed to ``reasonrl.bench.run_all``; results go to ``--out-dir``
  (default: the current directory).
* ``train`` the trainer (docs/trainer.md): ``reasonrl train [--preset dro|grpo|pear|laser] [--config x.yaml]
  [--key value | key=value ...]``, e.g. ``reasonrl train --preset dro --steps 50 --optim.lr 5e-4``;
  ``--print-config`` shows the merged configuration and exits; ``--resume [PATH]`` continues a run from its
  newest intact checkpoint (docs/trainer.md section 7.1).
* ``demo``  what ``make demo`` runs: ``info``, a short DRO training of the embedded tiny model on the embedded
  arithmetic task (held-out accuracy before / after, curves), then the quick profile of the fused
  policy-loss benchmark (the training step's hot path; ``reasonrl bench`` runs every benchmark).
* ``repro`` the small-scale reproduction of the papers' claims on the embedded task (docs/repro.md):
  ``reasonrl repro [--quick] [--seeds 3] [--jobs 2] [--out-dir DIR]``; resumable, skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def _overrides(rest: list[str]) -> list[str]:
    """``--key value`` / ``--key=value`` / ``key=value`` arguments as OmegaConf dot-list items."""
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" in key:
                out.append(key)
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                out.append(f"{key}={rest[i + 1]}")
                i += 1
            else:
                out.append(f"{key}=true")
        elif "=" in arg:
            out.append(arg)
        else:
            raise SystemExit(f"reasonrl train: cannot read argument {arg!r}; use --key value or key=value")
        i += 1
    return out


def _train(argv: list[str]) -> int:
    from reasonrl.trainer import PRESETS, ConfigError, Trainer, config_to_yaml, load_config

    ap = argparse.ArgumentParser(prog="reasonrl train", description="GRPO-family training (docs/trainer.md). "
                                 "Any other --key value sets a TrainerConfig field (dotted for sections: "
                                 "--optim.lr 1e-4, --loss.beta 0.01, --rewards.0.options.weighting topk).")
    ap.add_argument("--config", help="YAML file with TrainerConfig fields")
    ap.add_argument("--preset", choices=PRESETS, help="start from a paper preset")
    ap.add_argument("--print-config", action="store_true", help="print the merged configuration and exit")
    ap.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                    help="continue from the newest intact checkpoint under log.out_dir (or from PATH, a "
                    "checkpoint or run folder); same as resume=latest")
    args, rest = ap.parse_known_args(argv)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        rest.insert(0, args.resume)  # `--resume steps=10`: the key=value after the flag is an override
        args.resume = "latest"
    overrides = _overrides(rest) + ([f"resume={args.resume}"] if args.resume is not None else [])
    try:
        cfg = load_config(args.config, preset=args.preset, overrides=overrides)
    except ConfigError as exc:
        print(f"reasonrl train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    trainer = Trainer(cfg)
    summary = trainer.train()
    if trainer.dist.is_main:  # under torchrun: rank 0 alone reports (docs/trainer.md section 10)
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print(f"held-out accuracy: {pct(summary['heldout_accuracy_before'])} before -> "
          f"{pct(summary['heldout_accuracy_after'])} after {summary['steps']} steps "
          f"({summary['before'].get('heldout_n', 0)} problems, greedy)")
    levels = sorted(k for k in summary["after"] if k.startswith("heldout_accuracy_level"))
    if levels:
        per = [f"{k[-1]}: {pct(summary['before'].get(k))} -> {pct(summary['after'][k])}" for k in levels]
        print("  per level: " + ", ".join(per))
    print(f"reward: {summary['reward_first']:.3f} (first step) -> {summary['reward_last']:.3f} (last step)")
    t = summary["mean_time"]
    if t:
        parts = ", ".join(f"{k.split('/', 1)[1]} {v:.2f}s" for k, v in t.items() if k != "time/step")
        print(f"time per step: {t.get('time/step', 0):.2f}s ({parts})")
    if summary.get("resumed_from"):
        print(f"resumed from {summary['resumed_from']}")
    print(f"training wall time: {summary['wall_s']:.0f}s; metrics: {summary['metrics']}; curves: "
          f"{summary['curves']}; checkpoint: {summary['checkpoint']}")


#: The demo's training run: the dro preset (R3 + length penalty, Dr. GRPO loss, KL 0.001, top-p 0.95) scaled
#: to the tiny model and a 2-core CPU: 16 steps of 8 prompts x 8 completions, temperature 0.7, one pass of
#: two mini-batches per batch, a learning rate for a 1M-parameter model, one thread (faster than two for
#: matrices this small, and robust on a shared machine).
DEMO_OVERRIDES = [
    "steps=16", "prompts_per_step=8", "rollout.group_size=8", "rollout.temperature=0.7",
    "rollout.max_new_tokens=72", "optim.lr=2e-5", "optim.warmup_ratio=0.0", "optim.updates_per_batch=1",
    "optim.mini_batches=2", "eval.size=200", "eval.max_new_tokens=72", "threads=1", "log.out_dir=runs/demo",
]


def _demo(rest: list[str]) -> int:
    from reasonrl.trainer import Trainer, load_config

    out_dir = "bench/results"
    if "--out-dir" in rest:
        i = rest.index("--out-dir")
        out_dir = rest[i + 1]
    _print_info()
    print("\n== reasonrl train --preset dro (embedded tiny Llama, embedded arithmetic task) ==")
    print("   overrides: " + " ".join(DEMO_OVERRIDES))
    cfg = load_config(preset="dro", overrides=DEMO_OVERRIDES)
    summary = Trainer(cfg).train()
    _print_summary(summary)
    print("\n== fused policy-loss benchmark, quick profile (reasonrl bench runs every benchmark) ==")
    return _run_bench(["--demo", "--profile", "quick", "--out-dir", out_dir])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reasonrl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and active backends")
    sub.add_parser("bench", help="run the benchmarks (options: reasonrl bench --help)", add_help=False)
    sub.add_parser("train", help="GRPO-family training (options: reasonrl train --help)", add_help=False)
    sub.add_parser("demo", help="info, a short DRO training of the embedded model, the quick benchmark",
                   add_help=False)
    sub.add_parser("repro", help="the papers' orderings on the embedded task (reasonrl repro --help)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        _print_info()
        return 0
    if args.command == "bench":
        return _run_bench(rest)
    if args.command == "train":
        return _train(rest)
    if args.command == "demo":
        return _demo(rest)
    if args.command == "repro":
        from reasonrl.bench.repro import main as repro_main

        return repro_main(rest)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
