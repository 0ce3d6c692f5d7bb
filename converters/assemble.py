"""Per-task GGUFs for PreMoe TAER on llama.cpp: the engine host pruned to a task's experts, then quantized.

The runtime's planner (:mod:`edgerun.planner`) picks the task of a message; llama.cpp cannot select
experts at load, so the model that keeps the task's experts is a GGUF of its own. This assembler
writes it (cached under ``$EDGERUN_HOME/cache/assembled``): the carved checkpoint hosted as Granite's
shared-expert MoE (:func:`converters.export.granite_cache`), pruned to the pattern's experts
(:func:`converters.prune.prune_host`, PreMoe PEP, Pei et al. arXiv 2505.17639 Sec. 3.2), written as
an exact F32 GGUF and quantized by llama.cpp. The runtime receives it as a function
(``edgerun.load(..., assembler=GGUFAssembler("Q8_0"))``), so ``edgerun/`` never imports a writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from converters import gguf as gguf_writer
from converters.export import granite_cache
from converters.prune import prune_host
from edgerun import catalog
from edgerun.formats.safetensors import read_config
from edgerun.moe.store import is_carved


class GGUFAssembler:
    """Builds (and caches) the GGUF of a carved model's host keeping given experts per layer.

    Args:
        quant: llama.cpp type of the assembled GGUFs (``Q8_0`` default; ``F32`` keeps the exact file).
        log: where one-line progress messages go.

    Raises:
        UsageError: an unknown type (from the GGUF writer), a host that does not match the selection.
    """

    def __init__(self, quant: str = "Q8_0", log: Callable[[str], None] | None = None):
        self.quant = gguf_writer.check_type(quant)
        self.log = log or (lambda m: None)
        self.root = catalog.home() / "cache" / "assembled"

    def host(self, model_dir: Path) -> Path:
        """The Granite host of a carved checkpoint (fitted linear routers; cached), or ``model_dir`` if it is one."""
        model_dir = Path(model_dir)
        if is_carved(read_config(model_dir)):
            return granite_cache(model_dir, progress=False, log=self.log)
        return model_dir

    def __call__(self, host: Path, tag: str, keep: list[list[int]], a: int, record: dict) -> Path:
        """The GGUF of ``host`` keeping ``keep[layer]`` routed experts per MoE layer, routing top-``a``."""
        out = self.root / f"{tag}-{self.quant}.gguf"
        if out.is_file():
            return out
        self.log(f"assembling a {self.quant} GGUF with the {record.get('task', tag)} experts ({a}/{len(keep[0])})")
        pruned = self.root / tag
        if not (pruned / "config.json").is_file():
            prune_host(host, pruned, keep, a, record, force=True)
        f32 = self.root / f"{tag}-F32.gguf"
        gguf_writer.write_f32(pruned, f32, name=tag, force=True)
        if self.quant == "F32":
            f32.rename(out)
        else:
            gguf_writer.quantize(f32, out, self.quant, force=True)
            f32.unlink()
        return out
