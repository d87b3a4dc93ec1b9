"""Verifiable numeric-answer reward, FinQA style (docs/rewards.md section 5).

The prediction's number is extracted from text with a handful of regular expressions and parsed with exact
decimal arithmetic. Text is never evaluated (no ``eval``, no sympy, no LaTeX engine): a completion is data.

Safety against adversarial text (catastrophic backtracking). Python's ``re`` backtracks, so every pattern
here is written to be linear time:

* no nested or adjacent quantifiers that can match the same characters in more than one way: the only
  repeated group, the thousands groups ``(?:,\\d{3})+``, starts each iteration with a literal comma, so
  there is one way to split a digit string into groups and backtracking out of it costs one step per group;
* every optional part of a number after its first digit is greedy and can never make the match fail, so a
  match that has started at a digit always succeeds: ``finditer`` never re-scans a long digit run from
  every position inside it (which would be quadratic);
* a number can only start where the previous character is not a word character or a dot (a fixed-width
  lookbehind), so each position is tried in O(1) before the digits.

The scope is also capped (``max_chars``, default 8192, the tail of the answer part), and the brace matching
of ``\\boxed{...}`` is a single left-to-right scan. tests/rewards/test_numeric.py times hostile inputs.

Extraction (docs/rewards.md 5.1): the text after the last ``think_end`` marker (or the whole completion),
its last ``max_chars`` characters; the answer span is the content of the last ``\\boxed{...}``, else the text
after the last answer cue (``final answer``, ``answer:``, ``answer is``, ``####``; case-insensitive), else the
whole scope; LaTeX clean-up; the first number of a boxed or cue span, the last number of the whole-text
fallback. Numbers: sign (``+``, ``-``, U+2212) or accounting parentheses, currency (``$ € £ ¥``, ``USD``,
``EUR``, ``GBP``), thousands separators (only as ``d{1,3}(,ddd)+``; decimal commas are not supported),
decimals (``.5`` allowed), exponents (``e-3``, ``× 10^{3}``, ``x10^3``), ``%`` / ``percent`` (a flag), and
fractions ``a/b`` / ``\\frac{a}{b}``. Magnitude words (million, ...) are ignored, not scaled.

Comparison (5.2): with percent-insensitivity the candidate values are {x, x/100, 100 x} on both sides;
``|a - b| <= rel_tol |b|`` (``|a| <= abs_tol`` when b = 0).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, DivisionByZero, InvalidOperation, localcontext
from typing import Any, NamedTuple

import torch

from reasonrl.rewards._validate import check_bool, check_int, check_real, check_str
from reasonrl.rewards.types import RewardOutput, check_batch, completion_text

__all__ = [
    "ParsedNumber",
    "NumericAnswerConfig",
    "NumericAnswerReward",
    "parse_number",
    "extract_answer_span",
    "extract_number",
    "numbers_match",
    "find_last_boxed",
]

logger = logging.getLogger("reasonrl")

_SIGN = "+\\-\u2212"
# One number. Optional prefix (each part bounded: at most one paren, sign, currency, second sign), then the
# digits (the lookahead guarantees one), then optional suffixes that cannot fail once the digits matched.
_NUMBER = re.compile(
    r"(?<![\w.])"
    r"(?P<open>\(\s?)?"
    rf"(?P<sign>[{_SIGN}]\s?)?"
    r"(?P<cur>(?:[$€£¥]|USD|EUR|GBP)\s?)?"
    rf"(?P<sign2>[{_SIGN}]\s?)?"
    r"(?=\.?\d)"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?"
    r"(?P<frac>\.\d+)?"
    rf"(?:[eE](?P<exp>[{_SIGN}]?\d+)|\s?(?:×|x|\*|\\times|\\cdot)\s?10\^\{{?(?P<exp10>[{_SIGN}]?\d+)\}}?)?"
    r"(?P<pct>\s?(?:\\?%|percent\b))?"
    r"(?P<close>\s?\))?",
    re.IGNORECASE,
)
# Between two numbers forming a fraction a/b (after LaTeX clean-up).
_SLASH = re.compile(r"\s?/\s?")
_CUES = ("final answer", "answer:", "answer is", "####")
# LaTeX clean-up (docs/rewards.md 5.1 step 3). [^{}]* cannot overlap with the braces around it: linear.
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s?\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s?\{([^{}]*)\}\s?\{([^{}]*)\}")
_DROP = re.compile(r"\\left|\\right|\\,|\\!|\\;|\{,\}|\\ ")
_BOXED = "\\boxed"
_BRACE = re.compile(r"[{}]")


class ParsedNumber(NamedTuple):
    """A parsed number: its float value and whether it carried a percent sign / word."""

    value: float
    percent: bool


def find_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance, or None.

    Linear time: one pass over the brace characters pairs every ``{`` with its ``}`` (a stack), then the
    ``\\boxed`` occurrences are visited from the last one backwards (the ``rfind`` calls together scan
    the text once). Re-scanning forward from every unbalanced ``\\boxed{`` would be quadratic on
    ``"\\boxed{" * n``.
    """
    start = text.rfind(_BOXED)
    if start == -1:
        return None
    closing: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closing[stack.pop()] = m.start()
    while start != -1:
        i = start + len(_BOXED)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{" and i in closing:
            return text[i + 1:closing[i]]
        start = text.rfind(_BOXED, 0, start)
    return None


def _scope(text: str, think_end: str | None, max_chars: int) -> str:
    if think_end:
        cut = text.rfind(think_end)
        if cut != -1:
            text = text[cut + len(think_end):]
    return text[-max_chars:] if len(text) > max_chars else text


def extract_answer_span(text: str, *, think_end: str | None = "</think>", max_chars: int = 8192
                        ) -> tuple[str, str]:
    """(span, kind) of docs/rewards.md 5.1 steps 1-2: kind is ``"boxed"``, ``"cue"`` or ``"text"``."""
    scope = _scope(text, think_end, max_chars)
    boxed = find_last_boxed(scope)
    if boxed is not None:
        return boxed, "boxed"
    lower = scope.lower()
    best, best_end = -1, -1
    for cue in _CUES:
        pos = lower.rfind(cue)
        if pos > best:
            best, best_end = pos, pos + len(cue)
    if best >= 0:
        return scope[best_end:], "cue"
    return scope, "text"


def _clean_latex(span: str) -> str:
    span = span.replace("\\%", "%").replace("\\$", "$")
    span = _DROP.sub("", span)
    span = _TEXT_WRAP.sub(r"\1", span)
    return _FRAC.sub(r"\1/\2", span)


def _match_value(m: re.Match) -> tuple[Decimal, bool] | None:
    """Exact value of one ``_NUMBER`` match (sign, parentheses, exponent applied) and its percent flag."""
    digits = (m.group("int") or "0").replace(",", "")
    frac = m.group("frac") or ""
    exp = m.group("exp") or m.group("exp10") or "0"
    exp = exp.replace("\u2212", "-")
    if len(exp.lstrip("+-")) > 6:  # |exponent| >= 10^6: no float can hold it; refuse, do not build it
        return None
    try:
        value = Decimal(f"{digits}{frac}E{exp}")
    except (InvalidOperation, ValueError):
        return None
    negative = False
    for s in (m.group("sign"), m.group("sign2")):
        if s and s.strip() in ("-", "\u2212"):
            negative = not negative
    if m.group("open") and m.group("close"):
        negative = not negative  # accounting notation (1,234) = -1234
    return (-value if negative else value), bool(m.group("pct"))


def _fraction(num: Decimal, den: Decimal) -> Decimal:
    if den == 0:
        return Decimal("NaN")
    with localcontext() as ctx:
        ctx.prec = 40
        try:
            return num / den
        except (InvalidOperation, DivisionByZero):
            return Decimal("NaN")


def _select_number(span: str, first: bool) -> tuple[Decimal, bool] | None:
    """The first or last number of ``span``, where ``a / b`` pairs (paired left to right) count as one.

    The scan over the matches is cheap (no arithmetic); only the selected number is converted to a Decimal,
    so a span holding thousands of numbers costs one regex pass plus O(1) exact arithmetic.
    """
    items: list[tuple[re.Match, re.Match | None]] = []  # (number, its denominator or None)
    prev, prev_slashable = None, False
    for m in _NUMBER.finditer(span):
        pct, paren = bool(m.group("pct")), bool(m.group("open") and m.group("close"))
        # a/b: the previous number ended right before "/" and this one starts right after it, and neither
        # carries decorations that make a fraction meaningless (percent, parentheses).
        if (prev_slashable and not pct and not m.group("open")
                and _SLASH.fullmatch(span, prev.end(), m.start()) is not None):
            items[-1] = (prev, m)
            prev, prev_slashable = m, False
            continue
        items.append((m, None))
        if first and len(items) == 2:
            break  # the first item is final once a second one has started
        prev, prev_slashable = m, not pct and not paren
    if not items:
        return None
    num_m, den_m = items[0] if first else items[-1]
    num = _match_value(num_m)
    if den_m is None:
        return num
    den = _match_value(den_m)
    if num is None or den is None:
        return None
    return _fraction(num[0], den[0]), False


def parse_number(span: str, *, first: bool = True) -> ParsedNumber | None:
    """The first (``first=True``) or last number of ``span`` after LaTeX clean-up, or None.

    Non-finite results (a zero denominator, overflow of float) are None: unparsable, never inf / NaN.
    """
    if not isinstance(span, str):
        return None
    picked = _select_number(_clean_latex(span), first)
    if picked is None:
        return None
    value, pct = picked
    try:
        f = float(value)
    except (OverflowError, ValueError):
        return None
    if not math.isfinite(f):
        return None
    return ParsedNumber(f, pct)


def extract_number(text: Any, *, think_end: str | None = "</think>", max_chars: int = 8192
                   ) -> ParsedNumber | None:
    """docs/rewards.md 5.1 end to end: the answer's number in a completion (or a gold string), or None.

    ``text`` may also be an int / float (a gold value given as a number): it is taken as is when finite.
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return ParsedNumber(float(text), False) if math.isfinite(text) else None
    if not isinstance(text, str):
        return None
    span, kind = extract_answer_span(text, think_end=think_end, max_chars=max_chars)
    return parse_number(span, first=kind != "text")


def _candidates(p: ParsedNumber, percent_insensitive: bool) -> tuple[float, ...]:
    if percent_insensitive:
        return (p.value, p.value / 100.0, p.value * 100.0)
    return (p.value / 100.0 if p.percent else p.value,)


def numbers_match(pred: ParsedNumber, gold: ParsedNumber, *, rel_tol: float = 0.02, abs_tol: float = 1e-6,
                  percent_insensitive: bool = True) -> bool:
    """docs/rewards.md 5.2: any candidate pair close (relative to the gold candidate; absolute for 0)."""
    for b in _candidates(gold, percent_insensitive):
        tol = rel_tol * abs(b) if b != 0 else abs_tol
        for a in _candidates(pred, percent_insensitive):
            if abs(a - b) <= tol:
                return True
    return False


@dataclass(frozen=True)
class NumericAnswerConfig:
    """Settings of :class:`NumericAnswerReward` (docs/rewards.md section 5).

    rel_tol: relative tolerance, 0.02 (FinQA's 2% criterion used by the DRO paper).
    abs_tol: absolute tolerance when the gold value is 0.
    percent_insensitive: "25%", "25" and "0.25" match each other (the FinQA convention).
    unparsable_reward: reward of a prediction without a number (status ``unparsable``).
    think_end: reasoning end marker; only the text after its last occurrence is searched (None: all text).
    max_chars: only the last ``max_chars`` characters of that text are searched.
    """

    rel_tol: float = 0.02
    abs_tol: float = 1e-6
    percent_insensitive: bool = True
    unparsable_reward: float = 0.0
    think_end: str | None = "</think>"
    max_chars: int = 8192

    def __post_init__(self):
        n = type(self).__name__
        check_real(n, "rel_tol", self.rel_tol, lo=0)
        check_real(n, "abs_tol", self.abs_tol, lo=0)
        check_bool(n, "percent_insensitive", self.percent_insensitive)
        check_real(n, "unparsable_reward", self.unparsable_reward)
        check_str(n, "think_end", self.think_end, allow_none=True)
        check_int(n, "max_chars", self.max_chars, lo=1)


class NumericAnswerReward:
    """1.0 when the completion's number matches the reference within tolerance, else 0.0 (docs/rewards.md 5).

    ``reward(completions, references)`` -> :class:`RewardOutput` with ``rewards [B]`` and diagnostics
    ``status`` (``correct`` / ``incorrect`` / ``unparsable`` / ``bad_gold``), ``pred`` and ``gold`` (floats
    or None) and ``pred_percent``. A gold answer that does not parse gives NaN (``bad_gold``: a data error,
    logged once per distinct gold value, never raised). Keyword arguments override fields of ``config``.
    """

    name = "numeric_answer"

    def __init__(self, config: NumericAnswerConfig | None = None, **overrides):
        base = config or NumericAnswerConfig()
        self.config = NumericAnswerConfig(**{**base.__dict__, **overrides}) if overrides else base
        self._bad_gold_logged: set[str] = set()

    def score_one(self, completion: Any, reference: Any) -> tuple[float, str, ParsedNumber | None,
                                                                    ParsedNumber | None]:
        """(reward, status, parsed prediction, parsed gold) of one completion."""
        c = self.config
        gold = extract_number(reference, think_end=None, max_chars=c.max_chars)
        text = completion_text(completion)
        pred = None if text is None else extract_number(text, think_end=c.think_end, max_chars=c.max_chars)
        if gold is None:
            key = repr(reference)[:200]
            if key not in self._bad_gold_logged:
                self._bad_gold_logged.add(key)
                logger.warning("NumericAnswerReward: gold answer %s has no parsable number; its completions "
                               "score NaN (status 'bad_gold')", key)
            return math.nan, "bad_gold", pred, None
        if pred is None:
            return float(c.unparsable_reward), "unparsable", None, gold
        ok = numbers_match(pred, gold, rel_tol=c.rel_tol, abs_tol=c.abs_tol,
                           percent_insensitive=c.percent_insensitive)
        return (1.0 if ok else 0.0), ("correct" if ok else "incorrect"), pred, gold

    def __call__(self, completions: Sequence, references: Sequence | None = None, **kwargs) -> RewardOutput:
        n = len(completions)
        check_batch("references", references, n)
        rewards, status, preds, golds, pcts = [], [], [], [], []
        for comp, ref in zip(completions, references, strict=True):
            r, s, p, g = self.score_one(comp, ref)
            rewards.append(r)
            status.append(s)
            preds.append(None if p is None else p.value)
            pcts.append(None if p is None else p.percent)
            golds.append(None if g is None else g.value)
        return RewardOutput(torch.tensor(rewards, dtype=torch.float32),
                            {"status": status, "pred": preds, "pred_percent": pcts, "gold": golds})
