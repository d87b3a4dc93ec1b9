"""Step time and peak memory of TRL 1.16's GRPOTrainer loss step: TRL's own path, ``use_liger_kernel=True``,
and reasonrl's drop-in (docs/integrations-trl.md).

    python -m reasonrl.bench.bench_trl_step [--profile quick|full] [--out-dir DIR] [--threads N]

One optimizer-free training step of the loss: ``trainer.compute_loss(model, batch)`` then ``backward()``, on
the same tiny Llama (vocabulary 32,768, hidden 256, 2 layers) and the same batch of 4 sequences of 64 prompt
+ 1,024 completion tokens (``--profile full``: 8 x 2,048), built directly (no generation, which is the same
code on every path). The loss is TRL's default ``dapo`` with the entropy metric; all three paths see identical
inputs, and the script checks that the drop-in's loss equals TRL's before timing.

Every provider runs in its own subprocess, so that peak memory is that of one path alone: the peak resident
set size during the timed steps above the resident size before them (Linux ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``; on CUDA ``torch.cuda.max_memory_allocated``). Times are the median (p20,
p80) of the timed steps after one warm-up step. On a CPU without Triton, ``use_liger_kernel=True`` cannot run
(Liger's layer kernels are Triton kernels); the table says so instead of a number.

Self-contained on purpose: only the standard library, torch, transformers, TRL and reasonrl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

PROVIDERS = ("trl", "trl_liger", "reasonrl")
PROFILES = {
    "quick": dict(batch=4, prompt=64, completion=1024, steps=3),
    "full": dict(batch=8, prompt=64, completion=2048, steps=5),
}
VOCAB, HIDDEN, LAYERS = 32768, 256, 2


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2")


def _child(provider: str, profile: str, device: str) -> dict:
    """Build the trainer of ``provider``, run the steps, return its measurements."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PROFILES[profile]
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=p["prompt"] + p["completion"],
            tie_word_embeddings=False,
            pad_token_id=1,
            eos_token_id=2,
            bos_token_id=None,
        )
    ).to(device)
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=p["batch"],
        num_generations=p["batch"],
        max_completion_length=p["completion"],
        report_to=[],
        save_strategy="no",
        use_cpu=device == "cpu",
        bf16=False,
        use_liger_kernel=provider == "trl_liger",
        loss_type="dapo",
    )
    cls = trl.GRPOTrainer
    if provider == "reasonrl":
        from reasonrl.integrations.trl import GRPOTrainer as cls
    trainer = cls(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["t3"] * p["batch"]}),
        processing_class=_tokenizer(),
    )
    model = trainer.model
    if provider == "trl_liger":  # Trainer applies Liger's kernels when training starts; apply them now
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, **(args.liger_kernel_config or {}))
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(1)
    b, c = p["batch"], p["completion"]
    completion_mask = torch.ones(b, c, dtype=torch.long)
    completion_mask[1:, c - c // 4 :] = 0  # a few shorter completions, as after EOS
    batch = {
        "prompt_ids": torch.randint(3, VOCAB, (b, p["prompt"]), generator=g),
        "prompt_mask": torch.ones(b, p["prompt"], dtype=torch.long),
        "completion_ids": torch.randint(3, VOCAB, (b, c), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g),
    }
    batch["num_items_in_batch"] = completion_mask.sum().float()
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, float(loss)

    _, loss = step()  # warm-up (and the value checked against TRL's by the parent)
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        exact = _reset_peak()
        base = _rss_kib("VmRSS") * 1024
    times = [step()[0] for _ in range(p["steps"])]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base if exact else None
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {
        "provider": provider,
        "loss": loss,
        "median_s": statistics.median(times),
        "p20_s": q[0],
        "p80_s": q[-1],
        "peak_bytes": peak,
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out-dir", default=None, help="write <device>-<timestamp>-trl_step.json there")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads in each run")
    parser.add_argument("--child", choices=PROVIDERS, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args.child, args.profile, device)))
        return 0

    results = []
    for provider in PROVIDERS:
        cmd = [
            sys.executable,
            "-m",
            __spec__.name if __spec__ else "bench.bench_trl_step",
            "--child",
            provider,
            "--profile",
            args.profile,
        ] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            results.append(json.loads(lines[-1]))
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"provider": provider, "error": tail[:300]})

    ok = {r["provider"]: r for r in results if "error" not in r}
    status = 0
    if "trl" in ok and "reasonrl" in ok:
        a, b = ok["trl"]["loss"], ok["reasonrl"]["loss"]
        if abs(a - b) > 1e-4 * (1 + abs(a)):
            print(f"MISMATCH: TRL loss {a} vs reasonrl {b}")
            status = 1
    p = PROFILES[args.profile]
    print(
        f"TRL GRPOTrainer loss step ({device}, {platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()}): batch {p['batch']} x ({p['prompt']} + {p['completion']}) "
        f"tokens, vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers"
    )
    print(f"{'provider':<12} {'median s':>9} {'p20':>7} {'p80':>7} {'peak MiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['provider']:<12} not runnable here: {r['error']}")
            continue
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        print(f"{r['provider']:<12} {r['median_s']:>9.3f} {r['p20_s']:>7.3f} {r['p80_s']:>7.3f} {peak:>9}")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"{device}-{time.strftime('%Y%m%d-%H%M%S')}-trl_step.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "device": device,
                    "profile": args.profile,
                    "vocab": VOCAB,
                    "hidden": HIDDEN,
                    "layers": LAYERS,
                    **p,
                    "torch": torch.__version__,
                    "results": results,
                },
                f,
                indent=1,
            )
        print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
