"""The one token-window splitter (edgerun.data.token_windows) and its BOS rule, for every consumer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgerun import data
from edgerun.calibration import all_windows, calibration_windows
from edgerun.errors import UsageError


class WordTokenizer:
    """A transformers-like tokenizer: one id per word (its length); BOS 0 added with special tokens if ``adds_bos``."""

    bos_token_id = 0

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [len(w) for w in text.split()]
        return SimpleNamespace(input_ids=([0] if add_special_tokens and self.adds_bos else []) + ids)


class WordBackend:
    """An edgerun-backend-like tokenizer: ``tokenize`` adds nothing, ``encode_prompt`` adds BOS 0 if ``adds_bos``."""

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def tokenize(self, text):
        return [len(w) for w in text.split()]

    def encode_prompt(self, text):
        return ([0] if self.adds_bos else []) + self.tokenize(text)


@pytest.fixture(autouse=True)
def seven_words(monkeypatch):
    monkeypatch.setattr(data, "text", lambda dataset, split: "a bb ccc dddd eeeee ffffff ggggggg")


@pytest.mark.parametrize("tokenizer", [WordTokenizer(False), WordBackend(False)])
def test_windows_are_consecutive_whole_windows_without_bos_when_the_model_adds_none(tokenizer):
    assert data.token_windows(tokenizer, "wiki", "heldout", 3, 2) == [[1, 2, 3], [4, 5, 6]]
    assert data.token_windows(tokenizer, "wiki", "heldout", 3) == [[1, 2, 3], [4, 5, 6]]   # the partial tail is dropped


@pytest.mark.parametrize("tokenizer", [WordTokenizer(True), WordBackend(True)])
def test_each_window_starts_with_bos_when_the_model_adds_one(tokenizer):
    assert data.token_windows(tokenizer, "wiki", "calibration", 3, 2) == [[0, 1, 2, 3], [0, 4, 5, 6]]


def test_calibration_windows_are_the_same_windows_as_tensors():
    tok = WordTokenizer(True)
    assert [w.tolist() for w in calibration_windows(tok, 2, 3)] == [[[0, 1, 2, 3]], [[0, 4, 5, 6]]]
    assert [w.tolist() for w in all_windows(tok, 2)] == [[[0, 1, 2]], [[0, 3, 4]], [[0, 5, 6]]]


def test_too_little_text_is_a_usage_error():
    with pytest.raises(UsageError, match="7 tokens: 2 windows of 3, fewer than the 3 asked for"):
        data.token_windows(WordTokenizer(False), "wiki", "heldout", 3, 3)
    with pytest.raises(UsageError, match="fewer than the 1 asked for"):
        data.token_windows(WordTokenizer(False), "wiki", "heldout", 8)
