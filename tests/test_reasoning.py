"""The reasoning testbed's generator (edgerun/reasoning.py): splits, determinism, replies, answer reading."""

from __future__ import annotations

import re

import pytest

from edgerun import reasoning
from edgerun.errors import UsageError


def test_train_and_test_never_share_a_problem():
    train = reasoning.problems("train", 3000)
    test = reasoning.problems("test", 400)
    assert not {p.question for p in train} & {p.question for p in test}
    assert {p.split for p in train} == {"train"} and {p.split for p in test} == {"test"}
    assert len({p.question for p in test}) == 400                       # distinct within a split
    assert {p.kind for p in test} == set(reasoning.KINDS)


def test_the_stream_is_deterministic_and_prefix_stable():
    a = reasoning.problems("test", 50, seed=3)
    assert a == reasoning.problems("test", 50, seed=3)
    assert reasoning.problems("test", 20, seed=3) == a[:20]
    assert reasoning.problems("test", 50, seed=4) != a


def _evaluate(expr: str) -> int:
    return eval(expr.replace("×", "*"), {"__builtins__": {}})   # digits, + - * and parentheses only


@pytest.mark.parametrize("p", reasoning.problems("test", 120), ids=lambda p: p.id)
def test_answers_are_exact(p):
    if p.question.startswith("Compute "):
        expr = p.question[len("Compute "):-1]
        assert re.fullmatch(r"[\d+\-×() ]+", expr)
        assert _evaluate(expr) == int(p.answer)
    elif p.kind == "equation":
        a, sign, b, c = re.match(r"Solve for x: (\d+)x ([+-]) (\d+) = (-?\d+)", p.question).groups()
        x = int(p.answer)
        assert int(a) * x + (int(b) if sign == "+" else -int(b)) == int(c)
    elif p.kind == "order":
        nums = [int(n) for n in p.question.split(": ")[1].rstrip("?").split(", ")]
        k = 2 if "second" in p.question else 3 if "third" in p.question else 1
        high = "largest" in p.question
        assert sorted(nums, reverse=high)[k - 1] == int(p.answer)
    assert int(p.answer) >= 0


def test_system2_replies_think_at_length_and_end_with_the_answer():
    probs = reasoning.problems("train", 200)
    lengths_1, lengths_2, slips = [], [], 0
    for p in probs:
        r2 = reasoning.system2_reply(p)
        assert r2.startswith("<think>\n") and r2.count("</think>") == 1
        assert reasoning.is_correct(r2, p)
        assert reasoning.is_correct(reasoning.system1_reply(p), p)
        paragraphs = r2.split("</think>")[0].split("\n\n")
        assert 3 <= len(paragraphs) <= 6                       # a first pass and 2-5 reflections
        assert all(any(q.startswith(m) for m in reasoning.REFLECTION_MARKERS) for q in paragraphs[1:])
        first = reasoning.extract_answer(paragraphs[0])
        slips += first != p.answer
        lengths_1.append(len(reasoning.system1_reply(p)))
        lengths_2.append(len(r2))
    assert 0.1 < slips / len(probs) < 0.4                      # planted slips, about a quarter
    assert sum(lengths_2) > 10 * sum(lengths_1)
    assert reasoning.system2_reply(probs[0], seed=0) == reasoning.system2_reply(probs[0], seed=0)


def test_extract_answer():
    assert reasoning.extract_answer("so the answer is 1,234.") == "1234"
    assert reasoning.extract_answer("The answer is 12.0") == "12"
    assert reasoning.extract_answer("So the answer is 37/3.") == "37/3"
    assert reasoning.extract_answer("the answer is 3. Wait, the answer is 4.") == "4"
    assert reasoning.extract_answer("no answer here 7") is None
    assert reasoning.extract_answer("no answer here 7", fallback_last_number=True) == "7"
    assert reasoning.final_answer("<think>the answer is 3</think>\nThe answer is 5.") == "5"
    assert reasoning.final_answer("<think>the answer is 3 and it goes on") is None


def test_bad_arguments():
    with pytest.raises(UsageError, match="split"):
        reasoning.problems("dev", 3)
    with pytest.raises(UsageError, match="kind"):
        reasoning.problems("test", 3, kinds=("poetry",))
