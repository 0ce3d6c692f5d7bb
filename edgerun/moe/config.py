"""CMoE configurations ``SxAyEz``: x shared experts, y active routed experts, z experts in total.

Expert size m = d_ff / z neurons; the shared expert has x*m neurons; z - x routed experts of m
neurons, y chosen per token; active fraction (x + y) / z.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from edgerun.errors import UsageError

_PATTERN = re.compile(r"^S(\d+)A(\d+)E(\d+)$", re.IGNORECASE)
GGUF_BLOCK = 32  # every GGUF quantization type works in blocks of at least 32 along a row


@dataclass(frozen=True)
class MoEConfig:
    """A parsed SxAyEz configuration for a given FFN width.

    Attributes:
        shared, active, total: x, y, z.
        d_ff: dense FFN width; expert_size: m = d_ff / z.
    """

    shared: int
    active: int
    total: int
    d_ff: int

    @property
    def name(self) -> str:
        return f"S{self.shared}A{self.active}E{self.total}"

    @property
    def expert_size(self) -> int:
        return self.d_ff // self.total

    @property
    def routed(self) -> int:
        return self.total - self.shared

    @property
    def shared_neurons(self) -> int:
        return self.shared * self.expert_size

    @property
    def active_fraction(self) -> float:
        return (self.shared + self.active) / self.total

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(name=self.name, expert_size=self.expert_size, routed=self.routed,
                 shared_neurons=self.shared_neurons, active_fraction=self.active_fraction)
        return d


def parse(text: str, d_ff: int) -> MoEConfig:
    """Parse ``SxAyEz`` for an FFN of ``d_ff`` neurons.

    Raises:
        UsageError: a malformed string, impossible counts, a z that does not divide d_ff (the valid
            z are listed), or an expert width that is not a multiple of 32 (GGUF blocks).
    """
    m = _PATTERN.match(text.strip())
    if not m:
        raise UsageError(f"bad MoE configuration '{text}'; expected SxAyEz, e.g. S2A4E16 (x shared, y active, z total)")
    x, y, z = (int(g) for g in m.groups())
    valid = [n for n in range(2, d_ff + 1) if d_ff % n == 0 and (d_ff // n) % GGUF_BLOCK == 0 and n <= 64]
    if z < 2 or y < 1 or x + y > z or x >= z:
        raise UsageError(f"bad MoE configuration '{text}': need 1 <= y, x + y <= z and x < z")
    if d_ff % z:
        raise UsageError(f"{text}: {z} experts do not divide the FFN width {d_ff}; valid z: {', '.join(map(str, valid))}")
    if (d_ff // z) % GGUF_BLOCK:
        raise UsageError(f"{text}: experts of {d_ff // z} neurons are not a multiple of {GGUF_BLOCK} (GGUF blocks); "
                         f"valid z: {', '.join(map(str, valid))}")
    return MoEConfig(x, y, z, d_ff)
