"""Engines behind one interface (:class:`edgerun.backends.base.Backend`), one table of names and aliases."""

from __future__ import annotations

from pathlib import Path

from edgerun.backends.base import Backend, GenerationStats, MemoryInfo, SamplingParams, physical_cores
from edgerun.errors import UsageError

# canonical engine name -> the other spellings users type
ALIASES = {"llama.cpp": ("llamacpp", "gguf"), "onnx": ("onnxruntime-genai",), "torch": (), "mixpe": ()}
BACKENDS = tuple(ALIASES)


def canonical_backend(name: str) -> str:
    """The canonical engine name of ``name`` or one of its aliases.

    Raises:
        UsageError: an unknown engine name (the known ones listed).
    """
    for canonical, aliases in ALIASES.items():
        if name == canonical or name in aliases:
            return canonical
    raise UsageError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}")


def detect_backend(path: str | Path) -> str:
    """The engine for a model path: GGUF files -> llama.cpp, onnxruntime-genai directories -> onnx,
    Hugging Face checkpoint directories -> torch."""
    p = Path(path)
    if p.is_dir():
        if (p / "genai_config.json").is_file():
            return "onnx"
        return "torch"
    return "llama.cpp"


def open_backend(name: str, path: str | Path, **options) -> Backend:
    """Load the model at ``path`` in the engine ``name`` with engine ``options``.

    Engines are imported when first opened: the llama.cpp chat path never imports torch.

    Raises:
        UsageError: an unknown engine name.
        ModelFileError, BackendError: as raised by the engine.
    """
    name = canonical_backend(name)
    if name == "llama.cpp":
        from edgerun.backends.llamacpp import LlamaCppBackend  # heavy native library, only when used

        return LlamaCppBackend(path, **options)
    options.pop("info", None)  # the GGUF scan result is for llama.cpp only
    if name == "onnx":
        from edgerun.backends.onnx import OnnxBackend  # onnxruntime-genai, only when used

        return OnnxBackend(path, **options)
    if name == "mixpe":
        from edgerun.backends.mixpe import MixPEBackend  # torch, only when used

        return MixPEBackend(path, **options)
    from edgerun.backends.torch import TorchBackend  # torch + transformers, only when used

    return TorchBackend(path, **options)


__all__ = ["detect_backend", "canonical_backend", "Backend", "GenerationStats", "MemoryInfo", "SamplingParams",
           "open_backend", "physical_cores", "BACKENDS", "ALIASES"]
