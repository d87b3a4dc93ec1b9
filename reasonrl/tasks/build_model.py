"""Build the embedded tokenizer and tiny model (docs/trainer.md section 4.2): ``reasonrl/assets/tiny-arith``.

    python -m reasonrl.tasks.build_model --out reasonrl/assets/tiny-arith          # seed 0, the shipped model

1. Tokenizer: a byte-level BPE (``tokenizers``) trained on train-split texts of the arithmetic task, with
   digits split into single characters (a number is read digit by digit, which is what a small model can
   learn to add), ``<think>`` / ``</think>`` as single non-special tokens (decoding keeps them, so text
   rewards see the markers), ``<pad>`` and ``<eos>``. Wrapped as a ``PreTrainedTokenizerFast`` (left padding,
   for batched generation).
2. Model: a ``LlamaForCausalLM`` of about 2M parameters (hidden 192, 4 layers, untied lm_head), trained
   from scratch with supervised fine-tuning on gold completions (loss on the completion tokens only), for a
   fixed number of steps that leaves the held-out accuracy clearly below 100% so that RL has room.
3. Held-out greedy accuracy per level, written with the settings to ``sft_report.json`` next to the weights.

Sequences are built by concatenating the token ids of the segments ``prompt``, ``<think> cot </think>``,
``"\\n\\n"`` and the reference outcome, plus ``<eos>``: exactly how R3 builds its scoring sequence
[q ; c ; answer_prefix ; y] (docs/rewards.md section 2.2), so the model's scoring is in distribution.

Deterministic on one machine under ``--seed`` (``torch.manual_seed``, ``random.Random``); thread count and
BLAS may change the last bits across machines.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from reasonrl.tasks.arithmetic import ANSWER_PREFIX, THINK_END, THINK_START, ArithmeticTask, Problem, verify

__all__ = ["build_tokenizer", "build_config", "encode_example", "evaluate", "main"]

VOCAB_SIZE = 384


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (digits kept as single tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Markers as single tokens that decoding keeps (special=False): text rewards look for "</think>".
    tok.add_tokens(
        [
            AddedToken(THINK_START, special=False, normalized=False),
            AddedToken(THINK_END, special=False, normalized=False),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left", model_max_length=256
    )
    return fast


def build_config(tokenizer, *, hidden: int = 160, layers: int = 4, heads: int = 4, intermediate: int = 384):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def encode_example(tokenizer, p: Problem) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a problem's gold completion, segment by segment (see module doc)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = enc(p.prompt)
    completion = (
        enc(f"{THINK_START} {p.cot} {THINK_END}")
        + enc(ANSWER_PREFIX)
        + enc(p.reference)
        + [tokenizer.eos_token_id]
    )
    return prompt, completion


@torch.no_grad()
def evaluate(
    model, tokenizer, problems: list[Problem], *, batch_size: int = 64, max_new_tokens: int = 72
) -> dict:
    """Greedy held-out accuracy: overall, per level, and the fraction of well-formed answers."""
    was_training = model.training
    model.eval()
    statuses: list[str] = []
    for s in range(0, len(problems), batch_size):
        chunk = problems[s : s + batch_size]
        batch = tokenizer(
            [p.prompt for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False
        )
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        statuses += [verify(t, p.answer) for t, p in zip(texts, chunk, strict=True)]
    model.train(was_training)
    result = {
        "n": len(problems),
        "accuracy": _frac(statuses, "correct"),
        "well_formed": 1.0 - _frac(statuses, "bad_format"),
    }
    for level in sorted({p.level for p in problems}):
        sub = [s for s, p in zip(statuses, problems, strict=True) if p.level == level]
        result[f"accuracy_level{level}"] = _frac(sub, "correct")
    return result


def _frac(statuses: list[str], what: str) -> float:
    return sum(s == what for s in statuses) / max(1, len(statuses))


def _batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    length = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(examples):  # right padding for training
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(c)
        mask[i, : len(seq)] = 1
    return ids, mask, labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m reasonrl.tasks.build_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", default="reasonrl/assets/tiny-arith", help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300, help="SFT optimiser steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=160)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-size", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=0, help="print a quick held-out accuracy every N steps")
    args = ap.parse_args(argv)

    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    task = ArithmeticTask(seed=args.seed)
    corpus = task.problems("train", 3000)
    tokenizer = build_tokenizer([p.prompt + p.completion for p in corpus])
    model = LlamaForCausalLM(
        build_config(tokenizer, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate)
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, parameters {n_params / 1e6:.2f}M", flush=True)

    train = task.problems("train", args.steps * args.batch_size, offset=3000)
    heldout = task.problems("heldout", args.eval_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    rng = random.Random(args.seed)
    model.train()
    for step in range(args.steps):
        chunk = train[step * args.batch_size : (step + 1) * args.batch_size]
        rng.shuffle(chunk)
        ids, mask, labels = _batch([encode_example(tokenizer, p) for p in chunk], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t_start:6.1f}s", flush=True)
        if args.eval_every and step and step % args.eval_every == 0:
            print(
                f"step {step:5d}  held-out (first 64): "
                f"{json.dumps(evaluate(model, tokenizer, heldout[:64]))}",
                flush=True,
            )
    sft_seconds = time.time() - t_start
    report = evaluate(model, tokenizer, heldout)
    print("held-out:", json.dumps(report), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=72
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "sft_report.json").write_text(
        json.dumps(
            {
                "command": "python -m reasonrl.tasks.build_model "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "seed": args.seed,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "parameters": n_params,
                "vocab_size": len(tokenizer),
                "threads": args.threads,
                "sft_seconds": round(sft_seconds, 1),
                "torch": torch.__version__,
                "heldout": report,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved to {out} ({time.time() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
