"""The ``edgerun`` command: a thin argparse layer over the Python API (``edgerun.load``, ``edgerun.catalog``).

Errors a user can cause print ``error: <one line>`` on stderr and exit non-zero, with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import sys
from pathlib import Path

import edgerun
from edgerun import __version__, catalog
from edgerun.device import load as load_device
from edgerun.device import to_yaml
from edgerun.errors import EdgerunError, UsageError

# The commands below import their writers, profilers, torch modules and matplotlib inside the command
# function: `edgerun chat` on a GGUF must start without torch (about 2 s and 300 MB), and each such
# import carries a comment naming what is heavy about it.

HELP_TEXT = """commands:
  /clear   forget the conversation (the system prompt stays)
  /stats   TTFT, prefill and decode speed of the last reply, context used, and the plan it ran under
  /help    this help
  /exit    leave (also Ctrl-D)
Ctrl-C stops a reply and keeps the conversation."""


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (interactive, or one reply with -p or stdin)",
                       description="Chat with a model. Without -p and with a terminal on stdin, starts an "
                                   "interactive session; otherwise answers one prompt and exits.")
    p.add_argument("model", nargs="?", default=None,
                   help=f"catalog name or path to a .gguf file (default: {catalog.DEFAULT_MODEL})")
    p.add_argument("-p", "--prompt", help="answer this prompt and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens per reply (default: until done)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default 0.95)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (default 40)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed, 0..4294967294 (default: one is drawn; /stats shows it)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: physical cores; capped at the CPUs this process may use)")
    p.add_argument("--ctx-size", type=int, default=None, help="context window in tokens (default 4096 or less)")
    p.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                   help="llama.cpp: prompt tokens per evaluation call (default 64 in the interactive chat, so "
                        "Ctrl-C stops a long prefill at once; 512 otherwise)")
    p.add_argument("--kv-type", default=None, metavar="TYPE",
                   help="llama.cpp KV cache type of K and V: f32, f16 (default), bf16, q8_0, q5_1, q5_0, q4_1, "
                        "q4_0, iq4_nl (a quantized V turns flash attention on)")
    p.add_argument("--kv-type-k", default=None, metavar="TYPE", help="llama.cpp KV cache type of K (over --kv-type)")
    p.add_argument("--kv-type-v", default=None, metavar="TYPE", help="llama.cpp KV cache type of V (over --kv-type)")
    p.add_argument("--chat-template", default=None,
                   help="chat template to use instead of the model's: chatml, llama3, gemma, or a Jinja file")
    p.add_argument("--adaptive-experts", action="store_true",
                   help="per message, load only the retrieved task's experts of a carved model (PreMoe TAER)")
    p.add_argument("--keep", default="2/4", metavar="a/b", help="adaptive experts: top-a of the top-b per layer")
    p.add_argument("--patterns", default=None, help="adaptive experts: expert patterns directory")
    p.add_argument("--quant", default=None, help="adaptive experts on llama.cpp: GGUF type of the assembled models "
                                                  "(default Q8_0)")
    p.add_argument("--mixpe", default=None, help="MixPE mode with --backend mixpe: W4A8, W4A16 (default), W8A8, W8A16")
    p.add_argument("--cost-table", default=None, help="MixPE: energy cost table YAML (default: the simulator's)")
    p.add_argument("--mixpe-gemm", default=None, choices=["codes", "bitplane"],
                   help="MixPE GEMM path: codes (default; one batched matmul of the packed codes per layer) or "
                        "bitplane (shift-and-add over bit-planes in float64: the slow reference)")
    p.add_argument("--mixpe-accum", default=None, choices=["fp32", "fp16", "bf16", "fp64"],
                   help="MixPE W4A16/W8A16: precision of the per-group accumulation (default fp32; A8 modes "
                        "accumulate integers exactly)")
    p.add_argument("--kv-layout", default=None, metavar="LAYOUT",
                   help="KVTuner KV-cache layout YAML, or a directory of them ('edgerun kv tune' output) to choose "
                        "per message within the device budget (torch; llama.cpp maps one file to a uniform type)")
    p.add_argument("--kv-working-copy", default=None, choices=["none", "model", "float16", "bfloat16"],
                   help="torch with --kv-layout: what the packed cache keeps dequantized for attention: none "
                        "(default; packed bytes only), model, float16, bfloat16 (faster decode, more memory)")
    p.add_argument("--device", default=None, help="device config YAML bounding weights + KV cache "
                                                  "(default: this machine, 75%% of RAM)")
    p.add_argument("--backend", default=None, choices=["llama.cpp", "onnx", "torch", "mixpe"],
                   help="engine (default: llama.cpp for .gguf files, onnx for onnxruntime-genai directories, "
                        "torch for Hugging Face checkpoint directories)")
    p.add_argument("--trim-thinking", action="store_true",
                   help="TrimR: close a reasoning model's <think> section once thoughts keep confirming the same "
                        "answer (or it underthinks or loops); see docs/trimr.md")
    p.add_argument("--verifier", default=None, metavar="rule|llm|MODEL",
                   help="TrimR's verifier: rule (reads 'answer is N', default), llm (the default model asked yes/no "
                        "in a second llama.cpp context) or a model name / GGUF path")
    p.add_argument("--trim-confirmations", type=int, default=None, metavar="M",
                   help="TrimR: close after M consecutive confirmations of the same answer (default 2)")
    p.set_defaults(func=cmd_chat)


def _check_sampling(args) -> None:
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if args.temperature < 0:
        raise UsageError("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    if args.ctx_size is not None and args.ctx_size < 16:
        raise UsageError("--ctx-size must be at least 16")


def format_stats(stats) -> str:
    """One line of /stats: TTFT (ms), prefill and decode tokens/s, context used."""
    def rate(v):
        return f"{v:.1f} tokens/s" if v else "n/a"
    if not stats.finish_reason:
        return "no reply yet"
    reused = stats.prompt_tokens - stats.prefill_tokens
    return (f"TTFT {stats.ttft_ms:.1f} ms | prefill {stats.prefill_tokens} tokens"
            + (f" ({reused} of {stats.prompt_tokens} from the KV cache)" if reused > 0 else "")
            + f", {rate(stats.prefill_tokens_per_s)}"
            f" | decode {stats.generated_tokens} tokens, {rate(stats.decode_tokens_per_s)}"
            f" | context {stats.context_used}/{stats.context_size} tokens | finish: {stats.finish_reason}"
            + (f" | KV cache {stats.kv_cache_bytes / 2**20:.2f} MiB" if stats.kv_cache_bytes else "")
            + (f" ({stats.kv_layout})" if stats.kv_layout else ""))


def format_turn(turn) -> str:
    """/stats for one turn record: the generation line, then the plan (model or experts, KV layout,
    settings, reasons) and engine counters."""
    if turn is None:
        return "no reply yet"
    lines = [format_stats(turn.stats)]
    plan = turn.plan
    shown = {k: v for k, v in plan.settings.items() if k != "flash_attn_auto"}
    if plan.settings.get("flash_attn_auto"):
        shown["flash_attn"] = f"{shown.get('flash_attn', True)} (on for the quantized V cache)"
    settings = ", ".join(f"{k} {v}" for k, v in shown.items())
    lines.append(f"plan: {plan.engine} {plan.model_path.name} | weights {plan.weights_bytes / 2**20:.1f} MiB"
                 + (f" of a {plan.budget_bytes / 2**30:.1f} GiB budget" if plan.budget_bytes else "")
                 + f" | {settings} | history {turn.history}" + (f" | load {turn.load_ms:.0f} ms" if turn.load_ms else ""))
    if plan.experts is not None:
        e = plan.experts
        lines.append(f"experts: task {e.task} (distance {e.distance:.4f}), {e.a}/{e.b} | retrieval "
                     f"{e.retrieval_ms:.1f} ms | assembly {e.assembly_ms:.0f} ms")
    lines += [f"  - {r}" for r in plan.reasons]
    m, d = turn.accounting.get("mixpe"), turn.accounting.get("dequant-loop")
    if m:
        lines.append(f"MixPE: {m['ops_per_token']['macs']:.3g} MACs/token, {m['ops_per_token']['shift_adds']:.3g} "
                     f"shift-adds, {m['ops_per_token']['dequant_ops']:.3g} dequant ops (dequant-loop: "
                     f"{d['ops_per_token']['dequant_ops']:.3g}); modelled energy {m['energy_vs_fp16']:.2f} x FP16")
    t = turn.thinking
    if t:
        where = (f"closed for {t['closed']} after thought {t['closed_at_thought']} at token {t['closed_at_token']} "
                 f"({t['budget_left_at_close']} of {t['budget_tokens']} budget tokens left)"
                 if t["budget_left_at_close"] is not None else f"thinking ended: {t['closed']}")
        mean = f", mean {t['verifier_ms_mean']:.1f} ms" if t["verifier_ms_mean"] is not None else ""
        lines.append(f"TrimR: {t['thoughts']} thoughts | {t['verifier']} verifier: {t['verifier_calls']} calls, "
                     f"{t['verifier_ms_total']:.0f} ms{mean}, {t['pending_at_close']} pending | {where}")
    return "\n".join(lines)


def _print_reply(pieces) -> None:
    out = sys.stdout
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()


def cmd_chat(args) -> int:
    _check_sampling(args)
    interactive = args.prompt is None and sys.stdin.isatty()
    prompt = args.prompt
    if prompt is None and not interactive:
        prompt = sys.stdin.read().strip()  # `echo question | edgerun chat`: drop the shell's newline
    if prompt is not None and not prompt.strip():
        raise UsageError("empty prompt: give text with -p or on stdin")

    def notify(msg: str) -> None:
        print(f"[{msg}]", file=sys.stderr, flush=True)

    if args.backend != "mixpe" and (args.mixpe or args.cost_table or args.mixpe_gemm or args.mixpe_accum):
        raise UsageError("--mixpe, --mixpe-gemm, --mixpe-accum and --cost-table apply to --backend mixpe")
    if args.quant and not (args.adaptive_experts and args.backend in (None, "llama.cpp")):
        raise UsageError("--quant applies to --adaptive-experts on llama.cpp (the GGUFs assembled per task); "
                         "to quantize a model use 'edgerun export --quant'")
    if not args.adaptive_experts and (args.patterns or args.keep != "2/4"):
        raise UsageError("--patterns and --keep apply to --adaptive-experts")
    mixpe = {}
    if args.backend == "mixpe":
        mixpe = {"mode": args.mixpe or "W4A16", "cost_table": args.cost_table, "gemm": args.mixpe_gemm or "codes",
                 "accum": args.mixpe_accum or "fp32"}
    assembler = None
    if args.adaptive_experts and args.backend in (None, "llama.cpp"):
        from converters.assemble import GGUFAssembler  # the writers: only adaptive experts on llama.cpp

        assembler = GGUFAssembler(args.quant or "Q8_0", log=notify)
    # while a person waits, llama.cpp prefills in batches of 64 tokens: Python gets control back between
    # batches, so Ctrl-C stops a long prefill within a fraction of a second (prefill speed is the same:
    # 1,800 tokens at 64 vs 512 per batch measured within 5% on this VM)
    if args.batch_size is not None and not (args.backend in (None, "llama.cpp") and not args.adaptive_experts):
        raise UsageError("--batch-size applies to llama.cpp models (not with --adaptive-experts)")
    engine = {}
    if args.backend in (None, "llama.cpp") and not args.adaptive_experts:
        if args.batch_size is not None:
            engine = {"n_batch": args.batch_size}
        elif interactive:
            engine = {"n_batch": 64}
    if args.kv_working_copy is not None:
        if not args.kv_layout:
            raise UsageError("--kv-working-copy applies to a packed KV cache: give --kv-layout")
        engine["kv_working_copy"] = args.kv_working_copy
    if not args.trim_thinking and (args.verifier is not None or args.trim_confirmations is not None):
        raise UsageError("--verifier and --trim-confirmations apply to --trim-thinking")
    if args.trim_thinking:
        engine.update(trim_thinking=True, verifier=args.verifier or "rule",
                      trim_confirmations=args.trim_confirmations if args.trim_confirmations is not None else 2)
    session = edgerun.load(args.model, backend=args.backend, system=args.system, chat_template=args.chat_template,
                           n_ctx=args.ctx_size, threads=args.threads, max_tokens=args.max_tokens,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                           seed=args.seed, notify=notify, adaptive_experts=args.adaptive_experts, keep=args.keep,
                           patterns=args.patterns, assembler=assembler, kv_layout=args.kv_layout,
                           device=args.device, kv_type=args.kv_type, kv_type_k=args.kv_type_k,
                           kv_type_v=args.kv_type_v, **mixpe, **engine)
    try:
        if not interactive:
            pieces = session.chat(prompt, stream=True)
            try:
                _print_reply(pieces)
            finally:
                pieces.close()      # Ctrl-C: the reply (its engine stream, a TrimR verifier) ends before the models
            return 0
        return _repl(session, args)
    finally:
        session.close()


def _repl(session, args) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    b = session.backend
    name = args.model or catalog.DEFAULT_MODEL
    print(f"edgerun chat: {name} ({b.name}, {b.threads} threads, context {b.n_ctx} tokens, "
          f"template {session.template.name}). /help for commands, Ctrl-D to exit.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to leave)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/quit", "/bye"):
                return 0
            if cmd == "/clear":
                session.clear()
                print("[conversation cleared]", file=sys.stderr)
            elif cmd == "/stats":
                print(format_turn(session.last_turn))
            elif cmd in ("/help", "/?"):
                print(HELP_TEXT)
            else:
                print(f"unknown command {cmd}; /help lists the commands", file=sys.stderr)
            continue
        try:
            pieces = session.chat(line, stream=True)
            try:
                _print_reply(pieces)
            except KeyboardInterrupt:
                pieces.close()
                print("\n[interrupted]", file=sys.stderr)
        except EdgerunError as e:  # one refused or failed message does not end the conversation
            print(f"error: {e}", file=sys.stderr)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (loopback by default)",
                       description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /metrics), one request at a time, each planned like a "
                                   "chat message. See docs/serve.md.")
    p.add_argument("model", nargs="?", default=None,
                   help=f"catalog name or path to a model (default: {catalog.DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback (with a warning)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request (default: $EDGERUN_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait while one runs; more get 503 + Retry-After (default 16)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the catalog name or file name)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on a reply's tokens (default: the request's)")
    p.add_argument("--temperature", type=float, default=0.8, help="default temperature of requests (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="default top_p of requests (default 0.95)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (default 40)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of requests that give none (default: one drawn per request, returned in 'edgerun')")
    for flag, kw in (("--threads", dict(type=int, help="CPU threads (default: physical cores)")),
                     ("--ctx-size", dict(type=int, help="context window in tokens (default 4096 or less)")),
                     ("--kv-type", dict(metavar="TYPE", help="llama.cpp KV cache type of K and V (as edgerun chat)")),
                     ("--kv-type-k", dict(metavar="TYPE", help="llama.cpp KV cache type of K")),
                     ("--kv-type-v", dict(metavar="TYPE", help="llama.cpp KV cache type of V")),
                     ("--chat-template", dict(help="chatml, llama3, gemma or a Jinja file instead of the model's")),
                     ("--keep", dict(default="2/4", metavar="a/b", help="adaptive experts: top-a of the top-b")),
                     ("--patterns", dict(help="adaptive experts: expert patterns directory")),
                     ("--quant", dict(help="adaptive experts on llama.cpp: GGUF type of the assembled models")),
                     ("--kv-layout", dict(metavar="LAYOUT", help="KVTuner layout YAML or directory (as edgerun chat)")),
                     ("--device", dict(help="device config YAML bounding weights + KV cache")),
                     ("--backend", dict(choices=["llama.cpp", "onnx", "torch", "mixpe"], help="engine (default: "
                                        "from the path)"))):
        p.add_argument(flag, **{"default": None, **kw})
    p.add_argument("--adaptive-experts", action="store_true", help="per request, the retrieved task's experts (PreMoe)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import os

    from edgerun import server  # fastapi, uvicorn: only for serve

    _check_sampling(args)
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be in 0..65535")
    if args.max_queue < 0:
        raise UsageError("--max-queue must be >= 0")
    warning = server.check_host(args.host, args.allow_remote)
    if not args.adaptive_experts and (args.patterns or args.keep != "2/4" or args.quant):
        raise UsageError("--patterns, --keep and --quant apply to --adaptive-experts")

    def notify(msg: str) -> None:
        print(f"[{msg}]", file=sys.stderr, flush=True)

    if warning:
        print(warning, file=sys.stderr)
    sock = server.bind(args.host, args.port)  # before the model loads: a port in use is said at once
    try:
        assembler = None
        if args.adaptive_experts and args.backend in (None, "llama.cpp"):
            from converters.assemble import GGUFAssembler  # the writers: only adaptive experts on llama.cpp

            assembler = GGUFAssembler(args.quant or "Q8_0", log=notify)
        session = edgerun.load(args.model, backend=args.backend, chat_template=args.chat_template, n_ctx=args.ctx_size,
                               threads=args.threads, max_tokens=args.max_tokens, temperature=args.temperature,
                               top_p=args.top_p, top_k=args.top_k, seed=args.seed, notify=notify,
                               adaptive_experts=args.adaptive_experts, keep=args.keep, patterns=args.patterns,
                               assembler=assembler, kv_layout=args.kv_layout, device=args.device,
                               kv_type=args.kv_type, kv_type_k=args.kv_type_k, kv_type_v=args.kv_type_v)
    except BaseException:
        sock.close()
        raise
    name = args.model_name or (Path(args.model).name if args.model and Path(args.model).exists()
                               else args.model or catalog.DEFAULT_MODEL)
    b = session.backend
    key = args.api_key or os.environ.get(server.API_KEY_ENV) or None

    def ready(url: str) -> None:
        print(f"edgerun serve: {name} ({b.name}, {b.threads} threads, context {b.n_ctx} tokens) on {url}/v1"
              + (" (API key required)" if key else "") + ". Ctrl-C to stop.", file=sys.stderr, flush=True)

    try:
        server.serve(session, name, sock=sock, api_key=key, max_queue=args.max_queue, default_seed=args.seed,
                     ready=ready)
    finally:
        session.backend.close()
    return 0


def _old_spelling(p, flag: str, dest: str) -> None:
    """A hidden alias of a renamed integer option (accepted for one release): ``flag`` sets ``dest``."""
    p.add_argument(flag, dest=dest, type=_positive_int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model as GGUF (llama.cpp types) or ONNX (fp32/int8/int4), with a manifest",
                       description="Export SRC (catalog name, .gguf file or HF checkpoint directory). A GGUF "
                                   "source is dequantized once into a cached float32 checkpoint first.")
    p.add_argument("src", nargs="?", help="catalog name, .gguf file or Hugging Face checkpoint directory")
    p.add_argument("--list-passes", action="store_true",
                   help="list the registered passes with their parameters (for --recipe) and exit")
    p.add_argument("--to", default="gguf", choices=["gguf", "onnx", "hf"],
                   help="output format: gguf, onnx, or hf (a safetensors checkpoint of the passes' result, e.g. "
                        "--prune or --ptq) (default gguf)")
    p.add_argument("--quant", default=None,
                   help="GGUF: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, IQ4_XS, Q3_K_M, Q2_K, ... "
                        "(default Q8_0); ONNX: fp32, int8, int4 (default int4)")
    p.add_argument("-o", "--output", default=None,
                   help="output path (default: ./<model>-<QUANT>.gguf or ./<model>-onnx-<quant>/)")
    p.add_argument("--block-size", type=int, default=32, help="ONNX int4 block size: 32, 64 or 128 (default 32)")
    p.add_argument("--onnx-algo", default="default",
                   help="ONNX int4: builder (onnxruntime-genai's RTN, default), rtn, hqq, gptq; "
                        "int8: dynamic (quantize_dynamic, default) or builder (weight-only)")
    p.add_argument("--token-embedding-type", default=None, help="ggml type for token_embd (e.g. Q4_0)")
    p.add_argument("--output-tensor-type", default=None, help="ggml type for the output head (e.g. Q6_K)")
    p.add_argument("--ptq", default=None, choices=["rtn", "gptq", "awq"],
                   help="torch-side weight quantization into a GPTQ-layout checkpoint (with --to hf)")
    p.add_argument("--bits", type=int, default=None, help="PTQ weight bits: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=_positive_int, default=None, help="PTQ input columns per scale (default 64)")
    p.add_argument("--calib-tokens", type=_positive_int, default=None, metavar="N",
                   help="calibration tokens of the carve, PTQ, wanda and aim-ties merge passes (default: each pass's "
                        "own: carve 16384, PTQ and wanda 8192 in windows of 512, AIM 25600)")
    _old_spelling(p, "--carve-tokens", "calib_tokens")
    p.add_argument("--calib-samples", type=_positive_int, default=None, help=argparse.SUPPRESS)  # old: PTQ windows of 512
    p.add_argument("--carve", default=None, metavar="SxAyEz",
                   help="carve the dense FFNs into an MoE first (CMoE), e.g. S2A4E16")
    p.add_argument("--finetune", type=float, default=None, metavar="MINUTES", nargs="?", const=3.0,
                   help="with --carve: CMoE's light fine-tune (gate scale, bias balancing, LoRA r=8), "
                        "bounded to MINUTES (default 3)")
    p.add_argument("--prune", default=None, metavar="wanda:RATIO|wanda:N:M",
                   help="prune the dense model's linear layers with Wanda first: wanda:0.5 (half of each output "
                        "row) or wanda:2:4 (2 of every 4); zeros are stored densely in GGUF/ONNX")
    p.add_argument("--prune-experts", default=None, metavar="TASK:a/b",
                   help="keep the task's top-b routed experts per layer and route top-a (PreMoe PEP)")
    p.add_argument("--patterns", default=None, help="expert patterns directory (default: calibrate a built-in task)")
    p.add_argument("--merge", default=None, metavar="RECIPE.yaml|MODEL",
                   help="merge first: a mergekit-style recipe with SRC as base, or a fine-tune of SRC to merge in")
    p.add_argument("--merge-method", default=None,
                   help="with --merge MODEL: task-arithmetic (default), ties, dare, dare-ties, aim-ties, svd")
    p.add_argument("--recipe", default=None, metavar="RECIPE.yaml",
                   help="the passes from a YAML recipe instead of flags: passes: [{merge: {...}}, {carve: {config: "
                        "S2A2E8}}, {finetune: {minutes: 2}}, {prune: {task: math, keep: 2/4}}, {ptq: {method: gptq}}]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-verify", action="store_true", help="skip loading the output and measuring perplexity")
    p.set_defaults(func=cmd_export)


def _add_carve(sub) -> None:
    p = sub.add_parser("carve", help="carve a dense model's FFNs into a mixture of experts (CMoE, training-free)",
                       description="Carve SRC (catalog name, .gguf or HF checkpoint of a Llama-family model) into "
                                   "an SxAyEz MoE: x shared experts, y of z-x routed experts active per token.")
    p.add_argument("src")
    p.add_argument("--config", required=True, metavar="SxAyEz", help="e.g. S2A4E16 (x shared, y active, z total)")
    p.add_argument("--calib", default="wiki", help="calibration dataset (default wiki)")
    p.add_argument("--calib-tokens", type=_positive_int, default=16384, metavar="N",
                   help="calibration tokens (default 16384)")
    _old_spelling(p, "--tokens", "calib_tokens")
    p.add_argument("--router", choices=("fitted", "analytical"), default="fitted",
                   help="fitted: a linear router fitted to each expert's activation mass (default; the engine "
                        "exports route identically); analytical: CMoE's representative-neuron router")
    p.add_argument("--atopk", type=_positive_int, default=10, metavar="K",
                   help="neurons marked per calibration token for the grouping (CMoE's ATopK; default 10)")
    p.add_argument("--domains", default="", metavar="A,B,...",
                   help="domain-aware grouping: calibrate on these catalog texts in equal shares (instead of "
                        "--calib) and group neurons by co-activation and domain preference, so routed experts "
                        "align with domains (e.g. wiki,code,multilingual,math)")
    p.add_argument("--domain-weight", type=float, default=0.5, metavar="W",
                   help="with --domains: weight of the domain preference against co-activation, 0..1 (default 0.5)")
    p.add_argument("--finetune", type=float, default=None, metavar="MINUTES", nargs="?", const=3.0,
                   help="then CMoE's light fine-tune on the calibration text: learnable gate scales, bias load "
                        "balancing and LoRA r=8 (peft), bounded to MINUTES (default 3)")
    p.add_argument("--finetune-steps", type=_positive_int, default=None, help="also bound the fine-tune in steps")
    p.add_argument("--no-lora", action="store_true", help="fine-tune the gate scales and bias only")
    p.add_argument("-o", "--output", default=None, help="output directory (default ./<model>-<config>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=cmd_carve)


def cmd_carve(args) -> int:
    from converters import passes  # torch (carving): not on the chat path
    from converters.source import open_source  # torch (dequantizing a GGUF source)

    chain = [passes.make("carve", "--config", config=args.config, calib_tokens=args.calib_tokens, dataset=args.calib,
                         router=args.router, atopk=args.atopk, domains=args.domains or None,
                         domain_weight=args.domain_weight)]
    if args.finetune is not None:
        chain.append(passes.make("finetune", "--finetune", minutes=args.finetune, steps=args.finetune_steps,
                                 lora=not args.no_lora, dataset=args.calib))
    out = args.output
    if out is None:
        source = open_source(args.src)
        out = f"{args.src if args.src in catalog.CATALOG else source.path.name}-{args.config.upper()}"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    path, records = passes.to_checkpoint(args.src, chain, out, force=args.force, log=log)
    for r in records:
        if r["name"] == "cmoe-finetune":
            print(f"fine-tune: {r['steps']} steps ({r['tokens']} tokens, {r['seconds']:.0f} s), loss "
                  f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} nats/token, expert load imbalance (max/mean) "
                  f"{r['imbalance_first']:.2f} -> {r['imbalance_last']:.2f}")
    print(path)
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge fine-tunes into a base model: task arithmetic, TIES, DARE, AIM-TIES, "
                                     "SVD (Long-to-Short)",
                       description="Merge MODELs (fine-tunes of BASE) into BASE through their task vectors, one "
                                   "tensor at a time, into a Hugging Face checkpoint (export it with edgerun "
                                   "export OUT). Or give a mergekit-style YAML recipe with --recipe.")
    p.add_argument("base", nargs="?", help="the base (quick) model: catalog name, .gguf or HF checkpoint")
    p.add_argument("models", nargs="*", help="models to merge into it (HF checkpoints or .gguf)")
    p.add_argument("--recipe", default=None, help="a YAML recipe (merge_method, base_model, models, parameters)")
    p.add_argument("--method", default=None,
                   help="task-arithmetic (default), ties, dare, dare-ties, aim-ties, svd")
    p.add_argument("--alpha", type=float, default=None, help="task-vector scale (TA/DARE/SVD 0.7, TIES 1.0)")
    p.add_argument("--density", type=float, default=None, help="TIES: fraction of each task vector kept (0.2)")
    p.add_argument("--drop", type=float, default=None, help="DARE: drop probability (0.3)")
    p.add_argument("--omega", type=float, default=None, help="AIM: relaxation of the most active channels (0.4)")
    p.add_argument("--rank", type=_positive_int, default=None, help="SVD: rank of each task vector (64)")
    p.add_argument("--sign-rule", choices=("paper", "weighted"), default=None,
                   help="TIES sign election: paper (unweighted trimmed task vectors, Alg. 1; default) or weighted")
    p.add_argument("--seed", type=int, default=None, help="DARE's mask seed (0)")
    p.add_argument("--calib-tokens", type=_positive_int, default=None, metavar="N",
                   help="AIM: calibration tokens of BASE's activations, in windows of 256 (default 25600)")
    p.add_argument("--tokenizer-from", default=None,
                   help="config and tokenizer from: auto (the longest-context parent, default), base, or a model")
    p.add_argument("--context-length", type=_positive_int, default=None, help="override the context length")
    p.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from converters import merge as mg  # torch: not on the chat path

    hyper = {k: getattr(args, k) for k in ("alpha", "density", "drop", "omega", "rank", "sign_rule")}
    if args.recipe:
        if args.base or args.models or args.method or any(v is not None for v in hyper.values()):
            raise UsageError("give either --recipe or BASE MODEL... with --method and its parameters, not both")
        r = mg.load_recipe(args.recipe)
        base, models, spec = r.base, list(r.models), r.spec
        tok, ctx = args.tokenizer_from or r.tokenizer_from, args.context_length or r.context_length
        if args.seed is not None:
            spec = dataclasses.replace(spec, seed=args.seed)
    else:
        if not args.base or not args.models:
            raise UsageError("give BASE and at least one MODEL to merge into it (or --recipe FILE)")
        base, models = args.base, args.models
        spec = mg.make_spec(args.method or "task-arithmetic", **hyper, seed=args.seed or 0)
        tok, ctx = args.tokenizer_from, args.context_length
    if args.calib_tokens is not None:
        if spec.method != "aim-ties":
            raise UsageError("--calib-tokens applies to aim-ties (the activation calibration of BASE)")
        spec = dataclasses.replace(spec, calib_samples=-(-args.calib_tokens // spec.calib_len))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = mg.merge(base, models, args.output, spec, force=args.force, tokenizer_from=tok, context_length=ctx,
                      log=log)
    print(result.output)
    return 0


def _add_recover(sub) -> None:
    p = sub.add_parser("recover", help="recover a pruned model: PASER picks the recovery data, LoRA trains on it",
                       description="Choose recovery data for PRUNED (a pruned checkpoint of --original) with PASER: "
                                   "embed an offline instruction pool (all-MiniLM-L6-v2), cluster it (diffusion map + "
                                   "spectral), score each cluster by the JSD between the original and pruned "
                                   "models, spend the budget where the damage is, drop concept conflicts; then LoRA "
                                   "(r 8, alpha 16, lr 3e-4), merged into a checkpoint that exports like any other. "
                                   "The selection (JSON) and a PNG of the clusters are written beside the weights.")
    p.add_argument("pruned", help="the pruned checkpoint directory (e.g. from edgerun export --prune wanda:0.5 --to hf, "
                                  "or the wanda pass's cached output), or a carved MoE in the expert-store layout "
                                  "(edgerun carve, PEP-pruned or not; recovered into the same layout)")
    p.add_argument("--original", required=True, help="the model it was pruned from (catalog name, .gguf or checkpoint)")
    p.add_argument("--budget", type=float, default=0.1, help="fraction of the pool to train on, in (0, 1] (default 0.1)")
    p.add_argument("--pool-size", type=_positive_int, default=4000,
                   help="a seeded subsample of N pairs of the ~19,800-pair pool (default 4000; scoring costs two "
                        "forward passes per pair)")
    p.add_argument("--clusters", type=_positive_int, default=10, help="capability clusters (default 10)")
    p.add_argument("--method", choices=("paser", "random"), default="paser",
                   help="paser (default) or random (the baseline: the same budget drawn at random)")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-time bound of the LoRA training (default 5)")
    p.add_argument("--steps", type=_positive_int, default=None, help="also bound the training in optimizer steps")
    p.add_argument("--epochs", type=_positive_int, default=3, help="passes over the selection (default 3)")
    p.add_argument("--seed", type=int, default=0, help="pool subsample, clustering and training seed (default 0)")
    p.add_argument("-o", "--output", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=cmd_recover)


def cmd_recover(args) -> int:
    from converters import paser  # torch, transformers, peft, scikit-learn: not on the chat path

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    record = paser.run(args.pruned, args.original, args.output, budget=args.budget, pool_size=args.pool_size,
                       clusters=args.clusters, method=args.method, seed=args.seed, minutes=args.minutes,
                       steps=args.steps, epochs=args.epochs, force=args.force, log=log)
    log(f"selection: {record['selection']['size']} of {record['pool']} samples; "
        f"{Path(args.output) / 'paser_selection.json'}")
    print(args.output)
    return 0


def cmd_export(args) -> int:
    from converters import passes  # the writers import torch: not on the chat path
    from converters.export import export  # torch: not on the chat path
    from profilers.accuracy import perplexity  # the quality protocol, passed to export (layers go one way)

    if args.list_passes:
        print(passes.describe())
        return 0
    if not args.src:
        raise UsageError("edgerun export needs SRC (a catalog name, .gguf file or checkpoint directory)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    flags = {"merge": args.merge, "merge_method": args.merge_method, "prune": args.prune, "carve": args.carve,
             "finetune_minutes": args.finetune, "prune_experts": args.prune_experts, "patterns": args.patterns,
             "ptq": args.ptq, "bits": args.bits, "group_size": args.group_size, "calib_tokens": args.calib_tokens,
             "calib_samples": args.calib_samples}
    result = export(args.src, to=args.to, quant=args.quant, out=args.output, force=args.force, passes=args.recipe,
                    token_embedding_type=args.token_embedding_type, output_tensor_type=args.output_tensor_type,
                    block_size=args.block_size, onnx_algo=args.onnx_algo,
                    verify=None if args.no_verify else perplexity, threads=args.threads, log=log,
                    **{k: v for k, v in flags.items() if v is not None})
    print(result.output)
    log(f"manifest: {result.manifest}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark sweep (latency, memory, energy, quality vs effective BPW), "
                                     "or 'bench report DIR'",
                       description="edgerun bench --sweep FILE.yaml --device FILE.yaml --out DIR runs (or resumes) a "
                                   "sweep (also: edgerun bench FILE.yaml ...); --cluster ADDRESS runs its cells on the "
                                   "nodes of a Ray cluster that have their devices; edgerun bench report DIR renders "
                                   "its plots and summary.")
    p.add_argument("report", nargs="*", metavar="report DIR", help="render PNG plots and summary.md of DIR")
    p.add_argument("--sweep", help="sweep definition (YAML), e.g. benchmarks/bpw_sweep.yaml")
    p.add_argument("--device", help="device config (YAML), e.g. device_configs/this-machine.yaml; with --cluster, "
                                    "the device (NAME or its YAML) of a sweep that names none")
    p.add_argument("--out", help="results directory (JSONL, resumable)")
    p.add_argument("--force", action="store_true", help="add to a directory that holds a different sweep")
    p.add_argument("--cluster", metavar="ADDRESS", help="run on a Ray cluster: auto, HOST:PORT or ray://HOST:PORT (docs/cluster.md)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from profilers import report, sweep  # llama.cpp, onnx and matplotlib: only for bench

    if len(args.report) == 1 and args.report[0].endswith((".yaml", ".yml")) and not args.sweep:
        args.sweep, args.report = args.report[0], []            # edgerun bench SWEEP.yaml ...
    if args.report:
        if args.report[0] != "report" or len(args.report) != 2:
            raise UsageError("usage: edgerun bench report DIR")
        path = report.render(args.report[1])
        print(path)
        return 0
    if not args.sweep or not args.out:
        raise UsageError("edgerun bench needs --sweep FILE and --out DIR (and usually --device FILE)")
    sw = sweep.load(args.sweep)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.cluster:
        from profilers import cluster  # Ray: only with --cluster

        name = cluster.find_config(args.device)[0] if args.device and not sw.devices else None
        jsonl = cluster.run_sweep(sw, args.out, args.cluster, device_name=name, force=args.force, log=log)
    else:
        dev = load_device(args.device) if args.device else None
        jsonl = sweep.run(sw, args.out, device=dev, force=args.force, log=log,
                          device_name=sweep.local_device_name(sw, args.device))
    summary = report.render(args.out)
    print(jsonl)
    log(f"summary: {summary}")
    return 0


def _add_kv(sub) -> None:
    p = sub.add_parser("kv", help="layer-wise KV-cache precision layouts: show, tune (KVTuner)")
    kv = p.add_subparsers(dest="kv_command", metavar="{show,tune}")
    kv.required = True
    s = kv.add_parser("show", help="print a layout: pairs per layer, average and true bits, bytes with --model")
    s.add_argument("layout", help="layout YAML")
    s.add_argument("--model", default=None,
                   help="catalog name, HF checkpoint or .gguf whose KV shape (layers, KV heads, head_dim) gives the "
                        "true bits and KV-cache bytes per token; without it, bits per value only")
    s.add_argument("--context", type=_positive_int, default=2048, help="context for KIVI's window share (default 2048)")
    s.set_defaults(func=cmd_kv_show)
    t = kv.add_parser("tune", help="search layer-wise KV layouts under an average-bits budget (KVTuner)",
                      description="End-to-end KL sensitivity per layer and pair, then an exact per-layer choice by "
                                  "dynamic programming (--search dp, default) or KVTuner's grouped NSGA-II "
                                  "(--search nsga2), each layout scored by KL to the unquantized cache on held-out "
                                  "long contexts. Resumable: run again with the same output directory.")
    t.add_argument("model", help="catalog name, .gguf or HF checkpoint (dense or carved MoE)")
    t.add_argument("--budget", type=float, default=4.0, help="average bits cap (default 4.0)")
    t.add_argument("--search", default="dp", choices=["dp", "nsga2"],
                   help="dp: per-layer choice under the additive KL model, verified (default); nsga2: grouped NSGA-II")
    t.add_argument("--points", type=_positive_int, default=24, help="dp: layouts verified on held-out text (default 24)")
    t.add_argument("--trials", type=_positive_int, default=60, help="distinct layouts evaluated by NSGA-II (default 60)")
    t.add_argument("--population", type=_positive_int, default=12, help="NSGA-II population (default 12)")
    t.add_argument("--mode", default="per-token", choices=["per-token", "kivi"], help="quantization mode")
    t.add_argument("--groups", type=_positive_int, default=4, help="nsga2: layer groups after clustering (default 4)")
    t.add_argument("--group-size", type=_positive_int, default=32, help="quantization group (default 32)")
    t.add_argument("--window", type=_nonnegative_int, default=32, help="KIVI full-precision window (default 32)")
    t.add_argument("--context", type=_positive_int, default=2048, help="held-out context length (default 2048)")
    t.add_argument("--contexts", type=_positive_int, default=2, help="held-out contexts (default 2)")
    t.add_argument("--calib-tokens", type=_positive_int, default=1024, metavar="N",
                   help="calibration tokens of the per-layer sensitivity, in windows of 512 (default 1024)")
    t.add_argument("--task", default="arc-easy", help="task scored on the Pareto front (default arc-easy; 'none')")
    t.add_argument("--task-items", type=int, default=100, help="task items (default 100)")
    t.add_argument("-o", "--output", required=True, help="output directory (layouts, journal, plot)")
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads per evaluation (default: the physical cores here, 1 per evaluator on a cluster)")
    t.add_argument("--cluster", metavar="ADDRESS",
                   help="evaluate layouts on a Ray cluster (one evaluator per CPU, each on its node's copy of the "
                        "model): auto, HOST:PORT or ray://HOST:PORT (docs/cluster.md)")
    t.set_defaults(func=cmd_kv_tune)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def cmd_kv_show(args) -> int:
    from edgerun.kv import layout as kvl  # torch (the KV cache module)

    shape = kvl.model_kv_shape(catalog.resolve(args.model)) if args.model else None
    lay = kvl.load(args.layout, n_layers=shape.layers if shape else None)
    print(f"{lay.name}: {len(lay.pairs)} layers, mode {lay.mode}, group {lay.group_size}"
          + (f", window {lay.window}" if lay.mode == "kivi" else ""))
    if shape is None:   # no model: bits per value for a head_dim the group divides, no bytes
        print(f"average bits {lay.average_bits:.3f} (K and V bits over 2L); true bits "
              f"{lay.true_bits(lay.group_size, args.context):.3f} with fp16 scales and int16 zeros per group of "
              f"{lay.group_size} values (context {args.context}); --model MODEL gives its bytes per token")
    else:
        print(f"average bits {lay.average_bits:.3f} (K and V bits over 2L); true bits "
              f"{lay.true_bits(shape.head_dim, args.context):.3f} with fp16 scales and int16 zeros "
              f"(head_dim {shape.head_dim}, context {args.context})")
        print(f"KV cache: {lay.bytes_per_token(shape.kv_heads, shape.head_dim, args.context):.0f} bytes/token "
              f"({args.model}: {shape.kv_heads} KV heads x {shape.head_dim}; 16-bit unquantized values)")
    print(lay.describe())
    for key in ("kl", "ppl", "kv16_ppl", "arc-easy_accuracy"):
        if key in lay.meta:
            print(f"{key}: {lay.meta[key]:.6g}")
    return 0


def cmd_kv_tune(args) -> int:
    from edgerun.kv import tune as kvt  # torch, optuna, scikit-learn

    if args.trials < 1 or args.population < 2:
        raise UsageError("--trials must be >= 1 and --population >= 2")
    model_dir = _checkpoint_dir(args.model)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    kw = dict(budget=args.budget, trials=args.trials, population=args.population, mode=args.mode, groups=args.groups,
              group_size=args.group_size, window=args.window, context=args.context, contexts=args.contexts,
              calib_windows=-(-args.calib_tokens // 512), search=args.search, points=args.points, log=log)
    if args.cluster:
        from profilers import cluster  # Ray: only with --cluster

        with cluster.LayoutPool(args.cluster, args.model, model_dir, threads=args.threads or 1) as pool:
            result = kvt.tune(model_dir, args.output, evaluate=pool, **kw)
    else:
        result = kvt.tune(model_dir, args.output, threads=args.threads, **kw)
    if args.task != "none" and result.front:
        from profilers.accuracy import kv_front_accuracy  # torch backend for the front's task accuracy

        kv_front_accuracy(model_dir, result.front, args.output, args.task, args.task_items, progress=True)
    kv16 = result.kv16["ppl"]
    print(f"{'layout':24} {'avg bits':>8} {'KL':>10} {'PPL':>9} {'vs KV16':>8}")
    for lay in result.front:
        print(f"{lay.name:24} {lay.average_bits:8.3f} {lay.meta['kl']:10.3g} {lay.meta['ppl']:9.3f} "
              f"{(lay.meta['ppl'] / kv16 - 1) * 100:+7.2f}%")
    print(f"KV16 perplexity {kv16:.3f}; layouts, trials.json and front.png in {args.output}")
    return 0


def _checkpoint_dir(model: str) -> Path:
    """An HF checkpoint directory for ``model`` (a GGUF is materialized as float32 once, cached)."""
    from converters.source import open_source  # torch (dequantizing a GGUF source)

    path = catalog.resolve(model)
    if path.is_dir():
        return path
    return open_source(model).path


def _add_device(sub) -> None:
    p = sub.add_parser("device", help="describe this machine as a device config: 'edgerun device detect'")
    p.add_argument("action", choices=["detect"])
    p.add_argument("--no-measure", action="store_true", help="skip the memory-bandwidth measurement")
    p.set_defaults(func=cmd_device)


def cmd_device(args) -> int:
    from profilers.device import detect  # torch (the bandwidth measurement), RAPL discovery

    print(to_yaml(detect(measure=not args.no_measure)), end="")
    return 0


def _add_experts(sub) -> None:
    p = sub.add_parser("experts", help="expert patterns of an MoE model: calibrate, list, show, prune (PreMoe)",
                       description="edgerun experts calibrate MODEL --task NAME=DATA ... -o DIR | list DIR | show FILE "
                                   "| prune CARVED --prune-experts TASK:a/b -o OUT")
    p.add_argument("action", choices=["calibrate", "list", "show", "prune"])
    p.add_argument("target", help="MODEL (calibrate), a patterns DIR (list), a pattern FILE (show) or a carved "
                                  "checkpoint (prune)")
    p.add_argument("--prune-experts", metavar="TASK:a/b",
                   help="prune: keep the task's top-b routed experts per layer and route top-a (PreMoe PEP); the "
                        "output is a carved checkpoint (torch; export hosts it; recover recovers it)")
    p.add_argument("--patterns", default=None, metavar="DIR",
                   help="prune: the task's pattern from DIR (default: calibrated on the model and cached)")
    p.add_argument("--force", action="store_true", help="prune: overwrite an existing output")
    p.add_argument("--task", action="append", default=[],
                   help="NAME=DATA, DATA a catalog text (wiki, c4, tiny, code, multilingual, technical), math, "
                        "or a text file; repeatable (default: all seven built-in tasks)")
    p.add_argument("-o", "--output", default=None,
                   help="patterns directory (calibrate; default ./patterns) or the pruned checkpoint (prune; default "
                        "./<model>-<task>-a<a>b<b>)")
    p.add_argument("--calib-tokens", type=_positive_int, default=4096, metavar="N",
                   help="calibration tokens per task (default 4096)")
    _old_spelling(p, "--tokens", "calib_tokens")
    p.add_argument("--key-layer", type=int, default=0, help="MoE layer of the layer and hidden keys (default 0)")
    p.add_argument("--key", choices=("layer", "mass", "frequency", "hidden"), default="layer",
                   help="retrieval key: layer (PreMoe: the key layer's TCESS; default, cheapest), mass (normalised "
                        "expert mass of every MoE layer: more accurate, the query runs the whole model), frequency "
                        "(top-k frequency of every layer), hidden (mean input of the key layer)")
    p.add_argument("--key-depth", type=int, default=0, metavar="N",
                   help="mass/frequency keys over the first N MoE layers only (cheaper queries; default 0: all)")
    p.add_argument("--score", default=None, help="raw-logit, frequency, probability or softplus")
    p.add_argument("--plot", default=None, help="show: write a PNG heat map of layer x expert scores here")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="calibrate: one Ray task per task, each on its node's copy of the model: auto, HOST:PORT or "
                        "ray://HOST:PORT (docs/cluster.md)")
    p.set_defaults(func=cmd_experts)


def cmd_experts(args) -> int:
    from edgerun.moe import calibrate as cal  # torch + transformers
    from edgerun.moe import tcess  # torch

    score = args.score or tcess.DEFAULT_SCORE
    if args.action == "prune":
        from converters.prune import parse_spec, prune_carved  # the converter layer: the CLI sits on top

        if not args.prune_experts:
            raise UsageError("experts prune needs --prune-experts TASK:a/b, e.g. wiki:2/4")
        if args.task or args.score:
            raise UsageError("--task and --score apply to experts calibrate; prune takes the task from "
                             "--prune-experts and its pattern from --patterns (or calibrates a built-in task)")
        task, a, b = parse_spec(args.prune_experts)
        src = Path(args.target).resolve()
        if not src.is_dir():
            raise UsageError(f"{args.target} is not a carved checkpoint directory (edgerun carve makes one)")
        out = Path(args.output or f"{src.name}-{task}-a{a}b{b}")
        print(prune_carved(src, out, task, a, b, patterns=args.patterns, force=args.force))
        return 0
    if args.output is None:
        args.output = "patterns"
    if args.action == "calibrate":
        tasks = [cal.parse_task(t) for t in (args.task or cal.DEFAULT_TASKS)]
        if score not in tcess.SCORES:
            raise UsageError(f"unknown score function '{score}'; valid: {', '.join(tcess.SCORES)}")
        if args.key_depth < 0:
            raise UsageError("--key-depth must be >= 0 (0: every MoE layer)")
        if args.key_depth and args.key not in ("mass", "frequency"):
            raise UsageError(f"--key-depth applies to the all-layer keys (--key mass or frequency), not '{args.key}'")
        if args.cluster:
            from profilers import cluster  # Ray: only with --cluster

            patterns = cluster.calibrate_tasks(args.cluster, str(args.target), tasks, tokens=args.calib_tokens,
                                               key_layer=args.key_layer, score=score, name=str(args.target))
        else:
            model, tokenizer = cal.load_model(catalog.resolve(args.target))
            patterns = cal.calibrate(model, tokenizer, tasks, tokens=args.calib_tokens, key_layer=args.key_layer,
                                     score=score, name=str(args.target), progress=True)
        for pat in patterns:   # every pattern holds the statistics of all keys: the key is a choice among them
            pat.key_kind, pat.key_depth = args.key, args.key_depth
            print(tcess.save(pat, args.output))
        return 0
    if args.action == "list":
        for pat in tcess.load_dir(args.target):
            print(f"{pat.task:14s} {pat.tokens:6d} tokens  {pat.model['layers']} layers x {pat.model['experts']} "
                  f"experts, top-{pat.model['top_k']}  score {pat.score}  key {pat.key_kind} "
                  f"(layer {pat.key_layer}, depth {pat.key_depth or 'all'})")
        return 0
    pat = tcess.load(args.target)
    print(f"task {pat.task}: {pat.tokens} tokens, score {score}, key layer {pat.key_layer} (model {pat.model['name']})")
    print(_heat_rows(pat, score))
    if args.plot:
        print(_plot_pattern(pat, score, args.plot))
    return 0


def _heat_rows(pat, score: str) -> str:
    """One line per layer: experts left to right, shade by score relative to the layer's maximum."""
    shades = " .:-=+*#%@"
    lines = ["layer  " + "".join(str(j % 10) for j in range(pat.model["experts"])) + "   top experts"]
    for i in range(len(pat.stats)):
        s = pat.layer_scores(i, score)
        lo, hi = float(s.min()), float(s.max())
        cells = "".join(shades[int((float(v) - lo) / (hi - lo) * (len(shades) - 1)) if hi > lo else 0] for v in s)
        lines.append(f"{i:5d}  {cells}   {pat.ranking(i, score)[:4]}")
    return "\n".join(lines)


def _plot_pattern(pat, score: str, path: str) -> str:
    import matplotlib  # heavy: only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg")
    import numpy as np  # with the plot only

    grid = np.stack([pat.layer_scores(i, score).numpy() for i in range(len(pat.stats))])
    fig, ax = plt.subplots(figsize=(max(4, grid.shape[1] * 0.4), max(3, grid.shape[0] * 0.25)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"TCESS ({score}) for task {pat.task}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    from edgerun.atomic import atomic_file

    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def cmd_pull(args) -> int:
    path = catalog.pull(args.name, progress=not args.quiet)
    print(path)
    return 0


def cmd_list(args) -> int:
    rows = [("NAME", "KIND", "SIZE", "PULLED", "LICENSE", "DESCRIPTION")]
    for e in catalog.entries():
        rows.append((e.name, e.kind, f"{e.size / 2**20:.0f} MiB", "yes" if catalog.is_pulled(e) else "no",
                     e.license, e.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print(f"cache: {catalog.home()}", file=sys.stderr)
    return 0


def cmd_rm(args) -> int:
    for name in args.names:
        catalog.remove(name)
        print(f"removed {name}")
    return 0


def _add_worker(sub) -> None:
    p = sub.add_parser("worker", help="join (or start) a Ray cluster as a node offering this machine's device",
                       description="Runs Ray's own 'ray start' in the foreground with the custom resource "
                                   "device:NAME (amount 1: one sweep cell at a time) from this machine's device config, "
                                   "kept in $EDGERUN_HOME/devices/NAME.yaml for the tasks. Stop it with Ctrl-C.")
    p.add_argument("--address", metavar="HOST:PORT", help="the cluster's head (its GCS port, default 6379)")
    p.add_argument("--head", action="store_true", help="start a new cluster with this machine as its head")
    p.add_argument("--port", type=_positive_int, default=6379, help="--head: GCS port (default 6379)")
    p.add_argument("--client-port", type=_positive_int, default=10001,
                   help="--head: Ray Client port, for ray://HOST:PORT (default 10001)")
    p.add_argument("--device", help="device config: NAME (device_configs/NAME.yaml) or a YAML path (default: the config "
                                    "in device_configs/ that describes this machine, else one detected now)")
    p.add_argument("--num-cpus", type=_positive_int, default=None, help="CPUs this node offers (default: all)")
    p.add_argument("--object-store-memory", type=_positive_int, default=None, metavar="BYTES",
                   help="Ray object store size (edgerun sends only small records through it)")
    p.add_argument("--node-ip-address", default=None, help="this node's address as the others reach it")
    p.add_argument("--dry-run", action="store_true", help="print the ray start command instead of running it")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args) -> int:
    import os
    import shlex

    from profilers import cluster  # device detection; Ray itself runs in the exec'd process

    if args.device:
        name, path = cluster.find_config(args.device)
        config, how = load_device(path), f"from {path}"
    else:
        name, config, how = cluster.detect_config()
    cmd = cluster.worker_command(name, address=args.address, head=args.head, port=args.port,
                                 client_port=args.client_port, num_cpus=args.num_cpus,
                                 object_store_bytes=args.object_store_memory, node_ip=args.node_ip_address)
    print(f"device {name} ({how}); resource {cluster.device_resource(name)}", file=sys.stderr)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"device config kept in {cluster.install_config(name, config)}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)       # Ray's own start, in the foreground; this process becomes it


def _add_certify(sub) -> None:
    p = sub.add_parser("certify", help="certified robustness of a classifier to backdoor triggers (FRS)",
                       description="Certify a text classifier's predictions against backdoor triggers with fuzzed "
                                   "randomized smoothing (FRS): per input the smoothed label, a lower bound on its "
                                   "probability, the certified radius in word edits and the vulnerable spans found.")
    p.add_argument("model", help="classifier checkpoint directory (with a head for --task); with --prompted, a "
                                 "catalog model or HF checkpoint directory")
    p.add_argument("--task", default="sst2", help="classification task (default sst2)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="an input text (repeat for more)")
    src.add_argument("--file", help="a UTF-8 file with one input text per line (blank lines skipped)")
    p.add_argument("--prompted", action="store_true",
                   help="no trained head: the zero-shot classifier (label-word likelihood after the task prompt)")
    p.add_argument("--uniform", action="store_true",
                   help="the uniform baseline: no span search, every word randomized with --omega-m")
    p.add_argument("-k", "--k", type=int, default=20, help="noisy copies / randomized passes K (default 20)")
    p.add_argument("--sigma", type=float, default=0.01, help="parameter noise std, 0 = off (default 0.01)")
    p.add_argument("--top-layers", type=int, default=10, help="noised top layers H (default 10)")
    p.add_argument("--omega-h", type=float, default=0.8, help="randomization inside the vulnerable area (default 0.8)")
    p.add_argument("--omega-l", type=float, default=0.1, help="randomization outside it (default 0.1)")
    p.add_argument("--omega-m", type=float, default=0.5, help="randomization of the uniform baseline (default 0.5)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of the bound (default 0.05)")
    p.add_argument("--budget", type=int, default=48, help="span-search simulations per input (default 48)")
    p.add_argument("--seed", type=int, default=0, help="noise, randomization and search seed (default 0)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model dtype (default bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the certificates as JSON")
    p.add_argument("-o", "--output", default=None, help="also write the certificates as JSON to this file")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=cmd_certify)


def cmd_certify(args) -> int:
    import json

    if args.file is not None:
        try:
            texts = [line.strip() for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {args.file}: {e}") from None
        if not texts:
            raise UsageError(f"{args.file} has no input text")
    else:
        texts = args.text
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    from edgerun.robustness import FRSConfig, TextClassifier, certify, get_task  # heavy: torch, transformers

    get_task(args.task)
    config = FRSConfig(k=args.k, sigma=args.sigma, top_layers=args.top_layers, fuzz=not args.uniform,
                       omega_h=args.omega_h, omega_l=args.omega_l, omega_m=args.omega_m, alpha=args.alpha,
                       budget=args.budget, seed=args.seed).validate()
    for i, t in enumerate(texts):
        if not t.strip():
            raise UsageError(f"input {i + 1} is empty")
    if args.output and Path(args.output).exists() and not args.force:
        from edgerun.atomic import OutputExistsError

        raise OutputExistsError(f"{args.output} already exists; pass --force to overwrite it")
    if args.prompted:
        from converters.source import open_source  # heavy: gguf, and torch to dequantize a GGUF once

        clf = TextClassifier.prompted(open_source(args.model, progress=True).path, args.task, dtype=args.dtype,
                                      threads=args.threads)
    else:
        if not Path(args.model).is_dir():
            raise UsageError(f"{args.model} is not a classifier checkpoint directory with a head for "
                             f"'{args.task}'; use --prompted for the zero-shot classifier of a model")
        clf = TextClassifier.load(args.model, args.task, dtype=args.dtype, threads=args.threads)
    certs = certify(clf, texts, config, notify=lambda m: print(f"notice: {m}", file=sys.stderr))
    report = [c.as_dict() for c in certs]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        omega = "omega_H" if config.fuzz else "omega_M"
        for i, c in enumerate(certs, 1):
            head = f"[{i}] {c.label_name}  votes {c.votes}  p_A >= {c.p_a_lower:.3f}"
            if c.certified:
                head += (f"  radius {c.radius_edits} word edits ({100 * c.radius:.1f}% of {c.n_words} words, {omega}"
                         + (f"; {c.radius_unconditional_edits} if the trigger is outside the area" if config.fuzz else "")
                         + ")")
            else:
                head += "  not certified (p_A lower bound <= 1/2)"
            print(head)
            if config.fuzz:
                print("    vulnerable area: " + (" | ".join(repr(w) for w in c.area_words) or "none"))
            print(f"    time {c.total_ms:.0f} ms (span search {c.mcts_ms:.0f}, {config.k} passes {c.passes_ms:.0f})")
    if args.output:
        from edgerun.atomic import atomic_file

        with atomic_file(args.output, force=args.force) as tmp:
            tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgerun", description="On-device LLM runtime and compression toolchain.")
    parser.add_argument("--version", action="version", version=f"edgerun {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_chat(sub)
    _add_serve(sub)
    _add_export(sub)
    _add_carve(sub)
    _add_merge(sub)
    _add_recover(sub)
    _add_experts(sub)
    _add_bench(sub)
    _add_device(sub)
    _add_kv(sub)
    _add_certify(sub)
    _add_worker(sub)
    p = sub.add_parser("pull", help="download a catalog model or dataset into the cache")
    p.add_argument("name")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("list", help="list catalog models and datasets and whether they are pulled")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("rm", help="remove pulled models or datasets from the cache")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_rm)
    return parser


_finished = False


def _terminate(signum, frame):
    if _finished:                      # the command is over (its outputs are in place): exit without
        os._exit(128 + signum)         # raising into interpreter shutdown (atexit callbacks)
    raise SystemExit(128 + signum)     # unwinds like Ctrl-C: atomic writers remove their temporaries


def main(argv: list[str] | None = None) -> int:
    global _finished
    _finished = False
    try:
        return _main(argv)
    finally:
        _finished = True


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    signal.signal(signal.SIGTERM, _terminate)   # SIGTERM cleans up like Ctrl-C: no partial output left
    try:
        return args.func(args) or 0
    except EdgerunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        # Ctrl-C or SIGTERM while a native module initializes (onnxruntime) surfaces as an ImportError
        if isinstance(e.__cause__ or e.__context__, (KeyboardInterrupt, SystemExit)):
            print("\ninterrupted", file=sys.stderr)
            return 130
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"error: no space left on the device ({e.filename or 'disk full'}); free some space "
                  "and try again", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
