"""Reference engine: a Hugging Face checkpoint run with PyTorch/transformers on the CPU.

It is the reference every parity check compares against (float32 by default) and the home of what
llama.cpp cannot do (exact MoE routing, per-layer KV precision, and the MixPE emulation, :mod:`edgerun.backends.mixpe`).
The streaming path is a plain decode loop over a transformers ``DynamicCache`` (the previous turn's
cache is reused up to the longest common prefix); the non-streaming path is ``model.generate``.
Only safetensors weights are loaded (no pickles).
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

from edgerun.backends.base import (Backend, GenerationStats, MemoryInfo, SamplingParams, cap_threads,
                                   physical_cores, reply_budget)
from edgerun.errors import BackendError
from edgerun.formats import safetensors as st_format
from edgerun.formats.gptq import dequantized_state_dict, is_quantized_checkpoint
from edgerun.kv import layout as kv_layout
from edgerun.kv.cache import WORKING_COPIES, QuantizedKVCache
from edgerun.moe import store
from edgerun.procmem import release_free_memory

DEFAULT_CTX = 4096


class TorchBackend(Backend):
    """An HF checkpoint directory loaded with transformers.

    Args:
        path: checkpoint directory (config.json, *.safetensors, tokenizer files).
        n_ctx: context window in tokens (default min(4096, max_position_embeddings)).
        threads: torch intra-op threads (default: physical cores; capped at the CPUs this process may use).
        dtype: ``"float32"`` (reference) or ``"bfloat16"``.
        seed: default sampling seed.
        kv_layout: a :class:`edgerun.kv.layout.Layout` (or a layout YAML path): the KV cache is the
            packed layer-wise quantized cache of :mod:`edgerun.kv` (KVTuner), also for :meth:`logits`
            (teacher-forced, the simulated quantization of the layout search); None: transformers'
            ``DynamicCache`` at the model's dtype.
        kv_working_copy: with a layout, what the packed cache keeps dequantized for attention
            (:class:`edgerun.kv.cache.QuantizedKVLayer`): ``"none"`` (default: packed bytes only, what the
            planner budgets; the whole history is dequantized at every step), ``"model"`` (each token
            dequantized once, decode near the unquantized cache's speed, but a full-width copy is held on
            top of the packed bytes), ``"float16"``/``"bfloat16"`` (a 2-byte copy). ``memory().kv_cache_bytes`` is always the packed bytes,
            ``memory().kv_working_bytes`` the copy.

    Raises:
        ModelFileError: not a checkpoint directory, pickled weights, corrupted safetensors.
        BackendError: transformers cannot build the model.
    """

    name = "torch"

    def __init__(self, path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 dtype: str = "float32", seed: int | None = None, batch_threads: int | None = None,
                 kv_layout=None, kv_working_copy: str = "none", **_ignored):
        hf_logging.set_verbosity_error()  # deprecation chatter from generate() is not for our users
        self.path = Path(path)
        st_format.checkpoint_files(self.path)
        cfg = st_format.read_config(self.path)
        self.threads = cap_threads(int(threads))[0] if threads else physical_cores()  # never more than the CPUs
        torch.set_num_threads(self.threads)
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = self._load_model(cfg, getattr(torch, dtype))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise BackendError(f"transformers could not load {self.path}: {e}") from None
        self.model.eval()
        release_free_memory()   # the loader's temporary buffers (file reads, dtype casts) go back to the kernel
        # transformers >= 5.2x renames the forward's `past_key_values` argument to `cache`
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.n_ctx = int(n_ctx) if n_ctx else min(DEFAULT_CTX, int(cfg.get("max_position_embeddings", DEFAULT_CTX)))
        self.seed = seed
        if kv_working_copy not in WORKING_COPIES:
            raise BackendError(f"kv_working_copy {kv_working_copy!r} is not one of {', '.join(WORKING_COPIES)}")
        self.kv_working_copy = kv_working_copy
        self.kv_layout = None
        self._cache = None
        self._cached_tokens: list[int] = []
        if kv_layout is not None:
            self.set_kv_layout(kv_layout)
        self.last_stats = GenerationStats(context_size=self.n_ctx)
        self._bos = self.tokenizer.bos_token_id
        self._add_bos = bool(getattr(self.tokenizer, "add_bos_token", False)) or self._tokenizer_adds_bos()
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)

    def _load_model(self, cfg: dict, dtype):
        """transformers' loader; for a carved MoE the exact CMoE layers; for a PTQ checkpoint its dequantized weights."""
        if store.is_carved(cfg):
            return store.load_model(self.path, dtype)
        if not is_quantized_checkpoint(cfg):
            return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, use_safetensors=True)
        state, _ = dequantized_state_dict(self.path)
        config = AutoConfig.from_pretrained(self.path)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"checkpoint tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.tie_weights()
        return model

    def reset(self) -> None:
        """Drop the cached KV of the previous call: the next call prefills every prompt token."""
        self._cache, self._cached_tokens = None, []

    def set_kv_layout(self, layout) -> bool:
        """Use ``layout`` (Layout, YAML path, or None for the unquantized DynamicCache) from the next call on.

        A cache made under another layout is dropped, so the next message re-prefills the conversation
        under the new layout (the history is recomputed, not re-quantized: exact for the new layout).
        Returns True when a cache was dropped.

        Raises:
            YamlError: a layout for another number of layers or a bad layout file.
        """
        if layout is not None and not isinstance(layout, kv_layout.Layout):
            layout = kv_layout.load(layout, self.model.config.num_hidden_layers)
        if layout is not None and len(layout.pairs) != self.model.config.num_hidden_layers:
            raise kv_layout.yf.YamlError(f"KV layout {layout.name!r} is for {len(layout.pairs)} layers, the model has "
                                         f"{self.model.config.num_hidden_layers}")
        def key(lay):
            return None if lay is None else (tuple(lay.pairs), lay.mode, lay.group_size, lay.window)

        dropped = key(self.kv_layout) != key(layout) and self._cache is not None
        if dropped:
            self._cache, self._cached_tokens = None, []
        self.kv_layout = layout
        return dropped

    def _new_cache(self):
        if self.kv_layout is not None:
            return QuantizedKVCache(self.kv_layout.specs(), self.kv_working_copy)
        return DynamicCache(config=self.model.config)

    def _tokenizer_adds_bos(self) -> bool:
        ids = self.tokenizer("a", add_special_tokens=True).input_ids
        return self._bos is not None and bool(ids) and ids[0] == self._bos

    # --- tokens -------------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids if text else []
        if self._add_bos and self._bos is not None and (not ids or ids[0] != self._bos):
            ids = [self._bos] + ids
        return list(ids)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    def tokenize_markup(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text else []

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @property
    def chat_template(self) -> str | None:
        t = getattr(self.tokenizer, "chat_template", None)
        return t if isinstance(t, str) else None

    @property
    def special_tokens(self) -> dict[str, str]:
        return {"bos_token": self.tokenizer.bos_token or "", "eos_token": self.tokenizer.eos_token or ""}

    # --- forward ------------------------------------------------------------------------------

    def _forward(self, ids: list[int], cache, past: int):
        x = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(past, past + len(ids)).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(input_ids=x, use_cache=True, position_ids=pos, **{self._cache_kwarg: cache})
        return out.logits[0], getattr(out, "past_key_values", None) or getattr(out, "cache", None)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position: float32 (len(tokens), vocab), no cache reused."""
        tokens = [int(t) for t in tokens]
        if not tokens or len(tokens) > self.n_ctx:
            raise BackendError(f"logits need 1..{self.n_ctx} tokens, got {len(tokens)}")
        logits, _ = self._forward(tokens, self._new_cache() if self.kv_layout is not None else None, 0)
        return logits.float().numpy()

    def _prefix_cache(self, prompt: list[int]):
        """Reuse the cached KV of the previous call up to the longest common prefix (leaving >= 1 token).

        A packed cache is cropped where it can be cut exactly (:meth:`QuantizedKVCache.exact_prefix`: any
        token in per-token mode; in KIVI mode the block boundary where a fresh prefill's packed part ends
        when the cut would reach into packed tokens), so the tokens after it are prefilled again.
        """
        n = 0
        for a, b in zip(self._cached_tokens, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)
        if self._cache is None or n == 0:
            return None, 0
        if self.kv_layout is not None:
            n = self._cache.exact_prefix(n)           # KIVI may back off to a block boundary
            if n == 0:
                return None, 0
        extra = self._cache.get_seq_length() - n
        if extra > 0:
            self._cache.crop(-extra)  # transformers 5: a negative count removes that many newest tokens
        return self._cache, n

    def _sample(self, logits, sampling: SamplingParams, gen) -> int:
        if sampling.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_k and sampling.top_k > 0:
            kth = torch.topk(probs, min(sampling.top_k, probs.numel())).values[-1]
            probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
        if sampling.min_p and sampling.min_p > 0:
            probs = torch.where(probs < sampling.min_p * probs.max(), torch.zeros_like(probs), probs)
        if sampling.top_p and sampling.top_p < 1:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < sampling.top_p * sorted_p.sum()
            mask = torch.zeros_like(probs, dtype=torch.bool)
            mask[idx[keep]] = True
            probs = torch.where(mask, probs, torch.zeros_like(probs))
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    def stream(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> Iterator[str]:
        prompt = [int(t) for t in prompt_tokens]
        max_new = reply_budget(self.n_ctx, len(prompt), sampling.max_tokens)
        gen = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else (self.seed or 0))
        stats = GenerationStats(prompt_tokens=len(prompt), context_size=self.n_ctx)
        cache, reused = self._prefix_cache(prompt)
        if cache is None:
            cache = self._new_cache()
        stats.prefill_tokens = len(prompt) - reused
        generated: list[int] = []
        shown = ""
        finish = "interrupted"
        t0 = time.perf_counter()
        try:
            logits, cache = self._forward(prompt[reused:], cache, reused)
            stats.prefill_ms = (time.perf_counter() - t0) * 1e3
            self._cached_tokens = list(prompt)
            while True:
                tok = self._sample(logits[-1], sampling, gen)
                if not generated:
                    stats.ttft_ms = (time.perf_counter() - t0) * 1e3
                if tok in self._eos and not sampling.ignore_eos:
                    finish = "stop"
                    break
                generated.append(tok)
                text = self.detokenize(generated)
                if not text.endswith("\ufffd"):
                    yield text[len(shown):]
                    shown = text
                if len(generated) >= max_new:
                    finish = "length"
                    break
                t1 = time.perf_counter()
                logits, cache = self._forward([tok], cache, len(prompt) + len(generated) - 1)
                self._cached_tokens.append(tok)
                stats.decode_ms += (time.perf_counter() - t1) * 1e3
                stats.decode_steps += 1
        finally:
            self._cache = cache
            stats.generated_tokens = len(generated)
            stats.finish_reason = finish
            stats.context_used = len(self._cached_tokens)
            self.last_stats = stats
            mem = self.memory()
            stats.kv_cache_bytes, stats.kv_working_bytes = mem.kv_cache_bytes, mem.kv_working_bytes
            stats.kv_layout = self.kv_layout.name if self.kv_layout is not None else ""

    def complete(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> str:
        prompt = [int(t) for t in prompt_tokens]
        max_new = reply_budget(self.n_ctx, len(prompt), sampling.max_tokens)
        kwargs = dict(max_new_tokens=max_new, eos_token_id=sorted(self._eos), pad_token_id=sorted(self._eos)[0])
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed if sampling.seed is not None else (self.seed or 0))
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k, min_p=sampling.min_p)
        else:
            kwargs.update(do_sample=False)
        # model.generate exposes no per-phase timing: the stats of this path carry token counts only
        cache = self._new_cache()                                   # the layout's packed cache, if any
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                      past_key_values=cache, **kwargs)
        new = out[0, len(prompt):].tolist()
        finish = "stop" if new and new[-1] in self._eos else "length"
        if new and new[-1] in self._eos:
            new = new[:-1]
        self._cache, self._cached_tokens = None, []
        self.last_stats = GenerationStats(prompt_tokens=len(prompt), prefill_tokens=len(prompt),
                                          generated_tokens=len(new), finish_reason=finish,
                                          context_used=len(prompt) + len(new), context_size=self.n_ctx)
        if self.kv_layout is not None:
            self.last_stats.kv_cache_bytes, self.last_stats.kv_layout = cache.nbytes(), self.kv_layout.name
            self.last_stats.kv_working_bytes = cache.working_nbytes()
        return self.detokenize(new)

    def memory(self) -> MemoryInfo:
        model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        cfg = self.model.config
        n_head = cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
        working = 0
        if self._cache is not None and hasattr(self._cache, "nbytes"):
            kv = self._cache.nbytes()                        # the packed cache: what it must hold
            working = self._cache.working_nbytes()           # its dequantized working copy, held on top
        else:
            per_token = 2 * cfg.num_hidden_layers * getattr(cfg, "num_key_value_heads", n_head) * hd * \
                next(self.model.parameters()).element_size()
            kv = per_token * len(self._cached_tokens)
        return MemoryInfo(model_bytes=int(model_bytes), kv_cache_bytes=int(kv),
                          rss_bytes=psutil.Process().memory_info().rss, kv_working_bytes=int(working))

    def close(self) -> None:
        self.model = None
        self._cache = None
        release_free_memory()   # the freed weights go back to the kernel (a model swap would keep them)
