"""Text classifiers on a causal LM, split into lower and top layers for parameter smoothing.

A classifier reads the model's last-layer hidden state at the last token of a task prompt
(``"Review: {text}\\nSentiment:"`` for SST-2) and maps it to class logits with a linear head:

- a **trained head** (``classifier/head.safetensors`` + ``classifier/classifier.json`` in a checkpoint directory,
  written by :mod:`converters.classifier`): ``logits = W h + b``;
- a **prompted** classifier (no training): the head is the LM head's rows of the label words
  (``" negative"``, ``" positive"``), so the softmax over the classes is the label words' likelihood
  renormalized over the labels; zero-shot, or few-shot with demonstrations before the prompt.

The forward is split at layer ``n_layers - H`` so that FRS's parameter smoothing (:mod:`edgerun.robustness.frs`)
can run the shared lower layers once and only the top ``H`` layers per noisy copy
(:meth:`TextClassifier.lower`, :meth:`TextClassifier.upper`). Sequences are right-padded, so the causal
mask alone keeps real tokens from seeing padding and every sequence gets the positions 0..T-1 it gets
alone. Llama-architecture checkpoints only (the default model); weights are read from safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from edgerun.errors import BackendError, ModelFileError, UsageError
from edgerun.formats import safetensors as st_format

# in a sub-directory, so that readers of the checkpoint's *.safetensors weights (export, merge) do not see the head
HEAD_FILE = "classifier/head.safetensors"
HEAD_META = "classifier/classifier.json"
MAX_TOKENS = 512        # prompt tokens a classifier input may take; longer texts are cut at a word boundary


@dataclass(frozen=True)
class Task:
    """A classification task: its label names, prompt template and label words (prompted classifier)."""

    name: str
    labels: tuple[str, ...]
    template: str
    label_words: tuple[str, ...]

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)


TASKS = {"sst2": Task("sst2", ("negative", "positive"), "Review: {text}\nSentiment:", (" negative", " positive"))}


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        UsageError: an unknown task (the message lists the known ones).
    """
    if name not in TASKS:
        raise UsageError(f"unknown task '{name}'; known: {', '.join(TASKS)}")
    return TASKS[name]


def has_head(path: str | Path, task: str) -> bool:
    """Whether ``path`` is a checkpoint directory with a trained classifier head for ``task``."""
    meta = Path(path) / HEAD_META
    if not meta.is_file() or not (Path(path) / HEAD_FILE).is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("task") == task
    except (OSError, ValueError):
        return False


class TextClassifier:
    """A causal LM with a linear class head on the last token's final hidden state.

    Build it with :meth:`load` (trained head) or :meth:`prompted` (label-word head).

    Attributes:
        task: the :class:`Task`. n_layers: decoder layers of the model. kind: ``"head"`` or ``"prompted"``.
        head_weight: float32 ``[n_classes, hidden]``; head_bias: float32 ``[n_classes]``.
        prefix: text put before every prompt (few-shot demonstrations), else ``""``.
    """

    def __init__(self, model, tokenizer, task: Task, head_weight: torch.Tensor, head_bias: torch.Tensor,
                 kind: str, path: Path, prefix: str = "", max_tokens: int = MAX_TOKENS, meta: dict | None = None):
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.kind, self.path, self.prefix, self.max_tokens = kind, Path(path), prefix, max_tokens
        self.meta = meta or {}
        self.dtype = next(model.parameters()).dtype
        self.head_weight = head_weight.to(torch.float32)
        self.head_bias = head_bias.to(torch.float32)
        self.layers = model.model.layers
        self.n_layers = len(self.layers)

    # --- construction ---

    @staticmethod
    def _load_model(path: Path, dtype: str, threads: int | None):
        from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers
        from transformers.utils import logging as hf_logging  # heavy: as above

        st_format.checkpoint_files(path)
        cfg = st_format.read_config(path)
        if cfg.get("model_type") != "llama":
            raise UsageError(f"{path}: certification supports Llama-architecture models, not {cfg.get('model_type')}")
        if dtype not in ("float32", "bfloat16"):
            raise UsageError(f"dtype must be float32 or bfloat16, not {dtype}")
        if threads:
            torch.set_num_threads(int(threads))
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise BackendError(f"transformers could not load {path}: {e}") from None
        model.eval()
        model.requires_grad_(False)
        return model, tokenizer

    @classmethod
    def load(cls, path: str | Path, task: str = "sst2", dtype: str = "bfloat16",
             threads: int | None = None) -> "TextClassifier":
        """A checkpoint directory with a trained head for ``task`` (written by ``converters.classifier``).

        Args:
            path: checkpoint directory (config.json, model safetensors, tokenizer, classifier/classifier.json
                and classifier/head.safetensors). dtype: ``"bfloat16"`` (default: about 3x faster on CPUs with
                AVX512-BF16) or ``"float32"``. threads: torch intra-op threads (default: torch's).

        Raises:
            UsageError: an unknown task, a directory without a head for ``task``, a non-Llama model.
            ModelFileError: missing or corrupted files. BackendError: transformers cannot build the model.
        """
        from safetensors.torch import load_file  # heavy: safetensors' torch bindings

        spec = get_task(task)
        path = Path(path)
        if not path.is_dir():
            raise ModelFileError(f"{path} is not a classifier checkpoint directory")
        if not has_head(path, task):
            raise UsageError(f"{path} has no classifier head for task '{task}'; train one "
                             f"(converters.classifier.train_classifier) or use the prompted classifier (--prompted)")
        meta = json.loads((path / HEAD_META).read_text(encoding="utf-8"))
        try:
            head = load_file(str(path / HEAD_FILE))
            weight, bias = head["weight"], head["bias"]
        except Exception as e:  # safetensors raises its own error types for corrupted files
            raise ModelFileError(f"{path / HEAD_FILE} is unreadable ({e})") from None
        model, tokenizer = cls._load_model(path, dtype, threads)
        hidden = model.config.hidden_size
        if tuple(weight.shape) != (len(spec.labels), hidden) or tuple(bias.shape) != (len(spec.labels),):
            raise ModelFileError(f"{path / HEAD_FILE}: head of shape {tuple(weight.shape)}, expected "
                                 f"({len(spec.labels)}, {hidden})")
        return cls(model, tokenizer, spec, weight, bias, "head", path, meta=meta)

    @classmethod
    def prompted(cls, path: str | Path, task: str = "sst2", shots: Sequence[tuple[str, int]] = (),
                 dtype: str = "bfloat16", threads: int | None = None) -> "TextClassifier":
        """The no-training classifier: label-word log-likelihood after the task prompt.

        Class scores are the LM's next-token logits of the label words' first tokens (" negative",
        " positive"), so the class distribution is their likelihood renormalized over the labels.
        ``shots``: ``(text, label)`` demonstrations put before the prompt (few-shot), else zero-shot.

        Raises:
            UsageError: an unknown task; label words that share their first token.
            ModelFileError, BackendError: as :meth:`load`.
        """
        spec = get_task(task)
        path = Path(path)
        model, tokenizer = cls._load_model(path, dtype, threads)
        ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in spec.label_words]
        if len(set(ids)) != len(ids):
            raise UsageError(f"the label words {spec.label_words} share their first token in this tokenizer")
        weight = model.get_output_embeddings().weight[ids].detach().clone()
        prefix = "".join(spec.prompt(t) + spec.label_words[y] + "\n\n" for t, y in shots)
        meta = {"task": task, "kind": "prompted", "shots": len(shots)}
        return cls(model, tokenizer, spec, weight, torch.zeros(len(ids)), "prompted", path, prefix=prefix, meta=meta)

    # --- inputs ---

    def fit_words(self, words: list[str]) -> tuple[list[str], bool]:
        """The longest prefix of ``words`` whose prompt fits :attr:`max_tokens`, and whether it was cut."""
        if len(self.encode([words])[0]) <= self.max_tokens:
            return words, False
        lo, hi = 0, len(words)
        while lo < hi:  # binary search on the number of words kept
            mid = (lo + hi + 1) // 2
            if len(self.encode([words[:mid]])[0]) <= self.max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return words[:lo], True

    def encode(self, inputs: Sequence[Sequence[str] | str]) -> list[list[int]]:
        """Token ids of each input's prompt (an input is a text or its list of words, joined by spaces)."""
        texts = [x if isinstance(x, str) else " ".join(x) for x in inputs]
        prompts = [self.prefix + self.task.prompt(t) for t in texts]
        return [list(ids) for ids in self.tokenizer(prompts, add_special_tokens=True).input_ids]

    # --- the split forward ---

    def _run_layers(self, hidden: torch.Tensor, layers) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask  # heavy: transformers

        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=None,
                                  cache=None, position_ids=positions)
        rope = self.model.model.rotary_emb(hidden, position_ids=positions)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        return hidden

    @torch.inference_mode()
    def lower(self, seqs: Sequence[Sequence[int]], n_lower: int, batch: int = 32) -> list[torch.Tensor]:
        """Hidden states after the first ``n_lower`` decoder layers, one ``[T_i, hidden]`` tensor per sequence.

        Sequences are grouped by length (right-padded within a group) and run ``batch`` at a time.
        """
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            width = len(seqs[idx[-1]])
            ids = torch.full((len(idx), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
            hidden = self._run_layers(self.model.model.embed_tokens(ids), self.layers[:n_lower])
            for row, i in enumerate(idx):
                out[i] = hidden[row, :len(seqs[i])].clone()
        return out

    @torch.inference_mode()
    def upper(self, hidden: Sequence[torch.Tensor], layers=None, n_lower: int | None = None,
              batch: int = 32) -> torch.Tensor:
        """Class logits (float32 ``[N, n_classes]``) from lower-layer hidden states ``[T_i, hidden]``.

        ``layers``: the decoder layers to run on top (default: the model's own layers from ``n_lower``
        on; FRS passes a noisy copy of them). Then the final norm, the last real token, the head.
        """
        layers = self.layers[n_lower:] if layers is None else layers
        logits = torch.empty(len(hidden), self.head_weight.shape[0])
        order = sorted(range(len(hidden)), key=lambda i: hidden[i].shape[0])
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            width = hidden[idx[-1]].shape[0]
            h = torch.zeros(len(idx), width, hidden[idx[0]].shape[1], dtype=self.dtype)
            for row, i in enumerate(idx):
                h[row, :hidden[i].shape[0]] = hidden[i]
            h = self.model.model.norm(self._run_layers(h, layers))
            last = torch.stack([h[row, hidden[i].shape[0] - 1] for row, i in enumerate(idx)]).float()
            logits[idx] = last @ self.head_weight.T + self.head_bias
        return logits

    def features(self, inputs: Sequence[Sequence[str] | str], batch: int = 32) -> torch.Tensor:
        """Final-norm hidden state at the last prompt token, float32 ``[N, hidden]`` (what the head reads)."""
        seqs = self.encode(inputs)
        saved = (self.head_weight, self.head_bias)
        hidden_size = self.model.config.hidden_size
        try:  # an identity head returns the features themselves
            self.head_weight, self.head_bias = torch.eye(hidden_size), torch.zeros(hidden_size)
            return self.upper(self.lower(seqs, 0, batch), n_lower=0, batch=batch)
        finally:
            self.head_weight, self.head_bias = saved

    def logits(self, inputs: Sequence[Sequence[str] | str], batch: int = 32) -> torch.Tensor:
        """Class logits, float32 ``[N, n_classes]``, of texts (or word lists) with the unperturbed model."""
        seqs = self.encode(inputs)
        return self.upper(self.lower(seqs, self.n_layers, batch), n_lower=self.n_layers, batch=batch)

    def probs(self, inputs: Sequence[Sequence[str] | str], batch: int = 32) -> torch.Tensor:
        """Class probabilities, float32 ``[N, n_classes]`` (softmax of :meth:`logits`)."""
        return torch.softmax(self.logits(inputs, batch), dim=-1)

    def predict(self, inputs: Sequence[Sequence[str] | str], batch: int = 32) -> list[int]:
        """Predicted class index of each input with the unperturbed model."""
        return self.logits(inputs, batch).argmax(-1).tolist()
