"""LASER, LASER-D and LASER-DE: length-based reward shaping with adaptive targets (docs/rewards.md section 4).

Liu et al., "Learn to Reason Efficiently with Adaptive Length-based Reward Shaping", arXiv 2505.15612 v1
(ICLR 2026), and the authors' repository hkust-nlp/Laser (commit c9e7c4e), where the methods are called
``larse``, ``larse-d`` and ``larse-de``. Paper-vs-code differences are options.

Base correctness reward R (4.1): +1 correct, -0.5 well-formed but wrong, -1 invalid format (no ``\\boxed{}``
after ``</think>``, or a missing ``<think>`` / ``</think>`` marker; a chat template that opens ``<think>`` in
the prompt counts as the opening marker). Correctness is judged on the last ``\\boxed{}`` after ``</think>``:
with HF ``math_verify`` when installed (``verifier="auto"``), else the numeric comparison of docs/rewards.md 5
at relative tolerance 1e-6. L = number of generated response tokens.

Shaped reward r (4.2, alpha = 0.5), with the target L_T (LASER) or L_A(d) of the prompt's difficulty bucket d:

    laser / laser_d      1 + alpha if R = 1 and L <= target, else R
    laser_de "paper"     R + alpha 1[R = 1] 1[L <= target] + alpha 1[R != 1] 1[L > target]
    laser_de "code"      1 + alpha if R = 1 and L <= target; R + alpha if R = -0.5 and L > target and the
                         response is not repetitive; else R

Buckets (4.3) come from the prompt's own K rollouts (acc >= 2/3 easy, >= 1/3 medium, else hard). The adaptive
targets L_A(d) (4.4) come from :class:`LaserLengthMonitor`; when it has no target for a bucket (not evaluated
yet, no candidate qualified, or an empty bucket) the target is the longest response of the current batch.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reasonrl.rewards._validate import check_bool, check_choice, check_int, check_real, check_str
from reasonrl.rewards.numeric import extract_number, find_last_boxed, numbers_match, parse_number
from reasonrl.rewards.types import RewardOutput, check_batch, completion_text

__all__ = ["LaserConfig", "LaserReward", "LaserLengthMonitor", "difficulty_buckets", "is_repetitive",
           "laser_base_reward", "BUCKETS"]

BUCKETS = ("easy", "medium", "hard")
METHODS = ("laser", "laser_d", "laser_de")


@dataclass(frozen=True)
class LaserConfig:
    """Settings of :class:`LaserReward` and :class:`LaserLengthMonitor` (docs/rewards.md section 4).

    method: ``"laser" | "laser_d" | "laser_de"``. target_length: L_T (released scripts: 2048, 4096, 8192;
    **library default (assumption)**: 4096, the setting of the paper's LASER-D / LASER-DE headline rows).
    alpha: the bonus (0.5 in every experiment). de_variant: ``"paper"`` (default) or ``"code"`` (4.2).
    coverage_rule: ``"paper"`` (default; |C_d| = ceil(2K/3), ceil(K/3), 1) or ``"code"`` (floor(2K/3),
    floor(K/3), 1). max_length: L_max, the largest candidate target (16384). correct_reward / wrong_reward /
    invalid_reward: R's three values. think_start / think_end: the reasoning markers. think_start_in_prompt:
    count ``think_start`` as present when the prompt contains it (**library default (assumption)**: True).
    verifier: ``"auto"`` (math_verify when importable, else numeric), ``"math_verify"``, ``"numeric"``.
    rel_tol: tolerance of the numeric fallback (**library default (assumption)**: 1e-6). monitor_interval:
    steps between monitor evaluations (20); monitor_size: monitor prompts (500). length_step: spacing of the
    candidate targets above L_T (the paper's 1024; a task whose responses are tens of tokens needs a finer
    grid, e.g. 8, for L_A(d) to take more than one value below L_max).
    """

    method: str = "laser_d"
    target_length: int = 4096
    alpha: float = 0.5
    de_variant: str = "paper"
    coverage_rule: str = "paper"
    max_length: int = 16384
    correct_reward: float = 1.0
    wrong_reward: float = -0.5
    invalid_reward: float = -1.0
    think_start: str = "<think>"
    think_end: str = "</think>"
    think_start_in_prompt: bool = True
    verifier: str = "auto"
    rel_tol: float = 1e-6
    monitor_interval: int = 20
    monitor_size: int = 500
    length_step: int = 1024

    def __post_init__(self):
        n = type(self).__name__
        check_choice(n, "method", self.method, METHODS)
        check_int(n, "target_length", self.target_length, lo=1)
        check_real(n, "alpha", self.alpha, lo=0)
        check_choice(n, "de_variant", self.de_variant, ("paper", "code"))
        check_choice(n, "coverage_rule", self.coverage_rule, ("paper", "code"))
        check_int(n, "max_length", self.max_length, lo=1)
        if self.max_length < self.target_length:
            raise ValueError(f"{n}.max_length ({self.max_length}) must be >= target_length "
                             f"({self.target_length})")
        check_real(n, "correct_reward", self.correct_reward)
        check_real(n, "wrong_reward", self.wrong_reward)
        check_real(n, "invalid_reward", self.invalid_reward)
        check_str(n, "think_start", self.think_start, allow_empty=False)
        check_str(n, "think_end", self.think_end, allow_empty=False)
        check_bool(n, "think_start_in_prompt", self.think_start_in_prompt)
        check_choice(n, "verifier", self.verifier, ("auto", "math_verify", "numeric"))
        check_real(n, "rel_tol", self.rel_tol, lo=0)
        check_int(n, "monitor_interval", self.monitor_interval, lo=1)
        check_int(n, "monitor_size", self.monitor_size, lo=1)
        check_int(n, "length_step", self.length_step, lo=1)
        if self.verifier == "math_verify":
            try:
                import math_verify  # noqa: F401
            except ImportError:
                raise ValueError(f"{n}.verifier='math_verify' needs the math-verify package "
                                 "(pip install math-verify); use 'auto' or 'numeric'") from None


def _math_verify():
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def laser_base_reward(text: Any, gold: Any, cfg: LaserConfig, prompt: Any = None) -> tuple[float, str]:
    """(R, status) of docs/rewards.md 4.1; status is ``correct``, ``wrong`` or ``invalid``."""
    text = completion_text(text)
    if text is None:
        return cfg.invalid_reward, "invalid"
    end = text.find(cfg.think_end)
    prompt_text = completion_text(prompt) if prompt is not None else None
    opened = cfg.think_start in text[: end if end != -1 else len(text)] or (
        cfg.think_start_in_prompt and prompt_text is not None and cfg.think_start in prompt_text)
    if end == -1 or not opened:
        return cfg.invalid_reward, "invalid"
    answer = text[text.rfind(cfg.think_end) + len(cfg.think_end):]
    boxed = find_last_boxed(answer)
    if boxed is None:
        return cfg.invalid_reward, "invalid"
    mv = _math_verify() if cfg.verifier != "numeric" else None
    if mv is not None:
        try:
            ok = bool(mv.verify(mv.parse(f"\\boxed{{{gold}}}" if isinstance(gold, str) else str(gold)),
                                mv.parse(f"\\boxed{{{boxed}}}")))
        except Exception:  # math_verify raises on malformed LaTeX: a wrong answer, never an exception
            ok = False
    else:
        pred = parse_number(boxed, first=True)
        g = extract_number(gold, think_end=None)
        ok = pred is not None and g is not None and numbers_match(pred, g, rel_tol=cfg.rel_tol, abs_tol=1e-9,
                                                                  percent_insensitive=False)
    return (cfg.correct_reward, "correct") if ok else (cfg.wrong_reward, "wrong")


def difficulty_buckets(correct: Sequence[bool], group_ids: Sequence[Any]
                       ) -> tuple[list[str], dict[Any, float]]:
    """Bucket of each row's prompt from the accuracy of its group (docs/rewards.md 4.3), and the accuracies.

    acc >= 2/3: easy; 1/3 <= acc < 2/3: medium; acc < 1/3: hard. Compared in integers (3 c >= 2 K), so
    6 of 8 is easy and 3 of 8 medium exactly as the paper's table says.
    """
    total: Counter = Counter(group_ids)
    good: Counter = Counter(g for g, c in zip(group_ids, correct, strict=True) if c)
    acc = {g: good[g] / total[g] for g in total}
    buckets = []
    for g in group_ids:
        c, k = good[g], total[g]
        buckets.append("easy" if 3 * c >= 2 * k else "medium" if 3 * c >= k else "hard")
    return buckets, acc


def is_repetitive(tokens: Sequence[Any]) -> bool:
    """The repetition filter of the authors' LASER-DE code, as docs/rewards.md 4.2 describes it.

    n = 4 for responses of at least 100 tokens (else 2); flagged when some n-gram occurs at least 3 times
    (2 for short responses) with every gap between consecutive occurrences below a third of the length, or
    when some 2n-gram occurs twice without overlapping. n-grams are collected scanning from the end; O(L n).
    """
    tokens = list(tokens)
    length = len(tokens)
    n = 4 if length >= 100 else 2
    need = 3 if length >= 100 else 2
    if length < 2 * n:
        return False
    where: dict[tuple, list[int]] = defaultdict(list)
    for i in range(length - n, -1, -1):  # from the end
        where[tuple(tokens[i:i + n])].append(i)
    limit = length / 3
    for pos in where.values():
        if len(pos) >= need:
            gaps = [a - b for a, b in zip(pos, pos[1:], strict=False)]  # positions are descending
            if all(gap < limit for gap in gaps):
                return True
    seen: dict[tuple, int] = {}
    for i in range(length - 2 * n, -1, -1):
        key = tuple(tokens[i:i + 2 * n])
        if key in seen and seen[key] - i >= 2 * n:
            return True
        seen.setdefault(key, i)
    return False


class LaserLengthMonitor:
    """Adaptive target lengths L_A(d) from a monitor set's rollouts (docs/rewards.md 4.4).

    The trainer evaluates the monitor prompts (``monitor_size`` prompts sampled from the training data, K
    rollouts each with the training sampling settings) at step 0 and every ``monitor_interval`` steps
    (:meth:`due`), and passes the rollouts' lengths, correctness and prompt ids to :meth:`update`.

    Candidates: L_T and every multiple of ``length_step`` (1024) in (L_T, L_max]. For bucket d: P_{l,d} =
    fraction of all monitor responses (correct or not) of bucket-d prompts with length <= l; L_A(d) = the
    smallest candidate with P_{l,d} |C_d| >= 1 (``paper``: |C_d| = ceil(2K/3), ceil(K/3), 1; ``code``:
    floor(2K/3), floor(K/3), 1, the released scripts' floor rounding), tested in exact integer arithmetic. No
    qualifying candidate or an empty bucket leaves L_A(d) = None (the reward then uses the longest response of
    its batch).
    """

    def __init__(self, config: LaserConfig | None = None):
        self.config = config or LaserConfig()
        self.targets: dict[str, int | None] = {b: None for b in BUCKETS}
        self.coverage: dict[str, dict[int, float]] = {}
        self.last_step: int | None = None

    def state_dict(self) -> dict:
        """The adaptive targets, the coverage table and the step of the last evaluation (for checkpoints)."""
        return {"targets": dict(self.targets), "coverage": {d: dict(c) for d, c in self.coverage.items()},
                "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.targets = {b: (None if state["targets"].get(b) is None else int(state["targets"][b]))
                        for b in BUCKETS}
        self.coverage = {d: {int(k): float(v) for k, v in c.items()} for d, c in state["coverage"].items()}
        self.last_step = None if state["last_step"] is None else int(state["last_step"])

    def candidates(self) -> list[int]:
        c = self.config
        out = [c.target_length]
        step = c.length_step
        m = c.target_length // step + 1
        while m * step <= c.max_length:
            out.append(m * step)
            m += 1
        return out

    def due(self, step: int) -> bool:
        """True at step 0 and every ``monitor_interval`` steps."""
        return step % self.config.monitor_interval == 0

    def sample_prompts(self, dataset: Sequence[Any], *, seed: int = 0) -> list[Any]:
        """``monitor_size`` items of ``dataset`` drawn uniformly without replacement under ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(dataset), generator=gen)[: self.config.monitor_size].tolist()
        return [dataset[i] for i in sorted(idx)]

    def update(self, lengths: Sequence[int], correct: Sequence[bool], group_ids: Sequence[Any],
               *, step: int | None = None) -> dict[str, int | None]:
        """Recompute L_A(d) from one monitor evaluation; returns the new targets (kept in ``targets``)."""
        n = len(lengths)
        check_batch("correct", correct, n)
        check_batch("group_ids", group_ids, n)
        buckets, _ = difficulty_buckets(correct, group_ids)
        k = max(Counter(group_ids).values()) if n else 0
        if self.config.coverage_rule == "paper":
            need = {"easy": math.ceil(2 * k / 3), "medium": math.ceil(k / 3), "hard": 1}
        else:
            need = {"easy": (2 * k) // 3, "medium": k // 3, "hard": 1}
        cands = self.candidates()
        targets: dict[str, int | None] = {}
        self.coverage = {}
        for d in BUCKETS:
            lens = sorted(int(ln) for ln, b in zip(lengths, buckets, strict=True) if b == d)
            targets[d] = None
            self.coverage[d] = {}
            if not lens or need[d] < 1:
                continue
            j = 0
            for cand in cands:
                while j < len(lens) and lens[j] <= cand:
                    j += 1
                self.coverage[d][cand] = j / len(lens)
                # P |C_d| >= 1  <=>  j |C_d| >= |responses|  (exact; floor(P |C|) >= 1 is the same test)
                if targets[d] is None and j * need[d] >= len(lens):
                    targets[d] = cand
        self.targets = targets
        self.last_step = step
        return dict(targets)


class LaserReward:
    """LASER / LASER-D / LASER-DE rewards (docs/rewards.md section 4).

    ``reward(completions, references, completion_ids=..., group_size=K | group_ids=..., prompts=...)``: the
    lengths are ``len(completion_ids[i])`` (or ``completion_lengths=``, or the token count of the text when
    the reward was built with a ``tokenizer`` and no ids are given); the groups (for the difficulty
    buckets) are contiguous blocks of ``group_size`` rows (TRL layout) or ``group_ids``; without either, rows
    with equal prompts form a group. LASER-D / DE read the targets of ``monitor`` (a
    :class:`LaserLengthMonitor`, created when not given; call ``monitor.update`` after each monitor
    evaluation).

    Diagnostics: ``status`` (correct / wrong / invalid), ``base`` (R), ``length``, ``bucket``, ``target``,
    ``repetitive`` (code variant of LASER-DE only, else None).
    """

    name = "laser"

    def __init__(self, config: LaserConfig | None = None, *, monitor: LaserLengthMonitor | None = None,
                 tokenizer=None, **overrides):
        base = config or LaserConfig()
        self.tokenizer = tokenizer
        self.config = LaserConfig(**{**base.__dict__, **overrides}) if overrides else base
        self.monitor = monitor or LaserLengthMonitor(self.config)
        self._seen: list[tuple[list[int], list[bool], list[Any]]] = []  # training batches since the update

    def after_step(self, output: RewardOutput, *, step: int, group_size: int | None = None,
                   group_ids: Sequence[Any] | None = None) -> dict[str, int | None] | None:
        """Trainer hook (called after the rewards of each training step, ``step`` counting from 0): keeps the
        lengths and correctness of this call's rollouts and, when the monitor is due (step 0 and every
        ``monitor_interval`` steps), recomputes the targets L_A(d) from the training batches seen since the
        last update (the most recent ``monitor_size`` prompts), so that LASER-D / DE adapt
        during training. This monitor set is the training rollouts themselves, not a separate set of 500
        prompts sampled again with the training settings as in the paper (docs/rewards.md 4.4): no extra
        generation, at the price of a monitor that sees each prompt once. Returns the new targets when it
        updated them, else None. LASER (fixed L_T) ignores it."""
        if self.config.method == "laser":
            return None
        d = output.diagnostics
        lengths = [int(v) for v in d["length"]]
        gids = _group_ids(len(lengths), group_size, group_ids, None)
        self._seen.append((lengths, [s == "correct" for s in d["status"]], [(step, g) for g in gids]))
        while len(self._seen) > 1 and sum(len(set(b[2])) for b in self._seen) > self.config.monitor_size:
            self._seen.pop(0)
        if not self.monitor.due(step):
            return None
        lens = [v for b in self._seen for v in b[0]]
        correct = [v for b in self._seen for v in b[1]]
        groups = [v for b in self._seen for v in b[2]]
        self._seen = []
        return self.monitor.update(lens, correct, groups, step=step)

    def state_dict(self) -> dict:
        """The length monitor's state (LASER-D / DE targets); the config is not state."""
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.monitor.load_state_dict(state["monitor"])

    def __call__(self, completions: Sequence, references: Sequence | None = None, *, completion_ids=None,
                 completion_lengths: Sequence[int] | None = None, group_size: int | None = None,
                 group_ids: Sequence[Any] | None = None, prompts: Sequence | None = None,
                 **kwargs) -> RewardOutput:
        c = self.config
        n = len(completions)
        check_batch("references", references, n)
        if completion_lengths is None:
            if completion_ids is None and self.tokenizer is not None:  # text only (e.g. verl's compute_score)
                tok = self.tokenizer
                completion_ids = [tok(completion_text(x) or "", add_special_tokens=False)["input_ids"]
                                  for x in completions]
            check_batch("completion_ids", completion_ids, n)
            completion_lengths = [len(x) for x in completion_ids]
        check_batch("completion_lengths", completion_lengths, n)
        lengths = [int(x) for x in completion_lengths]
        if prompts is not None:
            check_batch("prompts", prompts, n)
        base, status = [], []
        for i in range(n):
            prompt = None if prompts is None else prompts[i]
            r, s = laser_base_reward(completions[i], references[i], c, prompt)
            base.append(r)
            status.append(s)
        correct = [s == "correct" for s in status]
        if c.method == "laser" and group_size is None and group_ids is None and prompts is None:
            gids = list(range(n))  # LASER's target is fixed: the buckets are only diagnostics
        else:
            gids = _group_ids(n, group_size, group_ids, prompts)
        buckets, _ = difficulty_buckets(correct, gids)
        batch_max = max(lengths) if lengths else 0
        targets = []
        for b in buckets:
            if c.method == "laser":
                targets.append(c.target_length)
            else:
                t = self.monitor.targets.get(b)
                targets.append(batch_max if t is None else t)
        rewards, repetitive = [], []
        for i in range(n):
            r, length, target = base[i], lengths[i], targets[i]
            is_correct = status[i] == "correct"
            rep = None
            if c.method in ("laser", "laser_d") or c.de_variant == "paper":
                if is_correct and length <= target:
                    r = r + c.alpha
                elif c.method == "laser_de" and not is_correct and length > target:
                    r = r + c.alpha
            else:  # laser_de, code variant
                if is_correct and length <= target:
                    r = r + c.alpha
                elif status[i] == "wrong" and length > target:
                    ids = completion_ids[i] if completion_ids is not None else \
                        (completion_text(completions[i]) or "").split()
                    if isinstance(ids, torch.Tensor):
                        ids = ids.tolist()
                    rep = is_repetitive(ids)
                    if not rep:
                        r = r + c.alpha
            rewards.append(r)
            repetitive.append(rep)
        return RewardOutput(torch.tensor(rewards, dtype=torch.float32), {
            "status": status, "base": torch.tensor(base, dtype=torch.float32), "length": lengths,
            "bucket": buckets, "target": targets, "repetitive": repetitive,
        })


def _group_ids(n: int, group_size: int | None, group_ids: Sequence[Any] | None, prompts: Sequence | None
               ) -> list[Any]:
    if group_size is not None and group_ids is not None:
        raise ValueError("pass group_size or group_ids, not both")
    if group_size is not None:
        gs = group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1 or n % gs:
            raise ValueError(f"group_size must be an int >= 1 dividing the batch size {n}, got {gs!r}")
        return [i // group_size for i in range(n)]
    if group_ids is not None:
        check_batch("group_ids", group_ids, n)
        return [g.item() if isinstance(g, torch.Tensor) else g for g in group_ids]
    if prompts is not None:
        return [repr(p) for p in prompts]
    raise ValueError("the difficulty buckets need the groups: pass group_size, group_ids or prompts")
