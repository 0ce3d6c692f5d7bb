"""The KV-cache element types llama.cpp accepts (``--cache-type-k/-v``): the one table of them.

Names are llama.cpp's (lower-case ggml type names); ids are ggml's ``enum ggml_type`` values
(ggml.h); block sizes and bytes per block are ggml's type traits, from the one table of ggml types
(:mod:`edgerun.formats.ggml`). A block type stores ``block`` values in ``block_bytes``
bytes: its codes plus a float16 scale (``q8_0``, ``q5_0``, ``q4_0``, ``iq4_nl``) or a float16 scale
and minimum (``q5_1``, ``q4_1``). A quantized V cache needs flash attention in llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgerun.formats.ggml import GGML_TYPES


@dataclass(frozen=True)
class KVType:
    """One llama.cpp KV-cache element type.

    Attributes:
        name: llama.cpp's name, e.g. ``"q8_0"``.
        ggml_id: ggml's type id (``type_k`` / ``type_v`` of llama.cpp's context parameters).
        block: values per block (1 for the float types).
        block_bytes: bytes per block.
    """

    name: str
    ggml_id: int
    block: int
    block_bytes: int

    @property
    def bytes_per_value(self) -> float:
        """Bytes per cached value, block scales included (e.g. 34 / 32 for ``q8_0``)."""
        return self.block_bytes / self.block

    @property
    def bits(self) -> float:
        """Bits per cached value, block scales included (e.g. 8.5 for ``q8_0``)."""
        return 8 * self.bytes_per_value

    @property
    def quantized(self) -> bool:
        """A block type (needs flash attention as a V cache), not a float type."""
        return self.block > 1


KV_TYPES: dict[str, KVType] = {
    GGML_TYPES[i].name.lower(): KVType(GGML_TYPES[i].name.lower(), i, GGML_TYPES[i].block, GGML_TYPES[i].block_bytes)
    for i in (0, 1, 30, 8, 7, 6, 3, 2, 20)      # f32 f16 bf16 q8_0 q5_1 q5_0 q4_1 q4_0 iq4_nl
}
