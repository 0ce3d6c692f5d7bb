"""edgerun: an on-device LLM runtime and compression toolchain for laptop CPUs.

The Python API mirrors the CLI::

    import edgerun
    session = edgerun.load()                      # default model, pulled on first use
    for piece in session.chat("What is the capital of France?"):
        print(piece, end="", flush=True)
    print(session.stats.decode_tokens_per_s)
    print(session.last_turn.plan.reasons)          # the plan this message ran under
"""

from __future__ import annotations

import secrets
from pathlib import Path

from edgerun import catalog, templates
from edgerun.backends import canonical_backend, detect_backend, open_backend
from edgerun.backends.base import GenerationStats, SamplingParams, cap_threads
from edgerun.device import budget_bytes
from edgerun.errors import EdgerunError, UsageError
from edgerun.formats import gguf as gguf_format
from edgerun.kv.types import KV_TYPES
from edgerun.planner import KVPlanner, Plan, Planner, parse_keep
from edgerun.session import Session, Turn

__version__ = "0.1.0"

SEED_MAX = 2**32 - 2
"""The largest seed that reproduces: llama.cpp reads 0xFFFFFFFF (LLAMA_DEFAULT_SEED) as "random"."""


def load(model: str | Path | None = None, *, backend: str | None = None, system: str | None = None,
         chat_template: str | None = None, n_ctx: int | None = None, threads: int | None = None,
         batch_threads: int | None = None, max_tokens: int | None = None, temperature: float = 0.8,
         top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
         seed: int | None = None, progress: bool = True, notify=None, adaptive_experts: bool = False,
         keep: str = "2/4", patterns: str | Path | None = None, assembler=None, kv_layout=None,
         device: str | Path | None = None, kv_type: str | None = None, kv_type_k: str | None = None,
         kv_type_v: str | None = None, trim_thinking: bool = False, verifier="rule", trim_confirmations: int = 2,
         **engine_options) -> Session:
    """Open a chat session on ``model`` (a catalog name, a path, or None for the default model).

    Every message is planned once (:class:`edgerun.planner.Planner`): the model or the task's experts,
    the KV layout and the engine settings, within the device's memory budget; ``session.last_turn``
    holds the plan and the reply's stats.

    Args:
        model: catalog name (pulled on first use) or path to a model file.
        backend: engine name (``"llama.cpp"``, ``"onnx"``, ``"torch"``, ``"mixpe"``); default: from the
            path (a GGUF file, an onnxruntime-genai directory, a Hugging Face checkpoint directory).
        system: system prompt.
        chat_template: a built-in template name or a Jinja file, overriding the model's own.
        n_ctx: context window in tokens (default min(4096, the model's training context)).
        threads, batch_threads: decode / prompt threads (default: physical cores); more than the CPUs this
            process may use are capped at that number, with a notice.
        max_tokens, temperature, top_p, top_k, min_p, repeat_penalty: sampling (:class:`SamplingParams`).
        seed: sampling seed, 0..4294967294; None draws one (``session.sampling.seed``, shown by /stats in
            the plan's settings): passing it back reproduces the replies exactly.
        progress: show a progress bar when pulling.
        notify: callback for one-line notices (context trimmed, threads capped, flash attention turned on);
            default: ``session.notices``.
        adaptive_experts: per message, run only the retrieved task's experts (PreMoe TAER) of a carved
            model (``model`` is the carved checkpoint; torch reads them from the expert store, llama.cpp
            runs GGUFs that ``assembler`` builds per pattern).
        keep: ``a/b`` for adaptive experts: route top-a of the top-b experts per layer.
        patterns: expert patterns directory for adaptive experts.
        assembler: for adaptive experts on llama.cpp, what builds a task's GGUF
            (``converters.assemble.GGUFAssembler(quant)``; the runtime writes no GGUF itself; torch's task
            models are cached copies of the kept experts' tensors).
        kv_layout: KVTuner layout(s): a layout YAML, or a directory of them (a ``kv tune`` Pareto
            front). torch: the packed layer-wise KV cache; one file runs that layout (refused when its
            cache does not fit); with a directory the layout is chosen per message to fit
            ``device``'s memory budget after the weights of the model (or task experts) the plan runs
            (KV16 included when it fits); the engine opens with a single file's layout, so every path
            (``backend.complete``, ``stream``, ``logits``) runs it. llama.cpp: one file, mapped to the
            nearest uniform (type_k, type_v) not less precise (said in a notice).
        device: device config YAML whose ``memory_budget_gib`` bounds weights + KV cache (default:
            this machine, 75% of RAM).
        kv_type, kv_type_k, kv_type_v: llama.cpp KV cache element types
            (:data:`edgerun.kv.types.KV_TYPES`): ``kv_type`` for K and V, the others for one each; a
            quantized V type turns flash attention on (said in a notice).
        trim_thinking: TrimR (:mod:`edgerun.trimr`): while a reasoning model thinks, close its thinking once
            ``trim_confirmations`` consecutive thoughts confirm the previous answer (or it underthinks or
            loops). The model's chat template must know ``<think>``/``</think>``.
        verifier: TrimR's verifier: ``"rule"`` (reads ``answer is N``), ``"llm"`` (the default model as a
            yes/no verifier in a second llama.cpp context), a model name or GGUF path, or a verifier object.
        trim_confirmations: TrimR's M (default 2).
        engine_options: passed to the engine (e.g. ``flash_attn``, ``cache_type_k``, ``mode`` for MixPE).

    Raises:
        UsageError: a seed outside 0..4294967294, a KV type that is unknown or whose block does not
            divide the model's head dimension, KV types with a KV layout or on another engine.
        EdgerunError: unknown model, bad file, download failure, missing chat template, engine error,
            a plan that does not fit the device budget; with ``trim_thinking``, a template without thinking
            markers or a verifier model that cannot be loaded.
    """
    if not trim_thinking and (verifier != "rule" or trim_confirmations != 2):
        raise UsageError("verifier and trim_confirmations apply to trim_thinking=True")
    label = str(model or catalog.DEFAULT_MODEL)
    pending: list[str] = []  # notices before the session exists, when it keeps them (no ``notify``)
    notify_fn = notify or pending.append
    if seed is None:
        seed = secrets.randbelow(2**31)  # drawn, so that unseeded runs differ; kept, so that it reproduces
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed must be in 0..{SEED_MAX}")
    threads, note = cap_threads(threads)  # more threads than CPUs only fight over them
    batch_threads, batch_note = cap_threads(batch_threads)
    if note or batch_note:
        notify_fn(note or batch_note)
    budget = budget_bytes(device)
    experts = None
    if adaptive_experts:
        engine_name = canonical_backend(backend or "llama.cpp")
        experts = _expert_planner(model, engine_name, keep, patterns, assembler, notify, threads)
        path = experts.model_for(experts.patterns[0].task)
    else:
        engine_name = canonical_backend(backend) if backend else None
        entry = catalog.CATALOG.get(label)
        if entry is not None and not entry.chat and chat_template is None and not Path(label).exists():
            # known to have no chat template: say so before a download
            templates.choose(None, None, model_label=f"{label} (a base model)")
        path = catalog.resolve(model, progress=progress)
        engine_name = engine_name or detect_backend(path)
    if engine_name == "llama.cpp":
        info = gguf_format.validate(path)
        # refuse a model without a chat template before loading it (never fall back silently)
        templates.choose(info.chat_template, chat_template, model_label=label)
        engine_options["info"] = info
        engine_options["notify"] = notify_fn
    if kv_type is not None or kv_type_k is not None or kv_type_v is not None:
        if kv_layout is not None:
            raise UsageError("give --kv-type/--kv-type-k/--kv-type-v or --kv-layout, not both")
        if engine_name != "llama.cpp":
            raise UsageError(f"--kv-type applies to llama.cpp, not {engine_name} (torch runs --kv-layout)")
        engine_options["cache_type_k"] = kv_type_k or kv_type or engine_options.get("cache_type_k", "f16")
        engine_options["cache_type_v"] = kv_type_v or kv_type or engine_options.get("cache_type_v", "f16")
    kv_layouts = None
    if kv_layout is not None:
        kv_layouts, engine_options = _kv_options(engine_name, kv_layout, engine_options, notify_fn)
        if kv_layouts is not None and len(kv_layouts) == 1 and not kv_layouts[0].is_dir():
            # one file: the engine opens with it, so every generation path (not only chat) runs it
            engine_options = {**engine_options, "kv_layout": kv_layouts[0]}

    def open_model(plan: Plan):
        return open_backend(plan.engine, plan.model_path, n_ctx=n_ctx, threads=threads, batch_threads=batch_threads,
                            seed=seed, **engine_options)

    engine = open_backend(engine_name, path, n_ctx=n_ctx, threads=threads, batch_threads=batch_threads, seed=seed,
                          **engine_options)
    try:
        special = engine.special_tokens
        template = templates.choose(engine.chat_template, chat_template, model_label=label,
                                    bos_token=special["bos_token"], eos_token=special["eos_token"])
        kv_planner = None
        if kv_layouts is not None:
            # one file runs that layout; a directory (a Pareto front) is planned per message with KV16
            plan_all = len(kv_layouts) > 1 or any(Path(p).is_dir() for p in kv_layouts)
            kv_planner = KVPlanner.for_backend(engine, kv_layouts, budget, include_kv16=plan_all)
        # the seed every reply samples with is part of the settings a plan reports (/stats)
        planner = Planner(engine_name, budget, experts=experts, kv=kv_planner,
                          settings={**engine.engine_settings(), "seed": seed})
        trim = None
        if trim_thinking:
            from edgerun import trimr

            trimr.check_template(template.source, label)
            trimr.TrimConfig(confirmations=trim_confirmations)          # refuse a bad M before loading a verifier
            trim = trimr.TrimConfig(verifier=trimr.make_verifier(verifier), confirmations=trim_confirmations)
    except BaseException:
        engine.close()
        raise
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
    session = Session(engine, template, system=system, sampling=sampling, notify=notify, planner=planner,
                      open_model=open_model, trim=trim)
    session.notices.extend(pending)
    return session


def _expert_planner(model, engine: str, keep: str, patterns, assembler, notify, threads: int | None = None):
    """The PreMoe TAER half of the planner for a carved checkpoint."""
    from edgerun.moe.taer import ExpertPlanner  # torch: only adaptive-expert sessions need it

    if patterns is None:
        raise UsageError("--adaptive-experts needs --patterns DIR (made by 'edgerun experts calibrate')")
    a, b = parse_keep(keep)
    path = catalog.resolve(model)
    if not path.is_dir():
        raise UsageError(f"--adaptive-experts needs a carved checkpoint directory, not {path}")
    return ExpertPlanner(path, patterns, a, b, engine=engine, assembler=assembler, log=notify, threads=threads)


def _kv_options(backend: str, kv_layout, engine_options: dict, notify) -> tuple:
    """(layouts for the torch planner or None, engine options) for a ``kv_layout`` argument."""
    paths = [Path(kv_layout)] if not isinstance(kv_layout, (list, tuple)) else [Path(p) for p in kv_layout]
    for p in paths:
        if not p.exists():
            raise UsageError(f"KV layout {p} does not exist")
    if backend == "llama.cpp":
        from edgerun.kv import layout as kvl  # torch (via the KV cache module): only layout sessions

        if len(paths) != 1 or paths[0].is_dir():
            raise UsageError("llama.cpp runs one uniform KV type: give one layout file, not a directory")
        tk, tv, note = kvl.llama_cpp_types(kvl.load(paths[0]))
        notify(note)
        opts = {**engine_options, "cache_type_k": tk, "cache_type_v": tv}
        if KV_TYPES[tv].quantized:  # llama.cpp needs flash attention for a quantized V cache
            opts["flash_attn"] = True
        return None, opts
    if backend != "torch":
        raise UsageError(f"KV layouts run on the torch backend (or llama.cpp as a uniform type), not {backend}")
    return paths, engine_options


__all__ = ["load", "Session", "Turn", "Plan", "SamplingParams", "GenerationStats", "EdgerunError", "__version__"]
