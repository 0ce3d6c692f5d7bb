"""edgerun bench: a small sweep end to end, resume, a failing cell, bad sweep files, the report."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import cli_env, edgerun_cmd

SWEEP = """\
name: {name}
models: [smollm2-135m-instruct{extra_model}]
variants:
  - {{format: gguf, quant: Q8_0}}
  - {{format: onnx, quant: int4}}
backends: [edgerun, llama-cpp-python]
threads: [2]
kv_cache_types: [f16]
prompt_tokens: [16]
gen_tokens: [8]
repetitions: 2
warmup: 1
ctx_size: 128
accuracy:
  perplexity_windows: 1
"""


def _write(tmp_path, name="tiny-sweep", extra_model=""):
    p = tmp_path / f"{name}.yaml"
    p.write_text(SWEEP.format(name=name, extra_model=extra_model))
    return p


def _records(out):
    recs = []
    for line in (out / "runs.jsonl").read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass  # a line cut by an interrupt
    return recs


@pytest.fixture(scope="module")
def swept(tmp_path_factory, smollm2_f32_gguf):
    """The tiny sweep run once (its exports are cached under EDGERUN_HOME/cache/exports)."""
    from profilers import sweep

    tmp = tmp_path_factory.mktemp("bench")
    sw = sweep.load(_write(tmp))
    out = tmp / "results"
    sweep.run(sw, out, progress=False, log=lambda m: None)
    return tmp, sw, out


def test_sweep_records_every_cell(swept):
    _, sw, out = swept
    recs = _records(out)
    cells = [r for r in recs if r.get("kind") != "quality"]
    assert len(cells) == 4  # 2 variants x 2 backends
    status = {(r["cell"]["variant"], r["cell"]["backend"]): r["status"] for r in cells}
    assert status == {("Q8_0", "edgerun"): "ok", ("Q8_0", "llama-cpp-python"): "ok",
                      ("onnx-int4", "edgerun"): "ok", ("onnx-int4", "llama-cpp-python"): "not applicable"}
    ok = next(r for r in cells if r["status"] == "ok" and r["cell"]["backend"] == "edgerun")
    m = ok["runs"][0]["metrics"]
    assert m["generated_tokens"] == 8 and m["ttft_ms"] > 0 and m["peak_rss_bytes"] > 0
    assert m["linear_bpw"] == 8.5 and m["tensor_bpw"] < m["file_bpw"]
    assert "energy" in m or "energy_joules" in m  # measured, or unavailable with its reason
    assert ok["machine"]["versions"]["llama-cpp-python"] == "0.3.36"
    quality = [r for r in recs if r.get("kind") == "quality"]
    assert {q["variant"] for q in quality} == {"Q8_0", "onnx-int4"}
    assert all(q["status"] == "ok" and q["quality"]["perplexity"]["perplexity"] > 1 for q in quality)


def test_every_timed_repetition_is_cold_on_both_engines(swept):
    """The engine's own counter: every timed repetition evaluated all 16 prompt tokens, none reused a prefix."""
    _, _, out = swept
    cells = [r for r in _records(out) if r.get("status") == "ok" and r.get("kind") != "quality"]
    assert {r["cell"]["backend"] for r in cells} == {"edgerun", "llama-cpp-python"}
    for r in cells:
        assert len(r["runs"]) == 2
        for run in r["runs"]:
            m = run["metrics"]
            assert m["evaluated_prompt_tokens"] == 16 and m["reused_prefix_tokens"] == 0
            assert m["cpu_s"] > 0 and m["wall_s"] > 0 and "steal_s" in m and m["other_cpu_s"] >= 0
            # the second turn reuses the cached prefix: only the 15 new tokens are evaluated
            assert m["second_turn_new_tokens"] == 15
            # both engines reuse the prefix (ONNX: the kept generator rewound to the shared prefix)
            assert m["second_turn_ttft_ms"] > 0 and m["second_turn_evaluated_tokens"] == 15


def test_the_two_engines_are_interleaved_and_each_has_its_own_process(swept):
    import os

    _, _, out = swept
    pair = {r["cell"]["backend"]: r for r in _records(out)
            if r.get("status") == "ok" and r.get("kind") != "quality" and r["cell"]["variant"] == "Q8_0"}
    seq = sorted((run["order"], backend, run["repetition"]) for backend, r in pair.items() for run in r["runs"])
    # repetition 0: edgerun then the peer; repetition 1: the peer first (A B B A)
    assert [(b, rep) for _, b, rep in seq] == [("edgerun", 0), ("llama-cpp-python", 0),
                                               ("llama-cpp-python", 1), ("edgerun", 1)]
    pids = {r["pid"] for r in pair.values()}
    assert len(pids) == 2 and os.getpid() not in pids
    for r in pair.values():  # the peak is the child's own, after load and after generation
        mem = r["memory"]
        assert 0 < mem["peak_rss_after_load_bytes"] <= mem["peak_rss_bytes"] < 2 * 2**30
    assert pair["edgerun"]["engine_buffers_mib"]["CPU KV"] > 0


def test_a_cached_repetition_is_rejected_and_run_again():
    from profilers import sweep

    class Scripted:
        """A cell process whose first repetition reuses a cached prefix."""
        def __init__(self):
            self.reused = [100, 0]

        def command(self, op, **args):
            return {"ok": True, "metrics": {"reused_prefix_tokens": self.reused.pop(0), "cpu_share": 1.0,
                                            "wall_s": 1.0, "steal_s": 0.0}}

    run, rejected = sweep._timed(Scripted(), 1.0, {"seq": 0})
    assert run["metrics"]["reused_prefix_tokens"] == 0 and run["attempts"] == 2 and run["order"] == 2
    assert len(rejected) == 1 and "reused a cached prefix of 100 tokens" in rejected[0]["reason"]


def test_a_repetition_that_lost_the_cpu_is_rerun_then_flagged():
    from profilers import sweep

    class Starved:
        def command(self, op, **args):
            return {"ok": True, "metrics": {"reused_prefix_tokens": 0, "cpu_share": 0.2, "wall_s": 1.0,
                                            "steal_s": 0.0, "other_cpu_s": 0.0}}

    run, rejected = sweep._timed(Starved(), 1.0, {"seq": 0})
    assert len(rejected) == sweep.MAX_RERUNS and run["attempts"] == sweep.MAX_RERUNS + 1
    assert run["flag"].startswith("lost the CPU: CPU share 0.20")


def test_a_repetition_beside_a_busy_process_is_flagged_even_at_full_cpu_share():
    """llama.cpp's threads spin while they wait: the other processes' CPU time shows the loss."""
    from profilers import sweep

    m = {"reused_prefix_tokens": 0, "cpu_share": 0.99, "wall_s": 1.0, "steal_s": 0.0, "other_cpu_s": 0.4}
    assert sweep._lost_cpu(m, 1.0) == "other processes used 40% of a core"
    assert sweep._lost_cpu({**m, "other_cpu_s": 0.02}, 1.0) is None


def test_a_dying_cell_is_recorded_with_its_cause_and_the_sweep_goes_on(tmp_path, swept, monkeypatch):
    import os
    import signal

    from profilers import sweep

    original = sweep.CellProcess.command

    def command(self, op, **args):  # the peer's process is killed as the OOM killer would
        if op == "run" and self.cell["backend"] == "llama-cpp-python":
            os.kill(self.proc.pid, signal.SIGKILL)
        return original(self, op, **args)

    monkeypatch.setattr(sweep.CellProcess, "command", command)
    sw = sweep.load(_write(tmp_path))
    out = tmp_path / "results"
    sweep.run(sw, out, progress=False, log=lambda m: None)
    cells = {(r["cell"]["variant"], r["cell"]["backend"]): r for r in _records(out) if r.get("kind") != "quality"}
    dead = cells[("Q8_0", "llama-cpp-python")]
    assert dead["status"] == "error" and "killed by SIGKILL (out of memory?)" in dead["error"]
    assert cells[("Q8_0", "edgerun")]["status"] == "ok" and len(cells[("Q8_0", "edgerun")]["runs"]) == 2


def test_an_interrupted_sweep_resumes_without_duplicate_or_partial_records(tmp_path, swept, monkeypatch):
    from profilers import sweep

    original, calls = sweep._timed, []

    def interrupt_in_the_second_group(proc, reference, state):
        calls.append(proc.cell["variant"])
        if proc.cell["variant"] == "onnx-int4":
            raise KeyboardInterrupt
        return original(proc, reference, state)

    sw = sweep.load(_write(tmp_path))
    out = tmp_path / "results"
    monkeypatch.setattr(sweep, "_timed", interrupt_in_the_second_group)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(sw, out, progress=False, log=lambda m: None)
    first = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]   # whole lines only
    assert {(r["cell"]["variant"], r["status"]) for r in first} == {
        ("Q8_0", "ok"), ("onnx-int4", "not applicable")}          # nothing of the interrupted group's run
    monkeypatch.setattr(sweep, "_timed", original)
    sweep.run(sw, out, progress=False, log=lambda m: None)
    keys = [json.loads(line)["key"] for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 4 + 2      # 4 cells (one not applicable) + 2 quality records


def test_load_never_parses_the_gguf_twice(default_model_path, monkeypatch):
    """The bounds-checked scan guards llama.cpp; gguf-py's reader (seconds on a large vocabulary) is off the path."""
    import gguf

    import edgerun

    def forbidden(*a, **k):
        raise AssertionError("GGUFReader constructed on the load path")

    monkeypatch.setattr(gguf, "GGUFReader", forbidden)
    s = edgerun.load(None, max_tokens=2, temperature=0.0)
    try:
        assert s.chat("Hi", stream=False) is not None
    finally:
        s.backend.close()


def test_sweep_resumes_without_rerunning_done_cells(swept):
    from profilers import sweep

    _, sw, out = swept
    before = _records(out)
    lines = (out / "runs.jsonl").read_text().splitlines()
    # an interrupt cut the last line in half: that cell (and only it) runs again
    (out / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    messages = []
    sweep.run(sw, out, progress=False, log=messages.append)
    after = [r for r in _records(out)]
    assert any("already done" in m for m in messages)
    assert len(after) == len(before)  # the cut record was replaced by one new run, nothing else re-ran


def test_a_different_sweep_in_the_same_directory_is_refused(swept, tmp_path):
    from edgerun.errors import UsageError
    from profilers import sweep

    _, _, out = swept
    other = sweep.load(_write(tmp_path, name="other-sweep"))
    with pytest.raises(UsageError, match="holds results of a different sweep"):
        sweep.run(other, out, progress=False, log=lambda m: None)


def test_a_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, default_model_path, swept):
    from profilers import sweep

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(default_model_path.read_bytes()[:1000])
    sw = sweep.load(_write(tmp_path, extra_model=f", {broken}"))
    out = tmp_path / "results"
    sweep.run(sw, out, progress=False, log=lambda m: None)
    recs = [r for r in _records(out) if r.get("kind") != "quality"]
    errors = [r for r in recs if r["status"] == "error"]
    assert errors and all(str(broken) == r["cell"]["model"] for r in errors)
    assert "truncated" in errors[0]["error"]
    assert any(r["status"] == "ok" for r in recs)


def test_report_renders_plots_and_a_summary(swept):
    from profilers import report

    _, _, out = swept
    summary = report.render(out)
    text = summary.read_text()
    assert "| smollm2-135m-instruct | Q8_0 | edgerun |" in text
    assert "not applicable" in text
    png = out / "decode_tokens_per_s_vs_bpw.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("edit, message", [
    (("models: [smollm2-135m-instruct]", "models: [llama-9000]"), "line 2: unknown model 'llama-9000'"),
    (("quant: Q8_0", "quant: Q9_9"), "line 4: unknown quantization type 'Q9_9'"),
    (("repetitions: 2", "repetitions: zero"), "line 11: field 'repetitions' must be a positive integer"),
    (("backends: [edgerun, llama-cpp-python]", "backends: [edgerun, vllm]"), "line 6: field 'backends' item 1"),
])
def test_bad_sweep_files_name_the_field_and_line(tmp_path, edit, message):
    from profilers import sweep
    from edgerun.formats.yamlfile import YamlError

    p = _write(tmp_path)
    p.write_text(p.read_text().replace(*edit))
    with pytest.raises(YamlError, match=message):
        sweep.load(p)


def test_bench_cli_reports_a_missing_directory(tmp_path):
    r = subprocess.run(edgerun_cmd("bench", "report", str(tmp_path / "nothing")), capture_output=True, text=True,
                       env=cli_env(), timeout=120)
    assert r.returncode == 2 and "has no runs.jsonl" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_bench_cli_killed_by_a_signal_resumes_to_the_same_records(tmp_path, swept, sig):
    """`edgerun bench` killed by a real SIGINT/SIGTERM at a random moment: no traceback, no temporary left,
    runs.jsonl holds whole records only, and running it again finishes the sweep without duplicates."""
    import random
    import signal as signals
    import time
    from pathlib import Path

    from test_interrupt import leftovers, no_traceback

    root = Path(__file__).resolve().parents[1]
    sweep_file = _write(tmp_path)
    out = tmp_path / "results"
    cmd = edgerun_cmd("bench", "--sweep", str(sweep_file), "--device",
                      str(root / "device_configs" / "this-machine.yaml"), "--out", str(out))
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env())
    time.sleep(random.Random(sig).uniform(2.0, 12.0))
    if p.poll() is None:
        p.send_signal(getattr(signals, sig))
    _, err = p.communicate(timeout=600)
    assert no_traceback(err), err[-2000:]
    assert leftovers(tmp_path) == [], err[-2000:]
    if (out / "runs.jsonl").exists():
        for line in (out / "runs.jsonl").read_text().splitlines():
            json.loads(line)                                       # whole records only
    again = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    keys = [json.loads(line)["key"] for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 4 + 2                  # as the uninterrupted sweep
