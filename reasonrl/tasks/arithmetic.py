"""The embedded reasoning task: multi-step arithmetic word problems with a scratchpad
(docs/trainer.md section 4).

A problem is a short story (``"Tom has 3 bags with 6 apples in each bag. He eats 4 apples. How many apples
does Tom have now?"``); the expected completion is a chain of thought in ``<think> ... </think>`` followed by
a final answer that restates the question around the computed number::

    <think> 3 * 6 = 18 . 18 - 4 = 14 </think>

    Tom has \\boxed{14} apples now.

The final answer is the **reference outcome** of DRO (docs/rewards.md section 2.1): most of its tokens (the
name, the item, ``has``, ``now``, ``\\boxed{``) are copied from the question and do not depend on the
reasoning; the digits of the number are decided by it. R3's variance weighting therefore concentrates on a
few tokens while plain aggregate certainty is dominated by the restated words, so the two rewards differ
measurably. The number sits in ``\\boxed{}`` so that the numeric verifier (docs/rewards.md section 5), PEAR
(with ``boxed_fallback``) and LASER (which needs ``\\boxed{}`` after ``</think>``) can all score it.

Difficulty levels: 1 = one operation, 2 = two, 3 = four (two products, a sum, a difference). Numbers stay
small (factors 2-6, or 2-5 at level 3; added or removed amounts 1-9; results below 60), so a model of about a
million parameters learns the format quickly and the arithmetic only partly.

Splits: a problem belongs to the held-out split iff a hash of its content (level, template, name, item,
numbers) falls in a fixed 1/5 of the hash space; the train generator rejects those problems, so the two splits
never share a problem. Everything is deterministic under a seed (``random.Random``).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

__all__ = [
    "Problem",
    "ArithmeticTask",
    "THINK_START",
    "THINK_END",
    "ANSWER_PREFIX",
    "verify",
    "parse_answer",
    "LEVELS",
    "SPLITS",
]

THINK_START = "<think>"
THINK_END = "</think>"
#: What separates the trace from the final answer: R3's default ``answer_prefix`` (docs/rewards.md 2.2), so
#: that the scoring sequence [q ; c ; "\n\n" ; y] is exactly what the model was trained to produce.
ANSWER_PREFIX = "\n\n"
LEVELS = (1, 2, 3)
SPLITS = ("train", "heldout")
_HELDOUT_BUCKETS = 5  # 1 / 5 of the hash space is held out

_NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Leo", "Zoe", "Max", "Ivy", "Dan", "Amy")
_PRONOUN = {
    "Tom": "He",
    "Sam": "He",
    "Ben": "He",
    "Leo": "He",
    "Max": "He",
    "Dan": "He",
    "Ann": "She",
    "Mia": "She",
    "Eva": "She",
    "Zoe": "She",
    "Ivy": "She",
    "Amy": "She",
}
_ITEMS = ("apples", "pens", "books", "coins", "cards", "eggs", "shells", "stamps", "cookies", "marbles")
_BOXES = ("bags", "boxes", "jars", "packs")
_BOX_ONE = {"bags": "bag", "boxes": "box", "jars": "jar", "packs": "pack"}


@dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` (the question, ending with a newline), ``cot`` (the reasoning between the
    markers), ``answer`` (the integer result) and ``reference`` (the reference outcome sentence)."""

    level: int
    question: str
    cot: str
    answer: int
    reference: str
    key: str

    @property
    def prompt(self) -> str:
        """What the policy is conditioned on: ``"Q: <question>\\nA: "``; the completion starts with
        ``<think>``."""
        return f"Q: {self.question}\nA: "

    @property
    def completion(self) -> str:
        """The gold completion: ``<think> cot </think>`` + ``ANSWER_PREFIX`` + reference."""
        return f"{THINK_START} {self.cot} {THINK_END}{ANSWER_PREFIX}{self.reference}"

    @property
    def split(self) -> str:
        return split_of(self.key)


def split_of(key: str) -> str:
    """``"heldout"`` for 1/5 of the problems (by a hash of their content), ``"train"`` otherwise."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "heldout" if h % _HELDOUT_BUCKETS == 0 else "train"


def _sentence(name: str, item: str, value: int) -> str:
    return f"{name} has \\boxed{{{value}}} {item} now."


def _level1(rng: random.Random, name: str, item: str, he: str) -> tuple[str, str, int, tuple]:
    if rng.random() < 0.5:
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        q = f"{name} has {a} {item}. {he} buys {b} more {item}."
        return q, f"{a} + {b} = {a + b}", a + b, ("add", a, b)
    a = rng.randint(10, 29)
    b = rng.randint(2, 9)
    q = f"{name} has {a} {item}. {he} gives away {b} {item}."
    return q, f"{a} - {b} = {a - b}", a - b, ("sub", a, b)


def _level2(rng: random.Random, name: str, item: str, he: str) -> tuple[str, str, int, tuple]:
    box = rng.choice(_BOXES)
    n, k = rng.randint(2, 6), rng.randint(2, 6)
    p = n * k
    if rng.random() < 0.5:
        b = rng.randint(2, 9)
        q = f"{name} has {n} {box} with {k} {item} in each {_BOX_ONE[box]}. {he} buys {b} more {item}."
        return q, f"{n} * {k} = {p} . {p} + {b} = {p + b}", p + b, (box, "add", n, k, b)
    b = rng.randint(1, min(9, p - 1))
    q = f"{name} has {n} {box} with {k} {item} in each {_BOX_ONE[box]}. {he} gives away {b} {item}."
    return q, f"{n} * {k} = {p} . {p} - {b} = {p - b}", p - b, (box, "sub", n, k, b)


def _level3(rng: random.Random, name: str, item: str, he: str) -> tuple[str, str, int, tuple]:
    box1, box2 = rng.sample(_BOXES, 2)
    n1, k1, n2, k2 = (rng.randint(2, 5) for _ in range(4))
    p1, p2 = n1 * k1, n2 * k2
    s = p1 + p2
    b = rng.randint(1, min(9, s - 1))
    q = (
        f"{name} has {n1} {box1} with {k1} {item} in each {_BOX_ONE[box1]}. {he} buys {n2} {box2} with {k2} "
        f"{item} in each {_BOX_ONE[box2]}. {he} gives away {b} {item}."
    )
    cot = f"{n1} * {k1} = {p1} . {n2} * {k2} = {p2} . {p1} + {p2} = {s} . {s} - {b} = {s - b}"
    return q, cot, s - b, (box1, box2, n1, k1, n2, k2, b)


_GENERATORS = {1: _level1, 2: _level2, 3: _level3}


def make_problem(rng: random.Random, level: int) -> Problem:
    """One random problem of ``level`` (either split)."""
    if level not in _GENERATORS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    body, cot, answer, params = _GENERATORS[level](rng, name, item, _PRONOUN[name])
    question = f"{body} How many {item} does {name} have now?"
    key = repr((level, name, item, params))
    return Problem(level, question, cot, answer, _sentence(name, item, answer), key)


class ArithmeticTask:
    """Deterministic problem sets of the embedded task.

    Args:
        levels: difficulty levels to draw from (uniformly).
        seed: base seed; ``problems(split, n)`` is a pure function of (levels, seed, split, n).
    """

    def __init__(self, levels: tuple[int, ...] | list[int] = LEVELS, seed: int = 0):
        levels = tuple(int(v) for v in levels)
        if not levels or any(v not in LEVELS for v in levels):
            raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels!r}")
        self.levels, self.seed = levels, int(seed)

    def problems(self, split: str, n: int, *, offset: int = 0) -> list[Problem]:
        """``n`` distinct problems of ``split`` (``"train"`` or ``"heldout"``). ``offset`` skips the first
        ``offset`` problems of the same stream (fresh training batches: ``problems("train", B, offset=k*B)``).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0 or offset < 0:
            raise ValueError(f"n and offset must be >= 0, got n={n}, offset={offset}")
        rng = random.Random(f"{self.seed}:{split}:{self.levels}")
        out: list[Problem] = []
        seen: set[str] = set()
        # Held-out keys are unique (a fixed evaluation set); train problems may repeat across a long stream.
        unique = split == "heldout"
        tries = 0
        while len(out) < offset + n:
            tries += 1
            if tries > 1000 * (offset + n) + 10000:
                raise RuntimeError(
                    f"ArithmeticTask: could not draw {offset + n} distinct {split} problems of "
                    f"levels {self.levels}"
                )
            p = make_problem(rng, rng.choice(self.levels))
            if p.split != split or (unique and p.key in seen):
                continue
            seen.add(p.key)
            out.append(p)
        return out[offset:]


_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def parse_answer(completion: str) -> int | None:
    """The integer in the last ``\\boxed{...}`` after the first ``</think>``; None when the completion has no
    marker or no boxed integer there (a format failure)."""
    if not isinstance(completion, str):
        return None
    cut = completion.find(THINK_END)
    if cut < 0:
        return None
    found = _BOXED.findall(completion[cut + len(THINK_END) :])
    return int(found[-1]) if found else None


def verify(completion: str, answer: int) -> str:
    """``"correct"``, ``"incorrect"`` or ``"bad_format"`` (no ``</think>`` or no boxed integer after it)."""
    got = parse_answer(completion)
    if got is None:
        return "bad_format"
    return "correct" if got == int(answer) else "incorrect"
