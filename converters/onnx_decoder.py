"""ONNX for architectures onnxruntime-genai's builder does not know (the carved MoE), via ``torch.onnx.export``.

The graph is a small, explicit decoder written here (one readable module, gpt-fast style) rather than
transformers' model, so its inputs and outputs are exactly what onnxruntime-genai's decoder loop
feeds and reads:

- inputs: ``input_ids`` int64 (batch, seq), ``attention_mask`` int64 (batch, past + seq),
  ``position_ids`` int64 (batch, seq), and per layer ``past_key_values.{i}.key`` / ``.value`` float32
  (batch, kv_heads, past, head_dim);
- outputs: ``logits`` float32 (batch, seq, vocab) and ``present.{i}.key`` / ``.value``
  (batch, kv_heads, past + seq, head_dim).

The decoder is Llama attention (RoPE, GQA, RMSNorm, causal mask with the padding mask) with Granite's
multipliers, and Granite's shared-expert MoE FFN: router logits, top-k, softmax over the chosen
logits, routed SwiGLU experts and the shared SwiGLU expert. In the graph every routed expert is
computed for every token and masked by its routing weight (exact, ONNX-friendly, but it does the
dense FFN's arithmetic: the sparsity saves nothing in this engine; llama.cpp's ``granitemoe`` runs
only the chosen experts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from converters.source import copy_tokenizer
from edgerun.atomic import atomic_dir
from edgerun.errors import UsageError
from edgerun.formats import safetensors as st_format


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in float32: x / sqrt(mean(x^2) + eps) * weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension (rotary embedding, HF layout)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class GraniteMoEDecoder(nn.Module):
    """Granite shared-expert MoE decoder (Llama attention) with explicit KV-cache inputs and outputs.

    Args:
        cfg: a ``granitemoeshared`` config.json as a dict.
        state: its float32 state dict (HF names).
    """

    def __init__(self, cfg: dict, state: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.n_layer = cfg["num_hidden_layers"]
        self.n_head = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads", self.n_head)
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.n_head
        self.eps = cfg["rms_norm_eps"]
        self.top_k = cfg["num_experts_per_tok"]
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for name, value in state.items():
            self.register_buffer(name.replace(".", "__"), value.float().contiguous(), persistent=False)
        if cfg.get("tie_word_embeddings", False):
            self.lm_head = self.model__embed_tokens__weight

    def w(self, name: str) -> torch.Tensor:
        """The weight named ``name`` in the HF state dict."""
        return getattr(self, name.replace(".", "__"))

    def attention(self, i: int, x, cos, sin, past_k, past_v, mask):
        """Layer i self-attention on x (b, t, d) with the past KV; returns (output, present K, present V)."""
        p = f"model.layers.{i}.self_attn."
        b, t, _ = x.shape
        q = F.linear(x, self.w(p + "q_proj.weight")).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = F.linear(x, self.w(p + "k_proj.weight")).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = F.linear(x, self.w(p + "v_proj.weight")).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)                       # (b, kv, past + t, hd)
        v = torch.cat([past_v, v], dim=2)
        rep = self.n_head // self.n_kv
        kk = k.repeat_interleave(rep, dim=1)
        vv = v.repeat_interleave(rep, dim=1)
        scores = (q @ kk.transpose(-1, -2)) * self.cfg["attention_multiplier"] + mask   # (b, h, t, past + t)
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ vv
        out = out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return F.linear(out, self.w(p + "o_proj.weight")), k, v

    def moe(self, i: int, x):
        """Layer i MoE FFN on x (b, t, d): shared expert + routed experts weighted by the top-k softmax."""
        p = f"model.layers.{i}."
        logits = F.linear(x, self.w(p + "block_sparse_moe.router.weight")).float()           # (b, t, E)
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, top_idx, torch.softmax(top_logits, dim=-1))  # (b, t, E)
        gate_up = self.w(p + "block_sparse_moe.experts.gate_up_proj")                          # (E, 2m, d)
        m = gate_up.shape[1] // 2
        h = torch.einsum("btd,efd->btef", x, gate_up)                                          # (b, t, E, 2m)
        h = F.silu(h[..., :m]) * h[..., m:]
        h = h * weights[..., None].to(h.dtype)                                                 # mask unchosen
        out = torch.einsum("btem,edm->btd", h, self.w(p + "block_sparse_moe.experts.down_proj"))
        shared_in = p + "shared_mlp.input_linear.weight"
        if hasattr(self, shared_in.replace(".", "__")):
            s = F.linear(x, self.w(shared_in))
            half = s.shape[-1] // 2
            out = out + F.linear(F.silu(s[..., :half]) * s[..., half:], self.w(p + "shared_mlp.output_linear.weight"))
        return out

    def forward(self, input_ids, attention_mask, position_ids, *past):
        """(logits (b, t, vocab), present K/V per layer) for the graph inputs described in the module docstring."""
        b, t = input_ids.shape
        x = F.embedding(input_ids, self.model__embed_tokens__weight) * self.cfg["embedding_multiplier"]
        freqs = position_ids[..., None].float() * self.inv_freq                                 # (b, t, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]                                      # (b, 1, t, hd)
        total = attention_mask.shape[1]
        past_len = total - t
        key_pos = torch.arange(total)[None, :]
        query_pos = (torch.arange(t) + past_len)[:, None]
        causal = key_pos <= query_pos                                                           # (t, total)
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        presents = []
        r = self.cfg["residual_multiplier"]
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            h, k, v = self.attention(i, rms_norm(x, self.w(p + "input_layernorm.weight"), self.eps), cos, sin,
                                     past[2 * i], past[2 * i + 1], mask)
            x = x + h * r
            x = x + self.moe(i, rms_norm(x, self.w(p + "post_attention_layernorm.weight"), self.eps)) * r
            presents += [k, v]
        x = rms_norm(x, self.model__norm__weight, self.eps)
        head = self.lm_head if self.cfg.get("tie_word_embeddings", False) else self.w("lm_head.weight")
        logits = F.linear(x, head) / self.cfg["logits_scaling"]
        return (logits, *presents)


def export(checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    """Export a ``granitemoeshared`` HF checkpoint to an onnxruntime-genai model directory (fp32).

    Raises:
        UsageError: not a granitemoeshared checkpoint; output exists without ``force``.
        ModelFileError: invalid checkpoint.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    files = st_format.checkpoint_files(checkpoint)
    cfg = st_format.read_config(checkpoint)
    if cfg.get("model_type") != "granitemoeshared":
        raise UsageError(f"{checkpoint} is {cfg.get('model_type')}; this exporter writes granitemoeshared checkpoints")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    model = GraniteMoEDecoder(cfg, state).eval()
    n_layer, n_kv = model.n_layer, model.n_kv
    hd = model.head_dim
    names_in = ["input_ids", "attention_mask", "position_ids"]
    names_out = ["logits"]
    past = []
    for i in range(n_layer):
        names_in += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        names_out += [f"present.{i}.key", f"present.{i}.value"]
        past += [torch.zeros(1, n_kv, 3, hd), torch.zeros(1, n_kv, 3, hd)]
    example = (torch.ones(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long),
               torch.arange(3, 7)[None], *past)
    auto = torch.export.Dim.AUTO  # batch, sequence, past and total lengths are all dynamic
    shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
    with atomic_dir(out, force=force) as tmp:
        with torch.no_grad():
            torch.onnx.export(model, example, str(tmp / "model.onnx"), input_names=names_in, output_names=names_out,
                              dynamic_shapes=shapes, dynamo=True, external_data=True, optimize=True)
        _write_genai_config(tmp, cfg, n_layer)
        copy_tokenizer(checkpoint, tmp, ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                         "special_tokens_map.json"))
    return out


def _write_genai_config(directory: Path, cfg: dict, n_layer: int) -> None:
    eos = cfg.get("eos_token_id", 2)
    genai = {"model": {
        "type": "llama", "bos_token_id": cfg.get("bos_token_id", 1), "eos_token_id": eos,
        "pad_token_id": cfg.get("pad_token_id") if cfg.get("pad_token_id") is not None else (eos if isinstance(eos, int) else eos[0]),
        "vocab_size": cfg["vocab_size"], "context_length": cfg["max_position_embeddings"],
        "decoder": {"filename": "model.onnx", "head_size": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
                    "hidden_size": cfg["hidden_size"], "num_attention_heads": cfg["num_attention_heads"],
                    "num_key_value_heads": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                    "num_hidden_layers": n_layer, "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                               "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}}},
        "search": {"do_sample": False, "max_length": cfg["max_position_embeddings"], "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0}}
    (directory / "genai_config.json").write_text(json.dumps(genai, indent=2), encoding="utf-8")
