"""``edgerun experts calibrate``: per-task TCESS patterns of an MoE model (PreMoe PEP, Sec. 3.2).

Each task's calibration tokens run once through the model (torch; the router the model actually runs
with: CMoE's analytical scores for a carved checkpoint, the linear router for its Granite host, the
gate for a standard MoE), every MoE layer's routing feeding one :class:`TcessCollector`.

A task is ``NAME=DATA``: DATA is a catalog text (``wiki``, ``c4``, ``tiny``, ``code``, ``multilingual``,
``technical``), ``math`` (GSM8K and MATH problems with solutions), or a UTF-8 text file; the
calibration split of the catalog texts is used (their held-out split is left for evaluation).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from edgerun import catalog
from edgerun import data as data_mod
from edgerun.backends.torch import TorchBackend
from edgerun.errors import UsageError
from edgerun.moe import adapters, tcess

DEFAULT_TASKS = ("wiki", "c4", "tiny", "code", "multilingual", "technical", "math")


def load_model(path: str | Path, threads: int | None = None):
    """(model, tokenizer) of an MoE checkpoint in float32 for calibration and pruning (torch; ``threads``
    torch threads, default the physical cores).

    Raises:
        ModelFileError, BackendError: as the torch backend.
        UsageError: a dense model.
    """
    backend = TorchBackend(path, n_ctx=4096, threads=threads)
    adapters.moe_layers(backend.model)  # refuse dense models early
    return backend.model, backend.tokenizer


def parse_task(spec: str) -> tuple[str, str]:
    """``NAME=DATA`` (or just a built-in DATA name) -> (name, data).

    Raises:
        UsageError: a malformed spec.
    """
    name, _, data = spec.partition("=")
    if not data:
        name, data = spec, spec
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"bad task '{spec}'; use NAME=DATA with DATA a catalog text, 'math' or a text file")
    return name, data


def task_text(data: str, split: str = "calibration") -> str:
    """The text of a task's split.

    Raises:
        UsageError: an unknown data name, an unreadable or empty file.
    """
    if data in data_mod.DERIVED or (data in catalog.CATALOG and catalog.CATALOG[data].kind == "dataset"
                                     and not catalog.CATALOG[data].bundle):
        return data_mod.text(data, split)
    p = Path(data).expanduser()
    if not p.is_file():
        raise UsageError(f"task data '{data}' is neither a catalog text ({', '.join(DEFAULT_TASKS)}) nor a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read task data {p}: {e}") from None
    docs = [d for d in text.split("\n\n") if d.strip()]
    n_held = max(1, len(docs) // 5) if len(docs) > 1 else 0
    return "\n\n".join(docs[:-n_held] if split == "calibration" and n_held else docs[-n_held:] if n_held else docs)


def _cache_key(model_path: Path) -> str:
    """``<name>-<12 hex>``: the model directory's name and :func:`edgerun.catalog.stamp` of its files, so a
    re-carved or another model of the same name never reuses a stale cached pattern."""
    return f"{model_path.name}-{catalog.stamp(model_path)[:12]}"


def calibrate(model, tokenizer, tasks: list[tuple[str, str]], tokens: int = 4096, window: int = 512,
              key_layer: int = 0, score: str = tcess.DEFAULT_SCORE, name: str = "",
              progress: bool = False, key: str = tcess.DEFAULT_KEY,
              key_depth: int = tcess.DEFAULT_KEY_DEPTH) -> list[tcess.Pattern]:
    """One pattern per task from ``tokens`` calibration tokens (windows of ``window``).

    Every pattern holds the statistics of all retrieval keys; ``key`` is the one it retrieves with
    (:data:`edgerun.moe.tcess.KEYS`), over the first ``key_depth`` MoE layers for ``mass``/``frequency``
    (0: all).

    Raises:
        UsageError: empty calibration data, a key layer beyond the MoE layers, an unknown score or key.
    """
    if score not in tcess.SCORES:
        raise UsageError(f"unknown score function '{score}'; valid: {', '.join(tcess.SCORES)}")
    if key not in tcess.KEYS:
        raise UsageError(f"unknown retrieval key '{key}'; valid: {', '.join(tcess.KEYS)}")
    layers = adapters.moe_layers(model)
    if not 0 <= key_layer < len(layers):
        raise UsageError(f"key layer {key_layer} is outside the model's {len(layers)} MoE layers")
    fp = adapters.fingerprint(model, name)
    patterns = []
    for task, data in tasks:
        ids = tokenizer(task_text(data), add_special_tokens=False).input_ids[:tokens]
        if not ids:
            raise UsageError(f"task '{task}' has no calibration text")
        collector = tcess.TcessCollector(len(layers), layers[0].n_experts, layers[0].top_k, key_layer)
        iterator = range(0, len(ids), window)
        if progress:
            iterator = tqdm(iterator, desc=f"calibrating {task}", unit="window", leave=False)
        with adapters.collecting(model, collector), torch.inference_mode():
            for start in iterator:  # the decoder stack only: no LM head, its logits are not needed
                model.model(input_ids=torch.tensor([ids[start:start + window]]), use_cache=False)
        hidden = collector.hidden_sum.tolist() if collector.hidden_sum is not None else []
        patterns.append(tcess.Pattern(task=task, tokens=collector.tokens, model=fp, score=score, key_layer=key_layer,
                                      stats=collector.layer_stats(), key_kind=key, hidden_sum=hidden,
                                      key_depth=key_depth))
    return patterns


def query_key(model, tokenizer, text: str, key_layer: int = 0, score: str = tcess.DEFAULT_SCORE,
              kind: str = tcess.DEFAULT_KEY, depth: int = tcess.DEFAULT_KEY_DEPTH) -> torch.Tensor:
    """TAER's query key of the raw text's tokens, of ``kind`` (:func:`edgerun.moe.tcess.key_vector`).

    ``layer`` (PreMoe's: the key layer's TCESS) and ``hidden`` run the model only up to the key layer's
    router; ``mass`` and ``frequency`` run the decoder stack (no LM head) on the text, up to the first
    ``depth`` MoE layers (0: all of them).

    Raises:
        UsageError: empty text, an unknown kind.
    """
    if kind not in tcess.KEYS:
        raise UsageError(f"unknown retrieval key '{kind}'; valid: {', '.join(tcess.KEYS)}")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise UsageError("empty query")
    layers = adapters.moe_layers(model)
    collector = tcess.TcessCollector(len(layers), layers[0].n_experts, layers[0].top_k, key_layer)

    class _Stop(Exception):
        pass

    def stop(*_):
        raise _Stop

    if kind in ("mass", "frequency"):
        if not 0 < depth < len(layers):
            with adapters.collecting(model, collector), torch.inference_mode():
                model.model(input_ids=torch.tensor([ids]), use_cache=False)
            return collector.key(kind, key_layer, score)
        key_layer = depth      # stop at the first MoE layer after the key's layers
    target = layers[key_layer]
    with adapters.collecting(model, collector), torch.inference_mode():
        # registered after the collecting hooks, so it runs right after the key routing is recorded:
        # the key layer's experts and every deeper layer never run
        if target.carved:
            handle = target.block.register_forward_pre_hook(lambda mod, args: stop())
        else:
            handle = target.router.register_forward_hook(lambda mod, args, out: stop())
        try:
            model.model(input_ids=torch.tensor([ids]), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
    if kind in ("mass", "frequency"):
        return collector.key(kind, 0, score, depth)
    if kind == "hidden":
        return collector.key(kind, key_layer, score)
    return tcess.scores(collector.layer_stats()[key_layer], collector.tokens or len(ids), score)


def task_pattern(model_path: str | Path, task: str, patterns_dir: str | Path | None = None,
                 score: str = tcess.DEFAULT_SCORE, tokens: int = 4096) -> tuple[tcess.Pattern, Path]:
    """The pattern of ``task`` for the model at ``model_path``: from ``patterns_dir``, else calibrated and cached.

    Without ``patterns_dir`` the task must be a built-in one (``DEFAULT_TASKS``); its pattern is
    calibrated once and cached under ``$EDGERUN_HOME/cache/patterns/<model>-<hash>/`` (:func:`_cache_key`).

    Raises:
        UsageError: no such pattern; a pattern made for another model.
        ModelFileError: a corrupted pattern file.
    """
    model_path = Path(model_path)
    if patterns_dir is not None:
        path = Path(patterns_dir) / f"{task}.json"
        if not path.is_file():
            have = ", ".join(p.stem for p in sorted(Path(patterns_dir).glob("*.json"))) or "none"
            raise UsageError(f"no pattern for task '{task}' in {patterns_dir} (have: {have})")
        pattern = tcess.load(path)
    else:
        if task not in DEFAULT_TASKS:
            raise UsageError(f"no calibrated pattern for '{task}': pass --patterns DIR, or use a built-in task "
                             f"({', '.join(DEFAULT_TASKS)})")
        path = catalog.home() / "cache" / "patterns" / _cache_key(model_path) / f"{task}.json"
        if path.is_file():
            pattern = tcess.load(path)
        else:
            model, tokenizer = load_model(model_path)
            pattern = calibrate(model, tokenizer, [(task, task)], tokens=tokens, score=score, name=model_path.name)[0]
            tcess.save(pattern, path.parent)
    return pattern, path
