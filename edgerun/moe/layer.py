"""The carved MoE layer, exactly as CMoE defines it (Pei et al., "CMoE", arXiv 2502.04416, Sec. 3-4).

A dense SwiGLU FFN ``down(silu(gate x) * up x)`` with d_ff neurons becomes:

- one always-on **shared expert**: an SwiGLU MLP over the x*m neurons with the highest activation rate;
- z - x **routed experts** of m neurons each (rows of gate/up, columns of down);
- an **analytical router** built from one representative neuron per routed expert (Sec. 4.2, code):
  ``s_j(x) = |(u_j . x) * SiLU(g_j . x)|`` with g_j, u_j the L2-normalised gate/up rows of the
  representative neuron; ``p = softmax(s)`` in float32; the top-y of ``p + bias`` are selected;
- gates ``1 + p_j * scale_j`` for the selected experts (``scale`` is the learnable gate scale,
  initialised to 0, so training-free every selected expert has gate 1 and the layer equals the dense
  FFN with the unselected routed neurons dropped).

``F(x) = E_shared(x) + sum_{j in top-y} (1 + p_j * scale_j) * E_j(x)``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CarvedMoE(nn.Module):
    """CMoE feed-forward layer (drop-in for a Llama MLP: input and output (batch, tokens, d_model)).

    Args:
        d_model: hidden size.
        shared_neurons: neurons of the shared expert (x * m).
        n_routed: routed experts (z - x).
        expert_size: neurons per routed expert (m).
        top_k: routed experts selected per token (y).

    Attributes (tensors, float32 unless stated):
        shared_gate, shared_up: (shared_neurons, d_model); shared_down: (d_model, shared_neurons).
        expert_gate, expert_up: (n_routed, m, d_model); expert_down: (n_routed, d_model, m).
        router_gate, router_up: (n_routed, d_model), L2-normalised rows of the representative neurons.
        scale: (n_routed,) learnable gate scale (0: training-free). bias: (n_routed,) selection bias.
    """

    def __init__(self, d_model: int, shared_neurons: int, n_routed: int, expert_size: int, top_k: int):
        super().__init__()
        self.d_model, self.n_routed, self.expert_size, self.top_k = d_model, n_routed, expert_size, top_k
        self.shared_gate = nn.Parameter(torch.zeros(shared_neurons, d_model))
        self.shared_up = nn.Parameter(torch.zeros(shared_neurons, d_model))
        self.shared_down = nn.Parameter(torch.zeros(d_model, shared_neurons))
        self.expert_gate = nn.Parameter(torch.zeros(n_routed, expert_size, d_model))
        self.expert_up = nn.Parameter(torch.zeros(n_routed, expert_size, d_model))
        self.expert_down = nn.Parameter(torch.zeros(n_routed, d_model, expert_size))
        self.router_gate = nn.Parameter(torch.zeros(n_routed, d_model), requires_grad=False)
        self.router_up = nn.Parameter(torch.zeros(n_routed, d_model), requires_grad=False)
        self.scale = nn.Parameter(torch.zeros(n_routed))
        self.register_buffer("bias", torch.zeros(n_routed))

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Router probabilities p (..., n_routed), float32, from the analytical scores."""
        x = x.float()
        scores = torch.abs((x @ self.router_up.float().T) * F.silu(x @ self.router_gate.float().T))
        return torch.softmax(scores, dim=-1)

    def selection_scores(self, probs: torch.Tensor) -> torch.Tensor:
        """Scores the top-k selection ranks (..., n_routed): router probs plus the load-balancing bias.

        The bias (CMoE's auxiliary-loss-free balancing) only changes which experts are chosen, never
        their gates; engines that host the model fit their linear routers to these scores.
        """
        return probs + self.bias

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(selected expert ids (..., top_k) int64, their gates (..., top_k), router probs (..., n_routed))."""
        probs = self.router_probs(x)
        selected = torch.topk(self.selection_scores(probs), self.top_k, dim=-1).indices
        gates = 1.0 + probs.gather(-1, selected) * self.scale[selected]
        return selected, gates, probs

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Shared expert on tokens x (n, d_model)."""
        return F.linear(F.silu(F.linear(x, self.shared_gate)) * F.linear(x, self.shared_up), self.shared_down)

    def expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Routed expert j on tokens x (n, d_model)."""
        return F.linear(F.silu(F.linear(x, self.expert_gate[j])) * F.linear(x, self.expert_up[j]), self.expert_down[j])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) for x (..., d_model): shared expert plus the chosen routed experts, each times its gate."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                        # (tokens, d_model)
        selected, gates, _ = self.route(flat)                  # (tokens, top_k)
        out = self.shared(flat) if self.shared_gate.shape[0] else torch.zeros_like(flat)
        for j in range(self.n_routed):
            token_idx, slot = torch.nonzero(selected == j, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            expert_out = self.expert(j, flat[token_idx])       # (n_j, d_model)
            out.index_add_(0, token_idx, expert_out * gates[token_idx, slot, None].to(expert_out.dtype))
        return out.reshape(shape)
