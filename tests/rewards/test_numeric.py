"""NumericAnswerReward (docs/rewards.md section 5): tricky strings with expected verdicts, text that would
be dangerous to evaluate, and inputs built for catastrophic backtracking (each call must finish in
milliseconds)."""

from __future__ import annotations

import math
import time

import pytest

from reasonrl.rewards import NumericAnswerConfig, NumericAnswerReward
from reasonrl.rewards.numeric import extract_number, find_last_boxed, parse_number

C, W, U, BAD = "correct", "incorrect", "unparsable", "bad_gold"

# (completion, gold, expected status). Default config: rel_tol 2%, percent-insensitive, think_end "</think>".
CASES = [
    # plain numbers, tolerance
    ("The answer is 42", "42", C),
    ("The answer is 42.5", "42", C),            # 1.2% off: within 2%
    ("The answer is 43", "42", W),              # 2.4% off
    ("The answer is 41.2", "42", C),            # 1.9% off
    ("answer: 0", "0", C),
    ("answer: 0.0000001", "0", C),              # abs_tol 1e-6 at gold 0
    ("answer: 0.001", "0", W),
    ("#### 1,234", "1234", C),
    ("#### 1,234,567.89", "1234567.89", C),
    ("Final answer: 12,34", "12", C),           # not a thousands pattern: the comma ends the number
    ("Final answer: 1234,567", "1234", C),      # neither is 1234,567
    # signs and accounting negatives
    ("The answer is -17", "-17", C),
    ("The answer is \u221217", "-17", C),       # U+2212 minus
    ("The answer is (1,234)", "-1234", C),      # accounting parentheses
    ("The answer is ( 45 )", "-45", C),
    ("The answer is +8", "8", C),
    ("The answer is -17", "17", W),
    ("The answer is (12", "12", C),             # unclosed parenthesis: not negative
    # currency
    ("The answer is $1,000", "1000", C),
    ("The answer is -$5.50", "-5.5", C),
    ("The answer is $-5.50", "-5.5", C),
    ("The answer is USD 250", "250", C),
    ("The answer is €3.2", "3.2", C),
    ("The answer is £7", "7", C),
    ("The answer is ¥100", "100", C),
    ("Answer: \\$12.5", "12.5", C),
    # percent (insensitive: 25% = 25 = 0.25)
    ("The answer is 25%", "0.25", C),
    ("The answer is 25%", "25", C),
    ("The answer is 0.25", "25%", C),
    ("The answer is 25 percent", "0.25", C),
    ("The answer is \\boxed{12.5\\%}", "0.125", C),
    ("The answer is 25%", "0.3", W),
    # scientific notation
    ("The answer is 1.5e3", "1500", C),
    ("The answer is 1.5E-3", "0.0015", C),
    ("The answer is 2 \\times 10^{6}", "2000000", C),
    ("The answer is 3x10^4", "30000", C),
    ("The answer is 3 × 10^-2", "0.03", C),
    # fractions
    ("The answer is \\frac{3}{4}", "0.75", C),
    ("The answer is \\dfrac{1}{3}", "0.3333", C),
    ("The answer is 3/4", "0.75", C),
    ("The answer is -\\frac{1}{2}", "-0.5", C),
    ("The answer is 1/0", "1", U),              # zero denominator: unparsable, never inf
    ("The answer is 2 / 8", "0.25", C),
    # leading dot, trailing dot
    ("The answer is .5", "0.5", C),
    ("The answer is 5.", "5", C),
    # span rules: boxed > cue > last number
    ("First 3, then \\boxed{7} and finally 9", "7", C),
    ("\\boxed{1} ... \\boxed{2}", "2", C),
    ("\\boxed{\\text{\\$ 1{,}500}}", "1500", C),
    ("\\boxed{\\frac{1}{4}}", "0.25", C),
    ("\\boxed{12", "12", C),                    # unbalanced: no boxed span -> last number of the text
    ("Step 1: 10 apples. Step 2: 20 apples. So 30", "30", C),
    ("The final answer is 5. Check: 5 + 1 = 6", "5", C),  # cue span: first number after the cue
    ("ANSWER IS 8", "8", C),
    ("Answer: 1\\,000\\,000", "1000000", C),
    ("<think>the answer is 99</think>The answer is 100", "100", C),
    ("<think>it is 100</think>no number here", "100", U),  # the reasoning is not searched
    ("<think>reasoning</think>", "1", U),
    # magnitude words are not scaled
    ("The answer is 3 million", "3", C),
    ("The answer is 3 million", "3000000", W),
    # nothing parsable
    ("I don't know", "5", U),
    ("", "5", U),
    ("answer: x", "5", U),
    ("COVID-19 answer: unknown", "19", U),      # cue span has no number
    ("version2", "2", U),                       # digits glued to a word are not a number
    # malformed gold
    ("The answer is 5", "n/a", BAD),
    ("The answer is 5", "", BAD),
    ("The answer is 5", None, BAD),
    ("The answer is 5", float("nan"), BAD),
    # gold given as numbers
    ("The answer is 5", 5, C),
    ("The answer is 0.05", 5.0, C),             # percent-insensitive: 0.05 x 100
    # dangerous if evaluated: must only be parsed as text
    ("__import__('os').system('rm -rf /')", "0", U),
    ("answer: __import__('os').system('echo 1')", "1", C),  # the digit 1 inside is just a number
    ("answer: 2**1000000000", "2", C),          # first number 2; the power is never computed
    ("answer: 9**9**9", "9", C),
    ("answer: 10^10^10", "10", C),
    ("answer: 1e999999999", "1", U),            # exponent too large: refused, not built
    ("answer: 1e400", "1", U),                  # overflows float: unparsable, never inf
    ("answer: " + "9" * 5000, "9", U),          # 5000 digits: exact parse, overflows float
    ("answer: eval('6*7')", "6", C),
    ("answer: ${jndi:ldap://x}", "1", U),
    ("answer: lambda: 0", "0", C),
    ("answer: \\input{/etc/passwd}", "1", U),
    ("answer: NaN", "1", U),
    ("answer: inf", "1", U),
    ("answer: -Infinity", "1", U),
]


def test_enough_cases():
    assert len(CASES) >= 60
    assert {s for _, _, s in CASES} == {C, W, U, BAD}


@pytest.mark.parametrize("completion,gold,expected", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_verdict(completion, gold, expected):
    rw = NumericAnswerReward()
    out = rw([completion], [gold])
    assert out.diagnostics["status"] == [expected], (completion, gold, out.diagnostics)
    value = out.rewards[0].item()
    if expected == C:
        assert value == 1.0
    elif expected in (W, U):
        assert value == 0.0
    else:
        assert math.isnan(value)


def test_options():
    strict = NumericAnswerReward(percent_insensitive=False)
    assert strict(["answer: 25%"], ["0.25"]).diagnostics["status"] == [C]
    assert strict(["answer: 25"], ["0.25"]).diagnostics["status"] == [W]
    assert strict(["answer: 25%"], ["25"]).diagnostics["status"] == [W]
    exact = NumericAnswerReward(rel_tol=0.0)
    assert exact(["answer: 41.9"], ["42"]).diagnostics["status"] == [W]
    out = NumericAnswerReward(unparsable_reward=-1.0)(["nothing"], ["1"])
    assert out.rewards.tolist() == [-1.0] and out.diagnostics["status"] == [U]
    short = NumericAnswerReward(max_chars=5)
    assert short(["answer is 7 and padding"], ["7"]).diagnostics["status"] == [U]
    nothink = NumericAnswerReward(think_end=None)
    assert nothink(["<think>x</think> 3"], ["3"]).diagnostics["status"] == [C]


def test_conversational_and_non_string_completions():
    rw = NumericAnswerReward()
    out = rw([[{"role": "assistant", "content": "answer: 3"}], 42, None, ["not", "messages"]], ["3"] * 4)
    assert out.diagnostics["status"] == [C, U, U, U]
    assert out.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_diagnostics_and_batch_errors():
    out = NumericAnswerReward()(["answer: 25%", "x"], ["0.25", "bad"])
    assert out.diagnostics["pred"] == [25.0, None] and out.diagnostics["pred_percent"] == [True, None]
    assert out.diagnostics["gold"][0] == 0.25 and out.diagnostics["gold"][1] is None
    with pytest.raises(ValueError, match="references"):
        NumericAnswerReward()(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="rel_tol"):
        NumericAnswerConfig(rel_tol=-0.1)
    with pytest.raises(ValueError, match="max_chars"):
        NumericAnswerConfig(max_chars=0)
    with pytest.raises(ValueError, match="think_end"):
        NumericAnswerReward(think_end=3)


def test_parser_units():
    assert parse_number("x 1,000.5 y") == (1000.5, False)
    assert parse_number("1 and 2", first=False) == (2.0, False)
    assert parse_number("12%") == (12.0, True)
    assert extract_number(7) == (7.0, False) and extract_number(True) is None
    assert find_last_boxed("\\boxed{a{b}c} \\boxed{d") == "a{b}c"
    assert find_last_boxed("\\boxed {x}") == "x"


# Inputs built to make a backtracking regex engine (or a quadratic scan) blow up. Each must finish fast.
HOSTILE = [
    "1" * 8192 + "x",
    "1," * 4096,
    "1,000" * 1600 + "1",
    "1,000," * 1300,
    "(" * 8192,
    "(" * 4000 + "1" * 4000,
    "$" * 8192,
    "-" * 8191 + "1",
    "- " * 4096,
    "\\boxed{" * 1200,
    "\\boxed{" + "{" * 8000,
    "{" * 8192,
    "}" * 8192,
    "1e" * 4096,
    "1/" * 4096,
    "1 / " * 2048,
    "1.1." * 2048,
    ". " * 4096 + "5",
    "answer:" * 1170,
    "answer is " * 800,
    "#" * 8192,
    " " * 8190 + "7",
    "\\frac{" * 1300,
    "\\frac{1}{" * 900,
    "\\text{" * 1300,
    "x10^" * 2048,
    "1 x 10^" * 1170,
    "%" * 8192,
    "percent" * 1170,
    "USD" * 2730,
    "\u2212" * 8192,
    "9" * 100000,                  # longer than max_chars: cut to the tail first
    "a1" * 4096,
    "1" * 4000 + "e" + "1" * 4000,
    "</think>" * 1000,
]


@pytest.mark.parametrize("text", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_inputs_finish_in_milliseconds(text):
    rw = NumericAnswerReward()
    rw([text], ["1"])  # warm-up (pattern compilation is at import, but keep the bound about the scan)
    best = math.inf
    for _ in range(3):  # best of 3: the machine is shared; a quadratic scan is slow every time
        t0 = time.perf_counter()
        out = rw([text, text + " answer: 1"], ["1", "1"])
        best = min(best, time.perf_counter() - t0)
    assert out.diagnostics["status"][0] in (C, W, U)
    assert best < 0.05 * 2, f"{best * 1e3:.1f} ms for two calls on a hostile input of {len(text)} chars"
