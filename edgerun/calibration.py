"""Calibration plumbing shared by the passes that calibrate block by block (PTQ, CMoE carving).

The inputs of decoder block 0 are captured with the keyword arguments the model passes its blocks
(rotary position embeddings, attention mask), so later blocks can be run one at a time on whatever
the already-processed blocks produce (GPTQ's and CMoE's sequential calibration). Calibration windows
are :func:`edgerun.data.token_windows` of the calibration split (its BOS rule), as tensors.
"""

from __future__ import annotations

import torch

from edgerun import data


class _Stop(Exception):
    pass


def calibration_windows(tokenizer, n_samples: int, seq_len: int, dataset: str = "wiki") -> list[torch.Tensor]:
    """The first ``n_samples`` token windows of ``dataset``'s calibration split, int64 tensors (1, T).

    Cut by :func:`edgerun.data.token_windows`: ``seq_len`` text tokens each, preceded by BOS when the
    model's tokenizer adds one (T = seq_len + 1 then, else T = seq_len).

    Raises:
        UsageError: too little calibration text for the windows asked for.
    """
    return [torch.tensor([w]) for w in data.token_windows(tokenizer, dataset, "calibration", seq_len, n_samples)]


def all_windows(tokenizer, seq_len: int, dataset: str = "wiki") -> list[torch.Tensor]:
    """Every whole token window of ``dataset``'s calibration split, in order, int64 tensors (1, T).

    Cut as :func:`calibration_windows` (BOS first when the model uses one).

    Raises:
        UsageError: the split is shorter than one window.
    """
    return [torch.tensor([w]) for w in data.token_windows(tokenizer, dataset, "calibration", seq_len)]


def forward_windows(model, windows: list[torch.Tensor], handles: list) -> None:
    """Run ``model`` over ``windows`` (1, T) int64 (inference mode, no KV cache), then remove the hook ``handles``.

    The hooks are removed however the loop ends (an error, Ctrl-C).
    """
    try:
        with torch.inference_mode():
            for w in windows:
                model(input_ids=w, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def run_with_input_hooks(model, modules: dict, windows: list[torch.Tensor], visit) -> None:
    """Run ``model`` over ``windows`` (inference mode, no KV cache), handing each module's input to ``visit``.

    Args:
        model: a causal LM taking ``input_ids``.
        modules: ``{key: nn.Module}`` to observe.
        windows: token windows (1, T) int64.
        visit: called as ``visit(key, x)`` with the module's first input flattened to (tokens, d), detached.
    """
    def hook(key):
        return lambda module, args: visit(key, args[0].detach().reshape(-1, args[0].shape[-1]))

    forward_windows(model, windows, [m.register_forward_pre_hook(hook(k)) for k, m in modules.items()])


def block_inputs(model, windows: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering block 0 for each window, with the keyword arguments the model passes blocks."""
    layers = model.model.layers
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for w in windows:
                try:
                    model(input_ids=w, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return [c[0] for c in captured], [c[1] for c in captured]


def run_block(layer, hiddens, kwargs_list):
    """Outputs of decoder block ``layer`` for each captured input (no grad)."""
    with torch.inference_mode():
        outs = []
        for h, kw in zip(hiddens, kwargs_list):
            out = layer(h, **kw)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


