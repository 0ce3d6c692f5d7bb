"""Validate a GGUF file before any native code (llama.cpp) opens it, and read its metadata.

llama.cpp can crash on a truncated or corrupted GGUF, and ``gguf.GGUFReader`` itself loops over
whatever array length a corrupted header claims. So validation is:

1. a bounds-checked structural scan of the header, the key/value section and the tensor-info
   table (every length is checked against the bytes that remain before it is used), then every
   tensor's data extent (offset + size from its type and shape) against the file size: this runs
   before every load (9 ms for SmolLM2: the vocabulary strings are stepped over, not decoded);
2. on request only (``read_with_gguf=True``), ``gguf.GGUFReader`` (the gguf-py package) reads the
   now-safe file as a second, independent parser: it takes seconds and hundreds of MB on a large
   vocabulary (5.5 s for SmolLM2's 49k tokens), so no load path uses it.

Format reference: the GGUF specification in ggml-org/ggml ``docs/gguf.md`` (little-endian; magic
``GGUF``; version 2 or 3; counts are uint64; strings are uint64 length + UTF-8 bytes).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerun.errors import ModelFileError
from edgerun.formats.ggml import GGML_TYPES

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_MAX_COUNT = 1 << 24  # more tensors or keys than this is corruption, not a model
_MAX_DIMS = 8

# GGUF value types (gguf spec, `gguf_type`): id -> struct format of one scalar (None: string/array)
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file.

    Attributes:
        name: GGUF tensor name, e.g. ``"blk.0.attn_q.weight"``.
        type_name: ggml type name, e.g. ``"Q4_1"``, ``"F32"``.
        shape: logical shape in ggml order (ne0 first, i.e. the row length first).
        n_elements: number of weights.
        n_bytes: bytes of its data in the file.
    """

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int


@dataclass
class GGUFInfo:
    """What edgerun needs from a validated GGUF file.

    Attributes:
        path: the file.
        version: GGUF version (2 or 3).
        architecture: ``general.architecture``, e.g. ``"llama"``, ``"gemma3"``.
        metadata: every scalar and string key/value (arrays are omitted, except short ones).
        tensors: tensor table in file order.
        file_size: bytes.
    """

    path: Path
    version: int
    architecture: str
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)
    file_size: int = 0

    @property
    def chat_template(self) -> str | None:
        """The default ``tokenizer.chat_template``, or None when the file has none."""
        t = self.metadata.get("tokenizer.chat_template")
        return t if isinstance(t, str) and t.strip() else None

    @property
    def n_params(self) -> int:
        """Total number of weights over all tensors."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def context_length(self) -> int | None:
        """Training context length in tokens (``<arch>.context_length``), if present."""
        v = self.metadata.get(f"{self.architecture}.context_length")
        return int(v) if v is not None else None


_U64 = struct.Struct("<Q")


class _Scanner:
    """Bounds-checked little-endian reader over a memory map."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path
        self.size = len(buf)

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path} is corrupted or truncated ({what} at byte {self.pos}); "
                              "download or export it again")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, keep: bool = True) -> str | None:
        n = self.unpack("Q", what + " length")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n] if keep else None
        self.pos += n
        if raw is None:
            return None
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` length-prefixed strings (a vocabulary, merges), bounds-checking each length.

        The chat path's hot loop (about 100k strings for a 49k vocabulary): locals only, no decoding.

        Raises:
            ModelFileError: a length, or a string, that runs past the end of the file.
        """
        buf, pos, size, length = self.buf, self.pos, self.size, _U64.unpack_from
        for _ in range(count):
            start = pos
            if pos + 8 > size:
                self.pos = start
                raise self.fail(f"{what} length runs past the end of the file")
            pos += 8 + length(buf, pos)[0]
            if pos > size:
                self.pos = start            # report where the bad string starts, not its claimed end
                raise self.fail(f"{what} runs past the end of the file")
        self.pos = pos

    def value(self, vtype: int, what: str, keep: bool):
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what, keep)
        if vtype == _ARRAY:
            itype = self.unpack("I", what + " item type")
            count = self.unpack("Q", what + " array length")
            if itype in _SCALAR_FORMATS:
                width = struct.calcsize("<" + _SCALAR_FORMATS[itype])
                self.need(count * width, what)
                small = keep and count <= 64
                items = list(struct.unpack_from(f"<{count}{_SCALAR_FORMATS[itype]}", self.buf, self.pos)) if small else None
                self.pos += count * width
                return items
            if itype == _STRING:
                # every string needs at least its 8-byte length: a cheap bound before looping
                self.need(count * 8, what)
                if keep and count <= 64:
                    return [self.string(what) for _ in range(count)]
                self.skip_strings(count, what)
                return None
            raise self.fail(f"{what} has unsupported array item type {itype}")
        raise self.fail(f"{what} has unknown value type {vtype}")


def validate(path: str | Path, read_with_gguf: bool = False) -> GGUFInfo:
    """Check that ``path`` is a complete, well-formed GGUF file and return its metadata.

    Args:
        path: the file to check.
        read_with_gguf: also open it with ``gguf.GGUFReader`` (the gguf-py package) after the
            structural scan, as a second, independent parser. Off on every load path: it takes
            seconds and hundreds of MB on a large vocabulary (5.5 s for SmolLM2 against 9 ms for the
            scan); the scan alone bounds every length and extent before llama.cpp opens the file.

    Returns:
        GGUFInfo with the architecture, scalar metadata and the tensor table.

    Raises:
        ModelFileError: missing file, not a GGUF file, unsupported version, or a header, tensor
            table or tensor data extent that does not fit the file (truncated or corrupted).
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"no such file: {path}")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file")
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(f"{path} is not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            info = _scan(buf, path)
    if read_with_gguf:
        _check_with_gguf_reader(path, info)
    return info


def _scan(buf: mmap.mmap, path: Path) -> GGUFInfo:
    s = _Scanner(buf, path)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    s.pos = 4
    version = s.unpack("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(f"{path} has GGUF version {version}; supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors = s.unpack("Q", "tensor count")
    n_kv = s.unpack("Q", "key/value count")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise s.fail(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = s.string(f"key {i}")
        if key in metadata:
            raise s.fail(f"duplicate key {key}")
        vtype = s.unpack("I", f"type of {key}")
        metadata[key] = s.value(vtype, key, keep=True)

    types = {i: (t.name, t.block, t.block_bytes) for i, t in GGML_TYPES.items()}
    raw_tensors = []
    for i in range(n_tensors):
        name = s.string(f"name of tensor {i}")
        n_dims = s.unpack("I", f"dimension count of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise s.fail(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(s.unpack("Q", f"shape of {name}") for _ in range(n_dims))
        type_id = s.unpack("I", f"type of {name}")
        offset = s.unpack("Q", f"offset of {name}")
        if type_id not in types:
            raise s.fail(f"tensor {name} has unknown ggml type {type_id}")
        raw_tensors.append((name, shape, type_id, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise s.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-s.pos // alignment) * alignment

    tensors, names = [], set()
    for name, shape, type_id, offset in raw_tensors:
        if name in names:
            raise s.fail(f"duplicate tensor {name}")
        names.add(name)
        type_name, block, type_size = types[type_id]
        n_el = 1
        for d in shape:
            n_el *= d
        if shape[0] % block:
            raise s.fail(f"tensor {name} row length {shape[0]} is not a multiple of {type_name}'s block of {block}")
        n_bytes = n_el // block * type_size
        end = data_start + offset + n_bytes
        if offset % alignment or end > s.size:
            raise ModelFileError(
                f"{path} is truncated or corrupted: tensor {name} needs bytes up to {end}, "
                f"the file has {s.size}; download or export it again")
        tensors.append(TensorInfo(name, type_name, shape, n_el, n_bytes))

    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(f"{path} has no general.architecture key; it is not a model GGUF")
    return GGUFInfo(path=path, version=version, architecture=arch, metadata=metadata,
                    tensors=tensors, file_size=s.size)


def _check_with_gguf_reader(path: Path, info: GGUFInfo) -> None:
    """Second opinion from gguf-py's reader: same tensor table, every tensor's data inside the file."""
    from gguf import GGUFReader  # gguf-py: kept off the chat path's imports

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/KeyError/IndexError on malformed files
        raise ModelFileError(f"{path} is corrupted: gguf reader failed ({type(e).__name__}: {e})") from None
    if len(reader.tensors) != len(info.tensors):
        raise ModelFileError(f"{path} is corrupted: tensor table disagrees between parsers")
    size = info.file_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ModelFileError(f"{path} is truncated: tensor {t.name} data ends past the end of the file")

