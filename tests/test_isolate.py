"""The child-process first open (edgerun/isolate.py): a native crash becomes a one-line error, once per version."""

from __future__ import annotations

import pytest

from edgerun import isolate
from edgerun.errors import ModelFileError


@pytest.fixture
def engines(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGERUN_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(isolate._OPENERS, "segv", "import ctypes; ctypes.string_at(0)\n")
    monkeypatch.setitem(isolate._OPENERS, "abort", "import os; os.abort()\n")
    monkeypatch.setitem(isolate._OPENERS, "fine", "import sys; open(sys.argv[1] + '/model.bin').read()\n")
    monkeypatch.setitem(isolate._OPENERS, "raises", "raise RuntimeError('the engine says no')\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.bin").write_text("weights")
    return model


@pytest.mark.parametrize("engine, signal", [("segv", "SIGSEGV"), ("abort", "SIGABRT")])
def test_native_crash_is_a_one_line_error(engines, engine, signal):
    with pytest.raises(ModelFileError) as info:
        isolate.first_open(engine, engines)
    assert signal in str(info.value) and len(str(info.value).splitlines()) == 1
    with pytest.raises(ModelFileError):        # never stamped: every open retries in a child
        isolate.first_open(engine, engines)


def test_opened_once_per_version(engines):
    assert isolate.first_open("fine", engines) is not None
    assert isolate.first_open("fine", engines) is None           # the stamp: no child
    (engines / "model.bin").write_text("other weights")           # a new version of the files opens again
    assert isolate.first_open("fine", engines) is not None


def test_engine_error_left_to_the_parent(engines):
    assert isolate.first_open("raises", engines) is not None      # no error here, and no stamp
    assert isolate.first_open("raises", engines) is not None


def test_hang_is_an_error(engines, monkeypatch):
    monkeypatch.setitem(isolate._OPENERS, "hang", "import time; time.sleep(60)\n")
    with pytest.raises(ModelFileError, match="did not open within"):
        isolate.first_open("hang", engines, timeout=1)
