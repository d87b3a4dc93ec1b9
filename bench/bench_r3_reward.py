"""Benchmark of DRO's R3 reward scoring (docs/rewards.md 2.3): ``R3Reward`` vs the straightforward scorer.

Workload: a tiny random Llama built from a config (no download; vocabulary 32,000, hidden 256, SDPA
attention), G prompts x K = 8 rollouts, prompt 256 tokens, chain of thought 512 tokens (ending with the
``</think>`` token), answer prefix 1 token, reference 32 tokens: every scoring sequence is
[q ; c_k ; sep ; y] = 801 tokens, of which 32 are scored. A case is (G, decoder layers, dtype): ``--shapes
GxLAYERS``.

Providers:

* ``reasonrl``: ``R3Reward`` (``prefix_sharing="kv_cache"``): the prompt is encoded once per prompt and its
  KV cache shared by the K rollouts; only the 32 reference positions per rollout reach the lm_head
  (``linear_token_logprobs``, C++ on CPU); sigma, weights and rewards by ``r3_reward``.
* ``reasonrl-noshare``: the same with ``prefix_sharing="none"`` (every [q ; c_k ; sep ; y] in full): shows
  what the compact lm_head alone buys.
* ``straightforward``: per prompt, the model's plain forward of the K full sequences, ``logits`` for every
  position, ``log_softmax``, ``gather`` of the reference tokens, then the same std / weights / reward
  (``r3_reward``): what one writes without reasonrl. It is the baseline of the speed-up column ("x eager").

Mode: ``fwd`` only (scoring runs under no_grad). Correctness gate: every provider's rewards against the
float64 oracle (the straightforward scorer on the same weights upcast to float64, lm_head applied to the
scored positions only), within ``max(tol (1 + max |oracle|), 2 err(straightforward))`` with tol 1e-4 for
float32 and 2e-2 for 16-bit models (the error of a whole model forward, not of one op: docs/ops.md
section 8 does not apply). Reported by the shared harness (bench/harness.py): median time per batch
(p20 / p80), reference tokens per second (G K L / time; the throughput column) and completions per second
(G K / time, ``completions_per_s`` in the JSON), and the peak memory of one batch (CPU: peak RSS in a fresh
process, GPU: ``max_memory_allocated``); the model and the inputs are not counted.

Usage: ``python -m reasonrl.bench.bench_r3_reward --profile quick`` (a few minutes on 2 CPU cores,
most of them the straightforward provider and the peak-memory subprocesses, one per provider).
"""

from __future__ import annotations

import copy
import functools
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import harness
from .harness import GateRun, Verdict, Work
from .inputs import DTYPE_SHORT, DTYPES
from .memory import peak_memory

OP = "r3_reward"
MODULE = __spec__.name if __spec__ else __name__  # the memory subprocesses run `python -m MODULE`
MODES = ("fwd",)
PEER_DISTS = ("transformers",)
MARKER, SEP = 31999, 31998  # ids of "</think>" and the answer prefix in the random vocabulary
SHAPE = {"prompt": 256, "cot": 512, "ref": 32, "k": 8, "vocab": 32000, "hidden": 256, "intermediate": 688,
         "heads": 4}
# (G prompts, decoder layers, dtype) per profile and device type; lengths are the realistic ones.
PROFILES: dict[str, dict[str, list[tuple[int, int, str]]]] = {
    "quick": {"cpu": [(1, 2, "float32")], "cuda": [(16, 4, "bfloat16")]},
    "full": {"cpu": [(8, 4, "float32")], "cuda": [(64, 4, "bfloat16")]},
}
TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
N_SETS = 2  # rotating batches: the inputs are token ids, so a batch's cost is the model's, not the cache's


@dataclass(frozen=True)
class R3Spec:
    """One case: G prompts x K rollouts on a Llama of ``layers`` decoder layers in ``dtype``."""

    groups: int
    layers: int
    dtype: str
    seed: int = 0

    @property
    def n(self) -> int:  # the rows of the batch: completions scored
        return self.groups * SHAPE["k"]

    @property
    def ref_tokens(self) -> int:
        return self.n * SHAPE["ref"]

    @property
    def label(self) -> str:
        return f"G{self.groups}xK{SHAPE['k']} {self.layers}L {DTYPE_SHORT.get(self.dtype, self.dtype)}"


@dataclass
class R3Inputs:
    """One batch of token ids (TRL layout: the K rollouts of a prompt are adjacent), int64 tensors."""

    prompt_ids: torch.Tensor  # [G K, prompt]
    completion_ids: torch.Tensor  # [G K, cot + ref]: chain of thought ending with MARKER, then an answer
    reference_ids: torch.Tensor  # [G K, ref]


@functools.cache
def build_model(layers: int, dtype: str, device_str: str):
    """The tiny random Llama of the case (seeded: every provider and the oracle see the same weights)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
                                   intermediate_size=SHAPE["intermediate"], num_hidden_layers=layers,
                                   num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["heads"],
                                   max_position_embeddings=1024, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=torch.device(device_str), dtype=DTYPES[dtype])
    return model.eval()


def make_batch(groups: int, seed: int) -> R3Inputs:
    gen = torch.Generator().manual_seed(seed)

    def toks(n: int) -> torch.Tensor:
        return torch.randint(0, SHAPE["vocab"] - 2, (n,), generator=gen)

    prompts, completions, references = [], [], []
    for _ in range(groups):
        q, y = toks(SHAPE["prompt"]), toks(SHAPE["ref"])
        for _ in range(SHAPE["k"]):
            prompts.append(q)
            cot = torch.cat([toks(SHAPE["cot"] - 1), torch.tensor([MARKER])])
            completions.append(torch.cat([cot, toks(SHAPE["ref"])]))
            references.append(y)
    return R3Inputs(torch.stack(prompts), torch.stack(completions), torch.stack(references))


def _lists(batch: R3Inputs) -> dict[str, list[list[int]]]:
    """The id lists R3Reward takes (converted inside the timed call: part of what a trainer hands over)."""
    return {"prompt_ids": batch.prompt_ids.tolist(), "completion_ids": batch.completion_ids.tolist(),
            "reference_ids": batch.reference_ids.tolist()}


# ----------------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------------


def _build_reasonrl(spec: R3Spec, device: torch.device, prefix_sharing: str = "kv_cache"):
    from reasonrl.rewards import R3Config, R3Reward

    model = build_model(spec.layers, spec.dtype, str(device))
    reward = R3Reward(model, config=R3Config(think_end_ids=(MARKER,), answer_prefix_ids=(SEP,),
                                             prefix_sharing=prefix_sharing, max_batch_tokens=32768))

    def fn(batch: R3Inputs) -> torch.Tensor:
        return reward(group_size=SHAPE["k"], **_lists(batch)).diagnostics["r3"]

    return fn


def _scoring_sequences(batch: R3Inputs, rows: range) -> torch.Tensor:
    """[len(rows), prompt + cot + 1 + ref]: [q ; c_k up to its </think> ; sep ; y] (every c_k has the marker
    at the same place in this workload, so the rows stack without padding)."""
    seqs = []
    for r in rows:
        c = batch.completion_ids[r]
        end = int((c == MARKER).nonzero()[0, 0]) + 1
        seqs.append(torch.cat([batch.prompt_ids[r], c[:end], torch.tensor([SEP]), batch.reference_ids[r]]))
    return torch.stack(seqs)


def _straightforward_logprobs(model, ids: torch.Tensor, full_logits: bool) -> torch.Tensor:
    """Reference-token log-probs [K, L]: the plain forward's logits at every position, log_softmax, gather
    (``full_logits``), or, for the oracle, the lm_head on the scored positions only."""
    n_ref = SHAPE["ref"]
    if full_logits:
        logits = model(ids).logits.float()  # [K, T, V]: every position, as one writes it without reasonrl
        logp = torch.log_softmax(logits[:, -n_ref - 1:-1], dim=-1)
    else:
        hidden = model.model(ids).last_hidden_state[:, -n_ref - 1:-1]
        logp = torch.log_softmax(model.lm_head(hidden), dim=-1)
    return logp.gather(-1, ids[:, -n_ref:, None]).squeeze(-1)


def _straightforward_rewards(model, batch: R3Inputs, full_logits: bool = True) -> torch.Tensor:
    from reasonrl.rewards import r3_reward

    k, out = SHAPE["k"], []
    with torch.no_grad():
        for g in range(0, batch.prompt_ids.shape[0], k):
            ids = _scoring_sequences(batch, range(g, g + k)).to(model.device)
            lp = _straightforward_logprobs(model, ids, full_logits)
            out.append(r3_reward(lp[None]).reward[0])  # std over K, weights, reward
    return torch.cat(out).cpu()


def _build_straightforward(spec: R3Spec, device: torch.device):
    model = build_model(spec.layers, spec.dtype, str(device))
    return functools.partial(_straightforward_rewards, model)


@dataclass(frozen=True)
class Provider(harness.Provider):
    pass


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("reasonrl", _build_reasonrl, strict=True, module="transformers",
             note="R3Reward, prefix_sharing='kv_cache': prompt KV cache shared by the K rollouts, lm_head on "
                  "the 32 reference positions only"),
    Provider("reasonrl-noshare", functools.partial(_build_reasonrl, prefix_sharing="none"), strict=True,
             module="transformers", note="R3Reward, prefix_sharing='none': compact lm_head only"),
    Provider("straightforward", _build_straightforward, module="transformers",
             note="plain forward of q + c_k + sep + y, logits at every position, log_softmax, gather, "
                  "r3_reward"),
)}


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


class R3RewardBenchmark(harness.Benchmark):
    op, module, modes, profiles, providers, peer_dists = OP, MODULE, MODES, PROFILES, PROVIDERS, PEER_DISTS
    spec_cls, inputs_cls = R3Spec, R3Inputs
    eager, compiled = "straightforward", "straightforward-compiled"  # no compiled baseline: column empty
    shape_form = "GxLAYERS"
    profile_help = ("quick: 1 prompt x 8 rollouts, 2 layers, fp32 on CPU (a few minutes on 2 cores); 16 "
                    "prompts, 4 layers, bf16 on CUDA. full: 8 prompts, 4 layers (CPU); 64 prompts (CUDA)")
    modes_help = "R3 scoring is forward only (fwd)."

    def make_inputs(self, spec: R3Spec, device: torch.device):
        sets = [make_batch(spec.groups, spec.seed + k) for k in range(N_SETS)]
        record = {**SHAPE, "groups": spec.groups, "layers": spec.layers, "dtype": spec.dtype,
                  "n_sets": N_SETS, "seeds": [spec.seed + k for k in range(N_SETS)],
                  "completions": spec.n, "ref_tokens": spec.ref_tokens,
                  "scoring_sequence_tokens": SHAPE["prompt"] + SHAPE["cot"] + 1 + SHAPE["ref"],
                  "layout": f"{spec.n} scoring sequences of "
                            f"{SHAPE['prompt'] + SHAPE['cot'] + 1 + SHAPE['ref']} tokens"}
        return sets, record

    def oracle(self, spec: R3Spec, inp: R3Inputs, device: torch.device) -> torch.Tensor:
        """The straightforward scorer in float64 on the case's weights (upcast exactly), computing the
        lm_head only where it is read (the full [K, T, V] logits in float64 would dominate the run)."""
        model = copy.deepcopy(build_model(spec.layers, spec.dtype, str(device))).to(torch.float64)
        t0 = time.perf_counter()
        oracle = _straightforward_rewards(model, inp, full_logits=False).double()
        harness.log(OP, f"{spec.label}: float64 oracle in {time.perf_counter() - t0:.1f} s")
        return oracle

    def gate(self, p, fn, inp, modes, device, oracle) -> GateRun:
        t0 = time.perf_counter()
        rewards = fn(inp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return GateRun(rewards.detach().double().cpu(), {"fwd": time.perf_counter() - t0})

    def check(self, spec, inp, results, device, oracle) -> dict[str, dict[str, Verdict]]:
        errs = {name: float((r - oracle).abs().max()) for name, r in results.items()}
        errs = {name: (e if e == e else float("inf")) for name, e in errs.items()}  # NaN fails
        scale = 1 + float(oracle.abs().max())
        bound = TOL[spec.dtype] * scale
        if "straightforward" in errs:
            bound = max(bound, 2 * errs["straightforward"])
        return {name: {"fwd": Verdict(e <= bound, e, {"reward": {"err": e, "bound": bound, "scale": scale,
                                                                   "ok": e <= bound}})}
                for name, e in errs.items()}

    def timed(self, p, fn, sets, mode):
        return (lambda k: fn(sets[k])), []

    def work(self, spec, p, mode, ceilings, device) -> Work:
        # Reference tokens scored per second; no bandwidth or FLOP ceiling applies to a model forward here.
        return Work(spec.ref_tokens, "ref tok/s", None, scale=1.0)

    def row_metrics(self, spec, p, mode, median_ms) -> dict[str, Any]:
        return {"completions_per_s": spec.n / (median_ms / 1e3), "ref_tokens_per_s": spec.ref_tokens
                / (median_ms / 1e3)}

    def measure_memory(self, p, fn, inp, modes, device, warm):
        if warm:
            fn(inp)  # thread pools, lazily loaded kernels, the model's first-call allocations
        _, delta, absolute = peak_memory(lambda: fn(inp), device)
        return {"fwd": (delta, absolute)}

    def workload(self, providers, modes) -> dict[str, Any]:
        return {**SHAPE, "modes": modes, "tolerance": TOL,
                "providers": {p.name: {"note": p.note, "strict": p.strict} for p in providers}}

    def closing_lines(self, results: dict[str, Any]) -> list[str]:
        lines = []
        for r in results["rows"]:
            if r.get("median_ms") is not None:
                lines.append(f"{r['case']} {r['provider']}: {r['ref_tokens_per_s']:.0f} ref tok/s, "
                             f"{r['completions_per_s']:.1f} completions/s, speed-up vs straightforward "
                             f"{(r.get('speedup_vs_eager') or float('nan')):.2f}x, peak "
                             f"{r.get('mem_delta_mib', float('nan')):.0f} MiB")
        return lines


BENCHMARK = R3RewardBenchmark()

main = BENCHMARK.main  # main(argv) -> exit status: what run_all and `python -m` call


if __name__ == "__main__":
    sys.exit(main())
