"""Synthetic reasoning problems with exact answers: the testbed of TrimR and of Long-to-Short merging.

SmolLM2-135M-Instruct does not think at length and solves almost no GSM8K/MATH500 problem, so neither
trimming chain-of-thought nor merging a long- and a short-reasoning model can show an effect on it.
This module makes problems a 135M model can learn on two cores, and the two reply styles the
fine-tunes of ``benchmarks/reasoning_train.py`` teach:

- **kinds**: ``arithmetic`` (a two-digit start and 2-4 operations: add or subtract a two-digit
  number, multiply by 2-9), ``equation`` (``a x + b = c`` or ``a x - b = c``, integer ``x``), ``word``
  (the arithmetic chain as a story about a person's things) and ``order`` (the k-th smallest or largest
  of 4-6 numbers). Every answer is an integer.
- **System-1** reply (:func:`system1_reply`): ``The answer is N.``
- **System-2** reply (:func:`system2_reply`): a thinking section ``<think> ... </think>`` holding a
  step-by-step solution (multiplications split into tens and units), then 2-5 reflection paragraphs
  that start with a reflection marker (``Wait,``, ``Let me double-check``, ``Alternatively,`` ...) and
  re-derive the result by another route (the steps again, the chain backwards, substitution into the
  equation, the sorted list again); in a quarter of the replies the first pass carries a planted slip
  that the first reflection catches and corrects. Then the answer line ``The answer is N.``: long,
  partly redundant thinking, the overthinking TrimR removes.

Splits: a problem belongs to ``test`` when the SHA-1 of its question text falls in the first tenth,
else to ``train``, so the splits never share a problem whatever the seed and count
(:func:`problems`). Answers are read back with :func:`extract_answer` (the rule-based extractor TrimR's
cheap verifier and the benchmarks use).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

from edgerun.errors import UsageError

KINDS = ("arithmetic", "equation", "word", "order")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
#: Paragraph openings that start a new thought (TrimR splits the thinking stream at these).
REFLECTION_MARKERS = ("Wait", "Let me double-check", "Let me verify", "Alternatively", "Hmm", "But",
                      "Let me check", "Double-checking")
TEST_SHARE = 0.1

_NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ivan", "Sara", "Kai", "Nora", "Raj")
_THINGS = ("marbles", "stickers", "apples", "coins", "stamps", "cards", "shells", "pencils")


@dataclass(frozen=True)
class Problem:
    """One problem with its exact answer.

    Attributes:
        id: ``kind-<12 hex>``, stable (from the question text).
        kind: one of :data:`KINDS`.
        question: the user message.
        answer: the exact answer, an integer as text.
        data: what the reply writers need (the start and operations, the equation's coefficients, the
            numbers to order and the rank).
    """

    id: str
    kind: str
    question: str
    answer: str
    data: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def split(self) -> str:
        """``test`` or ``train`` (from the question text; see the module docstring)."""
        return split_of(self.question)


def split_of(question: str) -> str:
    """``test`` when the SHA-1 of ``question`` falls in the first :data:`TEST_SHARE` of its range, else ``train``."""
    h = int.from_bytes(hashlib.sha1(question.encode("utf-8")).digest()[:8], "big")
    return "test" if h < TEST_SHARE * 2**64 else "train"


# --- generation ---------------------------------------------------------------------------------------

_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "×": lambda x, y: x * y}


def _chain(rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
    """A start in 10..99 and 2-4 operations whose running value stays in 0..999."""
    start = rng.randint(10, 99)
    ops, value = [], start
    for _ in range(rng.randint(2, 4)):
        choices = ["+", "-"] + (["×"] if value <= 120 else [])
        op = rng.choice(choices)
        if op == "×":
            y = rng.randint(2, 9)
        elif op == "-":
            if value < 10:
                op, y = "+", rng.randint(10, 99)
            else:
                y = rng.randint(10, min(99, value))
        else:
            y = rng.randint(10, 99)
        if _OPS[op](value, y) > 999:
            op, y = "-", rng.randint(10, min(99, value))
        value = _OPS[op](value, y)
        ops.append((op, y))
    return start, ops


def _run(start: int, ops: list[tuple[str, int]]) -> list[int]:
    values = [start]
    for op, y in ops:
        values.append(_OPS[op](values[-1], y))
    return values


_VERB = {"+": "add {y}", "-": "subtract {y}", "×": "multiply by {y}"}


def _arithmetic(rng: random.Random) -> Problem:
    start, ops = _chain(rng)
    if rng.random() < 0.5:
        steps = ", ".join(_VERB[op].format(y=y) for op, y in ops[:-1])
        last = _VERB[ops[-1][0]].format(y=ops[-1][1])
        q = f"Start with {start}, {steps}, then {last}. What is the result?"
    else:
        expr, sums = str(start), False   # sums: the expression has a top-level + or -
        for op, y in ops:
            if op == "×":
                expr, sums = (f"({expr}) × {y}" if sums else f"{expr} × {y}"), False
            else:
                expr, sums = f"{expr} {op} {y}", True
        q = f"Compute {expr}."
    return _make("arithmetic", q, _run(start, ops)[-1], {"start": start, "ops": ops})


_STORY = {"+": ["{name} gets {y} more {thing}", "{name} finds {y} more {thing}"],
          "-": ["{name} gives {y} {thing} away", "{name} loses {y} {thing}"],
          "×": ["the number of {thing} grows {y} times", "{name} ends up with {y} times as many {thing}"]}


def _word(rng: random.Random) -> Problem:
    start, ops = _chain(rng)
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    parts = [rng.choice(_STORY[op]).format(name=name, y=y, thing=thing) for op, y in ops]
    story = ", then ".join(parts)
    q = f"{name} has {start} {thing}. First {story}. How many {thing} does {name} have now?"
    return _make("word", q, _run(start, ops)[-1], {"start": start, "ops": ops, "name": name, "thing": thing})


def _equation(rng: random.Random) -> Problem:
    a, x = rng.randint(2, 9), rng.randint(1, 30)
    sign = rng.choice("+-")
    b = rng.randint(1, 60) if sign == "+" else rng.randint(1, a * x)
    c = a * x + b if sign == "+" else a * x - b
    q = f"Solve for x: {a}x {sign} {b} = {c}. What is x?"
    return _make("equation", q, x, {"a": a, "b": b, "sign": sign, "c": c})


_RANK = {1: "smallest", 2: "second smallest", 3: "third smallest"}
_RANK_HI = {1: "largest", 2: "second largest", 3: "third largest"}


def _order(rng: random.Random) -> Problem:
    nums = rng.sample(range(1, 100), rng.randint(4, 6))
    k = rng.randint(1, 3)
    high = rng.random() < 0.5
    ordered = sorted(nums, reverse=high)
    word = (_RANK_HI if high else _RANK)[k]
    q = f"What is the {word} of these numbers: {', '.join(map(str, nums))}?"
    return _make("order", q, ordered[k - 1], {"nums": nums, "k": k, "high": high})


def _make(kind: str, question: str, answer: int, data: dict) -> Problem:
    pid = f"{kind}-{hashlib.sha1(question.encode('utf-8')).hexdigest()[:12]}"
    return Problem(pid, kind, question, str(answer), data)


_MAKERS = {"arithmetic": _arithmetic, "equation": _equation, "word": _word, "order": _order}


def problems(split: str, n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[Problem]:
    """The first ``n`` distinct problems of ``split`` from a seeded stream, kinds in turn.

    The same (split, seed, kinds) always gives the same list, and a longer list starts with a shorter
    one. Train and test never share a question (the split is a function of the question text).

    Args:
        split: ``train`` or ``test``.
        n: number of problems (>= 0).
        seed: seed of the stream.
        kinds: kinds to draw from, in turn.

    Raises:
        UsageError: an unknown split or kind, or a negative ``n``.
    """
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}; expected train or test")
    bad = [k for k in kinds if k not in _MAKERS]
    if bad or not kinds:
        raise UsageError(f"unknown problem kind(s) {bad}; expected some of {', '.join(KINDS)}")
    if n < 0:
        raise UsageError("the number of problems must be >= 0")
    rng = random.Random(f"edgerun-reasoning-{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    i = 0
    while len(out) < n:
        p = _MAKERS[kinds[i % len(kinds)]](rng)
        i += 1
        if p.question in seen or p.split != split:
            continue
        seen.add(p.question)
        out.append(p)
    return out


# --- replies --------------------------------------------------------------------------------------------

def system1_reply(p: Problem) -> str:
    """The short reply: ``The answer is N.``"""
    return f"The answer is {p.answer}."


def _mul_text(x: int, y: int) -> str:
    """``x × y`` worked in tens and units when x has two or more digits."""
    if x < 10:
        return f"{x} × {y} = {x * y}"
    tens, units = x - x % 10, x % 10
    if units == 0:
        return f"{x} × {y} = {x * y}"
    return f"{x} × {y} = {tens} × {y} + {units} × {y} = {tens * y} + {units * y} = {x * y}"


def _step_text(x: int, op: str, y: int, result: int | None = None) -> str:
    if op == "×" and result is None:
        return _mul_text(x, y)
    r = _OPS[op](x, y) if result is None else result
    return f"{x} {op} {y} = {r}"


def _slip(rng: random.Random, value: int) -> int:
    """A plausible wrong value: off by 1 or by 10 (never negative, never the value itself)."""
    delta = rng.choice((-10, -1, 1, 10))
    return value + delta if value + delta >= 0 else value - delta


def _chain_thinking(p: Problem, rng: random.Random, slip_at: int | None) -> tuple[list[str], int, str]:
    """First pass of a chain: step lines, the value it reaches, and the correction text of a slip."""
    start, ops = p.data["start"], p.data["ops"]
    lines, value, fix = [], start, ""
    for i, (op, y) in enumerate(ops):
        right = _OPS[op](value, y)
        if i == slip_at:
            wrong = _slip(rng, right)
            lines.append(f"Step {i + 1}: {value} {op} {y} = {wrong}.")
            fix = f"{value} {op} {y} is {right}, not {wrong}."
            value = wrong
        else:
            lines.append(f"Step {i + 1}: {_step_text(value, op, y)}.")
            value = right
    return lines, value, fix


def _chain_recheck(p: Problem) -> str:
    values = _run(p.data["start"], p.data["ops"])
    return " ".join(f"{_step_text(values[i], op, y, values[i + 1])}." for i, (op, y) in enumerate(p.data["ops"]))


def _chain_backwards(p: Problem) -> str:
    values = _run(p.data["start"], p.data["ops"])
    inverse = {"+": "-", "-": "+", "×": "÷"}
    parts = []
    for i in range(len(p.data["ops"]) - 1, -1, -1):
        op, y = p.data["ops"][i]
        parts.append(f"{values[i + 1]} {inverse[op]} {y} = {values[i]}")
    return ", ".join(parts) + f", which is the start, {values[0]}."


def system2_reply(p: Problem, seed: int = 0) -> str:
    """The long reply: ``<think>`` first pass and 2-5 reflections ``</think>`` then the answer line.

    Deterministic for (problem, seed). A quarter of the replies plant a slip in the first pass that the
    first reflection corrects (``data`` of the problem is not changed).
    """
    rng = random.Random(f"{p.id}-{seed}")
    n_reflect = rng.randint(2, 5)
    slip = rng.random() < 0.25
    ans = p.answer
    paras: list[str] = []
    if p.kind in ("arithmetic", "word"):
        ops = p.data["ops"]
        slip_at = rng.randrange(len(ops)) if slip else None
        lines, first, fix = _chain_thinking(p, rng, slip_at)
        head = f"{p.data['name']} starts with {p.data['start']} {p.data['thing']}.\n" if p.kind == "word" else ""
        paras.append(head + "\n".join(lines) + f"\nSo the answer is {first}.")
        checks = [f"Let me double-check each step. {_chain_recheck(p)} The answer is {ans}.",
                  f"Alternatively, work backwards from {ans}: {_chain_backwards(p)} The answer is {ans}.",
                  f"Let me verify once more. {_chain_recheck(p)} So the answer is {ans}.",
                  f"Hmm, let me check the last step again. {_step_text(_run(p.data['start'], ops)[-2], *ops[-1])}. "
                  f"The answer is {ans}.",
                  f"Double-checking the whole chain: {_chain_recheck(p)} The answer is {ans}."]
        first_fix = (f"Wait, {fix} Redo from there. {_chain_recheck(p)} The answer is {ans}." if slip else None)
    elif p.kind == "equation":
        a, b, sign, c = p.data["a"], p.data["b"], p.data["sign"], p.data["c"]
        inv, moved = ("subtract", c - b) if sign == "+" else ("add", c + b)
        x = int(ans)
        moved_shown = _slip(rng, moved) if slip else moved
        x_shown = moved_shown // a if moved_shown % a == 0 else f"{moved_shown}/{a}"
        paras.append(f"{inv.capitalize()} {b} on both sides: {a}x = {moved_shown}.\n"
                     f"Divide by {a}: x = {x_shown}.\nSo the answer is {x_shown}.")
        lhs = f"{a} × {x} {sign} {b} = {a * x} {sign} {b} = {c}"
        checks = [f"Let me double-check by substituting x = {x}: {lhs}. That matches, so the answer is {ans}.",
                  f"Alternatively, solve it again: {a}x = {moved}, and {moved} ÷ {a} = {x}. The answer is {ans}.",
                  f"Let me verify once more. {lhs}. The answer is {ans}.",
                  f"Hmm, is {moved} ÷ {a} really {x}? {a} × {x} = {a * x}. Yes. The answer is {ans}.",
                  f"Double-checking: {a}x {sign} {b} with x = {x} gives {c}. The answer is {ans}."]
        first_fix = (f"Wait, {c} {'-' if sign == '+' else '+'} {b} is {moved}, not {moved_shown}. So {a}x = {moved} "
                     f"and x = {x}. The answer is {ans}." if slip else None)
    elif p.kind == "order":
        nums, k, high = p.data["nums"], p.data["k"], p.data["high"]
        ordered = sorted(nums, reverse=high)
        word = (_RANK_HI if high else _RANK)[k]
        how = "largest to smallest" if high else "smallest to largest"
        shown = list(ordered)
        if slip:
            j = min(k - 1, len(shown) - 2)
            shown[j], shown[j + 1] = shown[j + 1], shown[j]
        paras.append(f"Sort from {how}: {', '.join(map(str, shown))}.\n"
                     f"The {word} is number {k} in this list: {shown[k - 1]}.\nSo the answer is {shown[k - 1]}.")
        rel = " > ".join(map(str, ordered)) if high else " < ".join(map(str, ordered))
        checks = [f"Let me double-check the order: {rel}. Number {k} is {ans}. The answer is {ans}.",
                  f"Alternatively, count how many numbers are {'larger' if high else 'smaller'} than {ans}: "
                  f"{k - 1}. So it is the {word}. The answer is {ans}.",
                  f"Let me verify once more. Sorted: {', '.join(map(str, ordered))}. The answer is {ans}.",
                  f"Hmm, the numbers were {', '.join(map(str, nums))}. Sorted: {', '.join(map(str, ordered))}. "
                  f"The answer is {ans}.",
                  f"Double-checking: {rel}. The {word} is {ans}. The answer is {ans}."]
        first_fix = (f"Wait, the order is wrong: {rel}. The {word} is {ans}. The answer is {ans}." if slip else None)
    else:  # pragma: no cover - KINDS is closed
        raise UsageError(f"unknown kind {p.kind}")
    rng.shuffle(checks)
    reflections = ([first_fix] if first_fix else []) + checks
    paras += reflections[:n_reflect]
    return f"{THINK_OPEN}\n" + "\n\n".join(paras) + f"\n{THINK_CLOSE}\nThe answer is {ans}."


# --- reading answers ------------------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"answer is:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+|/\d+)?)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str, fallback_last_number: bool = False) -> str | None:
    """The last ``answer is N`` number in ``text`` (commas dropped, ``12.0`` -> ``12``), or None.

    With ``fallback_last_number`` a text without the phrase gives its last number (GSM8K-style replies).
    This is TrimR's rule-based verifier and the benchmarks' exact-match reader.
    """
    found = _ANSWER_RE.findall(text)
    if not found and fallback_last_number:
        found = _NUMBER_RE.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "").rstrip(".")
    if "/" in s:
        return s                   # a fraction (a slip in an equation) is never an integer answer
    try:
        f = float(s)
    except ValueError:
        return None
    return str(int(f)) if f == int(f) else s


def final_answer(reply: str) -> str | None:
    """The answer of a reply: read after ``</think>`` when the reply thinks, else from the whole reply.

    A reply whose thinking never closed (cut by the token cap) has no answer (None)."""
    if THINK_OPEN in reply and THINK_CLOSE not in reply:
        return None
    tail = reply.rsplit(THINK_CLOSE, 1)[-1] if THINK_CLOSE in reply else reply
    return extract_answer(tail, fallback_last_number=True)


def is_correct(reply: str, p: Problem) -> bool:
    """Exact match of the reply's final answer with the problem's."""
    return final_answer(reply) == p.answer


#: The System-2 model's chat template: SmolLM2's ChatML, and earlier assistant turns lose their thinking
#: (``<think>`` ... ``</think>``) so a conversation carries answers only, as reasoning models' templates do.
SYSTEM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
