"""Export sources: a catalog name, a GGUF file or a Hugging Face checkpoint directory, as an HF checkpoint.

A GGUF source is dequantized once, with transformers' GGUF loader, into a float32 safetensors
checkpoint cached under ``$EDGERUN_HOME/sources/``; that checkpoint is the full-precision source of
every export pass. It is only as good as the GGUF it came from: a source materialized from a Q4_1
file is "Q4_1-dequantized", and manifests and results say so.

Besides ``config.json``, the weights and the tokenizer files, a materialized checkpoint holds:

- ``edgerun_source.json``: where it came from (file, sha256, GGUF file type, label);
- ``tokenizer.gguf.json``: the GGUF's ``tokenizer.*`` metadata (vocabulary, scores, token types,
  merges, special ids, chat template) with their GGUF value types, so that a GGUF written back
  from this checkpoint tokenizes exactly like the original.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader, GGUFValueType
from gguf.constants import LlamaFileType

from edgerun import catalog
from edgerun.atomic import atomic_dir
from edgerun.errors import ModelFileError, UsageError
from edgerun.formats import gguf as gguf_format
from edgerun.formats import safetensors as st_format

SOURCE_META = "edgerun_source.json"
TOKENIZER_SIDECAR = "tokenizer.gguf.json"
# the files a derived checkpoint (carved, quantized, merged...) takes over from its parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", TOKENIZER_SIDECAR)
# GGUF architecture -> HF model_type, for the architectures the export flow supports
SUPPORTED_ARCHITECTURES = {"llama": "llama", "gemma3": "gemma3_text"}
# HF model_type -> GGUF architecture, for HF checkpoints (a carved MoE is hosted as Granite's shared-expert MoE)
HF_ARCHITECTURES = {"llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3", "granitemoeshared": "granitemoe"}


@dataclass(frozen=True)
class Source:
    """A full-precision HF checkpoint ready for the export passes.

    Attributes:
        path: checkpoint directory (config.json, *.safetensors, tokenizer files).
        label: what it is, e.g. ``"Q4_1-dequantized smollm2-135m-instruct"``.
        architecture: GGUF architecture name (``llama``, ``gemma3``).
        origin: the file or directory the user named.
        origin_sha256: sha256 of the origin file (GGUF sources), else None.
        origin_format: ``"gguf"`` or ``"hf"``.
        origin_file_type: GGUF file type of the origin, e.g. ``"Q4_1"`` (GGUF sources).
    """

    path: Path
    label: str
    architecture: str
    origin: str
    origin_sha256: str | None
    origin_format: str
    origin_file_type: str | None

    def as_dict(self) -> dict:
        return {"path": str(self.path), "label": self.label, "architecture": self.architecture,
                "origin": self.origin, "origin_sha256": self.origin_sha256, "origin_format": self.origin_format,
                "origin_file_type": self.origin_file_type}


def copy_tokenizer(src: Path, dst: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> None:
    """Copy the tokenizer, chat template and generation files ``names`` that ``src`` has into ``dst``."""
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def _file_type_name(file_type: int | None) -> str | None:
    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        return None


def architecture_of(config: dict) -> str:
    """GGUF architecture name of an HF ``config.json``.

    Raises:
        UsageError: an architecture the export flow does not support (the message lists those it does).
    """
    model_type = config.get("model_type", "?")
    if model_type in HF_ARCHITECTURES:
        return HF_ARCHITECTURES[model_type]
    raise UsageError(f"unsupported architecture {model_type}; supported: {', '.join(HF_ARCHITECTURES)}")


def open_source(src: str | Path, progress: bool = True) -> Source:
    """Resolve ``src`` (catalog name, ``.gguf`` path or HF checkpoint directory) to a :class:`Source`.

    Raises:
        UnknownModelError, ModelFileError: as for :func:`edgerun.catalog.resolve` and the validators.
        UsageError: an unsupported architecture.
    """
    name = str(src)
    path = catalog.resolve(name, progress=progress)
    if path.is_dir():
        if (path / SOURCE_META).is_file():
            return _load_meta(path)
        st_format.checkpoint_files(path)
        arch = architecture_of(st_format.read_config(path))
        return Source(path=path, label=path.name, architecture=arch, origin=str(path), origin_sha256=None,
                      origin_format="hf", origin_file_type=None)
    return materialize_gguf(path, label=name if name in catalog.CATALOG else path.stem, progress=progress)


def _load_meta(path: Path) -> Source:
    try:
        meta = json.loads((path / SOURCE_META).read_text(encoding="utf-8"))
        return Source(path=path, **{k: meta[k] for k in ("label", "architecture", "origin", "origin_sha256",
                                                          "origin_format", "origin_file_type")})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path / SOURCE_META} is unreadable ({e}); remove {path} and export again") from None


def materialize_gguf(gguf_path: Path, label: str, progress: bool = True) -> Source:
    """Dequantize a GGUF file into a cached float32 HF checkpoint (once per file content).

    Raises:
        ModelFileError: the GGUF is invalid.
        UsageError: its architecture is not supported by the export flow.
    """
    info = gguf_format.validate(gguf_path)
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise UsageError(f"unsupported architecture {info.architecture}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    sha = catalog.file_sha256(gguf_path)
    dest = catalog.home() / "sources" / f"{gguf_path.stem}-{sha[:12]}"
    if (dest / SOURCE_META).is_file():
        return _load_meta(dest)
    file_type = _file_type_name(info.metadata.get("general.file_type"))
    source_label = f"{file_type}-dequantized {label}" if file_type else f"dequantized {label}"
    with atomic_dir(dest, force=True) as tmp:
        _dequantize_with_transformers(gguf_path, tmp, progress)
        (tmp / TOKENIZER_SIDECAR).write_text(json.dumps(gguf_tokenizer_metadata(gguf_path)), encoding="utf-8")
        meta = {"label": source_label, "architecture": info.architecture, "origin": str(gguf_path),
                "origin_sha256": sha, "origin_format": "gguf", "origin_file_type": file_type}
        (tmp / SOURCE_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return _load_meta(dest)


def _dequantize_with_transformers(gguf_path: Path, out: Path, progress: bool) -> None:
    import torch  # heavy: torch + transformers only to dequantize a GGUF source (not for an HF directory)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: as torch
    from transformers.utils import logging as hf_logging  # heavy: as torch

    if not progress:
        hf_logging.disable_progress_bar()
    try:
        kwargs = dict(gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    finally:
        hf_logging.enable_progress_bar()
    # transformers marks a GGUF-loaded model as "quantized" even when it dequantized every weight,
    # and refuses to save it: copy the float32 weights into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = {k: v for k, v in model.state_dict().items()}
    if any(v.dtype != torch.float32 for v in state.values() if v.is_floating_point()):
        raise ModelFileError(f"transformers did not dequantize every tensor of {gguf_path}")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(state, strict=True)
    plain.generation_config = model.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def gguf_tokenizer_metadata(gguf_path: Path) -> dict:
    """Every ``tokenizer.*`` key of a GGUF file with its value and GGUF value types (JSON-serializable)."""
    reader = GGUFReader(gguf_path)
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        types = [GGUFValueType(t).name for t in field.types]
        value = field.contents()
        out[key] = {"types": types, "value": value}
    return out


def read_tokenizer_sidecar(checkpoint: Path) -> dict | None:
    """The ``tokenizer.gguf.json`` of a materialized checkpoint, or None for other checkpoints."""
    p = Path(checkpoint) / TOKENIZER_SIDECAR
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{p} is unreadable ({e}); remove the checkpoint and export again") from None
