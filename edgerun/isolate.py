"""A first open in a child process, for model files that native code reads without a complete check.

edgerun validates what it can before an engine opens a file (the GGUF scan bounds every length and
tensor extent; ONNX directories get their genai_config.json and external-data extents checked), but an
ONNX graph is a protobuf program that onnxruntime interprets: no validator short of onnxruntime itself
covers every node, attribute and shape. A malformed graph can abort or crash the process (a segfault
or ``std::terminate`` in native code, which no ``try`` catches). So the first time a given version of a
model directory is opened, it is opened in a child process: if the child dies by a signal, the caller
gets a one-line :class:`~edgerun.errors.ModelFileError` instead of a dead process. The child's success
is remembered by a stamp under ``$EDGERUN_HOME/cache/opened/`` keyed by the files' paths, sizes and
modification times, so the cost (a Python start, the engine's import and one model load; measured in
docs/reliability.md) is paid once per version of the files, not per chat.

An ordinary error in the child (the engine raising an exception) is not reported here: the parent's own
open raises it again as the backend's one-line error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgerun.errors import ModelFileError

TIMEOUT_S = 600.0

# engine name -> code the child runs with the path as sys.argv[1]; it must only open the model
_OPENERS = {
    "onnx": ("import sys, onnxruntime_genai as og\n"
             "c = og.Config(sys.argv[1]); c.clear_providers(); m = og.Model(c); og.Tokenizer(m)\n"),
}


def _stamp(engine: str, path: Path) -> Path:
    from edgerun import catalog  # the cache home; a light import

    return catalog.home() / "cache" / "opened" / f"{engine}-{catalog.stamp(path, engine)[:24]}"


def first_open(engine: str, path: str | Path, timeout: float = TIMEOUT_S) -> float | None:
    """Open ``path`` with ``engine`` in a child process, unless this version of it already opened there.

    Returns:
        Seconds the child took, or None when the stamp said it had already opened.

    Raises:
        ModelFileError: the child died by a signal (a native crash) or did not finish within ``timeout``.
    """
    path = Path(path)
    stamp = _stamp(engine, path)
    if stamp.is_file():
        return None
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", _OPENERS[engine], str(path)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ModelFileError(f"{path} did not open within {timeout:.0f} s in a test process; "
                             "it may be corrupted: export it again") from None
    if p.returncode < 0:
        try:
            name = signal.Signals(-p.returncode).name
        except ValueError:
            name = f"signal {-p.returncode}"
        raise ModelFileError(f"{path} crashed the {engine} engine in a test open ({name}); the model is "
                             "corrupted or not supported: export it again")
    if p.returncode == 0:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
        tmp.write_text(f"{path}\n")
        os.replace(tmp, stamp)
    return time.perf_counter() - t0
