"""Registered conversion passes (merge, carve, finetune, prune, ptq), chained by ``edgerun export`` and ``edgerun carve``.

mergekit style (arcee-ai/mergekit: a registry maps names to small units with declared parameters,
and a YAML recipe drives the run): every pass is a small class in :data:`REGISTRY` that declares

- its parameters (:class:`converters.params.Param`: name, type, default, help, check), which
  validate CLI flags, keyword arguments and recipe fields alike;
- the checkpoint kind it takes and the kind it gives (:data:`KINDS`): a dense float checkpoint,
  a carved MoE in the expert-store layout, the engine host of a carved MoE, a GPTQ checkpoint;
- :meth:`Pass.apply`: checkpoint in, checkpoint out, plus its manifest records.

The passes and the methods behind them:

- ``merge``: Long-to-Short merging of fine-tunes into the checkpoint (:mod:`converters.merge`;
  Wu et al., arXiv 2503.20641); its fields are a mergekit merge recipe's;
- ``carve``: CMoE carving of the dense FFNs into shared + routed experts (:mod:`converters.carve`;
  Pei et al., arXiv 2502.04416, Sec. 3);
- ``finetune``: CMoE's light fine-tune of a carved MoE (:mod:`converters.cmoe_finetune`; Sec. 4.3);
- ``host``: a carved MoE hosted as Granite's shared-expert MoE with fitted linear routers, the
  form the GGUF and ONNX engines run (:mod:`converters.moe_export`); inserted by :func:`plan`
  wherever a carved MoE meets a pass or writer that needs the host;
- ``prune``: PreMoe's probabilistic expert pruning of the host for a task (:mod:`converters.prune`;
  Pei et al., arXiv 2505.17639, Sec. 3.2);
- ``ptq``: weight-only RTN / GPTQ / AWQ into the GPTQ checkpoint layout (:mod:`converters.ptq`).

A chain comes from export's flags (:func:`from_flags`, in the fixed order merge, carve, finetune,
prune, ptq) or from a recipe (:func:`load`)::

    passes:
      - merge: {merge_method: ties, models: [./system2], parameters: {density: 0.3}}
      - carve: {config: S2A2E8}
      - finetune: {minutes: 2}
      - prune: {task: math, keep: 2/4}

a list of one-key mappings ``{pass name: {parameter: value}}`` (a bare name takes every default),
checked field by field by :mod:`edgerun.formats.yamlfile` (errors name the file, field and line).
A plain mergekit merge recipe (``merge_method: ...`` at the top) is a one-pass recipe.

:func:`plan` checks the order before anything runs; :func:`run` applies the passes in order. In an
export each intermediate checkpoint is cached under ``$EDGERUN_HOME/cache/`` keyed by its input and
parameters (``carved/<input>-<config>-t<tokens>``, ``<carved>-ft<minutes>m``, ``<carved>-granite``,
``<host>-<task>-<a>of<b>-<score>``, ``merged/<input>-<method>-<hash>``), so a later export reuses it;
:func:`to_checkpoint` instead stages intermediates beside its output and removes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from converters.params import REQUIRED, Param, positive, validate
from converters.params import schema as params_schema
from converters.source import TOKENIZER_FILES, Source, open_source
from edgerun import catalog
from edgerun.errors import UsageError
from edgerun.formats import yamlfile
from edgerun.formats.safetensors import read_config
from edgerun.moe import config as moe_config

MOE_KEY = "edgerun_moe"      # edgerun.moe.store.MOE_KEY, without importing torch to read a config
KINDS = {
    "dense": "a dense float checkpoint",
    "carved": "a carved MoE (CMoE expert store)",
    "host": "the engine host of a carved MoE (GraniteMoeShared)",
    "gptq": "a GPTQ-layout quantized checkpoint",
}
PTQ_WINDOW = 512             # PTQ calibration window (tokens)


def kind_of(checkpoint: str | Path) -> str:
    """The kind (a key of :data:`KINDS`) of the HF checkpoint directory ``checkpoint``, from its config.json.

    Raises:
        ModelFileError: no readable config.json.
    """
    cfg = read_config(Path(checkpoint))
    if MOE_KEY in cfg:
        return "carved" if "export" not in cfg[MOE_KEY] else "host"
    return "gptq" if "quantization_config" in cfg else "dense"


@dataclass
class Context:
    """What a pass may need besides its parameters.

    Attributes:
        src: the export source as given (a merge recipe's ``base_model`` must name it).
        source: the opened source (None outside an export).
        progress: show progress bars. log: one-line messages.
        label: a human name of the current checkpoint ("SmolLM2 carved S2A2E8"), updated pass by pass.
    """

    src: str = ""
    source: Source | None = None
    progress: bool = True
    log: Callable[[str], None] = print
    label: str = ""


class Bar:
    """A tqdm bar fed by ``bar(done, total)`` callbacks (``bar(step, loss)`` with ``loss=True``); None if disabled."""

    def __init__(self, desc: str, unit: str, loss: bool = False):
        self.desc, self.unit, self.loss, self.bar = desc, unit, loss, None

    def __call__(self, done: int, other: float) -> None:
        from tqdm import tqdm   # only with progress shown

        if self.bar is None:
            self.bar = tqdm(total=None if self.loss else int(other), desc=self.desc, unit=self.unit, leave=False)
        self.bar.update(done - self.bar.n)
        if self.loss:
            self.bar.set_postfix(loss=f"{other:.3f}")

    def close(self) -> None:
        """Close the bar (if it was shown)."""
        if self.bar is not None:
            self.bar.close()


def bar(desc: str, enabled: bool, unit: str = "tensor", loss: bool = False) -> Bar | None:
    """A progress callback for the converters' ``progress=`` arguments, or None when ``enabled`` is False."""
    return Bar(desc, unit, loss) if enabled else None


def _close(b: Bar | None) -> None:
    if b is not None:
        b.close()


# --- the pass base class and registry --------------------------------------------------------------

class Pass:
    """A registered conversion step: one checkpoint in, one checkpoint out.

    Subclasses declare ``name`` (in recipes and :data:`REGISTRY`), ``params``, the checkpoint kinds
    they ``takes`` and the kind they ``gives``, the export ``flag`` that adds them and ``needs``
    (how to fix a chain that does not give them what they take); and implement :meth:`apply`.

    Attributes:
        values: every declared parameter's value (defaults filled in).
        origin: where the pass came from, for messages (``--carve``, ``r.yaml, line 4 (passes[1].carve)``).
    """

    name: ClassVar[str] = ""
    takes: ClassVar[tuple[str, ...]] = ("dense",)
    gives: ClassVar[str] = "dense"
    flag: ClassVar[str] = ""
    needs: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, values: dict, origin: str):
        self.values = values
        self.origin = origin

    @classmethod
    def declared(cls) -> tuple[Param, ...]:
        """The declared parameters."""
        return cls.params

    @classmethod
    def make(cls, origin: str, src: str | None = None, **values) -> "Pass":
        """The pass with keyword ``values`` (None: the default), checked against the declaration.

        Args:
            origin: the flag or place it comes from, for messages. src: the export source.

        Raises:
            UsageError: an unknown or missing parameter, or a bad value (``origin`` named).
        """
        return cls(validate(cls.declared(), values, origin), origin)

    @classmethod
    def from_yaml(cls, path: Path, data: dict, lines: dict[str, int], prefix: str, src: str | None) -> "Pass":
        """The pass from a recipe's parameter mapping ``data`` at ``prefix`` (``passes[1].carve.``).

        Raises:
            YamlError: an unknown or missing parameter, a wrong type or bad value (file, field, line named).
        """
        values = yamlfile.check(path, data, lines, params_schema(cls.declared()), prefix)
        key = prefix.rstrip(".")
        return cls(values, f"{path}, line {lines.get(key, '?')} ({key})")

    def as_dict(self) -> dict:
        """``{name: {parameter: value}}``, the pass as a recipe entry."""
        return {self.name: dict(self.values)}

    def tag(self) -> str:
        """A short name of what the pass made, for default output names."""
        return self.name

    def label(self, label: str) -> str:
        """The human name of the checkpoint after this pass, given the one before."""
        return label

    def apply(self, model: Path, ctx: Context, out: Path | None) -> tuple[Path, list[dict]]:
        """Run the pass on ``model`` and return (its output checkpoint, its manifest records).

        ``out`` None: the output goes to the pass's cache location, and an existing one is reused;
        otherwise it is written at ``out`` (replaced if it exists).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.values!r})"


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to :data:`REGISTRY` under its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def make(name: str, origin: str | None = None, src: str | None = None, **values) -> Pass:
    """The registered pass ``name`` with keyword ``values`` (see :meth:`Pass.make`).

    Raises:
        UsageError: an unknown pass, parameter or bad value.
    """
    if name not in REGISTRY:
        raise UsageError(f"unknown pass '{name}'; known: {', '.join(REGISTRY)}")
    return REGISTRY[name].make(origin or name, src=src, **values)


def describe() -> str:
    """Every registered pass with its parameters (type, default, help), one per line, for listings."""
    lines = []
    for name, cls in REGISTRY.items():
        lines.append(f"{name}: takes {KINDS[cls.takes[0]]}, gives {KINDS[cls.gives]}")
        lines += [f"  {p.describe()}" for p in cls.declared()]
        if cls is MergePass:
            from converters.merge import METHODS   # torch: the merge methods' declarations

            for m in METHODS.values():
                lines.append(f"  parameters of {m.name}: " + "; ".join(p.describe() for p in m.params))
    return "\n".join(lines)


# --- the passes ------------------------------------------------------------------------------------

_CONFIG = re.compile(r"^S\d+A\d+E\d+$", re.IGNORECASE)
_KEEP = re.compile(r"^(\d+)/(\d+)$")


def _sxayez(v) -> str | None:
    return None if _CONFIG.match(v.strip()) else f"must be a CMoE configuration SxAyEz (e.g. S2A4E16), got {v!r}"


def _keep(v) -> str | None:
    m = _KEEP.match(v.strip())
    if not m:
        return f"must be a/b (route top-a of the kept top-b experts), e.g. 2/4, got {v!r}"
    return None if 1 <= int(m.group(1)) <= int(m.group(2)) else f"needs 1 <= a <= b, got {v!r}"


def input_stamp(*checkpoints: Path) -> list:
    """Name, size and modification time of each checkpoint's weight, config and tokenizer files: a cache key
    part that changes whenever an input is rewritten."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for p in checkpoints
            for f in sorted(Path(p).glob("*.safetensors")) + [Path(p) / n for n in ("config.json", *TOKENIZER_FILES)]
            if f.is_file()]


def cached_output(model: Path, kind: str, name: str) -> Path:
    """Where a pass caches its output for input ``model``.

    An input that is itself in edgerun's cache (an earlier pass's output) gets its output beside it,
    named by the pass (the chain's cache keys stay readable). A user's checkpoint gets it under
    ``$EDGERUN_HOME/cache/<kind>/``, keyed by the input's path and files (:func:`input_stamp`), so a
    pass never writes beside a user's directory and a rewritten input is processed again.
    """
    cache = catalog.home() / "cache"
    if cache.resolve() in Path(model).resolve().parents:
        return Path(model).with_name(name)
    key = hashlib.sha256(json.dumps([str(Path(model).resolve()), input_stamp(model)]).encode()).hexdigest()[:12]
    return cache / kind / f"{name}-{key}"


def output_of(out: Path | None, cached: Callable[[], Path], marker: str = "config.json") -> tuple[Path, bool]:
    """(where a pass writes, whether it must run): a given ``out`` is always written; otherwise the cache
    path ``cached()`` is reused when its ``marker`` file exists (a complete earlier output)."""
    if out is not None:
        return out, True
    path = cached()
    return path, not (path / marker).is_file()


def carve_record(carved: Path) -> dict:
    """The manifest record of a carved checkpoint, from the carve metadata in its config."""
    meta = read_config(carved)[MOE_KEY]
    return {"name": "carve", "method": "cmoe", "config": meta["name"], "router": meta.get("router", "analytical"),
            "atopk": meta.get("k_a", 10), "calibration": meta["calibration"],
            **({"domains": meta["domains"], "domain_weight": meta["domain_weight"]} if "domains" in meta else {}),
            "carve_seconds": meta.get("carve_seconds"), "checkpoint": str(carved)}


def _unit_interval(v) -> str | None:
    return None if 0 <= v <= 1 else f"must lie in [0, 1], got {v!r}"


@register
class MergePass(Pass):
    """Merge fine-tunes into the checkpoint (Long-to-Short merging; :mod:`converters.merge`).

    Its parameters are a mergekit merge recipe's fields (:data:`converters.merge.RECIPE_PARAMS`):
    ``merge_method``, ``models``, ``parameters`` (the method's hyper-parameters) and the optional
    ``base_model`` (must name the export source), ``tokenizer_source``, ``context_length``, ``seed``.
    The merged checkpoint is cached by content: the recipe and each input's file sizes and times.
    """

    name = "merge"
    takes = ("dense",)
    gives = "dense"
    flag = "--merge"
    needs = "merge dense checkpoints first, then carve or quantize the merge"

    def __init__(self, values: dict, origin: str, recipe=None):
        super().__init__(values, origin)
        self.recipe = recipe

    @classmethod
    def declared(cls) -> tuple[Param, ...]:
        from converters.merge import RECIPE_PARAMS   # torch: only when a merge is named

        return RECIPE_PARAMS

    @classmethod
    def make(cls, origin: str, src: str | None = None, **values) -> "MergePass":
        from converters import merge as mg   # torch: only when a merge is named

        v = validate(mg.RECIPE_PARAMS, values, origin)
        try:
            if v["base_model"] is not None and src is not None and str(v["base_model"]) != str(src):
                raise UsageError(f"base_model {v['base_model']} differs from the export source {src}")
            if not all(isinstance(m, str) for m in v["models"]):
                raise UsageError("models must be names or paths (use a recipe file for per-model weights)")
            hyper = mg.method_hyper(v["merge_method"], v["parameters"] or {}, "parameters")
            spec = mg.make_spec(v["merge_method"], **hyper, seed=v["seed"])
        except UsageError as e:
            raise UsageError(f"{origin}: {e}") from None
        base = v["base_model"] or src
        if base is None:
            raise UsageError(f"{origin}: base_model is needed when the merge has no export source")
        recipe = mg.Recipe(base=str(base), models=tuple(v["models"]), spec=spec,
                           tokenizer_from=v["tokenizer_source"], context_length=v["context_length"])
        return cls(v, origin, recipe)

    @classmethod
    def from_yaml(cls, path, data, lines, prefix, src) -> "MergePass":
        from converters import merge as mg   # torch: only when a merge is named

        recipe = mg.recipe_from_yaml(path, data, lines, prefix, base=src)
        key = prefix.rstrip(".")
        origin = f"{path}, line {lines.get(key, '?')} ({key})" if key else str(path)
        return cls({**data}, origin, recipe)

    @classmethod
    def from_file(cls, path: str | Path, src: str, origin: str = "--merge") -> "MergePass":
        """The merge pass of a mergekit merge recipe file (:func:`converters.merge.load_recipe`)."""
        from converters import merge as mg   # torch: only when a merge is named

        return cls({"recipe": str(path)}, origin, mg.load_recipe(path, base=src))

    def as_dict(self) -> dict:
        return {self.name: self.recipe.as_dict()}

    def tag(self) -> str:
        return self.recipe.spec.method

    def label(self, label: str) -> str:
        return f"{label} merged {self.recipe.spec.method}"

    def apply(self, model, ctx, out):
        from converters import merge as mg   # torch

        recipe = self.recipe
        if ctx.source is None or model != ctx.source.path:      # a merge after another pass: BASE is its output
            recipe = dataclasses.replace(recipe, base=str(model))
        models = [open_source(m, progress=ctx.progress) for m in recipe.models]
        def cached() -> Path:
            stamp = input_stamp(model, *[m.path for m in models])
            key = hashlib.sha256(json.dumps([recipe.as_dict(), [str(m.path) for m in models], stamp],
                                            sort_keys=True, default=str).encode()).hexdigest()[:12]
            return catalog.home() / "cache" / "merged" / f"{model.name}-{recipe.spec.method}-{key}"

        out, todo = output_of(out, cached, mg.MERGE_META)
        if todo:
            ctx.log(f"merging {', '.join(recipe.models)} into {ctx.label or model.name} ({recipe.spec.method})")
            tok = recipe.tokenizer_from
            if tok not in (None, "auto", "base"):
                tok = str(open_source(tok, progress=False).path)
            mg.merge(model, [m.path for m in models], out, recipe.spec, force=True, tokenizer_from=tok,
                     context_length=recipe.context_length, progress=ctx.progress, log=ctx.log)
        record = json.loads((out / mg.MERGE_META).read_text(encoding="utf-8"))
        return out, [{"name": "merge", **record["merge"], "models": [m.as_dict() for m in models],
                      "config_and_tokenizer_from": record["config_and_tokenizer_from"],
                      "merge_seconds": record["seconds"], "checkpoint": str(out)}]


@register
class CarvePass(Pass):
    """Carve the dense FFNs into an SxAyEz mixture of experts, training-free (CMoE; :mod:`converters.carve`).

    Cached as ``$EDGERUN_HOME/cache/carved/<input>-<SxAyEz>-t<calib_tokens>-<router>`` (plus ``-k<atopk>``
    off 10, ``-<dataset>`` off wiki, ``-dom-<domains>`` for a domain-aware grouping and ``-w<weight>`` off 0.5).
    """

    name = "carve"
    takes = ("dense",)
    gives = "carved"
    flag = "--carve"
    needs = "carve a dense Llama-family checkpoint"
    params = (
        Param("config", str, REQUIRED, "SxAyEz: x shared experts, y of z-x routed experts active, z in total",
              check=_sxayez),
        Param("calib_tokens", int, 16384, "calibration tokens for the activation profiles (windows of 2048)",
              check=positive),
        Param("dataset", str, "wiki", "catalog text whose calibration split profiles the neurons"),
        Param("router", str, "fitted", "fitted (linear, ridge fit to each expert's log activation mass; exported "
                                       "exactly) or analytical (CMoE's representative-neuron router)",
              choices=("fitted", "analytical")),
        Param("atopk", int, 10, "ATopK's K: neurons marked per calibration token for the grouping", check=positive),
        Param("domains", str, None, "comma-separated catalog texts: a domain-aware grouping on calibration tokens "
                                  "shared equally among them (replaces dataset; empty: CMoE's grouping)"),
        Param("domain_weight", float, 0.5, "weight of the domain preference against co-activation in the "
                                           "domain-aware grouping, in [0, 1]", check=_unit_interval),
    )

    def tag(self) -> str:
        return self.values["config"].upper()

    def label(self, label: str) -> str:
        return f"{label} carved {self.values['config'].upper()}"

    def apply(self, model, ctx, out):
        from converters.carve import carve_checkpoint   # torch

        cfg = moe_config.parse(self.values["config"], int(read_config(model)["intermediate_size"]))
        tokens, dataset = self.values["calib_tokens"], self.values["dataset"]
        router, k_a = self.values["router"], self.values["atopk"]
        domains = [d.strip() for d in (self.values["domains"] or "").split(",") if d.strip()]
        weight = self.values["domain_weight"]
        suffix = f"-{router}" + ("" if k_a == 10 else f"-k{k_a}") + ("" if dataset == "wiki" or domains else f"-{dataset}")
        if domains:
            suffix += "-dom-" + "-".join(domains) + ("" if weight == 0.5 else f"-w{weight:g}")
        out, todo = output_of(out, lambda: catalog.home() / "cache" / "carved"
                              / f"{model.name}-{cfg.name}-t{tokens}{suffix}")
        if todo:
            ctx.log(f"carving {ctx.label or model.name} into {cfg.name} (CMoE, {tokens} calibration tokens, "
                    f"{router} router)")
            b = bar(f"carving {cfg.name}", ctx.progress, "layer")
            try:
                carve_checkpoint(model, out, cfg.name, tokens=tokens, dataset=dataset, k_a=k_a, router=router,
                                 force=True, progress=b, domains=domains or None, domain_weight=weight)
            finally:
                _close(b)
        return out, [carve_record(out)]


@register
class FinetunePass(Pass):
    """CMoE's light fine-tune of a carved MoE: gate scales, bias load balancing, LoRA (:mod:`converters.cmoe_finetune`).

    Cached beside its input as ``<carved>-ft<minutes>m`` (plus ``-s<steps>``, ``-nolora``,
    ``-<dataset>`` when those are set).
    """

    name = "finetune"
    takes = ("carved",)
    gives = "carved"
    flag = "--finetune"
    needs = "add --carve SxAyEz (a carve pass before it) or give a carved model"
    params = (
        Param("minutes", float, 3.0, "wall-time bound of the training loop (minutes)", check=positive),
        Param("steps", int, None, "also bound the training in optimizer steps", check=positive),
        Param("lora", bool, True, "also train LoRA r=8 on the attention and expert weights (false: gate "
                                  "scales and bias only)"),
        Param("dataset", str, "wiki", "catalog text whose calibration split it trains on"),
    )

    def tag(self) -> str:
        return f"ft{self.values['minutes']:g}m"

    def apply(self, model, ctx, out):
        from converters.cmoe_finetune import finetune   # torch, peft

        v = self.values
        name = (f"{model.name}-ft{v['minutes']:g}m" + (f"-s{v['steps']}" if v["steps"] else "")
                + ("" if v["lora"] else "-nolora") + ("" if v["dataset"] == "wiki" else f"-{v['dataset']}"))
        out, todo = output_of(out, lambda: cached_output(model, "finetuned", name))
        if todo:
            ctx.log(f"fine-tuning {model.name} for {v['minutes']:g} minutes (gate scales, bias load balancing"
                    + (", LoRA r=8)" if v["lora"] else ")"))
            b = bar("fine-tuning", ctx.progress, "step", loss=True)
            try:
                _, report = finetune(model, out, minutes=v["minutes"], steps=v["steps"], lora=v["lora"],
                                     dataset=v["dataset"], force=True, progress=b)
            finally:
                _close(b)
            ctx.log(f"fine-tune: {report.steps} steps, loss {report.loss_first:.3f} -> {report.loss_last:.3f} "
                    f"nats/token, load imbalance {report.imbalance_first:.2f} -> {report.imbalance_last:.2f}")
        ft = read_config(out)[MOE_KEY]["finetune"]
        keys = ("steps", "tokens", "seconds", "loss_first", "loss_last", "lora", "lr", "bias_step",
                "imbalance_first", "imbalance_last")
        return out, [{"name": "cmoe-finetune", **{k: ft[k] for k in keys}, "checkpoint": str(out)}]


@register
class HostPass(Pass):
    """A carved MoE hosted as Granite's shared-expert MoE with linear routers fitted to CMoE's choices.

    The form the GGUF and ONNX engines run (:func:`converters.moe_export.to_granite`); :func:`plan`
    inserts it where a carved MoE meets a pass or writer that needs it. Cached as ``<carved>-granite``
    (:func:`cached_output`).
    """

    name = "host"
    takes = ("carved",)
    gives = "host"
    needs = "host a carved MoE (carve first)"

    def apply(self, model, ctx, out):
        from converters.moe_export import to_granite   # torch

        out, todo = output_of(out, lambda: cached_output(model, "host", model.name + "-granite"))
        if todo:
            ctx.log("hosting the carved MoE as Granite's shared-expert MoE (its fitted router as it is, or a "
                    "linear router fitted to an analytical one)")
            b = bar("routers", ctx.progress)
            try:
                to_granite(model, out, force=True, progress=b)
            finally:
                _close(b)
        host = read_config(out)[MOE_KEY]
        ctx.log(f"router agreement with the carved model's top-{host['active']} on held-out tokens: "
                f"{host['router_agreement_mean']:.1%} (mean over layers)")
        exact = host.get("host_router") == "exact"
        return out, [{"name": "host-as-granitemoe",
                      "router": "the carved model's fitted router (exact)" if exact
                      else "linear, fitted to the carved model's top-k",
                      "router_temperature": host["router_temperature"],
                      "router_agreement_mean": host["router_agreement_mean"],
                      "router_agreement_by_layer": host["router_agreement"], "checkpoint": str(out)}]


@register
class PrunePass(Pass):
    """PreMoe PEP: keep a task's top-b routed experts per layer, route top-a (:mod:`converters.prune`).

    The task's TCESS pattern comes from ``patterns`` or is calibrated on the host and cached
    (:func:`edgerun.moe.calibrate.task_pattern`). Cached as ``<host>-<task>-<a>of<b>-<score>``
    (:func:`cached_output`).
    """

    name = "prune"
    takes = ("host",)
    gives = "host"
    flag = "--prune-experts"
    needs = "add --carve SxAyEz (a carve pass before it) or give a carved model"
    params = (
        Param("task", str, REQUIRED, "the task whose expert pattern decides: a built-in task, or one in patterns"),
        Param("keep", str, REQUIRED, "a/b: keep the top-b routed experts per layer and route top-a", check=_keep),
        Param("patterns", str, None, "expert patterns directory (edgerun experts calibrate); default: "
                                     "calibrate the built-in task and cache it"),
    )

    def _ab(self) -> tuple[int, int]:
        a, b = self.values["keep"].split("/")
        return int(a), int(b)

    def tag(self) -> str:
        a, b = self._ab()
        return f"{self.values['task']}{a}of{b}"

    def label(self, label: str) -> str:
        a, b = self._ab()
        return f"{label} pruned {self.values['task']}:{a}/{b}"

    def apply(self, model, ctx, out):
        from converters.prune import prune_host   # torch (and the imports below)
        from edgerun.moe import tcess
        from edgerun.moe.calibrate import task_pattern

        task, (a, b) = self.values["task"], self._ab()
        pattern, path = task_pattern(model, task, self.values["patterns"])
        cfg = read_config(model)
        tcess.check_model(pattern, {"layers": cfg["num_hidden_layers"], "experts": cfg["num_local_experts"],
                                    "top_k": cfg["num_experts_per_tok"]})
        keep = pattern.keep(b)
        out, todo = output_of(out, lambda: cached_output(model, "pruned",
                                                         f"{model.name}-{task}-{a}of{b}-{pattern.score}"))
        if todo:
            ctx.log(f"pruning to the top {b} experts of task '{task}' per layer, routing top-{a} "
                    f"({pattern.score} TCESS)")
            prune_host(model, out, keep, a, {"task": task, "pattern": str(path), "score": pattern.score}, force=True)
        return out, [{"name": "prune-experts", "method": "premoe-pep", "task": task, "a": a, "b": b,
                      "pattern": str(path), "score": pattern.score, "pattern_tokens": pattern.tokens, "keep": keep}]


def _wanda_sparsity(v) -> str | None:
    from converters.wanda import parse_sparsity   # torch: only when a Wanda pass is named

    try:
        parse_sparsity(v)
    except UsageError as e:
        return str(e)
    return None


@register
class WandaPass(Pass):
    """Wanda pruning of a dense model's linear layers: a ratio per output row, or N:M (:mod:`converters.wanda`).

    Calibrated on the wiki calibration split. The zeros are stored densely (GGUF and ONNX have no sparse
    weights on CPU): the pass changes quality, not size or speed. Cached as
    ``<input>-wanda<sparsity>-t<tokens>`` (:func:`cached_output`).
    """

    name = "wanda"
    takes = ("dense",)
    gives = "dense"
    flag = "--prune"
    needs = "prune a dense checkpoint (before carving or quantizing it)"
    params = (
        Param("sparsity", str, REQUIRED, "a ratio of each output row's weights to zero (0.5), or N:M (2:4: keep 2 "
                                         "of every 4 inputs)", check=_wanda_sparsity),
        Param("calib_tokens", int, 16 * PTQ_WINDOW, f"calibration tokens, in windows of {PTQ_WINDOW} from the wiki "
                                                    "calibration split (rounded up to whole windows)",
              check=positive),
    )

    @classmethod
    def from_yaml(cls, path, data, lines, prefix, src):
        sparsity = data.get("sparsity")
        if isinstance(sparsity, int) and not isinstance(sparsity, bool) and sparsity > 1:
            # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
            raise yamlfile.YamlError(f"{path}, line {lines.get(prefix + 'sparsity', '?')}: sparsity {sparsity} is not "
                                     "a ratio; write N:M quoted (sparsity: '2:4') or a ratio in (0, 1)")
        if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
            data = {**data, "sparsity": str(sparsity)}      # ``sparsity: 0.5`` reads as a number
        return super().from_yaml(path, data, lines, prefix, src)

    def tag(self) -> str:
        return "wanda" + str(self.values["sparsity"]).replace(":", "of")

    def label(self, label: str) -> str:
        return f"{label} pruned wanda:{self.values['sparsity']}"

    def apply(self, model, ctx, out):
        from converters.wanda import SPARSITY_KEY, prune_checkpoint   # torch

        v = self.values
        windows = math.ceil(v["calib_tokens"] / PTQ_WINDOW)
        out, todo = output_of(out, lambda: cached_output(model, "wanda", f"{model.name}-{self.tag()}"
                                                                         f"-t{windows * PTQ_WINDOW}"))
        if todo:
            ctx.log(f"pruning linear layers with Wanda to sparsity {v['sparsity']} (calibration: {windows} x "
                    f"{PTQ_WINDOW} tokens of the wiki calibration split)")
            b = bar("wanda blocks", ctx.progress, "block")
            try:
                prune_checkpoint(model, out, v["sparsity"], n_samples=windows, seq_len=PTQ_WINDOW, force=True,
                                 progress=b)
            finally:
                _close(b)
        record = read_config(out)[SPARSITY_KEY]
        ctx.log(f"wanda: {record['zero_fraction']:.1%} of the block linear weights are zero")
        return out, [{"name": "wanda", **record, "checkpoint": str(out)}]


def _fraction(v) -> str | None:
    return None if 0 < v <= 1 else f"must be a fraction of the pool in (0, 1], got {v!r}"


@register
class RecoverPass(Pass):
    """PASER recovery of a pruned dense model: select recovery data, LoRA, merge (:mod:`converters.paser`).

    The original is the export source (the JSD is taken between it and the pruned checkpoint); recipe only
    (``- recover: {budget: 0.1}`` after ``- wanda: {sparsity: 0.5}``). The selection JSON and cluster PNG
    are written inside the recovered checkpoint. Cached as ``<input>-<method><budget>-p<pool>-m<minutes>-s<seed>``.
    """

    name = "recover"
    takes = ("dense",)
    gives = "dense"
    needs = "recover a pruned dense checkpoint (a wanda pass before it)"
    params = (
        Param("budget", float, 0.1, "fraction of the instruction pool to train on, in (0, 1]", check=_fraction),
        Param("pool_size", int, 4000, "seeded subsample of the ~19,800-pair instruction pool", check=positive),
        Param("clusters", int, 10, "capability clusters", check=positive),
        Param("method", str, "paser", "paser, or random (the baseline)", choices=("paser", "random")),
        Param("minutes", float, 5.0, "wall-time bound of the LoRA training (minutes)", check=positive),
        Param("steps", int, None, "also bound the training in optimizer steps", check=positive),
        Param("seed", int, 0, "pool subsample, clustering and training seed"),
    )

    def tag(self) -> str:
        v = self.values
        return f"{v['method']}{v['budget']:g}"

    def label(self, label: str) -> str:
        return f"{label} recovered {self.tag()}"

    def apply(self, model, ctx, out):
        from converters import paser   # torch, peft, scikit-learn

        v = self.values
        if ctx.source is None:
            raise UsageError(f"{self.origin}: the recover pass needs the export source (the original model)")
        name = f"{model.name}-{self.tag()}-p{v['pool_size']}-k{v['clusters']}-m{v['minutes']:g}-s{v['seed']}" + \
            (f"-st{v['steps']}" if v["steps"] else "")
        out, todo = output_of(out, lambda: cached_output(model, "recovered", name), "paser_selection.json")
        if todo:
            paser.run(model, ctx.source.path, out, budget=v["budget"], pool_size=v["pool_size"],
                      clusters=v["clusters"], method=v["method"], seed=v["seed"], minutes=v["minutes"],
                      steps=v["steps"], force=True, progress=ctx.progress, log=ctx.log)
        rec = json.loads((out / "paser_selection.json").read_text(encoding="utf-8"))
        return out, [{"name": "recover", "method": v["method"], "budget": v["budget"], "pool": rec["pool"],
                      "selected": rec["selection"]["size"], "recovery": rec["recovery"], "seconds": rec["seconds"],
                      "checkpoint": str(out)}]


def _ptq_method(v) -> str | None:
    from converters.ptq.methods import METHODS   # torch: only when a PTQ pass is named

    return None if v in METHODS else f"must be one of {', '.join(METHODS)}, got {v!r}"


def _ptq_bits(v) -> str | None:
    from edgerun.formats.gptq import BITS   # torch: only when a PTQ pass is named

    return None if v in BITS else f"must be one of {', '.join(map(str, BITS))}, got {v!r}"


@register
class PtqPass(Pass):
    """Weight-only PTQ of every linear layer (RTN, GPTQ, AWQ) into the GPTQ layout (:mod:`converters.ptq`).

    Its output is a GPTQ-layout HF checkpoint: the last pass of an ``--to hf`` export.
    """

    name = "ptq"
    takes = ("dense",)
    gives = "gptq"
    flag = "--ptq"
    needs = "quantize a dense checkpoint (carved MoEs are not supported yet)"
    params = (
        Param("method", str, "gptq", "rtn, gptq or awq (converters.ptq.methods)", check=_ptq_method),
        Param("bits", int, 4, "weight bits: 2, 3, 4 or 8", check=_ptq_bits),
        Param("group_size", int, 64, "input columns per scale (must divide every layer's input width)",
              check=positive),
        Param("calib_tokens", int, 16 * PTQ_WINDOW, f"calibration tokens, in windows of {PTQ_WINDOW} from the wiki "
                                                    "calibration split (rounded up to whole windows)",
              check=positive),
    )

    def tag(self) -> str:
        v = self.values
        return f"{v['method']}-w{v['bits']}g{v['group_size']}"

    def apply(self, model, ctx, out):
        from converters.ptq import quantize_checkpoint   # torch

        v = self.values
        windows = math.ceil(v["calib_tokens"] / PTQ_WINDOW)
        out, todo = output_of(out, lambda: catalog.home() / "cache" / "ptq"
                              / f"{model.name}-{self.tag()}-t{windows * PTQ_WINDOW}")
        if todo:
            ctx.log(f"quantizing linear layers with {v['method'].upper()} to {v['bits']} bits, groups of "
                    f"{v['group_size']} (calibration: {windows} x {PTQ_WINDOW} tokens of the wiki calibration split)")
            b = bar(f"{v['method']} layers", ctx.progress, "layer")
            try:
                quantize_checkpoint(model, out, method=v["method"], bits=v["bits"], group_size=v["group_size"],
                                    n_samples=windows, seq_len=PTQ_WINDOW, force=True, progress=b)
            finally:
                _close(b)
        return out, [{"name": "ptq", "method": v["method"], "bits": v["bits"], "group_size": v["group_size"],
                      "layout": "gptq", "calibration": {"dataset": "wiki", "split": "calibration", "windows": windows,
                                                        "tokens_per_window": PTQ_WINDOW}}]


# --- chains: from flags, from recipes; planned, then run ----------------------------------------------

def from_flags(src: str, merge: str | None = None, merge_method: str | None = None, prune: str | None = None,
               carve: str | None = None, finetune_minutes: float | None = None, prune_experts: str | None = None,
               patterns: str | Path | None = None, ptq: str | None = None, bits: int | None = None,
               group_size: int | None = None, calib_tokens: int | None = None, carve_tokens: int | None = None,
               calib_samples: int | None = None) -> list[Pass]:
    """The chain export's flags ask for, in the fixed order merge, wanda (--prune), carve, finetune, prune, ptq.

    Args:
        src: the export source (a merge's BASE).
        merge: a mergekit merge recipe (``.yaml``/``.yml``), or one model to merge with ``merge_method``
            (default task-arithmetic) and its default hyper-parameters.
        prune: ``wanda:RATIO`` or ``wanda:N:M`` (Wanda pruning of the dense model).
        carve: ``SxAyEz``. finetune_minutes: CMoE fine-tune bound (minutes).
        prune_experts: ``TASK:a/b``. patterns: expert patterns directory for the prune.
        ptq: rtn, gptq or awq; bits, group_size: its settings.
        calib_tokens: calibration tokens of every calibrating pass given here (wanda, carve, ptq, an
            aim-ties ``merge_method``); None: each pass's declared default.
        carve_tokens, calib_samples: the old spellings (carve tokens; PTQ windows of 512 tokens).

    Raises:
        UsageError: flags that need another flag, bad values (the flag named).
    """
    chain: list[Pass] = []
    if merge_method and not merge:
        raise UsageError("--merge-method needs --merge MODEL")
    if merge:
        if Path(merge).suffix.lower() in (".yaml", ".yml"):
            if merge_method:
                raise UsageError("--merge-method applies to --merge MODEL; a recipe names its merge_method")
            chain.append(MergePass.from_file(merge, src))
        else:
            method = merge_method or "task-arithmetic"
            hyper = {}
            if calib_tokens is not None and method.lower().replace("_", "-") == "aim-ties":
                hyper["calib_samples"] = math.ceil(calib_tokens / 256)
            chain.append(MergePass.make("--merge", src=src, merge_method=method, models=[str(merge)],
                                        parameters=hyper))
    if prune:
        from converters.wanda import parse_spec   # torch: only with --prune

        chain.append(WandaPass.make("--prune", sparsity=parse_spec(prune),
                                    calib_tokens=calib_tokens))
    if carve_tokens is not None and calib_tokens is not None:
        raise UsageError("give --calib-tokens (--carve-tokens is its old name), not both")
    if carve:
        chain.append(CarvePass.make("--carve", config=carve, calib_tokens=calib_tokens or carve_tokens))
    if finetune_minutes is not None:
        chain.append(FinetunePass.make("--finetune", minutes=finetune_minutes))
    if prune_experts:
        from converters.prune import parse_spec   # torch: only with --prune-experts

        task, a, b = parse_spec(prune_experts)
        chain.append(PrunePass.make("--prune-experts", task=task, keep=f"{a}/{b}",
                                    patterns=str(patterns) if patterns is not None else None))
    if ptq is not None:
        if calib_samples is not None and calib_tokens is not None:
            raise UsageError("give --calib-tokens (--calib-samples, in windows of 512, is its old name), not both")
        tokens = calib_tokens if calib_samples is None else calib_samples * PTQ_WINDOW
        chain.append(PtqPass.make("--ptq", method=ptq, bits=bits, group_size=group_size, calib_tokens=tokens))
    # a flag that would do nothing is refused, not ignored
    if ptq is None and (bits is not None or group_size is not None or calib_samples is not None):
        raise UsageError("--bits, --group-size and --calib-samples set the PTQ pass: add --ptq rtn|gptq|awq")
    if patterns is not None and not prune_experts:
        raise UsageError("--patterns applies to --prune-experts TASK:a/b")
    calibrating = prune or carve or ptq is not None or (merge and (merge_method or "").lower().replace("_", "-") == "aim-ties")
    if calib_tokens is not None and not calibrating:
        raise UsageError("--calib-tokens sets a calibrating pass: --prune, --carve, --ptq, or --merge with aim-ties")
    return chain


# a recipe's top level; ``passes`` is checked for presence after unknown fields, so a misspelt key is named
RECIPE_SCHEMA = {"passes": yamlfile.Field(lambda v: None if isinstance(v, list) and v else
                                          "must be a non-empty list of passes, e.g. [{carve: {config: S2A2E8}}]",
                                          required=False)}


def load(path: str | Path, src: str | None = None) -> list[Pass]:
    """The chain of a recipe file: ``passes: [{name: {parameters}}, ...]``, or a plain merge recipe.

    Args:
        path: the YAML file. src: the export source (a merge's BASE).

    Raises:
        YamlError (a UsageError): malformed YAML, an unknown pass, an unknown or missing parameter,
            a wrong type or bad value, each naming the file, the field and its line.
    """
    path = Path(path)
    data, lines = yamlfile.read(path)
    if "passes" not in data and "merge_method" in data:          # a mergekit merge recipe: one merge pass
        return [MergePass.from_yaml(path, data, lines, "", src)]
    data = yamlfile.check(path, data, lines, RECIPE_SCHEMA)
    if data["passes"] is None:
        raise yamlfile.YamlError(f"{path}: missing field 'passes' (or a merge recipe's merge_method)")
    chain = []
    for i, entry in enumerate(data["passes"]):
        key = f"passes[{i}]"
        if isinstance(entry, str):
            entry = {entry: None}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise yamlfile.YamlError(f"{path}, line {lines.get(key, '?')}: field '{key}' must be one pass, "
                                     f"{{name: {{parameter: value}}}}, got {entry!r}")
        (name, params), = entry.items()
        if name not in REGISTRY:
            raise yamlfile.YamlError(f"{path}, line {lines.get(key, '?')}: unknown pass '{name}'; known: "
                                     f"{', '.join(REGISTRY)}")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise yamlfile.YamlError(f"{path}, line {lines.get(f'{key}.{name}', '?')}: field '{key}.{name}' "
                                     f"must be a mapping of its parameters, got {params!r}")
        chain.append(REGISTRY[name].from_yaml(path, params, lines, f"{key}.{name}.", src))
    return chain


def plan(chain: list[Pass], kind: str, writer: str | None = None) -> tuple[list[Pass], str]:
    """Check that each pass gets the checkpoint kind it takes; insert the host step where needed.

    Args:
        chain: the passes in order. kind: the kind of the input checkpoint (:func:`kind_of`).
        writer: ``gguf`` or ``onnx`` (they run dense checkpoints and hosts: a carved MoE is hosted
            first), ``hf`` or None (any kind).

    Returns:
        (the passes to run, the kind of the last output).

    Raises:
        UsageError: a pass that would get a kind it does not take (the pass and its origin named).
    """
    steps: list[Pass] = []
    for p in chain:
        if kind not in p.takes and kind == "carved" and "host" in p.takes:
            steps.append(HostPass({}, "(host of the carved MoE)"))
            kind = "host"
        if kind not in p.takes:
            raise UsageError(f"{p.origin}: {p.name} takes {KINDS[p.takes[0]]}, not {KINDS[kind]}"
                             + (f"; {p.needs}" if p.needs else ""))
        steps.append(p)
        kind = p.gives
    if writer in ("gguf", "onnx") and kind == "carved":
        steps.append(HostPass({}, "(host of the carved MoE)"))
        kind = "host"
    return steps, kind


def run(chain: list[Pass], model: Path, ctx: Context, out: Path | None = None,
        staging: Path | None = None) -> tuple[Path, list[dict]]:
    """Apply ``chain`` (planned) to the checkpoint ``model`` in order.

    Args:
        out: where the last pass writes (None: its cache location).
        staging: a directory for the intermediate checkpoints (None: the export caches).

    Returns:
        (the last checkpoint, every pass's manifest records in order). ``ctx.label`` ends as the
        last checkpoint's human name.
    """
    records: list[dict] = []
    for i, p in enumerate(chain):
        last = i == len(chain) - 1
        target = out if last and out is not None else (staging / f"{i:02d}-{p.name}" if staging else None)
        model, recs = p.apply(model, ctx, target)
        ctx.label = p.label(ctx.label)
        records += recs
    return model, records


def to_checkpoint(src: str, chain: list[Pass], out: str | Path, force: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print) -> tuple[Path, list[dict]]:
    """Run ``chain`` on ``src`` and write its last checkpoint at ``out`` (``edgerun carve``).

    The intermediate checkpoints live in a staging directory beside ``out``, removed afterwards
    (also on failure); nothing is cached.

    Raises:
        UsageError: an empty chain, a chain in the wrong order, ``out`` exists without ``force``.
    """
    out = Path(out)
    if not chain:
        raise UsageError("no passes to run")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    source = open_source(src, progress=progress)
    steps, _ = plan(chain, kind_of(source.path))
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".passes-", dir=out.resolve().parent))
    try:
        ctx = Context(src=str(src), source=source, progress=progress, log=log, label=source.label)
        return run(steps, source.path, ctx, out=out, staging=staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
