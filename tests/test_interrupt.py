"""Interrupted writes: SIGINT/SIGTERM at random points and a full disk leave the complete output or nothing.

Fast tier: the atomic writers (``edgerun/atomic.py``) in a subprocess killed at random moments, a
full disk on a real 1 MiB tmpfs (as root; a write hook raising ENOSPC otherwise), and ``edgerun bench
report`` (a CLI writer that needs no model) interrupted. The writing commands on the real model
(export, carve, merge, kv tune, experts calibrate, bench) are in ``test_interrupt_commands`` below, marked
slow. Every trial is recorded in ``TRIALS`` (printed at the end with ``-s``; the benchmark
``benchmarks/interrupt_trials.py`` runs more of them and writes the table).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, edgerun_cmd

ROOT = Path(__file__).resolve().parents[1]

WRITER = r"""
import sys, time
from pathlib import Path
from edgerun.atomic import atomic_dir, atomic_file
kind, dest, chunks = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
if kind == "file":
    with atomic_file(dest, force=True) as tmp:
        with open(tmp, "wb") as f:
            for i in range(chunks):
                f.write(bytes([i % 256]) * 4096); f.flush(); time.sleep(0.002)
else:
    with atomic_dir(dest, force=True) as tmp:
        for i in range(chunks):
            (tmp / f"part{i:03d}").write_bytes(bytes([i % 256]) * 4096); time.sleep(0.002)
"""


def _complete_file(dest: Path, chunks: int) -> bool:
    data = dest.read_bytes()
    return len(data) == chunks * 4096 and all(data[i * 4096] == i % 256 for i in range(chunks))


def _complete_dir(dest: Path, chunks: int) -> bool:
    return sorted(p.name for p in dest.iterdir()) == [f"part{i:03d}" for i in range(chunks)]


def leftovers(directory: Path) -> list[str]:
    """Temporaries an interrupted atomic writer left behind (``.NAME.*.partial``)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.name.endswith(".partial") or p.name.endswith(".old"))


def no_traceback(err: str) -> bool:
    """No traceback, except a Ctrl-C that landed while Python was still importing, before edgerun's main()
    could take over the signals (nothing has been written at that point)."""
    return "Traceback" not in err or (err.strip().splitlines()[-1] == "KeyboardInterrupt"
                                      and "edgerun/cli.py" not in err)


def interrupt(cmd: list[str], delay: float, sig: int, env=None, cwd=None, ready: str | None = None,
              timeout: float = 600) -> tuple[int, str]:
    """Run ``cmd``, send ``sig`` ``delay`` seconds after it prints ``ready`` (or starts); return (exit code, stderr)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True)
    if ready:
        while True:
            line = p.stdout.readline()
            if not line or ready in line:
                break
    time.sleep(delay)
    if p.poll() is None:
        p.send_signal(sig)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_atomic_writer_interrupted_at_random_points(tmp_path, kind, sig):
    rng = random.Random(f"{kind}{sig}")
    chunks = 40                                   # about 0.1-0.2 s of writing
    outcomes = {"complete": 0, "nothing": 0}
    for trial in range(4):
        dest = tmp_path / f"out{trial}"
        # SIGTERM is handled as the CLI does (edgerun.cli._terminate): unwind, so the writer cleans up
        prelude = "" if sig == signal.SIGINT else "import signal, sys; signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))\n"
        code, err = interrupt([sys.executable, "-c", prelude + WRITER, kind, str(dest), str(chunks)],
                              rng.uniform(0, 0.25), sig, ready="ready", env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if dest.exists():
            assert (_complete_file if kind == "file" else _complete_dir)(dest, chunks), err
            outcomes["complete"] += 1
        else:
            assert code != 0
            outcomes["nothing"] += 1
        assert leftovers(tmp_path) == [], err
    assert sum(outcomes.values()) == 4


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str = "1m"):
    """A directory on a ``size`` tmpfs (root only), or None when mounting is not possible here."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class _FullDisk:
    """A write hook: writes through ``open(...).write`` fail with ENOSPC after ``budget`` bytes."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, real_open):
        hook = self

        def fake_open(*a, **k):
            f = real_open(*a, **k)
            if "w" not in str(a[1] if len(a) > 1 else k.get("mode", "r")):
                return f
            write = f.write

            def limited(data):
                hook.budget -= len(data)
                if hook.budget < 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return write(data)
            f.write = limited
            return f
        return fake_open


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    from edgerun.atomic import atomic_dir, atomic_file
    from edgerun.errors import EdgerunError

    with small_disk(tmp_path) as disk:
        if disk is None:                          # not root: the write hook stands in for the tmpfs
            import builtins
            disk = tmp_path / "hooked"
            disk.mkdir()
            monkeypatch.setattr(builtins, "open", _FullDisk(1 << 20)(builtins.open))
        with pytest.raises(EdgerunError, match="no space left"):
            with atomic_file(disk / "model.gguf") as tmp:
                with open(tmp, "wb") as f:
                    for _ in range(64):
                        f.write(b"x" * 65536)
        assert list(disk.iterdir()) == []
        with pytest.raises(EdgerunError, match="no space left"):
            with atomic_dir(disk / "onnx") as tmp:
                for i in range(64):
                    with open(tmp / f"w{i}", "wb") as f:
                        f.write(b"x" * 65536)
        assert list(disk.iterdir()) == []
        with atomic_file(disk / "small.txt") as tmp:   # the disk is usable again afterwards
            tmp.write_text("ok")
        assert (disk / "small.txt").read_text() == "ok"


def test_full_disk_safetensors_stream(tmp_path):
    """The streaming safetensors writer (merge, carve, PTQ outputs) on a full tmpfs."""
    torch = pytest.importorskip("torch")
    from edgerun.atomic import atomic_file
    from edgerun.errors import EdgerunError
    from edgerun.formats.safetensors import StreamWriter

    with small_disk(tmp_path) as disk:
        if disk is None:
            pytest.skip("needs root to mount a tmpfs (the write-hook variant is test_full_disk_leaves_nothing)")
        specs = [(f"w{i}", "F32", (256, 256)) for i in range(8)]          # 2 MiB on a 1 MiB disk
        with pytest.raises(EdgerunError, match="no space left"):
            with atomic_file(disk / "model.safetensors") as tmp:
                w = StreamWriter(tmp, specs)
                try:
                    for name, _, shape in specs:
                        w.write(name, torch.ones(shape))
                    w.close()
                except BaseException:
                    w.abort()
                    raise
        assert list(disk.iterdir()) == []


def test_bench_report_interrupted(tmp_path):
    """``edgerun bench report`` (plots and summaries of a real sweep) killed at random points: every file it
    writes is the complete new one, or the complete old one, never a partial file."""
    src = ROOT / "benchmarks" / "results" / "bpw_sweep" / "runs.jsonl"
    assert src.is_file(), f"the recorded sweep {src} is committed with the repository; it is missing"
    rng = random.Random(0)
    for trial, sig in enumerate([signal.SIGINT, signal.SIGTERM] * 2):
        d = tmp_path / f"r{trial}"
        d.mkdir()
        shutil.copy(src, d / "runs.jsonl")
        (d / "summary.md").write_text("old summary\n")
        code, err = interrupt(edgerun_cmd("bench", "report", str(d)), rng.uniform(0.3, 3.0), sig, env=cli_env())
        assert leftovers(d) == [], err
        assert no_traceback(err), err
        summary = (d / "summary.md").read_text()
        assert summary == "old summary\n" or summary.startswith("#"), summary[:200]
        if (d / "summary.json").exists():
            import json
            json.loads((d / "summary.json").read_text())
        for png in d.glob("*.png"):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.read_bytes()[-8:-4] == b"IEND"


# --- the writing commands on the real model (slow) ---------------------------------------------------

def _export_ok(out: Path) -> bool:
    """A complete GGUF export: the file validates and its manifest records its sha256."""
    import hashlib
    import json

    from edgerun.formats import gguf

    gguf.validate(out)
    record = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    return record["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() if "output" in record \
        and isinstance(record["output"], dict) and "sha256" in record["output"] else True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_export_interrupted(tmp_path, default_model_path, sig):
    """``edgerun export`` to GGUF Q8_0, interrupted at random moments: the file and its manifest, or nothing."""
    rng = random.Random(int(sig))
    for trial in range(2):
        out = tmp_path / f"t{trial}" / "m.gguf"
        out.parent.mkdir()
        code, err = interrupt(edgerun_cmd("export", "smollm2-135m-instruct", "--quant", "Q8_0", "-o", str(out),
                                          "--no-verify"), rng.uniform(0.5, 8.0), sig, env=cli_env())
        assert no_traceback(err), err
        assert leftovers(out.parent) == [], err
        if out.exists():
            assert _export_ok(out)
        else:
            assert code != 0 and not out.with_name(out.name + ".manifest.json").exists()


@pytest.mark.slow
def test_export_full_disk(tmp_path, default_model_path):
    """``edgerun export`` onto a 32 MiB tmpfs (the Q8_0 file is ~145 MB): one line, nothing left there."""
    with small_disk(tmp_path, "32m") as disk:
        if disk is None:
            pytest.skip("needs root to mount a tmpfs")
        p = subprocess.run(edgerun_cmd("export", "smollm2-135m-instruct", "--quant", "Q8_0", "-o",
                                       str(disk / "m.gguf"), "--no-verify"),
                           capture_output=True, text=True, env=cli_env(), timeout=900)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "space" in p.stderr
        assert list(disk.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_models(smollm2_source, tmp_path_factory):
    """Two tiny Llama checkpoints (base, 'fine-tune') with the real tokenizer, and a carve of the base."""
    from converters.carve import carve_checkpoint

    from conftest import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("interrupt-tiny")
    base = make_tiny_checkpoint(root / "base", "llama", smollm2_source.path, seed=0)
    tuned = make_tiny_checkpoint(root / "tuned", "llama", smollm2_source.path, seed=1)
    carved = carve_checkpoint(base, root / "carved", "S1A1E4", tokens=512, seq_len=256)
    return base, tuned, carved


def _checkpoint_ok(out: Path) -> bool:
    from edgerun.formats import safetensors

    return bool(safetensors.checkpoint_files(out)) and (out / "config.json").is_file()


def _commands(base: Path, tuned: Path, carved: Path, out: Path) -> dict:
    """Each writing command on the tiny models: (argv, check of a complete output)."""
    import json

    return {
        "merge": (edgerun_cmd("merge", str(base), str(tuned), "--method", "ties", "--density", "0.5", "-o", str(out)),
                  lambda: _checkpoint_ok(out) and (out / "edgerun_merge.json").is_file()),
        "carve": (edgerun_cmd("carve", str(base), "--config", "S1A1E4", "--tokens", "512", "-o", str(out)),
                  lambda: _checkpoint_ok(out) and "edgerun_moe" in json.loads((out / "config.json").read_text())),
        "experts calibrate": (edgerun_cmd("experts", "calibrate", str(carved), "--task", "code", "--calib-tokens",
                                          "512", "-o", str(out)),
                              lambda: all(json.loads(p.read_text())["stats"] for p in out.glob("*.json"))),
        # PASER on the tiny pair (the tuned one as the "pruned" model): pool, embeddings, JSD, clusters, LoRA
        "recover": (edgerun_cmd("recover", str(tuned), "--original", str(base), "--pool-size", "48", "--budget",
                                "0.5", "--clusters", "3", "--steps", "8", "--minutes", "1", "-o", str(out)),
                    lambda: _checkpoint_ok(out) and (out / "paser_selection.json").is_file()),
        # resumable: a partial run leaves finished steps (each file whole), and the next run completes
        "kv tune": (edgerun_cmd("kv", "tune", str(base), "--points", "3", "--context", "128", "--contexts", "1",
                                "--calib-tokens", "512", "--task", "none", "--budget", "6", "-o", str(out)),
                    lambda: _kv_tune_files_whole(out)),
    }


def _kv_tune_files_whole(out: Path) -> bool:
    """Every file a (possibly interrupted) kv tune left parses: JSON, layout YAML, PNG."""
    import json

    import yaml

    for f in out.iterdir():
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".yaml":
            assert isinstance(yaml.safe_load(f.read_text()), dict), f
        elif f.suffix == ".png":
            assert f.read_bytes()[-8:-4] == b"IEND", f
    return True


@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "carve", "experts calibrate", "kv tune", "recover"])
def test_command_interrupted(tiny_models, tmp_path, command):
    """The command killed by SIGINT or SIGTERM at a random moment: its output complete, or nothing there."""
    rng = random.Random(command)
    for trial, sig in enumerate([signal.SIGINT, signal.SIGTERM]):
        parent = tmp_path / f"t{trial}"
        parent.mkdir()
        out = parent / "out"
        cmd, complete = _commands(*tiny_models, out)[command]
        code, err = interrupt(cmd, rng.uniform(1.0, 6.0), sig, env=cli_env())
        assert no_traceback(err), err[-2000:]
        assert leftovers(parent) == [], err[-2000:]
        if out.exists() and any(out.iterdir()):
            assert complete(), (command, code, err[-2000:])
        else:
            assert code != 0
        # resumes to a full result from whatever the kill left (recover: unless it had finished)
        if command == "kv tune" or (command == "recover" and not out.exists()):
            again = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=600)
            assert again.returncode == 0, again.stderr[-2000:]
            assert complete() and (command != "kv tune" or list(out.glob("pareto-*.yaml")))
