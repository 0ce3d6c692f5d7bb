"""GGUF validation: malformed files are refused with a one-line error before llama.cpp sees them."""

from __future__ import annotations

import struct

import pytest

from edgerun.errors import ModelFileError
from edgerun.formats import gguf as gguf_format

from conftest import write_tiny_gguf


def test_valid_tiny_file_passes_both_parsers(tmp_path):
    p = write_tiny_gguf(tmp_path / "tiny.gguf", chat_template="{{ messages }}")
    info = gguf_format.validate(p, read_with_gguf=True)
    assert info.architecture == "llama"
    assert [t.name for t in info.tensors] == ["t0.weight", "t1.weight"]
    assert info.tensors[0].shape == (32, 4) and info.tensors[0].n_bytes == 32 * 4 * 4
    assert info.chat_template == "{{ messages }}"
    assert info.n_params == 256


def test_text_file_is_not_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is not a model, just some text in a file\n" * 3)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        gguf_format.validate(p)


def test_tiny_file_is_not_gguf(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"GGUF")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        gguf_format.validate(p)


def test_unsupported_version(tmp_path):
    p = write_tiny_gguf(tmp_path / "v.gguf")
    data = bytearray(p.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="GGUF version 99"):
        gguf_format.validate(p)


@pytest.mark.parametrize("keep", [10, 30, 100, 200, 400])
def test_truncated_anywhere_is_refused(tmp_path, keep):
    full = write_tiny_gguf(tmp_path / "full.gguf").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(full[: min(keep, len(full) - 1)])
    with pytest.raises(ModelFileError, match="truncated|not a GGUF"):
        gguf_format.validate(p)


def test_truncated_tensor_data_is_refused(tmp_path):
    full = write_tiny_gguf(tmp_path / "full.gguf").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(full[:-100])  # header intact, last tensor's data cut
    with pytest.raises(ModelFileError, match="truncated"):
        gguf_format.validate(p)


def test_huge_array_length_fails_fast_instead_of_looping(tmp_path):
    # a string array that claims 2**60 items: the scanner must bound it by the bytes left
    import gguf

    p = tmp_path / "arr.gguf"
    w = gguf.GGUFWriter(str(p), arch="llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    data = bytearray(p.read_bytes())
    i = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens")
    # value type (4 bytes) + item type (4 bytes) then the uint64 count
    data[i + 8:i + 16] = struct.pack("<Q", 1 << 60)
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupted or truncated"):
        gguf_format.validate(p)


def test_tensor_offset_past_the_end_is_refused(tmp_path):
    p = write_tiny_gguf(tmp_path / "off.gguf", n_tensors=1)
    data = bytearray(p.read_bytes())
    i = data.index(b"t0.weight") + len(b"t0.weight")
    # n_dims (4) + 2 dims (16) + type (4) then the uint64 offset
    data[i + 24:i + 32] = struct.pack("<Q", 1 << 20)
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="truncated or corrupted"):
        gguf_format.validate(p)


def test_missing_architecture_is_refused(tmp_path):
    import gguf

    p = tmp_path / "noarch.gguf"
    w = gguf.GGUFWriter(str(p), arch="llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    data = bytearray(p.read_bytes())
    i = data.index(b"general.architecture")
    data[i:i + 7] = b"general"[::-1]  # rename the key
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="general.architecture"):
        gguf_format.validate(p)


def test_real_default_model_is_valid(default_model_path):
    info = gguf_format.validate(default_model_path)
    assert info.architecture == "llama"
    assert info.metadata["llama.block_count"] == 30
    assert info.n_params == 134_515_008
    assert "<|im_start|>" in info.chat_template


def test_the_ggml_type_table_matches_gguf_py():
    """edgerun's own table (kept off gguf-py for start-up time) has gguf-py's ids, names and sizes."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from edgerun.formats.ggml import GGML_TYPES

    for i, t in GGML_TYPES.items():
        ref = GGMLQuantizationType(i)
        assert t.name == ref.name and (t.block, t.block_bytes) == GGML_QUANT_SIZES[ref]
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS"} <= {t.name for t in GGML_TYPES.values()}
