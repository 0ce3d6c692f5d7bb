"""The manifest written next to every export: source, passes, output sha256 and size, effective BPW, tools, time.

Location: ``<file>.manifest.json`` beside an exported file, ``manifest.json`` inside an exported
directory. Written atomically, JSON (no pickles).

GGUF manifests also record what the file really holds (:func:`converters.gguf.type_record`):
``tied_embeddings``, ``tensor_types`` (tensor name -> ggml type), ``fallbacks`` (block linear weights
whose type is outside the requested family: count, share of linear parameters, types, names) and
``warning`` (set when more than half of the linear weights fell back); and ``vocab_padding``
(:func:`converters.gguf.vocab_padding`: placeholder tokens added for a padded vocabulary, or null).
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path

from edgerun.atomic import atomic_file
from edgerun.errors import ModelFileError

TOOLS = ("edgerun", "llama-cpp-python", "gguf", "transformers", "torch", "safetensors", "onnxruntime",
         "onnxruntime-genai", "numpy")


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the tools that can touch an export."""
    out = {}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def manifest_path(output: str | Path) -> Path:
    """Where the manifest of ``output`` lives."""
    output = Path(output)
    return output / "manifest.json" if output.is_dir() else output.with_name(output.name + ".manifest.json")


def write(output: str | Path, record: dict) -> Path:
    """Write ``record`` (plus tool versions and a UTC timestamp) as the manifest of ``output``."""
    record = dict(record)
    record.setdefault("created_utc", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    record.setdefault("tools", tool_versions())
    path = manifest_path(output)
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read(output: str | Path) -> dict:
    """The manifest of ``output``.

    Raises:
        ModelFileError: no manifest, or one that is not a JSON object (unreadable or corrupted).
    """
    path = manifest_path(output)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFileError(f"cannot read the manifest {path} ({type(e).__name__}); export again to rewrite it") from None
    if not isinstance(record, dict):
        raise ModelFileError(f"the manifest {path} is not a JSON object; export again to rewrite it")
    return record
