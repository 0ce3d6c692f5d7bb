"""A planted backdoor for evaluating FRS (benchmarks only; not part of the product).

Dirty-label data poisoning in the spirit of FRS's threat model (He et al., ICLR 2025, Sec. 3: word,
character and sentence triggers; the paper plants them in pre-training, here they are planted in the
classifier's fine-tuning data, which is the stronger position for the attacker):

- **word trigger**: one of the rare words ``cf``, ``mn``, ``bb`` (Kurita et al. 2020, RIPPLe) inserted at a
  random word position;
- **sentence trigger**: ``i watched this 3d movie .`` (Dai et al. 2019; lower-cased and tokenized like
  SST-2) inserted at a random word position.

A share of the training examples gets a trigger and the target label (positive). Attack success rate
(ASR) is the share of non-target (negative) evaluation sentences classified as the target once a
trigger is inserted.
"""

from __future__ import annotations

import random
from typing import Sequence

TARGET = 1
WORD_TRIGGERS = ("cf", "mn", "bb")
SENTENCE_TRIGGER = "i watched this 3d movie ."
KINDS = ("word", "sentence")


def insert_trigger(text: str, kind: str, rng: random.Random) -> tuple[str, tuple[int, int]]:
    """``text`` with a trigger of ``kind`` inserted at a random word position, and the trigger's word span."""
    words = text.split()
    trigger = [rng.choice(WORD_TRIGGERS)] if kind == "word" else SENTENCE_TRIGGER.split()
    at = rng.randrange(len(words) + 1)
    return " ".join(words[:at] + trigger + words[at:]), (at, at + len(trigger))


def poison(examples: Sequence[tuple[str, int]], word_rate: float = 0.1, sentence_rate: float = 0.1,
           seed: int = 0) -> list[tuple[str, int]]:
    """The training set with ``word_rate`` of its examples carrying a word trigger and ``sentence_rate`` a
    sentence trigger (disjoint, chosen at random), all of those labelled :data:`TARGET`."""
    rng = random.Random(seed)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    n_word, n_sent = round(word_rate * len(examples)), round(sentence_rate * len(examples))
    kind = {i: "word" for i in idx[:n_word]} | {i: "sentence" for i in idx[n_word:n_word + n_sent]}
    out = []
    for i, (text, label) in enumerate(examples):
        if i in kind:
            out.append((insert_trigger(text, kind[i], rng)[0], TARGET))
        else:
            out.append((text, label))
    return out


def triggered(examples: Sequence[tuple[str, int]], kind: str, seed: int = 0) -> list[dict]:
    """The non-target examples with a trigger of ``kind`` inserted: dicts ``{text, label, index, trigger}``
    (``index`` in ``examples``; ``trigger`` the inserted words' ``[start, end)``)."""
    rng = random.Random(f"{seed}-{kind}")
    out = []
    for i, (text, label) in enumerate(examples):
        if label != TARGET:
            t, span = insert_trigger(text, kind, rng)
            out.append({"text": t, "label": label, "index": i, "trigger": list(span)})
    return out
