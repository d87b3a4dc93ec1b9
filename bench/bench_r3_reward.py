"""Benchmark of DRO's R3 reward scoring (docs/rewards.md 2.3): ``R3Reward`` vs the straightforward scorer.

Workload: a tiny random Llama built from a config (no download; vocabulary 32,000, hidden 256, SDPA
attention), G prompts x K = 8 rollouts, prompt 256 tokens, chain of thought 512 tokens (ending with the
``</think>`` token), answer prefix 1 token, reference 32 tokens: every scoring sequence is
[q ; c_k ; sep ; y] = 801 tokens, of which 32 are scored.

Providers:

* ``reasonrl``: ``R3Reward`` (``prefix_sharing="kv_cache"``): the prompt is encoded once per prompt and its
  KV cache shared by the K rollouts; only the 32 reference positions per rollout reach the lm_head
  (``linear_token_logprobs``, C++ on CPU); sigma, weights and rewards by ``r3_reward``.
* ``reasonrl-noshare``: the same with ``prefix_sharing="none"`` (every [q ; c_k ; sep ; y] in full): shows
  what the compact lm_head alone buys.
* ``straightforward``: per prompt, the model's plain forward of the K full sequences, ``logits`` for every
  position, ``log_softmax``, ``gather`` of the reference tokens, then the same std / weights / reward
  (``r3_reward``): what one writes without reasonrl.

Correctness gate: the rewards of every provider agree with the straightforward ones (relative 1e-4 in fp32).
Reported: median time per batch (p20 / p80), reference tokens per second (G K L / time), completions per
second (G K / time), and the peak memory of one batch (CPU: peak RSS in a fresh process, GPU:
``max_memory_allocated``).

Usage: ``python -m reasonrl.bench.bench_r3_reward --profile quick`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import common

OP = "r3_reward"
MODULE = __spec__.name if __spec__ else __name__  # the memory subprocesses run `python -m MODULE`
PROVIDERS = ("reasonrl", "reasonrl-noshare", "straightforward")
DEFAULT_CPU_THREADS = 2
MARKER, SEP = 31999, 31998  # ids of "</think>" and the answer prefix in the random vocabulary

# G prompts, decoder layers, dtype per profile and device type; lengths are the issue's realistic ones.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {"cpu": {"groups": 1, "layers": 2, "dtype": "float32"},
              "cuda": {"groups": 16, "layers": 4, "dtype": "bfloat16"}},
    "full": {"cpu": {"groups": 8, "layers": 4, "dtype": "float32"},
             "cuda": {"groups": 64, "layers": 4, "dtype": "bfloat16"}},
}
SHAPE = {"prompt": 256, "cot": 512, "ref": 32, "k": 8, "vocab": 32000, "hidden": 256, "intermediate": 688,
         "heads": 4}


def _log(msg: str) -> None:
    print(f"[bench_r3_reward] {msg}", file=sys.stderr, flush=True)


def build_model(layers: int, dtype: str, device: torch.device):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
                                   intermediate_size=SHAPE["intermediate"], num_hidden_layers=layers,
                                   num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["heads"],
                                   max_position_embeddings=1024, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, dtype))
    return model.eval()


def make_batch(groups: int, seed: int = 0) -> dict[str, list]:
    """G prompts x K rollouts of token ids (TRL layout: the K rollouts of a prompt are adjacent)."""
    gen = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(0, SHAPE["vocab"] - 2, (n,), generator=gen).tolist()

    prompt_ids, completion_ids, reference_ids = [], [], []
    for _ in range(groups):
        q, y = toks(SHAPE["prompt"]), toks(SHAPE["ref"])
        for _ in range(SHAPE["k"]):
            prompt_ids.append(q)
            completion_ids.append(toks(SHAPE["cot"] - 1) + [MARKER] + toks(SHAPE["ref"]))
            reference_ids.append(y)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "reference_ids": reference_ids}


def _reasonrl(model, prefix_sharing: str):
    from reasonrl.rewards import R3Config, R3Reward

    reward = R3Reward(model, config=R3Config(think_end_ids=(MARKER,), answer_prefix_ids=(SEP,),
                                             prefix_sharing=prefix_sharing, max_batch_tokens=32768))

    def fn(batch):
        return reward(group_size=SHAPE["k"], **batch).diagnostics["r3"]

    return fn


def _straightforward(model):
    from reasonrl.rewards import r3_reward

    def fn(batch):
        k, n_ref = SHAPE["k"], SHAPE["ref"]
        out = []
        with torch.no_grad():
            for g in range(0, len(batch["prompt_ids"]), k):
                seqs = []
                for r in range(g, g + k):
                    c = batch["completion_ids"][r]
                    trace = c[: c.index(MARKER) + 1]
                    seqs.append(batch["prompt_ids"][r] + trace + [SEP] + batch["reference_ids"][r])
                ids = torch.tensor(seqs, device=model.device)
                logits = model(ids).logits.float()                       # [K, T, V]: every position
                logp = torch.log_softmax(logits[:, -n_ref - 1:-1], dim=-1)
                lp = logp.gather(-1, ids[:, -n_ref:, None]).squeeze(-1)  # [K, L]
                out.append(r3_reward(lp[None]).reward[0])                # std over K, weights, reward
        return torch.cat(out).cpu()

    return fn


def build(provider: str, model):
    if provider == "reasonrl":
        return _reasonrl(model, "kv_cache")
    if provider == "reasonrl-noshare":
        return _reasonrl(model, "none")
    return _straightforward(model)


def _memcase(payload: dict[str, Any]) -> dict[str, Any]:
    """Child process: peak memory of one batch of ``payload['provider']`` (model and inputs not counted)."""
    device = torch.device(payload["device"])
    torch.set_num_threads(payload["threads"])
    model = build_model(payload["layers"], payload["dtype"], device)
    batch = make_batch(payload["groups"])
    fn = build(payload["provider"], model)
    try:
        _, incremental, absolute = common.peak_memory(lambda: fn(batch), device)
    except Exception as err:  # reported as a row, never a crash of the parent
        return {"error": f"{type(err).__name__}: {err}"}
    return {"peak_bytes": incremental, "absolute_bytes": absolute}


def _peak(provider: str, prof: dict[str, Any], device: torch.device, threads: int) -> dict[str, Any]:
    payload = {"provider": provider, "device": str(device), "threads": threads, **prof}
    if device.type == "cuda":
        return _memcase(payload)
    why = common.cpu_peak_supported()
    if why is not None:
        return {"error": why}
    return common.run_memory_subprocess(MODULE, payload)


def run(profile: str, device: torch.device, threads: int, providers: list[str], with_memory: bool
        ) -> dict[str, Any]:
    prof = PROFILES[profile][device.type]
    model = build_model(prof["layers"], prof["dtype"], device)
    batch = make_batch(prof["groups"])
    n_rows = prof["groups"] * SHAPE["k"]
    ref_tokens = n_rows * SHAPE["ref"]
    fns = {p: build(p, model) for p in providers}
    t0 = time.perf_counter()
    oracle = fns["straightforward"](batch)
    gate_s = time.perf_counter() - t0
    tol = 1e-4 if prof["dtype"] == "float32" else 2e-2
    rows = []
    for p in providers:
        row: dict[str, Any] = {"provider": p}
        t0 = time.perf_counter()
        got = oracle if p == "straightforward" else fns[p](batch)
        call_s = gate_s if p == "straightforward" else time.perf_counter() - t0
        err = float((got - oracle).abs().max())
        scale = float(oracle.abs().max())
        row["max_abs_err"] = err
        row["status"] = "ok" if err <= tol * (1 + scale) and not math.isnan(err) else "INCORRECT"
        _log(f"{p}: gate max |err| = {err:.2e} (scale {scale:.2f}) -> {row['status']}")
        timing = common.time_fn(lambda _k, f=fns[p]: f(batch), 1, device,
                                prior_calls=1,
                                prior_s=call_s)
        row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                   repeats=timing.repeats, method=timing.method)
        row["ref_tokens_per_s"] = ref_tokens / (timing.median_ms / 1e3)
        row["completions_per_s"] = n_rows / (timing.median_ms / 1e3)
        if with_memory:
            mem = _peak(p, prof, device, threads)
            row["peak_mib"] = mem["peak_bytes"] / 2**20 if "peak_bytes" in mem else None
            row["peak_note"] = mem.get("error")
        _log(f"{p}: {timing.median_ms:.0f} ms, {row['ref_tokens_per_s']:.0f} ref tok/s, "
             f"peak {row.get('peak_mib')} MiB")
        rows.append(row)
    base = next((r for r in rows if r["provider"] == "straightforward"), None)
    for r in rows:
        if base is not None:
            r["speedup"] = base["median_ms"] / r["median_ms"]
            if r.get("peak_mib") and base.get("peak_mib"):
                r["memory_ratio"] = base["peak_mib"] / r["peak_mib"]
    return {"profile": profile, "workload": {**SHAPE, **prof, "rows": n_rows, "ref_tokens": ref_tokens,
                                             "scoring_sequence_tokens": SHAPE["prompt"] + SHAPE["cot"] + 1
                                             + SHAPE["ref"]}, "rows": rows}


def markdown(result: dict[str, Any], env: dict[str, Any]) -> str:
    w = result["workload"]
    lines = [f"R3 scoring, {w['groups']} prompts x K = {w['k']}, prompt {w['prompt']}, CoT {w['cot']}, "
             f"reference {w['ref']}; Llama {w['layers']} layers, hidden {w['hidden']}, vocabulary "
             f"{w['vocab']}, "
             f"{w['dtype']}; {env.get('device_name')} ({env.get('threads')} threads)", "",
             "| provider | time / batch (ms) [p20, p80] | ref tokens/s | completions/s | speed-up | peak "
             "memory "
             "(MiB) | status |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        peak = "n/a" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['provider']} | {r['median_ms']:.0f} [{r['p20_ms']:.0f}, {r['p80_ms']:.0f}] | "
                     f"{r['ref_tokens_per_s']:.0f} | {r['completions_per_s']:.1f} | "
                     f"{r.get('speedup', 1.0):.2f}x | {peak} | {r['status']} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_r3_reward", description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default="fwd", help="accepted for run_all; R3 scoring is forward only")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out-dir", type=Path, default=Path("."))
    p.add_argument("--_memcase", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 when a reasonrl provider failed its correctness gate."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = _parser().parse_known_args(argv)
    if args._memcase:
        common.emit_memcase_result(_memcase(json.loads(args._memcase)))
        return 0
    t_start = time.perf_counter()
    device = common.pick_device()
    threads = args.threads or (DEFAULT_CPU_THREADS if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    providers = [p.strip() for p in args.providers.split(",") if p.strip() in PROVIDERS]
    if "straightforward" not in providers:
        providers.append("straightforward")  # the gate's oracle and the speed-up's baseline
    result = run(args.profile, device, threads, providers, not args.no_memory)
    env = common.environment(device, ("transformers",))
    report = {"op": OP, "timestamp": common.timestamp(), "argv": argv, "environment": env, **result,
              "wall_s": time.perf_counter() - t_start}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{OP}-{common.device_slug(device)}-{report['timestamp']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = markdown(result, env)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json / .md ({report['wall_s']:.0f} s)")
    failed = [r for r in result["rows"] if r["provider"].startswith("reasonrl") and r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
