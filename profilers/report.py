"""``edgerun bench report DIR``: plots of every metric against effective BPW, with linear fits, and a summary table.

Runs are aggregated per cell: median, interquartile range and n over its cold repetitions. Cells that
differ only in backend were run as interleaved pairs (:mod:`profilers.sweep`): their ratios
edgerun / llama-cpp-python are taken pair by pair (repetition i with repetition i) and summarised
the same way, since a ratio within a pair cancels the machine's drift. For each metric (decode tokens/s, TTFT,
peak RSS, decode latency per token, energy where measured) and each BPW measure (file BPW, linear
BPW, bytes read per token), one PNG shows one line per model and backend with its least-squares
line and R^2 (LLMOnDevice reports near-linear scaling of system metrics with effective BPW).
``summary.md`` holds the per-cell medians, the R^2 table, roofline fractions and the quality records.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from edgerun.atomic import atomic_file
from edgerun.errors import UsageError

METRICS = {
    "decode_tokens_per_s": "decode tokens/s",
    "decode_ms_per_token": "decode latency per token (ms)",
    "ttft_ms": "TTFT (ms)",
    "peak_rss_bytes": "peak RSS (MiB)",
    "package_joules_above_idle": "package energy above idle (J)",
}
BPW_MEASURES = {"file_bpw": "file BPW", "linear_bpw": "linear BPW", "bytes_per_token": "bytes read per token (MiB)"}
SPREAD = ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "itl_p50_ms",
          "second_turn_ttft_ms")                                          # reported as median [IQR] n
RATIOS = ("decode_tokens_per_s", "ttft_ms", "prefill_tokens_per_s")


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``xs`` (inclusive method; one value: all three equal)."""
    xs = sorted(xs)
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def load_runs(directory: str | Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(ok cell records, quality records, other records) from ``DIR/runs.jsonl``.

    The last record of a key counts: a cell recorded as lost with its cluster node and run again on
    resume has two records, the second supersedes the first.

    Raises:
        UsageError: no runs.jsonl in ``directory``.
    """
    path = Path(directory) / "runs.jsonl"
    if not path.is_file():
        raise UsageError(f"{directory} has no runs.jsonl; run 'edgerun bench --sweep FILE --out {directory}' first")
    cells, quality, other = [], [], []
    last: dict = {}
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            last[rec.get("key", i)] = rec
    for rec in last.values():
        if rec.get("kind") == "quality":
            (quality if rec.get("status") == "ok" else other).append(rec)
        elif rec.get("status") == "ok":
            cells.append(rec)
        else:
            other.append(rec)
    return cells, quality, other


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per cell: the cell fields, the median of each numeric metric over its repetitions, and for
    TTFT, prefill and decode speed ``<metric>_iqr`` (q1, q3); ``n`` repetitions, ``flagged`` (runs that
    never got the CPU back), ``rejected`` (attempts re-run), memory and the second-turn TTFT."""
    rows = []
    for rec in cells:
        metrics = [r["metrics"] for r in rec["runs"]]
        row = dict(rec["cell"])
        row["n"] = len(metrics)
        row["flagged"] = sum(1 for r in rec["runs"] if r.get("flag"))
        row["rejected"] = len(rec.get("rejected", []))
        row["engine_buffers_mib"] = rec.get("engine_buffers_mib", {})
        notes = {m.get("second_turn_note") for m in metrics} - {None}
        row["second_turn_note"] = "; ".join(sorted(notes)) if notes else None
        for k in SPREAD:
            vals = [m[k] for m in metrics if isinstance(m.get(k), (int, float))]
            if vals:
                q1, _, q3 = quartiles(vals)
                row[f"{k}_iqr"] = (q1, q3)
        for k in metrics[0]:
            vals = [m[k] for m in metrics if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)]
            if vals:
                row[k] = statistics.median(vals)
            elif k not in row:
                row[k] = metrics[0][k]
        if row.get("decode_tokens_per_s"):
            row["decode_ms_per_token"] = 1e3 / row["decode_tokens_per_s"]
        rows.append(row)
    return rows


def pair_ratios(cells: list[dict], a: str = "edgerun", b: str = "llama-cpp-python") -> list[dict]:
    """Per group of cells differing only in backend, the ratios a / b of each metric in RATIOS, repetition by
    repetition, as (q1, median, q3) with n pairs; and the ratio of the two processes' peak RSS."""
    def group_key(cell):
        return json.dumps({k: v for k, v in cell.items() if k != "backend"}, sort_keys=True)

    by_group: dict[str, dict[str, dict]] = defaultdict(dict)
    for rec in cells:
        by_group[group_key(rec["cell"])][rec["cell"]["backend"]] = rec
    out = []
    for recs in by_group.values():
        if a not in recs or b not in recs:
            continue
        ra = {r["repetition"]: r["metrics"] for r in recs[a]["runs"] if "repetition" in r}
        rb = {r["repetition"]: r["metrics"] for r in recs[b]["runs"] if "repetition" in r}
        row = {k: v for k, v in recs[a]["cell"].items() if k != "backend"}
        for metric in RATIOS:
            vals = [ra[i][metric] / rb[i][metric] for i in sorted(set(ra) & set(rb))
                    if ra[i].get(metric) and rb[i].get(metric)]
            if vals:
                row[metric] = quartiles(vals)
                row["pairs"] = min(row.get("pairs", len(vals)), len(vals))
        pa = (recs[a].get("memory") or {}).get("peak_rss_bytes")
        pb = (recs[b].get("memory") or {}).get("peak_rss_bytes")
        row["peak_rss_bytes"] = pa / pb if pa and pb else None
        out.append(row)
    return out


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float] | None:
    """Least-squares slope, intercept and R^2 of y on x (None with fewer than 3 distinct x)."""
    if len(set(xs)) < 3:
        return None
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return float(slope), float(intercept), (1 - ss_res / ss_tot) if ss_tot > 0 else 1.0


def _series(rows: list[dict], metric: str, measure: str) -> dict[str, tuple[list[float], list[float]]]:
    groups: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in rows:
        if r.get(metric) is None or r.get(measure) is None:
            continue
        label = f"{_model(r)} / {r['backend']}"
        if len({(x['threads'], x['kv_cache_type'], x['prompt_tokens'], x['gen_tokens']) for x in rows}) > 1:
            label += f" / t{r['threads']} {r['kv_cache_type']} p{r['prompt_tokens']} g{r['gen_tokens']}"
        x = r[measure] / 2**20 if measure == "bytes_per_token" else r[measure]
        y = r[metric] / 2**20 if metric == "peak_rss_bytes" else r[metric]
        groups[label][0].append(x)
        groups[label][1].append(y)
    return groups


def render(directory: str | Path) -> Path:
    """Write PNG plots and ``summary.md`` into ``directory``; returns the summary path.

    Raises:
        UsageError: no runs recorded.
    """
    import matplotlib  # heavy, and global state: Agg is chosen here, before pyplot loads, only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: after matplotlib.use("Agg") above

    directory = Path(directory)
    cells, quality, other = load_runs(directory)
    if not cells:
        raise UsageError(f"{directory}/runs.jsonl has no successful runs to report")
    rows = aggregate(cells)
    ratios = pair_ratios(cells)
    fits = []
    for metric, mlabel in METRICS.items():
        if not any(r.get(metric) is not None for r in rows):
            continue
        fig, axes = plt.subplots(1, len(BPW_MEASURES), figsize=(5 * len(BPW_MEASURES), 4))
        for ax, (measure, xlabel) in zip(axes, BPW_MEASURES.items()):
            for label, (xs, ys) in sorted(_series(rows, metric, measure).items()):
                ax.scatter(xs, ys, label=label, s=18)
                fit = linear_fit(xs, ys)
                if fit:
                    slope, intercept, r2 = fit
                    lo, hi = min(xs), max(xs)
                    ax.plot([lo, hi], [slope * lo + intercept, slope * hi + intercept], linewidth=1)
                    fits.append({"metric": metric, "measure": measure, "series": label, "r2": r2, "slope": slope,
                                 "points": len(xs)})
            ax.set_xlabel(xlabel)
            ax.set_ylabel(mlabel)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{mlabel} vs effective BPW")
        fig.tight_layout()
        with atomic_file(directory / f"{metric}_vs_bpw.png", force=True) as tmp:   # complete or the old one
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
    summary = directory / "summary.md"
    with atomic_file(summary, force=True) as tmp:
        tmp.write_text(_markdown(rows, ratios, fits, quality, other), encoding="utf-8")
    with atomic_file(directory / "summary.json", force=True) as tmp:
        tmp.write_text(json.dumps({"rows": rows, "ratios": ratios, "fits": fits, "quality": quality}, indent=1,
                                  default=str))
    return summary


def _model(r: dict) -> str:
    """The model column: the model, and the device it was measured on when the sweep names devices."""
    return f"{r['model']} @ {r['device']}" if r.get("device") else r["model"]


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def _spread(r: dict, k: str, spec: str = ".1f") -> str:
    """``median [q1-q3]`` of a row's metric."""
    if r.get(k) is None:
        return "-"
    q = r.get(f"{k}_iqr")
    return f"{format(r[k], spec)} [{format(q[0], spec)}-{format(q[1], spec)}]" if q else format(r[k], spec)


def _markdown(rows, ratios, fits, quality, other) -> str:
    bw = next((r for r in rows if r.get("bandwidth_gbps")), None)
    lines = ["# Benchmark summary", "",
             "Cold repetitions (KV cache emptied before each, prompt tokens evaluated = prompt length): "
             "median [interquartile range] over n. Peak RSS is each cell's own process (VmHWM after generation). "
             "Bandwidth roofline = measured fraction of (memory read bandwidth / weight bytes read per token)"
             + (f", bandwidth {bw['bandwidth_gbps']:.1f} GB/s ({bw.get('bandwidth_source') or 'source not recorded'})."
                if bw else ": no bandwidth given.")
             + " 2nd-turn TTFT: the same prompt with all but its last 32 tokens cached (prefix reuse), per repetition."
             + " Energy: " + _energy_note(rows), "",
             "| model | variant | backend | threads | KV | prompt/gen | file BPW | tensor BPW | linear BPW | MiB/token | "
             "TTFT ms | prefill tok/s | decode tok/s | n | ITL p50/p95 ms | 2nd-turn TTFT ms | peak RSS MiB (after load) "
             "| bandwidth roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], -r["file_bpw"], r["backend"])):
        n = f"{r['n']}" + (f", {r['flagged']} flagged" if r.get("flagged") else "") + \
            (f", {r['rejected']} re-run" if r.get("rejected") else "")
        lines.append(
            f"| {_model(r)} | {r['variant']} | {r['backend']} | {r['threads'] or 'auto'} | {r['kv_cache_type']} | "
            f"{r['prompt_tokens']}/{r['gen_tokens']} | {r['file_bpw']:.2f} | {_fmt(r.get('tensor_bpw'), '.2f')} | "
            f"{r['linear_bpw']:.2f} | {r['bytes_per_token'] / 2**20:.1f} | {_spread(r, 'ttft_ms')} | "
            f"{_spread(r, 'prefill_tokens_per_s')} | {_spread(r, 'decode_tokens_per_s')} | {n} | "
            f"{_fmt(r.get('itl_p50_ms'), '.2f')}/{_fmt(r.get('itl_p95_ms'), '.2f')} | "
            f"{_spread(r, 'second_turn_ttft_ms') if r.get('second_turn_ttft_ms') is not None else 'no reuse'} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} "
            f"({_fmt((r.get('peak_rss_after_load_bytes') or 0) / 2**20, '.0f')}) | "
            f"{_fmt(r.get('bandwidth_roofline_fraction'), '.0%')} |")
    if ratios:
        lines += ["", "## edgerun / llama-cpp-python, pair by pair", "",
                  "Ratio of each interleaved pair (repetition i of both), median [IQR] over the pairs; peak RSS: "
                  "the two processes' peaks.", "",
                  "| model | variant | threads | KV | prompt/gen | decode tok/s | TTFT | prefill tok/s | pairs | peak RSS |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(ratios, key=lambda r: (r["model"], r["variant"])):
            cells = [f"{q[1]:.3f} [{q[0]:.3f}-{q[2]:.3f}]" if q else "-"
                     for q in (r.get("decode_tokens_per_s"), r.get("ttft_ms"), r.get("prefill_tokens_per_s"))]
            lines.append(f"| {_model(r)} | {r['variant']} | {r['threads'] or 'auto'} | {r['kv_cache_type']} | "
                         f"{r['prompt_tokens']}/{r['gen_tokens']} | " + " | ".join(cells) +
                         f" | {r.get('pairs', 0)} | {_fmt(r.get('peak_rss_bytes'), '.3f')} |")
    buffers = [r for r in rows if r.get("engine_buffers_mib")]
    if buffers:
        kinds = sorted({k for r in buffers for k in r["engine_buffers_mib"]})
        lines += ["", "## llama.cpp's buffers (MiB, from its load log)", "",
                  "| model | variant | backend | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
        for r in sorted(buffers, key=lambda r: (r["model"], -r["file_bpw"], r["backend"])):
            lines.append(f"| {_model(r)} | {r['variant']} | {r['backend']} | "
                         + " | ".join(_fmt(r["engine_buffers_mib"].get(k)) for k in kinds) + " |")
    lines += ["", "## Linear fits (R^2)", "", "| metric | vs | series | points | slope | R^2 |", "|---|---|---|---|---|---|"]
    for f in fits:
        lines.append(f"| {f['metric']} | {f['measure']} | {f['series']} | {f['points']} | {f['slope']:.4g} | {f['r2']:.3f} |")
    if quality:
        lines += ["", "## Quality", "", "| model | variant | file BPW | perplexity (wiki held-out) | task | accuracy [95% CI] | acc_norm [95% CI] | n |",
                  "|---|---|---|---|---|---|---|---|"]
        for q in sorted(quality, key=lambda q: (q["model"], -q["bpw"]["file_bpw"])):
            ppl = q["quality"]["perplexity"]["perplexity"]
            tasks = q["quality"]["tasks"] or {"-": None}
            for task, t in tasks.items():
                if t is None:
                    lines.append(f"| {q['model']} | {q['variant']} | {q['bpw']['file_bpw']:.2f} | {ppl:.2f} | - | - | - | - |")
                else:
                    lines.append(f"| {q['model']} | {q['variant']} | {q['bpw']['file_bpw']:.2f} | {ppl:.2f} | {task} | "
                                 f"{t['accuracy']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] | "
                                 f"{t['accuracy_norm']:.3f} [{t['ci95_norm'][0]:.3f}, {t['ci95_norm'][1]:.3f}] | {t['n']} |")
    if other:
        lines += ["", "## Not run", ""]
        for o in other:
            what = o.get("cell") or {"model": o.get("model"), "variant": o.get("variant")}
            lines.append(f"- {what}: {o.get('status')} ({o.get('reason') or o.get('error')})")
    return "\n".join(lines) + "\n"


def _energy_note(rows) -> str:
    for r in rows:
        if isinstance(r.get("energy"), str):
            return r["energy"] + "; estimates from the device TDP, where given, are in the JSON as estimated_* fields."
    return "measured from RAPL counters, idle baseline subtracted."
