"""How far can a linear router get towards the oracle? A diagnostic of the CMoE router training (issue 16).

The fine-tune's router distillation (``converters.cmoe_finetune``, ``router_distill``) barely moves the
distillation loss in 10-30 minutes. Two causes are possible: the training budget (AdamW at lr 2e-4 moves
each router weight by at most ~2e-4 per step, while the fitted router's softmax is nearly flat), or the
router class (no linear map of the FFN input picks the oracle's expert set much more often than the
ridge-fitted one). This script separates them without the language-model loss: per MoE layer of the
fitted-router S2A2E8 carve it

1. captures the FFN inputs on wiki calibration windows (train) and held-out windows (test), the model
   routed by its fitted routers;
2. computes the oracle's expert set per token (``CarvedMoE.oracle_select``);
3. trains the layer's linear router to convergence on the train tokens, full batch with L-BFGS, from
   the fitted router: the same objective as the fine-tune's distillation (cross-entropy of the
   router softmax against the uniform distribution over the oracle's k experts) plus a small L2 term;
4. reports the share of test tokens whose top-k set equals the oracle's (and the share of the oracle's
   experts recovered), for the fitted, the trained and random routers;

then the held-out perplexity with every layer routed by the trained routers, against fitted and oracle
routing (same windows; paired 95% bootstrap of the ratio).

    nice -n 10 python benchmarks/cmoe_router_ceiling.py [--train-windows 8] [--test-windows 8]

Writes ``benchmarks/results/cmoe_router_ceiling.{json,md}`` (``cmoe_router_ceiling_train<N>`` off 8 windows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def _agreement(sel, oracle) -> tuple[float, float]:
    """(share of tokens whose sorted top-k equals the oracle's, share of oracle experts selected)."""
    import torch

    s, o = torch.sort(sel, dim=1).values, torch.sort(oracle, dim=1).values
    exact = float((s == o).all(1).float().mean())
    overlap = float((sel[:, :, None] == oracle[:, None, :]).any(2).float().mean())
    return exact, overlap


def train_router(w0, x, oracle, l2: float = 1e-4, iters: int = 100):
    """L-BFGS on the distillation objective from ``w0`` (E, d): returns the trained (E, d) float32 and the loss."""
    import torch

    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(x @ w.T, dim=-1)
        loss = -logp.gather(1, oracle).mean() + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final = float(-torch.log_softmax(x @ w.T, dim=-1).gather(1, oracle).mean())
    return w.detach(), final


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="S2A2E8")
    ap.add_argument("--train-windows", type=int, default=8, help="wiki calibration windows of 512 tokens")
    ap.add_argument("--test-windows", type=int, default=8, help="held-out wiki windows of 512 tokens")
    ap.add_argument("--iters", type=int, default=100, help="L-BFGS iterations per layer")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cmoe_table import _bootstrap_ratio
    from converters.export import carved_cache
    from converters.source import open_source
    from edgerun import data
    from edgerun.calibration import run_with_input_hooks
    from edgerun.moe.store import load_model
    from profilers.accuracy import window_nlls

    torch.set_num_threads(1)
    t0, load0 = time.perf_counter(), os.getloadavg()
    source = open_source("smollm2-135m-instruct", progress=False)
    carved = carved_cache(source, args.config, 16384, False, print)
    model = load_model(carved).eval()
    moes = [layer.mlp for layer in model.model.layers]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(carved)
    train_w = [torch.tensor([w]) for w in data.token_windows(tok, "wiki", "calibration", 512, args.train_windows)]
    test_w = data.token_windows(tok, "wiki", "heldout", 512, args.test_windows)

    def capture(windows):
        got = [[] for _ in moes]
        run_with_input_hooks(model, dict(enumerate(moes)), windows, lambda i, x: got[i].append(x))
        return [torch.cat(g).float() for g in got]

    x_train = capture(train_w)
    x_test = capture([torch.tensor([w]) for w in test_w])
    gen = torch.Generator().manual_seed(0)
    layers, trained = [], []
    for i, m in enumerate(moes):
        with torch.no_grad():
            o_train, o_test = m.oracle_select(x_train[i]), m.oracle_select(x_test[i])
            w0 = m.router_weight.detach().float().clone()
            fit_sel = torch.topk(x_test[i] @ w0.T, m.top_k, dim=-1).indices
            rand_sel = torch.stack([torch.randperm(m.n_routed, generator=gen)[:m.top_k] for _ in range(len(x_test[i]))])
            loss0 = float(-torch.log_softmax(x_train[i] @ w0.T, dim=-1).gather(1, o_train).mean())
        w, loss = train_router(w0, x_train[i], o_train, iters=args.iters)
        trained.append(w)
        with torch.no_grad():
            tr_sel = torch.topk(x_test[i] @ w.T, m.top_k, dim=-1).indices
            tr_train = torch.topk(x_train[i] @ w.T, m.top_k, dim=-1).indices
        row = {"layer": i, "loss_fitted": loss0, "loss_trained": loss,
               "fitted": _agreement(fit_sel, o_test), "trained": _agreement(tr_sel, o_test),
               "trained_on_train": _agreement(tr_train, o_train), "random": _agreement(rand_sel, o_test)}
        layers.append(row)
        print(json.dumps(row), flush=True)

    def nlls(kind):
        saved = [m.router_weight.detach().clone() for m in moes]
        try:
            with torch.no_grad():
                for m, w in zip(moes, trained):
                    m.routing_override = "oracle" if kind == "oracle" else None
                    if kind == "trained":
                        m.router_weight.copy_(w)
            return window_nlls(model, test_w)
        finally:
            with torch.no_grad():
                for m, s in zip(moes, saved):
                    m.router_weight.copy_(s)
                    m.routing_override = None

    nll = {k: nlls(k) for k in ("fitted", "trained", "oracle")}
    ppl = {k: math.exp(statistics.mean(v)) for k, v in nll.items()}

    def mean(key, j):
        return statistics.mean(r[key][j] for r in layers)

    result = {"benchmark": "cmoe_router_ceiling", "config": args.config, "carved": str(carved),
              "train_tokens": int(x_train[0].shape[0]), "test_tokens": int(x_test[0].shape[0]), "iters": args.iters,
              "layers": layers, "perplexity": ppl,
              "trained_over_fitted": [math.exp(statistics.mean(nll["trained"]) - statistics.mean(nll["fitted"])),
                                      *_bootstrap_ratio(nll["trained"], nll["fitted"])],
              "oracle_over_trained": [math.exp(statistics.mean(nll["oracle"]) - statistics.mean(nll["trained"])),
                                      *_bootstrap_ratio(nll["oracle"], nll["trained"])],
              "seconds": round(time.perf_counter() - t0, 1), "load_average": [load0, os.getloadavg()],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("cmoe_router_ceiling" + ("" if args.config == "S2A2E8" else f"_{args.config}")
            + ("" if args.train_windows == 8 else f"_train{args.train_windows}")
            + ("" if args.test_windows == 8 else f"_test{args.test_windows}") + ("" if args.iters == 100 else f"_it{args.iters}"))
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    md = [f"# How close can a linear router get to the oracle? ({args.config}, fitted-router carve)", "",
          f"{r['date']}. `python benchmarks/cmoe_router_ceiling.py`: per MoE layer, the linear router trained to "
          f"convergence (L-BFGS, {args.iters} iterations, from the fitted router) on the fine-tune's distillation "
          f"objective over {r['train_tokens']} wiki calibration tokens; agreement with the oracle's expert set on "
          f"{r['test_tokens']} held-out tokens (exact set / share of the oracle's experts chosen), mean over the "
          f"{len(layers)} layers. {r['seconds']:.0f} s, 1 thread, load average {load0[0]:.1f}.", "",
          "| router | distillation loss (train) | exact set (test) | oracle experts chosen (test) |", "|---|---|---|---|",
          f"| random | - | {mean('random', 0):.1%} | {mean('random', 1):.1%} |",
          f"| fitted (ridge, the carve's) | {statistics.mean(x['loss_fitted'] for x in layers):.3f} | "
          f"{mean('fitted', 0):.1%} | {mean('fitted', 1):.1%} |",
          f"| trained to convergence | {statistics.mean(x['loss_trained'] for x in layers):.3f} | "
          f"{mean('trained', 0):.1%} (train {mean('trained_on_train', 0):.1%}) | {mean('trained', 1):.1%} |", "",
          f"Held-out perplexity ({args.test_windows} x 512 wiki tokens), every layer routed by: fitted "
          f"{ppl['fitted']:.2f}, trained {ppl['trained']:.2f}, oracle {ppl['oracle']:.2f}; trained / fitted "
          f"{r['trained_over_fitted'][0]:.3f} ({r['trained_over_fitted'][1]:.3f}-{r['trained_over_fitted'][2]:.3f}), "
          f"oracle / trained {r['oracle_over_trained'][0]:.3f} ({r['oracle_over_trained'][1]:.3f}-"
          f"{r['oracle_over_trained'][2]:.3f}), paired 95% bootstrap over the windows.", ""]
    (args.out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
