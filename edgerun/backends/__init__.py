"""Engines behind one interface (:class:`edgerun.backends.base.Backend`)."""

from __future__ import annotations

from pathlib import Path

from edgerun.backends.base import Backend, GenerationStats, MemoryInfo, SamplingParams, physical_cores
from edgerun.errors import UsageError

BACKENDS = ("llama.cpp", "onnx", "torch", "mixpe")


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

    Raises:
        UsageError: an unknown engine name.
        ModelFileError, BackendError: as raised by the engine.
    """
    if name in ("llama.cpp", "llamacpp", "gguf"):
        from edgerun.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(path, **options)
    if name in ("onnx", "onnxruntime-genai"):
        from edgerun.backends.onnx import OnnxBackend

        options.pop("info", None)
        return OnnxBackend(path, **options)
    if name == "mixpe":
        from edgerun.backends.mixpe import open_mixpe

        options.pop("info", None)
        return open_mixpe(path, **options)
    if name == "torch":
        from edgerun.backends.torch import TorchBackend

        options.pop("info", None)
        return TorchBackend(path, **options)
    raise UsageError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}")


__all__ = ["detect_backend", "Backend", "GenerationStats", "MemoryInfo", "SamplingParams", "open_backend", "physical_cores", "BACKENDS"]
