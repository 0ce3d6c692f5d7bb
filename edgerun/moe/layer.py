"""The carved MoE layer, exactly as CMoE defines it (Pei et al., "CMoE", arXiv 2502.04416, Sec. 3-4).

A dense SwiGLU FFN ``down(silu(gate x) * up x)`` with d_ff neurons becomes:

- one always-on **shared expert**: an SwiGLU MLP over the x*m neurons with the highest activation rate;
- z - x **routed experts** of m neurons each (rows of gate/up, columns of down);
- a router, one of two kinds (``router_kind``):

  - ``"fitted"`` (the default of ``edgerun carve``): a linear map ``s(x) = W x`` (W: (z-x, d)) fitted
    by ridge least squares on the calibration tokens to each expert's log activation mass
    ``log sum_{i in E_j} |h_i(x)|`` (:func:`converters.carve.fit_router`); the top-y of ``s + bias`` are
    selected. Linear, so the engine exports (Granite's linear router) select exactly the same experts;
  - ``"analytical"`` (CMoE's own, Sec. 4.2 and the released code), built from one representative
    neuron per routed expert: ``s_j(x) = |(u_j . x) * SiLU(g_j . x)|`` with g_j, u_j the
    L2-normalised gate/up rows of the representative neuron; the top-y of ``softmax(s) + bias`` are
    selected;

  ``p = softmax(s)`` in float32 in both cases;
- gates ``1 + p_j * scale_j`` for the selected experts (``scale`` is the learnable gate scale,
  initialised to 0, so training-free every selected expert has gate 1 and the layer equals the dense
  FFN with the unselected routed neurons dropped).

``F(x) = E_shared(x) + sum_{j in top-y} (1 + p_j * scale_j) * E_j(x)``

For measurement only, the routing can be overridden by an **oracle** (per token the y experts whose
dropped remainder has the smallest output norm: the ceiling of any router on this grouping) or by
uniform random sets (the floor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


ROUTER_KINDS = ("fitted", "analytical")
ROUTING_OVERRIDES = (None, "oracle", "random")
EXACT_ORACLE_SETS = 4096        # above this many C(E, k) expert sets the oracle is greedy (see oracle_select)
ORACLE_CHUNK_FLOATS = 2 ** 25   # at most this many float32 (128 MiB) of candidate outputs at a time


class CarvedMoE(nn.Module):
    """CMoE feed-forward layer (drop-in for a Llama MLP: input and output (batch, tokens, d_model)).

    Args:
        d_model: hidden size.
        shared_neurons: neurons of the shared expert (x * m).
        n_routed: routed experts (z - x).
        expert_size: neurons per routed expert (m).
        top_k: routed experts selected per token (y).
        router_kind: ``"fitted"`` (linear router ``router_weight``) or ``"analytical"`` (CMoE's
            representative-neuron scores from ``router_gate``/``router_up``).

    Attributes (tensors, float32 unless stated):
        shared_gate, shared_up: (shared_neurons, d_model); shared_down: (d_model, shared_neurons).
        expert_gate, expert_up: (n_routed, m, d_model); expert_down: (n_routed, d_model, m).
        router_gate, router_up: (n_routed, d_model), L2-normalised rows of the representative neurons.
        router_weight: (n_routed, d_model), the fitted linear router (zeros when never fitted).
        scale: (n_routed,) learnable gate scale (0: training-free). bias: (n_routed,) selection bias.
        routing_override: None (route with the router), ``"oracle"`` or ``"random"``: measurement-only
            routings (:meth:`oracle_select`, uniform random sets from ``random_generator``); never stored.

    Raises:
        ValueError: an unknown router kind.
    """

    def __init__(self, d_model: int, shared_neurons: int, n_routed: int, expert_size: int, top_k: int,
                 router_kind: str = "analytical"):
        super().__init__()
        if router_kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {router_kind!r}; valid: {', '.join(ROUTER_KINDS)}")
        self.d_model, self.n_routed, self.expert_size, self.top_k = d_model, n_routed, expert_size, top_k
        self.router_kind = router_kind
        self.routing_override: str | None = None
        self.random_generator: torch.Generator | None = None
        self.shared_gate = nn.Parameter(torch.zeros(shared_neurons, d_model))
        self.shared_up = nn.Parameter(torch.zeros(shared_neurons, d_model))
        self.shared_down = nn.Parameter(torch.zeros(d_model, shared_neurons))
        self.expert_gate = nn.Parameter(torch.zeros(n_routed, expert_size, d_model))
        self.expert_up = nn.Parameter(torch.zeros(n_routed, expert_size, d_model))
        self.expert_down = nn.Parameter(torch.zeros(n_routed, d_model, expert_size))
        self.router_gate = nn.Parameter(torch.zeros(n_routed, d_model), requires_grad=False)
        self.router_up = nn.Parameter(torch.zeros(n_routed, d_model), requires_grad=False)
        self.router_weight = nn.Parameter(torch.zeros(n_routed, d_model), requires_grad=False)
        self.scale = nn.Parameter(torch.zeros(n_routed))
        self.register_buffer("bias", torch.zeros(n_routed))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router scores s (..., n_routed) float32: ``W x`` (fitted) or ``|u.x| SiLU(g.x)`` (analytical)."""
        if self.router_kind == "fitted":
            return F.linear(x.float(), self.router_weight.float())
        x = x.float()
        return torch.abs((x @ self.router_up.float().T) * F.silu(x @ self.router_gate.float().T))

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Router probabilities p = softmax(s) (..., n_routed), float32."""
        return torch.softmax(self.router_logits(x), dim=-1)

    def selection_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores the top-k selection ranks (..., n_routed) for inputs x (..., d_model).

        Fitted router: logits + bias (so a linear engine router with the same weights selects the same
        experts); analytical: probabilities + bias, as CMoE. The bias (auxiliary-loss-free balancing)
        only changes which experts are chosen, never their gates.
        """
        if self.router_kind == "fitted":
            return self.router_logits(x) + self.bias
        return self.router_probs(x) + self.bias

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every routed expert's output on tokens x (n, d_model): (n, n_routed, d_model)."""
        h = F.silu(torch.einsum("nd,emd->nem", x, self.expert_gate)) * torch.einsum("nd,emd->nem", x, self.expert_up)
        return torch.einsum("nem,edm->ned", h, self.expert_down)

    def expert_mass(self, x: torch.Tensor) -> torch.Tensor:
        """Activation mass of every routed expert, ``sum_{i in E_j} |h_i(x)|`` (n, n_routed) float32, for x (n, d_model).

        h is the SwiGLU activation ``SiLU(gate x) * (up x)`` of the expert's neurons (not normalised);
        the fitted router regresses the log of this (:func:`converters.carve.fit_router`).
        """
        x = x.float()
        h = F.silu(torch.einsum("nd,emd->nem", x, self.expert_gate.float())) \
            * torch.einsum("nd,emd->nem", x, self.expert_up.float())
        return h.abs().sum(-1)

    def oracle_select(self, x: torch.Tensor) -> torch.Tensor:
        """The oracle's expert sets (n, top_k) int64 for tokens x (n, d_model): per token, of all C(E, k)
        sets, the one whose dropped remainder ``sum_{j not in S} E_j(x)`` has the smallest L2 norm.

        The best any router can do on this grouping for one layer's output (training-free gates of 1);
        for measurement and router distillation (it runs every expert), never for serving. Exact while
        C(E, k) <= :data:`EXACT_ORACLE_SETS`, evaluated in chunks of at most :data:`ORACLE_CHUNK_FLOATS`
        floats; above that (e.g. E24 top-6: 134,596 sets) greedy: k times, add the expert that leaves the
        smallest remainder (an upper bound on the exact oracle's remainder). Sets are sorted ascending.
        """
        import itertools
        import math

        outs = self.expert_outputs(x.float())                              # (n, E, d)
        total = outs.sum(1)                                                # (n, d)
        n, _, d = outs.shape
        if math.comb(self.n_routed, self.top_k) > EXACT_ORACLE_SETS:
            return self._greedy_oracle(outs, total)
        subsets = torch.tensor(list(itertools.combinations(range(self.n_routed), self.top_k)), dtype=torch.long)
        member = torch.zeros(len(subsets), self.n_routed).scatter_(1, subsets, 1.0)   # (S, E)
        best = torch.full((n,), float("inf"))
        best_set = torch.zeros(n, dtype=torch.long)
        chunk = max(1, ORACLE_CHUNK_FLOATS // max(1, n * d))
        for s0 in range(0, len(subsets), chunk):
            kept = torch.einsum("se,ned->nsd", member[s0:s0 + chunk], outs)              # (n, S_chunk, d)
            value, index = torch.linalg.vector_norm(total[:, None, :] - kept, dim=-1).min(1)
            better = value < best                                          # strict: ties keep the first set
            best = torch.where(better, value, best)
            best_set = torch.where(better, index + s0, best_set)
        return subsets[best_set]

    def _greedy_oracle(self, outs: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """Greedy expert sets (n, top_k) int64 for expert outputs ``outs`` (n, E, d) summing to ``total`` (n, d)."""
        n = outs.shape[0]
        rows = torch.arange(n)
        remainder = total.clone()
        taken = torch.zeros(n, self.n_routed, dtype=torch.bool)
        for _ in range(self.top_k):
            cost = torch.linalg.vector_norm(remainder[:, None, :] - outs, dim=-1).masked_fill(taken, float("inf"))
            j = cost.argmin(1)
            taken[rows, j] = True
            remainder = remainder - outs[rows, j]
        return taken.nonzero()[:, 1].reshape(n, self.top_k)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(selected expert ids (..., top_k) int64, their gates (..., top_k), router probs (..., n_routed))."""
        probs = self.router_probs(x)
        if self.routing_override == "oracle":
            selected = self.oracle_select(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.top_k)
        elif self.routing_override == "random":
            noise = torch.rand(probs.shape, generator=self.random_generator)
            selected = torch.topk(noise, self.top_k, dim=-1).indices
        else:
            selected = torch.topk(self.selection_scores(x), self.top_k, dim=-1).indices
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
