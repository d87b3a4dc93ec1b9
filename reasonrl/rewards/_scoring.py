"""Teacher-forced scoring of token continuations with a causal LM: the engine behind R3 (docs/rewards.md 2.3),
the R3 data filter (2.5) and PEAR's own entropy pass (3).

A *row* is a prompt (token ids) followed by a continuation (token ids); a suffix of the continuation is
*scored*: for each scored token we return its log-probability (and optionally the entropy of the predicting
distribution and the token's rank) under the model at a given temperature.

Work and memory decisions:

* **Only scored positions reach the lm_head.** The decoder's last hidden states are computed for every
  position (that is the transformer's cost), then the rows predicting scored tokens are gathered into one
  compact ``[n_scored, H]`` matrix and passed to :func:`reasonrl.linear_token_logprobs`. No ``[rows, V]``
  logits tensor is ever formed (for R3 at prompt 256, trace 512, reference 32, K = 8 that is 32 of 800
  positions per row).
* **The prompt is encoded once per prompt, not once per row** (``prefix_sharing="kv_cache"``): a *prefix pass*
  runs the prompts of a micro-batch (all but their last token) with ``use_cache=True``; the key/value cache is
  then indexed out to one copy per row (``Cache.batch_select_indices``) and a *continuation pass* runs
  ``[last prompt token ; continuation]`` for all rows against it. The prompt's last token is moved into the
  continuation pass so that the position predicting the continuation's first token is computed there.
  Layout: every tensor is right-padded. In the prefix pass no attention mask is needed at all: with right
  padding and a causal mask a real token never sees a padding slot (the padding slots compute finite garbage
  that nobody reads). In the continuation pass the 2-D mask ``[prefix mask ; continuation mask]`` hides the
  prefix padding slots, and ``position_ids`` restart each row at its own prompt length, so every real token
  sees exactly the keys and positions of the unpadded sequence ``[q ; c]``. No query row is ever fully masked
  (which would give NaN in SDPA), because every padding query sits to the right of a real token.
  Packing with a shared prefix (one long sequence per prompt with a tree-shaped mask) would avoid repeating
  the prefix's keys K times, but needs a 4-D custom mask that not every attention backend accepts; the cache
  route uses only the standard ``past_key_values`` interface. Its cost: the prefix K/V are copied K times per
  micro-batch (``K * P * layers * 2 * kv_dim`` elements), while the prefix compute drops from K x to 1 x.
  ``prefix_sharing="none"`` runs every ``[q ; c]`` in full (for models without a standard cache, and models
  with sliding-window attention layers, where it is selected automatically). ``prefix_sharing="packed"``
  runs every ``[q ; c]`` in full too, but packed: the rows of a micro-batch concatenated into one ``[1, N]``
  sequence with restarting ``position_ids`` and a per-row (block-diagonal) attention layout
  (reasonrl/trainer/packing.py: flash-attention's varlen kernel, or a block-diagonal mask for SDPA / eager),
  so no padding token is computed at all. With flash-attention the attention costs sum L_i^2; with a dense
  mask it costs N^2, so keep ``max_batch_tokens`` small there (micro-batches are counted in packed tokens,
  the prompt once per row).
* **Micro-batches** of whole prompts are formed in input order so that no batch exceeds ``max_batch_tokens``
  tokens (prefix pass plus continuation pass; a prompt larger than the budget runs alone).
* Under ``torch.no_grad()``, in eval mode (dropout off), inside ``torch.random.fork_rng``; every module's
  ``training`` flag is restored afterwards. Parameters are only read.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from reasonrl.models import _decoder, hidden_states_and_lm_head
from reasonrl.ops import linear_token_logprobs

__all__ = ["RowStats", "score_rows", "scoring_mode", "model_max_length", "uses_sliding_window"]

logger = logging.getLogger("reasonrl")
PREFIX_SHARING = ("kv_cache", "none", "packed")


@dataclass
class RowStats:
    """Per scored token of one row: ``logprobs [n]`` fp32, ``entropy [n]`` / ``rank [n]`` (int32) or None."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    rank: torch.Tensor | None = None


@contextlib.contextmanager
def scoring_mode(model: torch.nn.Module) -> Iterator[None]:
    """no_grad + eval mode + forked RNG for the duration; each module's ``training`` flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    devices = []
    try:
        p = next(model.parameters())
        if p.device.type == "cuda":
            devices = [p.device.index or 0]
    except StopIteration:
        pass
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _text_config(model):
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_max_length(model: torch.nn.Module) -> int | None:
    """``max_position_embeddings`` of the model's (text) config, or None."""
    value = getattr(_text_config(model), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def uses_sliding_window(model: torch.nn.Module) -> bool:
    """True when some attention layer is sliding-window (the KV-cache path's mask layout assumes full "
      "attention)."""
    cfg = _text_config(model)
    layer_types = getattr(cfg, "layer_types", None) or ()
    if any("sliding" in str(t) for t in layer_types):
        return True
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return True
    return False


def _micro_batches(prompts: Sequence[Sequence[int]], rows_of: list[list[int]], conts: Sequence[Sequence[int]],
                   budget: int, prompt_per_row: bool = False) -> Iterator[list[int]]:
    batch, used = [], 0
    for g, rows in enumerate(rows_of):
        if not rows:
            continue
        if prompt_per_row:  # packed: every row carries its own copy of the prompt
            cost = sum(len(prompts[g]) + len(conts[r]) for r in rows)
        else:
            cost = len(prompts[g]) + sum(len(conts[r]) + 1 for r in rows)
        if batch and used + cost > budget:
            yield batch
            batch, used = [], 0
        batch.append(g)
        used += cost
    if batch:
        yield batch


def score_rows(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    conts: Sequence[Sequence[int]],
    owner: Sequence[int],
    first_scored: Sequence[int],
    *,
    temperature: float = 1.0,
    want_entropy: bool = False,
    want_rank: bool = False,
    prefix_sharing: str = "kv_cache",
    max_batch_tokens: int = 16384,
) -> list[RowStats]:
    """Score ``conts[r][first_scored[r]:]`` after ``prompts[owner[r]]`` for every row r (see the module doc).

    Every prompt needs at least one token. Must be called under :func:`scoring_mode` (callers own the
    mode / RNG handling so several calls share one context). Returns one :class:`RowStats` per row, in order.
    """
    if prefix_sharing not in PREFIX_SHARING:
        raise ValueError(f"prefix_sharing must be one of {PREFIX_SHARING}, got {prefix_sharing!r}")
    if prefix_sharing == "kv_cache" and uses_sliding_window(model):
        prefix_sharing = "none"
    device = next(model.parameters()).device
    rows_of: list[list[int]] = [[] for _ in prompts]
    for r, g in enumerate(owner):
        rows_of[g].append(r)
    out: list[RowStats | None] = [None] * len(conts)
    for group in _micro_batches(prompts, rows_of, conts, max_batch_tokens, prefix_sharing == "packed"):
        rows = [r for g in group for r in rows_of[g]]
        if prefix_sharing == "kv_cache":
            hidden_sel, labels, counts, weight, bias = _kv_cache_pass(
                model, prompts, conts, owner, first_scored, group, rows, device)
        elif prefix_sharing == "packed":
            hidden_sel, labels, counts, weight, bias = _packed_pass(
                model, prompts, conts, owner, first_scored, rows, device)
        else:
            hidden_sel, labels, counts, weight, bias = _full_pass(model, prompts, conts, owner, first_scored,
                                                                  rows, device)
        stats = linear_token_logprobs(hidden_sel, weight, labels, bias=bias, temperature=temperature,
                                      want_entropy=want_entropy, want_rank=want_rank)
        for name in ("logprobs", "entropy", "rank"):
            val = getattr(stats, name)
            if val is None:
                continue
            for r, piece in zip(rows, torch.split(val, counts), strict=True):
                if out[r] is None:
                    out[r] = RowStats(torch.empty(0))
                setattr(out[r], name, piece)
    return [o if o is not None else RowStats(torch.empty(0)) for o in out]


def _gather(hidden: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Rows ``hidden[i, a:b]`` for each (a, b) of ``spans[i]``, concatenated: ``[sum (b - a), H]``."""
    idx_row = torch.cat([torch.full((b - a,), i, dtype=torch.long) for i, (a, b) in enumerate(spans)])
    idx_pos = torch.cat([torch.arange(a, b, dtype=torch.long) for a, b in spans])
    return hidden[idx_row.to(hidden.device), idx_pos.to(hidden.device)]


def _cache_kwarg(decoder: torch.nn.Module) -> str:
    """Name of the decoder's cache argument: ``cache`` (recent transformers, where ``past_key_values``
    is deprecated) or ``past_key_values`` (older versions)."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _kv_cache_pass(model, prompts, conts, owner, first_scored, group, rows, device):
    from transformers import DynamicCache  # transformers is only needed when a model is scored

    local = {g: i for i, g in enumerate(group)}
    prefix_len = [len(prompts[g]) - 1 for g in group]
    p_max = max(prefix_len)
    cache = None
    if p_max > 0:
        ids = torch.zeros((len(group), p_max), dtype=torch.long)
        for i, g in enumerate(group):
            ids[i, : prefix_len[i]] = torch.as_tensor(list(prompts[g][:-1]), dtype=torch.long)
        cache = DynamicCache()
        decoder = _decoder(model)
        # Right padding + causal mask: no attention mask needed (see the module docstring).
        decoder(input_ids=ids.to(device), use_cache=True, **{_cache_kwarg(decoder): cache})
        cache.batch_select_indices(torch.tensor([local[owner[r]] for r in rows], device=device))
    c_len = [len(conts[r]) + 1 for r in rows]
    c_max = max(c_len)
    ids = torch.zeros((len(rows), c_max), dtype=torch.long)
    mask = torch.zeros((len(rows), p_max + c_max), dtype=torch.long)
    pos = torch.zeros((len(rows), c_max), dtype=torch.long)
    spans, labels = [], []
    for i, r in enumerate(rows):
        q = prompts[owner[r]]
        ids[i, : c_len[i]] = torch.as_tensor([q[-1], *conts[r]], dtype=torch.long)
        mask[i, : len(q) - 1] = 1
        mask[i, p_max: p_max + c_len[i]] = 1
        pos[i] = torch.arange(len(q) - 1, len(q) - 1 + c_max)
        s = first_scored[r]
        spans.append((s, c_len[i] - 1))  # position t predicts continuation token t (input token t + 1)
        labels.extend(conts[r][s:])
    extra = {} if cache is None else {_cache_kwarg(_decoder(model)): cache, "use_cache": True}
    hidden, weight, bias = hidden_states_and_lm_head(model, ids.to(device), mask.to(device),
                                                     position_ids=pos.to(device), **extra)
    counts = [b - a for a, b in spans]
    return _gather(hidden, spans), torch.tensor(labels, dtype=torch.long, device=device), counts, weight, bias


def _full_pass(model, prompts, conts, owner, first_scored, rows, device):
    lens = [len(prompts[owner[r]]) + len(conts[r]) for r in rows]
    t_max = max(lens)
    ids = torch.zeros((len(rows), t_max), dtype=torch.long)
    mask = torch.zeros((len(rows), t_max), dtype=torch.long)
    spans, labels = [], []
    for i, r in enumerate(rows):
        q = prompts[owner[r]]
        ids[i, : lens[i]] = torch.as_tensor([*q, *conts[r]], dtype=torch.long)
        mask[i, : lens[i]] = 1
        s = first_scored[r]
        spans.append((len(q) - 1 + s, lens[i] - 1))
        labels.extend(conts[r][s:])
    hidden, weight, bias = hidden_states_and_lm_head(model, ids.to(device), mask.to(device))
    counts = [b - a for a, b in spans]
    return _gather(hidden, spans), torch.tensor(labels, dtype=torch.long, device=device), counts, weight, bias


def _packed_pass(model, prompts, conts, owner, first_scored, rows, device):
    """``_full_pass`` on one packed ``[1, N]`` sequence: no padding exists, only scored rows are gathered."""
    from reasonrl.trainer.packing import pack_sequences, packed_hidden_states

    seqs = [[*prompts[owner[r]], *conts[r]] for r in rows]
    batch = pack_sequences(seqs, device)
    hidden, weight, bias = packed_hidden_states(model, batch)  # [N, H]
    starts = batch.cu_seqlens.tolist()
    idx, labels, counts = [], [], []
    for i, r in enumerate(rows):
        q, s = prompts[owner[r]], first_scored[r]
        # Segment position t predicts token t + 1: the scored tokens conts[r][s:] sit at positions
        # len(q) + s ... len(seq) - 1, so the predicting rows are one earlier.
        a, b = starts[i] + len(q) - 1 + s, starts[i] + len(seqs[i]) - 1
        idx.append(torch.arange(a, b, dtype=torch.long))
        labels.extend(conts[r][s:])
        counts.append(b - a)
    sel = hidden[torch.cat(idx).to(hidden.device)] if idx else hidden[:0]
    return sel, torch.tensor(labels, dtype=torch.long, device=device), counts, weight, bias
