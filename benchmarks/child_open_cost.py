"""Cost of the ONNX child-process first open (edgerun/isolate.py) on the default model's int4 export.

    python benchmarks/child_open_cost.py      # needs the cached export (edgerun export ... --to onnx, or a bench sweep)

Prints and writes benchmarks/results/child_open_cost.json: the child's first open (ms; each run with a
fresh EDGERUN_HOME, so no stamp), a repeated open of the same files (the stamp hit, ms), and
onnxruntime-genai's own open in this process for scale.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from edgerun import catalog

RUNS = 3


def main() -> None:
    src = catalog.home() / "cache" / "exports" / "smollm2-135m-instruct" / "onnx-int4"
    load0 = os.getloadavg()
    res: dict[str, list[float]] = {"cold": [], "stamped": [], "in_process_open": []}
    from edgerun import isolate

    for _ in range(RUNS):
        os.environ["EDGERUN_HOME"] = tempfile.mkdtemp()        # no stamp: the child opens the model
        t0 = time.perf_counter()
        isolate.first_open("onnx", src)
        res["cold"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        assert isolate.first_open("onnx", src) is None           # stamped: no child
        res["stamped"].append((time.perf_counter() - t0) * 1000)
    import onnxruntime_genai as og

    for _ in range(RUNS):
        t0 = time.perf_counter()
        c = og.Config(str(src))
        c.clear_providers()
        m = og.Model(c)
        og.Tokenizer(m)
        res["in_process_open"].append((time.perf_counter() - t0) * 1000)
        del m
    out = {k: [round(x, 1) for x in v] for k, v in res.items()}
    out["median_ms"] = {k: round(statistics.median(v), 1) for k, v in res.items()}
    out["model"] = str(src)
    out["loadavg"] = [load0, os.getloadavg()]
    print(json.dumps(out))
    (Path(__file__).parent / "results" / "child_open_cost.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
