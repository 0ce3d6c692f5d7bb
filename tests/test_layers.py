"""The layers go one way (edgerun runs, converters write, profilers measure), checked by import-linter."""

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(pathlib.Path(sys.executable).with_name("lint-imports"))
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_the_runtime_api_imports_no_writer_profiler_or_torch():
    code = ("import sys, edgerun, edgerun.session, edgerun.planner, edgerun.backends\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('converters', 'profilers', 'torch'))\n"
            "print(bad)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
