"""CMoE: carve a dense Llama-family SwiGLU FFN into shared + routed experts, training-free.

Method (Pei et al., "CMoE: Fast Carving of Mixture-of-Experts for Efficient LLM Inference",
arXiv 2502.04416; the released code's details where the paper is silent, see docs/carve.md):

1. **Profiling**, layer by layer and sequentially (layer i+1 sees the outputs of the already-carved
   layer i): on the calibration tokens, the cosine-normalised SwiGLU activation
   ``h = SiLU(x^ W^_gate^T) * (x^ W^_up^T)`` (token x and every weight row L2-normalised); per token
   the K_a = 10 neurons with the largest |h| are marked (ATopK); the activation rate mu_i is the
   share of tokens marking neuron i.
2. **Shared expert**: the x*m neurons with the highest mu.
3. **Routed experts**: the other neurons in z - x groups of exactly m. Seeds are the marker columns
   of the remaining neurons with the highest mu; the cost of neuron i to seed j is the L1 (Hamming)
   distance of their marker columns over the calibration tokens; one balanced assignment (each seed
   has capacity m) solved exactly as a linear assignment on the cost matrix with each seed's column
   repeated m times (``scipy.optimize.linear_sum_assignment``; at SmolLM2's sizes the square matrix
   is at most 1,440 x 1,440 and solves in well under a second, so the min-cost-flow formulation on
   the un-expanded problem, which matters at 7B scale, is not needed). One iteration, as released.
4. **Router**: per routed expert, the representative neuron is the member whose marker column is
   closest (L1, as in the code; the paper's Eq. 7 says L2) to the group's mean column; the analytical
   router rows are its L2-normalised gate and up rows (see :mod:`edgerun.moe.layer` for the scores).
   Both routers are always stored; which one routes is ``router``:

   - ``fitted`` (default; not in the paper): per routed expert a linear map from the FFN input to the
     expert's log activation mass ``log sum_{i in E_j} |h_i(x)|`` (h the plain SwiGLU activation),
     ridge least squares on the calibration tokens (:func:`fit_router`). On SmolLM2 the analytical
     router is at chance: the marker vectors are sparse 0/1, so the member closest to the centroid is
     in practice the group's least active neuron (docs/carve.md has the measurement);
   - ``analytical``: CMoE's representative-neuron router, for paper fidelity.

   The sequential profiling of layer i+1 runs on layer i routed by the chosen router.
5. Training-free gates: every selected routed expert has gate 1.

ATopK's K (``k_a``, default 10 as released) is a parameter: the carve marks the K largest |h| per token.

**Domain-aware grouping** (``domains``, not in the paper; issue 16's specialisation option): the
calibration tokens come in equal shares from several catalog texts (the *domains*), and the routed
grouping adds each neuron's domain profile to the co-activation signal, so experts can align with
domains. Per remaining neuron i its activation rate on each domain's tokens r_{d,i} and its domain
preference q_{i,d} = r_{d,i} / sum_d' r_{d',i} (uniform for a neuron never active); routed expert j is
given domain d(j) = j mod D (the domains in the order given); its seed is the unseeded neuron with the
largest r_{d(j),i} q_{i,d(j)} (active on the domain and specific to it); the cost of neuron i to expert
j is ``(1 - w) C_coact / mean(C_coact) + w (1 - q_{i,d(j)}) / mean(1 - q)`` with C_coact the usual
column L1 to the seed and w = ``domain_weight`` (0.5); the same balanced assignment solves it. The
shared expert, the routers and everything after the grouping are unchanged.

Measurement options (not in the paper; ``benchmarks/cmoe_table.py --routers`` compares them by the
oracle perplexity of the grouping): ``grouping="magnitude"`` profiles with each token's normalised
|h| (``|h_i| / sum_k |h_k|``) instead of 0/1 markers (rates, seeds, L1 costs and representatives on
those columns); ``target="output"`` fits the router to the log output norm ``log ||E_j(x)||`` of each
expert instead of its activation mass.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edgerun.atomic import atomic_dir
from edgerun.calibration import block_inputs, calibration_windows
from converters.source import copy_tokenizer
from edgerun.errors import UsageError
from edgerun.formats import safetensors as st_format
from edgerun.moe import config as moe_config
from edgerun.moe.layer import CarvedMoE
from edgerun.moe.store import MOE_KEY, is_carved, layer_file, layer_tensors

K_A = 10
ROUTERS = ("fitted", "analytical")
GROUPINGS = ("markers", "magnitude")
TARGETS = ("mass", "output")
DEFAULT_ROUTER = "fitted"
RIDGE = 1e-2
DOMAIN_WEIGHT = 0.5


def activation_markers(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, k_a: int = K_A) -> torch.Tensor:
    """ATopK markers (CMoE's neuron profiling, step 1 of the module doc).

    Args:
        x: FFN inputs (tokens, d_model) float32.
        w_gate, w_up: (d_ff, d_model) float32.
        k_a: neurons marked per token.

    Returns:
        bool (tokens, d_ff): True for each token's ``k_a`` neurons of largest |cosine-normalised
        SwiGLU activation|.
    """
    xn = F.normalize(x, dim=-1)
    h = F.silu(xn @ F.normalize(w_gate, dim=-1).T) * (xn @ F.normalize(w_up, dim=-1).T)   # (tokens, d_ff)
    top = torch.topk(h.abs(), k_a, dim=-1).indices
    markers = torch.zeros_like(h, dtype=torch.bool)
    markers.scatter_(1, top, True)
    return markers


def _l1_to_columns(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """L1 distance between the columns of a (T, n) in {0,1} and the columns of c (T, k) in [0,1]: (n, k)."""
    # sum_t |a - c| = sum_t c + sum_t a * (1 - 2c)   (a is binary)
    return c.sum(0)[None, :] + a.T @ (1.0 - 2.0 * c)


def _magnitude_profile(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """Per token the cosine-normalised |h| divided by its sum over the neurons: (tokens, d_ff) float32."""
    xn = F.normalize(x, dim=-1)
    h = (F.silu(xn @ F.normalize(w_gate, dim=-1).T) * (xn @ F.normalize(w_up, dim=-1).T)).abs()
    return h / h.sum(1, keepdim=True).clamp_min(1e-12)


def _column_l1(a: torch.Tensor, c: torch.Tensor, grouping: str) -> torch.Tensor:
    """L1 distances (n, k) between the columns of a (T, n) and c (T, k): the binary shortcut for markers."""
    if grouping == "markers":
        return _l1_to_columns(a, c)
    out = torch.zeros(a.shape[1], c.shape[1])
    for start in range(0, a.shape[0], 2048):     # bounded memory: (n, k) partial sums over token blocks
        ab, cb = a[start:start + 2048], c[start:start + 2048]
        out += (ab[:, :, None] - cb[:, None, :]).abs().sum(0)
    return out


def balanced_assignment(cost: np.ndarray, capacity: int) -> np.ndarray:
    """Assign n items to k groups of exactly ``capacity`` minimising total cost (n = k * capacity).

    CMoE's balanced grouping of the routed neurons (step 3 of the module doc), solved exactly as a
    linear assignment on the cost matrix with each group's column repeated ``capacity`` times.

    Args:
        cost: (n, k) float64, the cost of item i in group j.
        capacity: items per group.

    Returns:
        group index per item, int64 (n,).

    Raises:
        ValueError: n != k * capacity.
    """
    from scipy.optimize import linear_sum_assignment   # scipy: only the carve's assignment step needs it

    n, k = cost.shape
    if n != k * capacity:
        raise ValueError(f"{n} items do not fill {k} groups of {capacity}")
    rows, cols = linear_sum_assignment(np.repeat(cost, capacity, axis=1))
    groups = np.empty(n, dtype=np.int64)
    groups[rows] = cols // capacity
    return groups


def fit_router(x: torch.Tensor, expert_gate: torch.Tensor, expert_up: torch.Tensor, ridge: float = RIDGE,
               chunk: int = 4096, expert_down: torch.Tensor | None = None, target: str = "mass") -> torch.Tensor:
    """The fitted linear router (step 4 of the module doc): W (E, d) float32 with ``W x ~ log mass_j(x)``.

    Per routed expert j, the target is the log of its activation mass ``sum_{i in E_j} |h_i(x)|``,
    ``h = SiLU(gate x) * (up x)``, centred per token (the selection depends only on the order of the
    experts within a token); ridge least squares ``(X^T X / n + lambda I) W^T = X^T Y / n`` with
    ``lambda = ridge * trace(X^T X / n) / d``. No intercept: the engines' linear routers (Granite,
    llama.cpp) have none.

    Args:
        x: FFN inputs (tokens, d) float32.
        expert_gate, expert_up: (E, m, d) float32, the routed experts' rows.
        ridge: regularisation relative to the mean input energy per dimension.
        chunk: tokens per block (bounds the (chunk, E, m) activations held at once).
        expert_down: (E, d, m) float32, needed for ``target="output"``.
        target: ``mass`` (log activation mass, the default) or ``output`` (log L2 norm of the expert's output).

    Returns:
        (E, d) float32.

    Raises:
        ValueError: no tokens, non-finite inputs, an unknown target or ``output`` without ``expert_down``.
    """
    if target not in TARGETS or (target == "output" and expert_down is None):
        raise ValueError(f"bad router target {target!r} (valid: {', '.join(TARGETS)}; output needs expert_down)")
    x = x.float()
    if not len(x) or not torch.isfinite(x).all():
        raise ValueError("the router fit needs finite calibration inputs")
    d = x.shape[1]
    gram = x.T @ x / len(x)
    rhs = torch.zeros(d, expert_gate.shape[0])
    for start in range(0, len(x), chunk):
        xb = x[start:start + chunk]
        h = F.silu(torch.einsum("nd,emd->nem", xb, expert_gate.float())) * torch.einsum("nd,emd->nem", xb,
                                                                                        expert_up.float())
        if target == "output":
            y = torch.log(torch.linalg.vector_norm(torch.einsum("nem,edm->ned", h, expert_down.float()), dim=-1)
                          .clamp_min(1e-12))                                            # (n, E)
        else:
            y = torch.log(h.abs().sum(-1).clamp_min(1e-12))                              # (n, E)
        y = y - y.mean(1, keepdim=True)
        rhs += xb.T @ y / len(x)
    lam = ridge * float(gram.diagonal().mean())
    return torch.linalg.solve(gram + lam * torch.eye(d), rhs).T.contiguous()


def domain_preferences(profile: torch.Tensor, domains: torch.Tensor, n_domains: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain activation rates and domain preferences of neurons (the domain-aware grouping, module doc).

    Args:
        profile: (tokens, n) float32, each token's markers (0/1) or normalised magnitudes.
        domains: (tokens,) int64, the domain index of each token, in 0..n_domains-1.
        n_domains: D.

    Returns:
        (rates (D, n) float32: mean profile over each domain's tokens, 0 for a domain with no tokens;
        preferences (n, D) float32: rates normalised per neuron to sum 1, uniform 1/D for a neuron never active).

    Raises:
        ValueError: token counts differ, or a domain index outside 0..n_domains-1.
    """
    if domains.shape != (profile.shape[0],):
        raise ValueError(f"{domains.shape[0] if domains.ndim else 0} domain labels for {profile.shape[0]} tokens")
    if len(domains) and (int(domains.min()) < 0 or int(domains.max()) >= n_domains):
        raise ValueError(f"domain labels must lie in 0..{n_domains - 1}")
    onehot = F.one_hot(domains, n_domains).float()                            # (T, D)
    counts = onehot.sum(0).clamp_min(1.0)
    rates = (onehot.T @ profile) / counts[:, None]                            # (D, n)
    total = rates.sum(0)                                                      # (n,)
    prefs = torch.where(total[:, None] > 0, rates.T / total.clamp_min(1e-12)[:, None],
                        torch.full((rates.shape[1], n_domains), 1.0 / n_domains))
    return rates, prefs


def carve_ffn(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, x: torch.Tensor,
              cfg: moe_config.MoEConfig, k_a: int = K_A, router: str = DEFAULT_ROUTER, grouping: str = "markers",
              target: str = "mass", domains: torch.Tensor | None = None, n_domains: int = 0,
              domain_weight: float = DOMAIN_WEIGHT) -> tuple[CarvedMoE, torch.Tensor, torch.Tensor, dict]:
    """Carve one FFN on its calibration inputs (CMoE steps 1-4 of the module doc).

    Args:
        w_gate, w_up: (d_ff, d) float32. w_down: (d, d_ff) float32.
        x: calibration inputs of the FFN (tokens, d) float32.
        cfg: the SxAyEz configuration for this d_ff. k_a: neurons marked per token (ATopK's K).
        router: ``fitted`` (linear, :func:`fit_router` on ``x``) or ``analytical`` (CMoE's); both are
            computed and stored, this one routes.
        grouping: ``markers`` (CMoE's 0/1 ATopK profile) or ``magnitude`` (normalised |h|; module doc).
        target: the fitted router's target, ``mass`` or ``output`` (:func:`fit_router`).
        domains: (tokens,) int64 domain index of each calibration token (the domain-aware grouping of the
            module doc), with ``n_domains`` domains and the weight ``domain_weight`` in [0, 1]; None: CMoE's
            co-activation grouping alone.

    Returns:
        (the :class:`CarvedMoE` layer, shared neuron ids int64 (x*m,), routed neuron ids int64
        (z-x, m) sorted per expert, statistics: mean activation rates and representative neurons, and
        with ``domains`` each expert's domain ``expert_domains`` and ``domain_purity``, the mean preference
        of its neurons for that domain in [0, 1] (1/D: none)).

    Raises:
        ValueError: an unknown router, grouping or target, k_a outside 1..d_ff, domain labels that do not
            match the tokens or are not int64, n_domains < 1, a domain weight outside [0, 1].
    """
    if domains is not None:
        if not 0.0 <= domain_weight <= 1.0:
            raise ValueError(f"the domain weight must lie in [0, 1], got {domain_weight}")
        if n_domains < 1 or domains.dtype != torch.int64:
            raise ValueError(f"domain labels need n_domains >= 1 (got {n_domains}) and dtype int64 (got {domains.dtype})")
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; valid: {', '.join(ROUTERS)}")
    if grouping not in GROUPINGS or target not in TARGETS:
        raise ValueError(f"unknown grouping {grouping!r} or router target {target!r}")
    if not 1 <= k_a <= w_gate.shape[0]:
        raise ValueError(f"ATopK K = {k_a} must be between 1 and the FFN width {w_gate.shape[0]}")
    d_ff, d_model = w_gate.shape
    m, n_routed = cfg.expert_size, cfg.routed
    if grouping == "magnitude":
        markers = _magnitude_profile(x, w_gate, w_up)                         # (T, d_ff), rows sum to 1
    else:
        markers = activation_markers(x, w_gate, w_up, k_a).float()         # (T, d_ff)
    mu = markers.mean(0)                                                      # activation rates
    order = torch.argsort(mu, descending=True, stable=True)
    shared = torch.sort(order[: cfg.shared_neurons]).values
    rest = torch.sort(order[cfg.shared_neurons:]).values                      # n = d_ff - x*m neurons
    a = markers[:, rest]                                                      # (T, n)
    if domains is None:
        seeds = order[cfg.shared_neurons: cfg.shared_neurons + n_routed]     # highest-rate remaining neurons
        cost = _column_l1(a, markers[:, seeds], grouping)                     # (n, z-x)
    else:
        rates, prefs = domain_preferences(a, domains, n_domains)              # (D, n), (n, D)
        expert_domain = torch.arange(n_routed) % n_domains
        taken, seed_pos = torch.zeros(len(rest), dtype=torch.bool), []
        for j in range(n_routed):
            d = int(expert_domain[j])
            score = torch.where(taken, torch.tensor(-1.0), rates[d] * prefs[:, d])
            pos = int(torch.argmax(score))
            taken[pos] = True
            seed_pos.append(pos)
        coact = _column_l1(a, a[:, seed_pos], grouping)                        # (n, z-x)
        dom = 1.0 - prefs[:, expert_domain]                                   # (n, z-x)
        cost = ((1.0 - domain_weight) * coact / coact.mean().clamp_min(1e-12)
                + domain_weight * dom / dom.mean().clamp_min(1e-12))
    groups = torch.from_numpy(balanced_assignment(cost.double().numpy(), m))
    members = torch.stack([rest[groups == j] for j in range(n_routed)])      # (z-x, m), sorted ids
    reps = []
    for j in range(n_routed):
        cols = markers[:, members[j]]                                         # (T, m)
        centroid = cols.mean(1, keepdim=True)                                 # (T, 1)
        reps.append(members[j][torch.argmin(_column_l1(cols, centroid, grouping)[:, 0])])
    reps = torch.stack(reps)

    moe = CarvedMoE(d_model, cfg.shared_neurons, n_routed, m, cfg.active, router_kind=router)
    with torch.no_grad():
        moe.shared_gate.copy_(w_gate[shared])
        moe.shared_up.copy_(w_up[shared])
        moe.shared_down.copy_(w_down[:, shared])
        moe.expert_gate.copy_(w_gate[members])
        moe.expert_up.copy_(w_up[members])
        moe.expert_down.copy_(torch.stack([w_down[:, members[j]] for j in range(n_routed)]))
        moe.router_gate.copy_(F.normalize(w_gate[reps], dim=-1))
        moe.router_up.copy_(F.normalize(w_up[reps], dim=-1))
        moe.router_weight.copy_(fit_router(x, w_gate[members], w_up[members], target=target,
                                           expert_down=torch.stack([w_down[:, members[j]] for j in range(n_routed)])))
    stats = {"mu_shared_mean": float(mu[shared].mean()) if len(shared) else None,
             "mu_routed_mean": float(mu[rest].mean()), "representatives": reps.tolist()}
    if domains is not None:   # per expert, the share of its members' domain rates on its own domain
        stats["expert_domains"] = expert_domain.tolist()
        stats["domain_purity"] = [float(prefs[groups == j][:, int(expert_domain[j])].mean()) for j in range(n_routed)]
    return moe, shared, members, stats


def carve_checkpoint(checkpoint: str | Path, out: str | Path, config: str, tokens: int = 16384,
                     seq_len: int = 2048, dataset: str = "wiki", k_a: int = K_A, router: str = DEFAULT_ROUTER,
                     force: bool = False, progress: Callable[[int, int], None] | None = None,
                     grouping: str = "markers", target: str = "mass", domains: list[str] | None = None,
                     domain_weight: float = DOMAIN_WEIGHT) -> Path:
    """Carve every FFN of an HF Llama checkpoint and write the carved checkpoint (see :mod:`edgerun.moe.store`).

    Args:
        checkpoint: dense float HF checkpoint directory (Llama family, SwiGLU).
        out: output directory.
        config: ``SxAyEz``.
        tokens, seq_len: calibration tokens, in windows of ``seq_len`` from ``dataset``'s calibration split.
        k_a: neurons marked per token (ATopK's K; 10 as released).
        router: ``fitted`` (default) or ``analytical`` (CMoE's); recorded in the config as ``router``.
        grouping, target: measurement options of :func:`carve_ffn` (recorded when not the default).
        domains: two or more catalog texts for the domain-aware grouping (module doc), at most one per routed
            expert: ``tokens`` split equally among them (whole windows of ``seq_len``, shortened to a
            domain's share when that is smaller), ``dataset`` unused; recorded with ``domain_weight`` in the
            config. None: CMoE's grouping.
        force: replace an existing output.
        progress: called as ``progress(done_layers, total_layers)``.

    Returns:
        ``out``: the carved checkpoint (dense tensors in ``model.safetensors``, experts per layer under
        ``experts/``, the configuration and calibration under ``config.json``'s ``edgerun_moe``).

    Raises:
        UsageError: unsupported architecture (non-Llama, non-SwiGLU), an already carved source, a bad
            configuration, an unknown router or K, too little calibration text, fewer than two, repeated
            or more domains than routed experts, a domain weight outside [0, 1], output exists without
            ``force``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer   # heavy: only a carve loads a model

    checkpoint, out = Path(checkpoint), Path(out)
    st_format.checkpoint_files(checkpoint)
    cfg = st_format.read_config(checkpoint)
    if is_carved(cfg):
        raise UsageError(f"{checkpoint} is already a carved MoE ({cfg[MOE_KEY]['name']}); carve its dense source")
    if cfg.get("model_type") != "llama" or cfg.get("hidden_act", "silu") != "silu":
        raise UsageError(f"CMoE carving supports Llama-family SwiGLU models; {checkpoint} is "
                         f"{cfg.get('model_type')} with {cfg.get('hidden_act')}")
    moe_cfg = moe_config.parse(config, int(cfg["intermediate_size"]))
    if router not in ROUTERS:
        raise UsageError(f"unknown router '{router}'; valid: {', '.join(ROUTERS)}")
    if grouping not in GROUPINGS or target not in TARGETS:
        raise UsageError(f"unknown grouping '{grouping}' or router target '{target}'")
    if not 1 <= k_a <= moe_cfg.d_ff:
        raise UsageError(f"ATopK K = {k_a} must be between 1 and the FFN width {moe_cfg.d_ff}")
    domains = list(domains) if domains else None
    if domains is not None:
        if len(domains) < 2:
            raise UsageError(f"a domain-aware carve needs at least two domains (got {','.join(domains)}); "
                             "for one calibration text use --calib")
        if len(set(domains)) != len(domains):
            raise UsageError(f"repeated domain in {','.join(domains)}")
        if len(domains) > moe_cfg.routed:
            raise UsageError(f"{len(domains)} domains for {moe_cfg.routed} routed experts: every domain needs an "
                             f"expert; use more experts (e.g. a larger z in SxAyEz) or fewer domains")
        if not 0.0 <= domain_weight <= 1.0:
            raise UsageError(f"the domain weight must lie in [0, 1], got {domain_weight}")
        seq_len = min(seq_len, tokens // len(domains))
        if seq_len < 1:
            raise UsageError(f"{tokens} calibration tokens cannot be shared among {len(domains)} domains")
    if tokens < seq_len:
        seq_len = tokens
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    if domains is None:
        windows, window_domain = calibration_windows(tokenizer, tokens // seq_len, seq_len, dataset), None
    else:
        per_domain = max(1, tokens // len(domains) // seq_len)
        windows, window_domain = [], []
        for d, name in enumerate(domains):
            windows += calibration_windows(tokenizer, per_domain, seq_len, name)
            window_domain += [d] * per_domain
    token_domain = (None if window_domain is None else       # the domain of every calibration token, all layers
                    torch.cat([torch.full((w.shape[1],), d, dtype=torch.int64) for w, d in zip(windows, window_domain)]))
    hiddens, kwargs_list = block_inputs(model, windows)
    layers, carved = model.model.layers, []
    for i, layer in enumerate(layers):
        residuals, ffn_in = _ffn_inputs(layer, hiddens, kwargs_list)
        mlp = layer.mlp
        moe, shared, members, stats = carve_ffn(mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float(),
                                                mlp.down_proj.weight.detach().float(), torch.cat(ffn_in), moe_cfg, k_a,
                                                router, grouping, target, domains=token_domain,
                                                n_domains=len(domains or ()), domain_weight=domain_weight)
        layer.mlp = moe
        carved.append((moe, shared, members, stats))
        with torch.inference_mode():                            # layer i+1 is profiled on carved layer i
            hiddens = [(r + moe(x))[None] for r, x in zip(residuals, ffn_in)]
        if progress:
            progress(i + 1, len(layers))
    seconds = time.perf_counter() - t0
    meta = {**moe_cfg.as_dict(), "method": "cmoe", "router": router, **({"grouping": grouping} if grouping != "markers" else {}),
            **({"router_target": target} if target != "mass" else {}), "top_k": moe_cfg.active,
            "k_a": k_a, "calibration": {"dataset": ",".join(domains) if domains else dataset, "split": "calibration",
                                        "tokens": len(windows) * seq_len, "window": seq_len},
            **({"domains": domains, "domain_weight": domain_weight,
                "domain_purity": [round(sum(c[3]["domain_purity"]) / len(c[3]["domain_purity"]), 4)
                                  for c in carved]} if domains else {}),
            "carve_seconds": round(seconds, 1), "source": str(checkpoint)}
    _save(model, carved, checkpoint, out, cfg, meta, force)
    return out


class _SkipFFN(Exception):
    pass


def _ffn_inputs(layer, hiddens, kwargs_list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run a Llama block's attention half on each captured input.

    Returns:
        (residual streams after attention, FFN inputs = their post-attention RMSNorm), one (tokens, d)
        float32 pair per window; the block's output is ``residual + ffn(ffn_input)``, so the FFN can be
        replaced without running attention again.
    """
    residuals, inputs = [], []
    h1 = layer.post_attention_layernorm.register_forward_pre_hook(
        lambda mod, args: residuals.append(args[0].detach()[0].float()))

    def grab(mod, args):
        inputs.append(args[0].detach()[0].float())
        raise _SkipFFN

    h2 = layer.mlp.register_forward_pre_hook(grab)
    try:
        with torch.inference_mode():
            for h, kw in zip(hiddens, kwargs_list):
                try:
                    layer(h, **kw)
                except _SkipFFN:
                    pass
    finally:
        h1.remove()
        h2.remove()
    return residuals, inputs


def _save(model, carved, checkpoint: Path, out: Path, cfg: dict, meta: dict, force: bool) -> None:
    dense = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".mlp." not in k}
    if cfg.get("tie_word_embeddings", False):
        dense.pop("lm_head.weight", None)
    cfg = dict(cfg)
    cfg[MOE_KEY] = meta
    with atomic_dir(out, force=force) as tmp:
        save_file(dense, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "experts").mkdir()
        for i, (moe, shared, members, _) in enumerate(carved):
            save_file(layer_tensors(moe, shared, members), str(layer_file(tmp, i)), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        copy_tokenizer(checkpoint, tmp)
