"""Packed vs padded trainer steps (docs/trainer.md section 11.4): step time and peak memory.

Workload: ``reasonrl train``'s defaults (the embedded tiny Llama and arithmetic task, 8 prompts x K = 8
sampled completions of at most 64 tokens, R3 reward, dapo loss, fp32 on the CPU), so the completion lengths
are whatever the model samples (the spread is reported). Each mode runs in a fresh process: one warm-up step,
then ``--steps`` measured steps. Reported per mode: the median step time and its parts (the trainer's own
``time/*`` metrics), the tokens a forward pass computes (padded: B x T per micro-batch; packed: sum L_i), the
attention-score area (padded: B T^2; packed with a dense block-diagonal mask: N^2), and two peak-RSS
figures: the whole step (generation included) and the loss phase alone (every micro-batch's forward +
backward on the last step's record), each as the increase over the RSS before it (bench/memory.py).

Modes: ``padded`` (defaults), ``padded-mb8`` (``optim.micro_batch_size=8``), ``packed`` (``packing=true``:
the whole batch in one micro-batch, bin-packed into rows of the longest sequence's width), ``packed-tok512``
(``packing=true optim.micro_batch_tokens=512``), ``packed-w256`` (rows 256 tokens wide), ``packed-1row``
(``packing_row_tokens=1000000``: one ``[1, N]`` row with a dense N x N mask, what SDPA would do without the
row layout).

Usage: ``python -m reasonrl.bench.bench_packing [--steps 3] [--rounds 1] [--threads 1]``. The parent prints a
Markdown table and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

MODES = {
    "padded": [],
    "padded-mb8": ["optim.micro_batch_size=8"],
    "packed": ["packing=true"],
    "packed-tok512": ["packing=true", "optim.micro_batch_tokens=512"],
    "packed-w256": ["packing=true", "packing_row_tokens=256"],
    "packed-1row": ["packing=true", "packing_row_tokens=1000000"],
}


def _case(payload: dict) -> dict:
    from reasonrl.losses import LossNormalizers
    from reasonrl.trainer import Trainer, load_config
    from reasonrl.trainer.packing import pack_rows, row_layout

    from .memory import peak_memory

    out_dir = tempfile.mkdtemp(prefix="bench-packing-")
    overrides = [
        f"steps={payload['steps'] + 1}",
        f"threads={payload['threads']}",
        "eval.size=1",
        f"log.out_dir={out_dir}",
        "log.progress=false",
        "log.plot=false",
        "log.tensorboard=off",
        *MODES[payload["mode"]],
    ]
    trainer = Trainer(load_config(overrides=overrides))
    trainer.step()  # warm-up: first-call costs (allocator, kernels' one-time setup)
    rows, tokens, real, attn_area, lengths = [], [], [], [], []
    step_peaks = []
    for _ in range(payload["steps"]):
        metrics, step_peak, _ = peak_memory(trainer.step, torch.device("cpu"))
        step_peaks.append(step_peak)
        rows.append({k: v for k, v in metrics.items() if k.startswith("time/")})
        rec = trainer.last_record
        B = len(rec.completion_ids)
        lens = [int(n) for n in rec.attention_mask.sum(1)]
        lengths.extend(len(c) for c in rec.completion_ids)
        real.append(sum(lens))
        micro = trainer._micro_slices(range(B))
        if trainer.config.packing:  # the SDPA row layout of each micro-batch (reasonrl.trainer.packing)
            slots = area = 0
            for m in micro:
                b = pack_rows(rec.input_ids, lens, m)
                w = max(min(trainer.config.packing_row_tokens, b.num_tokens), b.max_length)
                lay = row_layout(b, w)
                slots += lay.input_ids.numel()  # R W
                area += lay.input_ids.numel() * w  # R W^2
            tokens.append(slots)
            attn_area.append(area)
        else:
            widths = [max(lens[r] for r in m) for m in micro]
            tokens.append(sum(len(m) * w for m, w in zip(micro, widths, strict=True)))
            attn_area.append(sum(len(m) * w * w for m, w in zip(micro, widths, strict=True)))
    rec = trainer.last_record
    B = len(rec.completion_ids)
    micro = trainer._micro_slices(range(B))
    norm = LossNormalizers(
        num_items_in_batch=max(1, int(rec.loss_mask.sum())),
        global_num_seqs=B,
        grad_accum_steps=len(micro),
        padded_length=trainer.config.rollout.max_new_tokens,
    )

    def loss_phase():
        for m in micro:
            trainer._micro_loss(rec, m, norm).loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    t = time.perf_counter()
    _, loss_peak, _ = peak_memory(loss_phase, torch.device("cpu"))
    loss_time = time.perf_counter() - t
    keys = rows[0].keys()
    return {
        "mode": payload["mode"],
        "times": {k: statistics.median(r[k] for r in rows) for k in keys},
        "loss_phase_s": loss_time,
        "tokens_per_step": statistics.mean(tokens),
        "real_tokens_per_step": statistics.mean(real),
        "attention_area_per_step": statistics.mean(attn_area),
        "micro_batches": len(micro),
        "completion_len": {
            "min": min(lengths),
            "median": statistics.median(lengths),
            "max": max(lengths),
            "mean": statistics.mean(lengths),
        },
        "peak_step_mib": max(step_peaks) / 2**20,
        "peak_loss_phase_mib": loss_peak / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the modes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--_memcase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memcase is not None:
        from .memory import emit_memcase_result

        emit_memcase_result(_case(json.loads(args._memcase)))
        return 0
    from .memory import run_memory_subprocess

    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            payload = {"mode": mode, "steps": args.steps, "threads": args.threads}
            res = run_memory_subprocess("reasonrl.bench.bench_packing", payload, timeout_s=3600)
            if "error" in res:
                print(f"{mode}: {res['error']}", file=sys.stderr)
                continue
            results.setdefault(mode, []).append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    print(
        "| mode | step (s) | old log-probs (s) | reward (s) | loss fwd+bwd (s) | decoder slots / real tokens "
        "| attention area / step | micro-batches | peak RSS, step (MiB) | peak RSS, loss phase (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, runs in results.items():

        def med(f, runs=runs):
            return statistics.median(f(r) for r in runs)

        area = med(lambda r: r["attention_area_per_step"])
        print(
            f"| {mode} | {med(lambda r: r['times']['time/step']):.2f} "
            f"| {med(lambda r: r['times']['time/old_logprobs']):.2f} "
            f"| {med(lambda r: r['times']['time/reward']):.2f} "
            f"| {med(lambda r: r['times']['time/loss_fwd_bwd']):.2f} "
            f"| {med(lambda r: r['tokens_per_step']):.0f} / {med(lambda r: r['real_tokens_per_step']):.0f} "
            f"| {area:.3g} "
            f"| {runs[0]['micro_batches']} | {med(lambda r: r['peak_step_mib']):.0f} "
            f"| {med(lambda r: r['peak_loss_phase_mib']):.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
