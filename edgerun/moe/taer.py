"""PreMoe TAER in the runtime: retrieve a message's task and provide the model keeping that task's experts.

Pei et al., "PreMoe", arXiv 2505.17639, Sec. 3.3 (task-adaptive expert retrieval). Stored per-task
patterns (:mod:`edgerun.moe.tcess`) hold a retrieval key (the key MoE layer's TCESS vector); the raw
message runs through the model only up to the key router (no expert weights are read for a key in
the first MoE layer); the nearest stored key by L2 distance names the task. :class:`ExpertPlanner`
is the expert half of :class:`edgerun.planner.Planner`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from edgerun import catalog
from edgerun.errors import UsageError
from edgerun.formats.safetensors import read_config
from edgerun.moe import calibrate as cal
from edgerun.moe import tcess
from edgerun.moe.adapters import fingerprint
from edgerun.moe.store import MOE_KEY, is_carved, select_experts
from edgerun.planner import Assembler, ExpertChoice


class ExpertPlanner:
    """Chooses the task pattern for a message and provides the model built for it.

    Args:
        model_dir: a carved checkpoint (expert store) or its engine host checkpoint.
        patterns_dir: stored patterns (``edgerun experts calibrate``), made on the routing that runs:
            the host's for ``engine="llama.cpp"``, the carved model's for ``engine="torch"``.
        a, b: route top-a among the top-b experts per layer.
        engine: ``llama.cpp`` (models from ``assembler``) or ``torch`` (exact CMoE routing from the store).
        assembler: see :class:`Assembler`; required for llama.cpp.
        threads: torch threads of the retrieval pass (the session's ``--threads``; None: torch's default).
            It sets torch's process-wide count, which on llama.cpp only the retrieval model uses.

    Raises:
        UsageError: a dense model, patterns for another model, bad a/b, llama.cpp without an assembler.
    """

    def __init__(self, model_dir: str | Path, patterns_dir: str | Path, a: int, b: int, engine: str = "llama.cpp",
                 assembler: Assembler | None = None, log: Callable[[str], None] | None = None,
                 threads: int | None = None):
        self.model_dir = Path(model_dir)
        if threads:
            torch.set_num_threads(int(threads))   # more threads than the session's --threads fight over the CPUs
        cfg = read_config(self.model_dir)
        if MOE_KEY not in cfg:
            raise UsageError(f"{model_dir} is not a carved mixture of experts; --adaptive-experts needs one "
                             "('edgerun carve')")
        self.engine, self.a, self.b, self.assembler = engine, a, b, assembler
        self._log = log or (lambda m: None)
        if engine == "llama.cpp":
            if assembler is None:
                raise UsageError("adaptive experts on llama.cpp run GGUFs assembled per task: pass "
                                 "assembler=converters.assemble.GGUFAssembler(quant) (the CLI does), or use "
                                 "backend='torch'")
            self.model_dir = assembler.host(self.model_dir)
        elif engine == "torch" and not is_carved(cfg):
            raise UsageError("the torch engine runs exact CMoE routing: give the carved checkpoint, not its host")
        elif engine != "torch":
            raise UsageError("--adaptive-experts runs on llama.cpp (assembled GGUFs) or torch (exact routing)")
        self.patterns = tcess.load_dir(patterns_dir)
        self.key_model, self.tokenizer = cal.load_model(self.model_dir)
        fp = fingerprint(self.key_model, str(self.model_dir))
        for p in self.patterns:
            tcess.check_model(p, fp)
        if b > fp["experts"]:
            raise UsageError(f"--keep {a}/{b}: b exceeds the {fp['experts']} routed experts per layer")
        # the retrieval model stays resident beside the engine's model: the planner counts it in the budget
        self.resident_bytes = sum(p.numel() * p.element_size() for p in self.key_model.parameters())
        self.key_layer = self.patterns[0].key_layer
        self.score = self.patterns[0].score
        self.key_kind = self.patterns[0].key_kind
        self.key_depth = self.patterns[0].key_depth
        if any((p.key_kind, p.key_layer, p.key_depth) != (self.key_kind, self.key_layer, self.key_depth)
               for p in self.patterns):
            raise UsageError(f"the patterns in {patterns_dir} use different retrieval keys (key kind / key layer); "
                             "calibrate them together")
        self.keys = torch.stack([p.key() for p in self.patterns])          # (tasks, key size)

    def retrieve(self, text: str) -> tuple[str, float]:
        """(task, L2 distance) of the stored key nearest to the query key of ``text``."""
        q = cal.query_key(self.key_model, self.tokenizer, text, self.key_layer, self.score, self.key_kind,
                          self.key_depth)
        d = torch.linalg.norm(self.keys - q[None, :], dim=1)
        i = int(torch.argmin(d))
        return self.patterns[i].task, float(d[i])

    def choose(self, text: str) -> tuple[ExpertChoice, Path]:
        """Retrieve the task of ``text`` and make sure its model exists (assembling it if needed)."""
        t0 = time.perf_counter()
        task, distance = self.retrieve(text)
        retrieval_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        path = self.model_for(task)
        assembly_ms = (time.perf_counter() - t1) * 1e3
        return ExpertChoice(task, distance, retrieval_ms, assembly_ms, self.a, self.b), path

    def model_for(self, task: str) -> Path:
        """The model pruned to ``task``'s pattern: a pruned expert store (torch) or the assembler's model.

        Cached by model, task, a/b, score and the pattern's content hash (:meth:`Pattern.digest`), so a
        recalibrated pattern gets a model of its own instead of a stale one.
        """
        pattern = next(p for p in self.patterns if p.task == task)
        keep = pattern.keep(self.b)
        tag = f"{self.model_dir.name}-{task}-{self.a}of{self.b}-{pattern.score}-{pattern.digest()}"
        record = {"task": task, "score": pattern.score}
        if self.engine == "llama.cpp":
            return self.assembler(self.model_dir, tag, keep, self.a, record)
        out = catalog.home() / "cache" / "assembled" / tag
        if not (out / "config.json").is_file():
            self._log(f"assembling the {task} experts ({self.a}/{self.b}) from the expert store")
            select_experts(self.model_dir, out, keep, self.a, record, force=True)
        return out
