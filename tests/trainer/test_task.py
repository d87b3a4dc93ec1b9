"""The embedded task and the shipped tokenizer / model."""

from __future__ import annotations

import json

from reasonrl.tasks.arithmetic import (
    ANSWER_PREFIX,
    THINK_END,
    THINK_START,
    ArithmeticTask,
    parse_answer,
    verify,
)
from reasonrl.tasks.build_model import encode_example
from reasonrl.trainer import embedded_model_path


def test_splits_are_disjoint_deterministic_and_levelled():
    task = ArithmeticTask(seed=0)
    train, held = task.problems("train", 600), task.problems("heldout", 200)
    assert not {p.key for p in train} & {p.key for p in held}
    assert len({p.key for p in held}) == 200
    assert [p.key for p in ArithmeticTask(seed=0).problems("heldout", 200)] == [p.key for p in held]
    assert task.problems("train", 5, offset=3)[0].key == train[3].key
    assert {p.level for p in held} == {1, 2, 3}
    assert {p.level for p in ArithmeticTask(levels=[2]).problems("train", 20)} == {2}


def test_gold_completion_verifies_and_the_reference_restates_the_question():
    for p in ArithmeticTask(seed=1).problems("train", 50):
        assert verify(p.completion, p.answer) == "correct"
        assert verify(p.completion.replace(f"{{{p.answer}}}", f"{{{p.answer + 1}}}"), p.answer) == "incorrect"
        name = p.question.split()[0]
        assert p.reference.startswith(f"{name} has \\boxed{{{p.answer}}} ") and p.reference.endswith(" now.")
        assert (
            p.completion.startswith(THINK_START) and THINK_END + ANSWER_PREFIX + p.reference in p.completion
        )
    assert (
        parse_answer("no marker \\boxed{3}") is None and verify("<think> x </think> 12", 12) == "bad_format"
    )


def test_shipped_tokenizer_and_model():
    from transformers import AutoTokenizer

    path = embedded_model_path()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 20 * 2**20, f"embedded model folder is {size / 2**20:.1f} MiB"
    assert (path / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(path)
    for marker in (THINK_START, THINK_END):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    p = ArithmeticTask(seed=2).problems("heldout", 1)[0]
    prompt, completion = encode_example(tok, p)
    text = tok.decode(prompt + completion, skip_special_tokens=True)
    assert text == p.prompt + p.completion  # exact round trip, markers kept
    assert all(
        len(tok.decode([i])) == 1 for i in tok(str(p.answer * 1001), add_special_tokens=False)["input_ids"]
    )
    report = json.loads((path / "sft_report.json").read_text())
    assert 0.05 < report["heldout"]["accuracy"] < 0.9  # follows the format, clearly imperfect: room for RL
    assert report["heldout"]["well_formed"] > 0.9
