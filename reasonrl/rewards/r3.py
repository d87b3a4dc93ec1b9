"""DRO's reasoning-reflection reward R3 (docs/rewards.md section 2).

Xu et al., "Direct Reasoning Optimization: LLMs Can Reward and Refine Their Own Reasoning for Open-Ended
Tasks", arXiv 2506.13351 v1 (June 2025). (Not verl's ``dro`` policy-loss mode, which is "Direct *Reward*
Optimization", an unrelated method.)

For a prompt q with reference outcome y and K sampled rollouts o_k = (c_k, y_hat_k) (the trace ends at the
first ``</think>``, inclusive; the rest is the sampled outcome), the reward model pi_rwd teacher-forces y
after each trace, ``l[k, j] = log pi_rwd(y_j | q, c_k, sep, y_<j)``; the reference tokens whose
log-probability varies across the K traces (sigma_j = std_k l[k, j]) are the reasoning-reflective ones and get
the weight: R3_k = sum_j w(sigma_j) l[k, j] (:func:`reasonrl.rewards.r3_reward`). The final reward adds a
length penalty on the sampled outcome, which R3 does not see: ``reward = w_r3 R3 + w_len (1 - beta | |y| -
|y_hat| | / |y|)``.

:class:`R3Reward` does the scoring efficiently (docs/rewards.md 2.3; reasonrl/rewards/_scoring.py): only the
reference positions reach the lm_head (:func:`reasonrl.linear_token_logprobs` on the gathered hidden rows, no
``[rows, V]`` logits), the prompt is encoded once per prompt and its KV cache shared by its K scoring
sequences, prompts are batched into micro-batches of at most ``max_batch_tokens`` tokens, everything under
``torch.no_grad`` with the model's mode, parameters and RNG state left as they were.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reasonrl.reference.r3_reward import REDUCTIONS, WEIGHTINGS
from reasonrl.rewards._scoring import PREFIX_SHARING, model_max_length, score_rows, scoring_mode
from reasonrl.rewards._validate import check_bool, check_choice, check_int, check_real, check_str
from reasonrl.rewards.functional import r3_reward
from reasonrl.rewards.types import RewardOutput, check_batch, completion_text

__all__ = ["R3Config", "R3Reward", "REWARD_POLICIES", "TRUNCATIONS"]

logger = logging.getLogger("reasonrl")
REWARD_POLICIES = ("current", "reference", "lagged")
TRUNCATIONS = ("invalid", "cot_left")


def _check_ids(cls: str, name: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in value):
        raise ValueError(f"{cls}.{name} must be None or a tuple of token ids >= 0, got {value!r}")


@dataclass(frozen=True)
class R3Config:
    """Settings of :class:`R3Reward` (docs/rewards.md 2.2 and 2.4). Every default marked *assumption* there
    is a library choice where the paper is silent.

    R3 op: weighting (``linear`` | ``softmax`` | ``topk`` | ``uniform``), softmax_tau, topk (fraction of the
    reference tokens or an int), reduction (``weighted_mean`` | ``sum``), baseline (None | ``"masked_cot"``),
    propagation (enable the controlled-certainty-propagation form) and propagation_gamma (its decay; 0.1 when
    ``propagation`` is on and no value is given; setting a value enables it), min_valid_rollouts (sigma = 0
    below it).
    Reward: len_penalty_beta (beta), len_penalty_min (lower clip of r_len or None), weight_r3, weight_len.
    Reward policy: reward_policy (``current``: the model passed in, i.e. the rollout policy; ``reference``: a
    frozen copy taken at construction; ``lagged``: a copy refreshed every lag_steps calls of
    :meth:`R3Reward.step`).
    Scoring sequence [q ; c_k ; answer_prefix ; y (; EOS)]: think_end (the trace ends at its first occurrence,
    inclusive) or think_end_ids; answer_prefix (not scored) or answer_prefix_ids; append_eos (EOS appended to
    y and scored) with eos_token_id (default: the tokenizer's); score_temperature.
    Masked-CoT baseline: masked_cot (the trace replaced by an empty reasoning block; default
    ``think_start + think_end``) or masked_cot_ids.
    Context: max_length (default: the model's max_position_embeddings) and truncation (``invalid``: a scoring
    sequence longer than max_length makes the rollout invalid, status ``too_long``; ``cot_left``: the trace's
    first tokens are dropped until it fits, keeping its end and the marker).
    Efficiency: prefix_sharing (``kv_cache`` | ``none`` | ``packed``), max_batch_tokens.
    """

    weighting: str = "linear"
    softmax_tau: float = 1.0
    topk: float | int = 0.1
    reduction: str = "weighted_mean"
    baseline: str | None = None
    propagation: bool = False
    propagation_gamma: float | None = None
    min_valid_rollouts: int = 2
    len_penalty_beta: float = 0.5
    len_penalty_min: float | None = None
    weight_r3: float = 1.0
    weight_len: float = 1.0
    reward_policy: str = "current"
    lag_steps: int = 10
    think_start: str = "<think>"
    think_end: str = "</think>"
    think_end_ids: tuple[int, ...] | None = None
    answer_prefix: str = "\n\n"
    answer_prefix_ids: tuple[int, ...] | None = None
    append_eos: bool = False
    eos_token_id: int | None = None
    score_temperature: float = 1.0
    masked_cot: str | None = None
    masked_cot_ids: tuple[int, ...] | None = None
    max_length: int | None = None
    truncation: str = "invalid"
    prefix_sharing: str = "kv_cache"
    max_batch_tokens: int = 16384

    def __post_init__(self):
        n = type(self).__name__
        check_choice(n, "weighting", self.weighting, WEIGHTINGS)
        check_real(n, "softmax_tau", self.softmax_tau, lo=0, lo_open=True)
        if isinstance(self.topk, bool) or not isinstance(self.topk, (int, float)) or (
                isinstance(self.topk, int) and self.topk < 1) or (
                isinstance(self.topk, float) and not 0 < self.topk <= 1):
            raise ValueError(f"{n}.topk must be a float in (0, 1] or an int >= 1, got {self.topk!r}")
        check_choice(n, "reduction", self.reduction, REDUCTIONS)
        check_choice(n, "baseline", self.baseline, (None, "masked_cot"))
        check_bool(n, "propagation", self.propagation)
        check_real(n, "propagation_gamma", self.propagation_gamma, lo=0, allow_none=True)
        check_int(n, "min_valid_rollouts", self.min_valid_rollouts, lo=1)
        check_real(n, "len_penalty_beta", self.len_penalty_beta, lo=0)
        check_real(n, "len_penalty_min", self.len_penalty_min, allow_none=True)
        check_real(n, "weight_r3", self.weight_r3)
        check_real(n, "weight_len", self.weight_len)
        check_choice(n, "reward_policy", self.reward_policy, REWARD_POLICIES)
        check_int(n, "lag_steps", self.lag_steps, lo=1)
        check_str(n, "think_start", self.think_start)
        check_str(n, "think_end", self.think_end, allow_empty=False)
        _check_ids(n, "think_end_ids", self.think_end_ids)
        if self.think_end_ids == ():
            raise ValueError(f"{n}.think_end_ids must not be empty")
        check_str(n, "answer_prefix", self.answer_prefix)
        _check_ids(n, "answer_prefix_ids", self.answer_prefix_ids)
        check_bool(n, "append_eos", self.append_eos)
        check_int(n, "eos_token_id", self.eos_token_id, lo=0, allow_none=True)
        check_real(n, "score_temperature", self.score_temperature, lo=0, lo_open=True)
        check_str(n, "masked_cot", self.masked_cot, allow_none=True)
        _check_ids(n, "masked_cot_ids", self.masked_cot_ids)
        check_int(n, "max_length", self.max_length, lo=2, allow_none=True)
        check_choice(n, "truncation", self.truncation, TRUNCATIONS)
        check_choice(n, "prefix_sharing", self.prefix_sharing, PREFIX_SHARING)
        check_int(n, "max_batch_tokens", self.max_batch_tokens, lo=1)

    @property
    def gamma(self) -> float | None:
        """The propagation decay in effect (None: the plain weighted form)."""
        if self.propagation_gamma is not None:
            return float(self.propagation_gamma)
        return 0.1 if self.propagation else None


def _find(seq: Sequence[int], marker: Sequence[int]) -> int:
    """Index of the first occurrence of ``marker`` in ``seq``, or -1 (linear for the usual 1-token marker)."""
    m = len(marker)
    first = marker[0]
    for i in range(len(seq) - m + 1):
        if seq[i] == first and list(seq[i:i + m]) == list(marker):
            return i
    return -1


def _as_ids(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    return [int(v) for v in x]


class R3Reward:
    """DRO's R3 reward computed with a causal LM (docs/rewards.md section 2).

    Args:
        model: the policy (a Hugging Face causal LM with a linear lm_head: Llama, Qwen2 and alike).
        tokenizer: needed for text inputs and to encode ``think_end`` / ``answer_prefix`` / ``masked_cot``
            (or give their ``*_ids`` in the config).
        config: :class:`R3Config`; keyword arguments override its fields.
        reference_model: with ``reward_policy="reference"``, the frozen model to score with (default: a deep
            copy of ``model`` taken now, which costs one model of memory).

    Call: ``reward(prompts, completions, references, *, prompt_ids=None, completion_ids=None,
    reference_ids=None, group_size=None, group_ids=None)`` with one entry per completion (B = sum of group
    sizes). Ids take precedence over text. Groups: contiguous blocks of ``group_size`` (TRL layout), or
    ``group_ids``; by default the rows with equal (prompt, reference) form a group. All rows of a group must
    share prompt and reference.

    Returns :class:`RewardOutput`: ``rewards [B]`` (NaN for invalid rollouts) and diagnostics per row:
    ``r3``, ``r_len`` (``[B]`` tensors), ``status`` (``ok``, ``no_marker``, ``too_long``,
    ``empty_reference``), ``cot_tokens``, ``answer_tokens`` (|y_hat|), ``ref_tokens``, ``truncated``,
    ``logprobs`` (per row the ``[L_g]`` log-probs of the reference, None when not scored), ``group``; and per
    group (lists of length G): ``sigma``, ``weights``, ``baseline_logprobs`` (``[L_g]`` tensors or None),
    ``num_valid_rollouts``.
    """

    name = "r3"

    def __init__(self, model: torch.nn.Module, tokenizer=None, config: R3Config | None = None, *,
                 reference_model: torch.nn.Module | None = None, **overrides):
        base = config or R3Config()
        self.config = R3Config(**{**base.__dict__, **overrides}) if overrides else base
        self.model = model
        self.tokenizer = tokenizer
        self._steps = 0
        self._copy: torch.nn.Module | None = None
        policy = self.config.reward_policy
        if policy == "reference":
            self._copy = reference_model if reference_model is not None else self._frozen_copy(model)
        elif reference_model is not None:
            raise ValueError("R3Reward: reference_model is only used with reward_policy='reference'")
        elif policy == "lagged":
            self._copy = self._frozen_copy(model)

    @staticmethod
    def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            dup = copy.deepcopy(model)
        dup.requires_grad_(False)
        return dup.eval()

    @property
    def scoring_model(self) -> torch.nn.Module:
        """The model that scores: the policy (``current``), the frozen copy or the lagged copy."""
        return self.model if self._copy is None else self._copy

    def step(self) -> None:
        """Call once per optimiser step: with ``reward_policy="lagged"`` the copy is refreshed every
        ``lag_steps`` calls (no-op for the other policies)."""
        self._steps += 1
        if self.config.reward_policy == "lagged" and self._steps % self.config.lag_steps == 0:
            self.sync()

    def state_dict(self) -> dict:
        """What a training checkpoint keeps: the step counter and, with ``reward_policy="lagged"``, the
        lagged copy's parameters and buffers (references, as ``nn.Module.state_dict``). The ``reference``
        copy is not included: it is the frozen initial policy, rebuilt identically by the trainer."""
        out: dict = {"steps": self._steps}
        if self.config.reward_policy == "lagged":
            out["lagged"] = self._copy.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict` (the lagged copy is overwritten in place)."""
        if self.config.reward_policy == "lagged":
            if "lagged" not in state:
                raise ValueError("R3Reward.load_state_dict: reward_policy='lagged' needs the 'lagged' entry "
                                 "(the state was saved with another reward_policy)")
            self._copy.load_state_dict(state["lagged"])
        self._steps = int(state["steps"])

    def sync(self) -> None:
        """Copy the policy's current parameters and buffers into the lagged copy now."""
        if self.config.reward_policy != "lagged":
            return
        with torch.no_grad():
            dst_state, src_state = self._copy.state_dict(), self.model.state_dict()
            for dst, src in zip(dst_state.values(), src_state.values(), strict=True):
                dst.copy_(src)

    # -- token ids -------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("R3Reward: text inputs need a tokenizer (or pass prompt_ids / completion_ids / "
                             "reference_ids and the *_ids fields of R3Config)")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _config_ids(self, ids: tuple[int, ...] | None, text: str) -> list[int]:
        if ids is not None:
            return list(ids)
        return self._encode(text) if text else []

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return self._encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):  # conversational
            if self.tokenizer is None:
                raise ValueError("R3Reward: conversational prompts need a tokenizer (chat template)")
            text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False,
                                                      add_generation_prompt=True)
            return self._encode(text)
        raise ValueError(f"R3Reward: a prompt must be text, a list of chat messages or ids; got "
                         f"{type(prompt).__name__}")

    def _trailing_ids(self) -> set[int]:
        out = set()
        if self.config.eos_token_id is not None:
            out.add(self.config.eos_token_id)
        for name in ("eos_token_id", "pad_token_id"):
            v = getattr(self.tokenizer, name, None) if self.tokenizer is not None else None
            if isinstance(v, int):
                out.add(v)
        return out

    def _eos_id(self) -> int:
        if self.config.eos_token_id is not None:
            return self.config.eos_token_id
        v = getattr(self.tokenizer, "eos_token_id", None)
        if not isinstance(v, int):
            raise ValueError("R3Reward: append_eos=True needs R3Config.eos_token_id or a tokenizer with one")
        return v

    # -- the call --------------------------------------------------------------------------------------------

    def __call__(self, prompts: Sequence | None = None, completions: Sequence | None = None,
                 references: Sequence | None = None, *, prompt_ids: Sequence | None = None,
                 completion_ids: Sequence | None = None, reference_ids: Sequence | None = None,
                 group_size: int | None = None, group_ids: Sequence | None = None, **kwargs) -> RewardOutput:
        prep = self.prepare(prompts, completions, references, prompt_ids=prompt_ids,
                            completion_ids=completion_ids, reference_ids=reference_ids, group_size=group_size,
                            group_ids=group_ids)
        stats = self.score(prep)
        keys = ("n", "groups", "y_ids", "scored_ref", "answer_len", "status", "truncated", "traces", "row_of",
                "base_row")
        return self._assemble(*(prep[k] for k in keys), stats)

    def score(self, prep: dict, *, want_rank: bool = False) -> list:
        """Run the scoring model over the rows of :meth:`prepare` (per-row ``RowStats`` of the reference)."""
        cfg = self.config
        if not prep["rows_cont"]:
            return []
        model = self.scoring_model
        with scoring_mode(model):
            return score_rows(model, prep["g_prompt"], prep["rows_cont"], prep["rows_owner"],
                              prep["rows_first"], temperature=cfg.score_temperature, want_rank=want_rank,
                              prefix_sharing=cfg.prefix_sharing, max_batch_tokens=cfg.max_batch_tokens)

    def prepare(self, prompts: Sequence | None = None, completions: Sequence | None = None,
                references: Sequence | None = None, *, prompt_ids: Sequence | None = None,
                completion_ids: Sequence | None = None, reference_ids: Sequence | None = None,
                group_size: int | None = None, group_ids: Sequence | None = None) -> dict:
        """Token ids, groups, validity and the scoring rows of a call (for ``__call__`` and the filter)."""
        cfg = self.config
        n = _batch_size(prompts, completions, references, prompt_ids, completion_ids, reference_ids)
        marker = self._config_ids(cfg.think_end_ids, cfg.think_end)
        if not marker:
            raise ValueError(f"R3Reward: think_end {cfg.think_end!r} encodes to no token")
        sep = self._config_ids(cfg.answer_prefix_ids, cfg.answer_prefix)
        trailing = self._trailing_ids()

        # Token ids per row.
        if prompt_ids is not None:
            check_batch("prompt_ids", prompt_ids, n)
            q_ids = [_as_ids(p) for p in prompt_ids]
        else:
            check_batch("prompts", prompts, n)
            q_ids = [self._prompt_ids(p) for p in prompts]
        if reference_ids is not None:
            check_batch("reference_ids", reference_ids, n)
            y_ids = [_as_ids(y) for y in reference_ids]
        else:
            check_batch("references", references, n)
            y_ids = [self._encode(completion_text(y) or "") for y in references]
        if any(len(q) == 0 for q in q_ids):
            raise ValueError("R3Reward: every prompt needs at least one token")
        traces: list[list[int] | None] = []
        answer_len: list[int] = []
        if completion_ids is not None:
            check_batch("completion_ids", completion_ids, n)
            for c in completion_ids:
                c = _as_ids(c)
                b = _find(c, marker)
                if b < 0:
                    traces.append(None)
                    answer_len.append(0)
                    continue
                ans = c[b + len(marker):]
                if sep and ans[: len(sep)] == sep:
                    # The separator is not part of the outcome: the scoring sequence is [q ; c ; sep ; y] and
                    # r_len compares |y| with |y_hat| (docs/rewards.md 2.1, 2.2), so a completion that writes
                    # exactly "</think>" + sep + y gets r_len = 1.
                    ans = ans[len(sep):]
                while ans and ans[-1] in trailing:
                    ans = ans[:-1]
                traces.append(c[: b + len(marker)])
                answer_len.append(len(ans))
        else:
            check_batch("completions", completions, n)
            for c in completions:
                text = completion_text(c)
                cut = -1 if text is None else text.find(cfg.think_end)
                if cut < 0:
                    traces.append(None)
                    answer_len.append(0)
                    continue
                traces.append(self._encode(text[:cut]) + marker)
                ans_text = text[cut + len(cfg.think_end):]
                if cfg.answer_prefix and ans_text.startswith(cfg.answer_prefix):
                    ans_text = ans_text[len(cfg.answer_prefix):]  # the separator is not outcome (as above)
                answer_len.append(len(self._encode(ans_text.rstrip())))

        groups = _groups(n, group_size, group_ids, q_ids, y_ids)
        eos = [self._eos_id()] if cfg.append_eos else []
        scored_ref = [y + eos for y in y_ids]
        model = self.scoring_model
        max_len = cfg.max_length if cfg.max_length is not None else model_max_length(model)

        status = ["ok"] * n
        truncated = [False] * n
        rows_cont, rows_owner, rows_first, row_of = [], [], [], {}
        g_prompt = []
        for gi, rows in enumerate(groups):
            q, y = q_ids[rows[0]], scored_ref[rows[0]]
            for r in rows:
                if q_ids[r] != q or scored_ref[r] != y:
                    raise ValueError(f"R3Reward: rows {rows[0]} and {r} are in one group but have different "
                                     "prompts or references")
            g_prompt.append(q)
            if not y_ids[rows[0]]:
                for r in rows:
                    status[r] = "empty_reference"
                continue
            for r in rows:
                c = traces[r]
                if c is None:
                    status[r] = "no_marker"
                    continue
                excess = 0 if max_len is None else len(q) + len(c) + len(sep) + len(y) - max_len
                if excess > 0:
                    if cfg.truncation == "cot_left" and excess <= len(c) - len(marker):
                        c = c[excess:]
                        truncated[r] = True
                    else:
                        status[r] = "too_long"
                        continue
                row_of[r] = len(rows_cont)
                rows_cont.append(c + sep + y)
                rows_owner.append(gi)
                rows_first.append(len(c) + len(sep))
        base_row = {}
        if cfg.baseline == "masked_cot":
            masked = self._config_ids(cfg.masked_cot_ids, cfg.masked_cot if cfg.masked_cot is not None
                                      else cfg.think_start + cfg.think_end)
            for gi, rows in enumerate(groups):
                y = scored_ref[rows[0]]
                if not y_ids[rows[0]] or not any(r in row_of for r in rows):
                    continue
                base_row[gi] = len(rows_cont)
                rows_cont.append(masked + sep + y)
                rows_owner.append(gi)
                rows_first.append(len(masked) + len(sep))

        return dict(n=n, groups=groups, y_ids=y_ids, scored_ref=scored_ref, answer_len=answer_len,
                    status=status, truncated=truncated, traces=traces, row_of=row_of, base_row=base_row,
                    g_prompt=g_prompt, rows_cont=rows_cont, rows_owner=rows_owner, rows_first=rows_first)

    def _assemble(self, n, groups, y_ids, scored_ref, answer_len, status, truncated, traces, row_of, base_row,
                  stats) -> RewardOutput:
        cfg = self.config
        scored_groups = [gi for gi, rows in enumerate(groups) if y_ids[rows[0]]]
        r3 = torch.full((n,), math.nan, dtype=torch.float32)
        per_row_lp: list[torch.Tensor | None] = [None] * n
        sigma_g: list[torch.Tensor | None] = [None] * len(groups)
        weights_g: list[torch.Tensor | None] = [None] * len(groups)
        base_g: list[torch.Tensor | None] = [None] * len(groups)
        nvalid_g = [0] * len(groups)
        if scored_groups:
            k_max = max(len(groups[gi]) for gi in scored_groups)
            l_max = max(len(scored_ref[groups[gi][0]]) for gi in scored_groups)
            g = len(scored_groups)
            lp = torch.zeros((g, k_max, l_max), dtype=torch.float32)
            ref_mask = torch.zeros((g, l_max), dtype=torch.bool)
            roll = torch.zeros((g, k_max), dtype=torch.bool)
            baseline = torch.zeros((g, l_max), dtype=torch.float32) if cfg.baseline else None
            for i, gi in enumerate(scored_groups):
                length = len(scored_ref[groups[gi][0]])
                ref_mask[i, :length] = True
                for k, r in enumerate(groups[gi]):
                    if r in row_of:
                        v = stats[row_of[r]].logprobs.float().cpu()
                        lp[i, k, :length] = v
                        roll[i, k] = True
                        per_row_lp[r] = v
                if baseline is not None and gi in base_row:
                    b = stats[base_row[gi]].logprobs.float().cpu()
                    baseline[i, :length] = b
                    base_g[gi] = b
            out = r3_reward(lp, ref_mask=ref_mask, rollout_mask=roll, weighting=cfg.weighting,
                            softmax_tau=cfg.softmax_tau, topk=cfg.topk, reduction=cfg.reduction,
                            baseline_logprobs=baseline, propagation_gamma=cfg.gamma,
                            min_valid_rollouts=cfg.min_valid_rollouts)
            for i, gi in enumerate(scored_groups):
                length = len(scored_ref[groups[gi][0]])
                sigma_g[gi] = out.sigma[i, :length].clone()
                weights_g[gi] = out.weights[i, :length].clone()
                nvalid_g[gi] = int(out.num_valid_rollouts[i])
                for k, r in enumerate(groups[gi]):
                    r3[r] = out.reward[i, k]
        ref_len = torch.tensor([len(y) for y in y_ids], dtype=torch.float32)
        ans = torch.tensor(answer_len, dtype=torch.float32)
        r_len = 1.0 - cfg.len_penalty_beta * (ref_len - ans).abs() / ref_len.clamp(min=1)
        if cfg.len_penalty_min is not None:
            r_len = r_len.clamp(min=cfg.len_penalty_min)
        valid = torch.tensor([s == "ok" for s in status], dtype=torch.bool)
        r_len = torch.where(valid, r_len, torch.full_like(r_len, math.nan))
        reward = cfg.weight_r3 * r3 + cfg.weight_len * r_len
        group_of = [0] * n
        for gi, rows in enumerate(groups):
            for r in rows:
                group_of[r] = gi
        return RewardOutput(reward, {
            "r3": r3, "r_len": r_len, "status": status,
            "cot_tokens": [None if t is None else len(t) for t in traces],
            "answer_tokens": answer_len, "ref_tokens": [len(y) for y in y_ids], "truncated": truncated,
            "logprobs": per_row_lp, "group": group_of,
            "sigma": sigma_g, "weights": weights_g, "baseline_logprobs": base_g,
            "num_valid_rollouts": nvalid_g,
        })


def _batch_size(*seqs) -> int:
    for s in seqs:
        if s is not None:
            return len(s)
    raise ValueError("R3Reward: no inputs (give prompts / completions / references or their *_ids)")


def _groups(n: int, group_size, group_ids, q_ids, y_ids) -> list[list[int]]:
    """Row indices of each group, in order of first appearance."""
    if group_size is not None and group_ids is not None:
        raise ValueError("R3Reward: pass group_size or group_ids, not both")
    if group_size is not None:
        gs = group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1 or n % gs:
            raise ValueError(f"R3Reward: group_size must be an int >= 1 dividing the batch size {n}, got "
                             f"{gs!r}")
        return [list(range(s, s + gs)) for s in range(0, n, gs)]
    if group_ids is not None:
        check_batch("group_ids", group_ids, n)
        keys = [g.item() if isinstance(g, torch.Tensor) else g for g in group_ids]
    else:
        keys = [(tuple(q), tuple(y)) for q, y in zip(q_ids, y_ids, strict=True)]
    order: dict[Any, list[int]] = {}
    for r, key in enumerate(keys):
        order.setdefault(key, []).append(r)
    return list(order.values())
