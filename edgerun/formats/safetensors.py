"""Validate safetensors files and Hugging Face checkpoint directories before anything loads them.

safetensors layout (huggingface/safetensors ``README``, "Format"): an 8-byte little-endian header
length N, N bytes of JSON mapping tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section that follows the header), and an optional ``__metadata__``
map of strings. Every extent is checked against the file size and the tensor's element count, so
a truncated or corrupted file gets a one-line error instead of a loader's stack trace.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from edgerun.errors import ModelFileError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class SafetensorsTensor:
    """One tensor entry: name, dtype (e.g. ``"F32"``), shape, byte extent in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def validate_file(path: str | Path) -> dict[str, SafetensorsTensor]:
    """Check a ``.safetensors`` file's header and extents; return its tensors by name.

    Raises:
        ModelFileError: missing, truncated or corrupted file, or an unknown dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no such file: {path}")
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    if size < 8:
        raise ModelFileError(f"{bad} ({size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise ModelFileError(f"{bad}: header length {n} does not fit the file of {size} bytes (truncated or corrupted)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"{bad}: corrupted header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{bad}: header is not a JSON object")
    data_size = size - 8 - n
    tensors: dict[str, SafetensorsTensor] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{bad}: malformed entry for tensor {name!r}") from None
        if not all(type(v) is int for v in (*shape, begin, end)):   # JSON floats, strings, bools
            raise ModelFileError(f"{bad}: tensor {name!r} has a shape or data offsets that are not integers")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise ModelFileError(f"{bad}: tensor {name!r} has unknown dtype {dtype!r}")
        numel = 1
        for d in shape:
            if d < 0:
                raise ModelFileError(f"{bad}: tensor {name!r} has a negative dimension")
            numel *= d
        if not (0 <= begin <= end <= data_size) or end - begin != numel * DTYPE_BYTES[dtype]:
            raise ModelFileError(f"{path} is truncated or corrupted: tensor {name!r} needs bytes {begin}..{end} "
                                 f"of a {data_size}-byte data section")
        tensors[name] = SafetensorsTensor(name, dtype, shape, int(begin), int(end))
    return tensors


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The ``*.safetensors`` files of a Hugging Face checkpoint directory, validated.

    Raises:
        ModelFileError: not a directory, no ``config.json``, no safetensors weights (pickled
            ``.bin`` weights are refused: they can run code when loaded), or a bad file.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ModelFileError(f"{d} is not a checkpoint directory")
    if not (d / "config.json").is_file():
        raise ModelFileError(f"{d} has no config.json; a Hugging Face checkpoint directory needs one")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        if list(d.glob("*.bin")) or list(d.glob("*.pt")):
            raise ModelFileError(f"{d} holds only pickled weights (.bin/.pt), which edgerun does not load; "
                                 "convert them to safetensors first")
        raise ModelFileError(f"{d} has no .safetensors weights")
    for f in files:
        validate_file(f)
    return files


def read_config(directory: str | Path) -> dict:
    """``config.json`` of a checkpoint directory.

    Raises:
        ModelFileError: unreadable or not a JSON object.
    """
    p = Path(directory) / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"cannot read {p}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{p} is not a JSON object")
    return cfg


def read_tensor(path: str | Path, entry: SafetensorsTensor):
    """Read one tensor of a validated file (:func:`validate_file`) into memory, without a memory map.

    A memory map would leave every page read resident in the process; reading the extent into a
    fresh buffer keeps the footprint to the tensor itself.

    Returns:
        A torch tensor of the entry's dtype and shape (owning its memory).

    Raises:
        ModelFileError: the file changed since it was validated (short read).
    """
    import torch  # heavy: the chat path imports this module and must not load torch

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n + entry.begin)
        buf = bytearray(entry.end - entry.begin)
        if f.readinto(buf) != len(buf):
            raise ModelFileError(f"{path} is truncated: tensor {entry.name} ends past the end of the file")
    dtype = getattr(torch, TORCH_DTYPES[entry.dtype])
    if not buf:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry.shape)


TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class StreamWriter:
    """Write a ``.safetensors`` file one tensor at a time (peak memory: one tensor, not the model).

    The header needs every tensor's extent up front, so the writer is given the names, dtypes and
    shapes first (``specs``, in file order); :meth:`write` then takes the tensors in that order and
    checks each against its spec. The file is complete only after :meth:`close`, which fails if a
    tensor is missing. Write to a temporary path (:func:`edgerun.atomic.atomic_file`): a partial
    file is never valid.

    Args:
        path: file to create.
        specs: ``(name, dtype, shape)`` per tensor, dtype a safetensors name (``"F32"``, ``"BF16"``...).
        metadata: the optional ``__metadata__`` map of strings.

    Raises:
        ValueError: an unknown dtype, a repeated name, or (on write/close) a tensor out of order, of
            the wrong dtype or shape, or missing.
    """

    def __init__(self, path: str | Path, specs: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._specs = []
        for name, dtype, shape in specs:
            if dtype not in TORCH_DTYPES:
                raise ValueError(f"unsupported dtype {dtype} for tensor {name}")
            if name in header:
                raise ValueError(f"tensor {name} appears twice")
            numel = 1
            for d in shape:
                numel *= int(d)
            size = numel * DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
            self._specs.append((name, dtype, tuple(int(d) for d in shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)                      # data section 8-byte aligned, as the format advises
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor) -> None:
        """Append ``tensor`` (a torch tensor matching the next spec) to the file."""
        import torch  # heavy: the chat path imports this module and must not load torch

        if self._next >= len(self._specs) or self._specs[self._next][0] != name:
            expected = self._specs[self._next][0] if self._next < len(self._specs) else "nothing"
            raise ValueError(f"tensor {name} written out of order; expected {expected}")
        _, dtype, shape = self._specs[self._next]
        if tensor.dtype != getattr(torch, TORCH_DTYPES[dtype]) or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name} is {tensor.dtype} {tuple(tensor.shape)}; the header says {dtype} {shape}")
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))   # no bytes copy
        self._next += 1

    def abort(self) -> None:
        """Close the file without completing it (the caller removes the partial file)."""
        self._f.close()

    def close(self) -> None:
        """Finish the file.

        Raises:
            ValueError: tensors of the header were never written.
        """
        self._f.close()
        if self._next != len(self._specs):
            raise ValueError(f"{len(self._specs) - self._next} tensors were not written (next: {self._specs[self._next][0]})")
