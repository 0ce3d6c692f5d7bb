"""Atomic outputs: write to a temporary name beside the destination, rename only when complete.

A Ctrl-C, a full disk or any error leaves nothing at the destination and removes the temporary.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edgerun.errors import EdgerunError, UsageError


class OutputExistsError(UsageError):
    """The output path exists and ``--force`` was not given."""


def _check_dest(dest: Path, force: bool) -> None:
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} already exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _cleanup_on_failure(dest: Path, cleanup) -> Iterator[None]:
    """Run ``cleanup`` on any failure (Ctrl-C included); a full disk becomes a one-line error."""
    try:
        yield
    except OSError as e:
        cleanup()
        if e.errno == errno.ENOSPC:
            raise EdgerunError(f"no space left on the device while writing {dest}; nothing was written there") from None
        raise
    except BaseException:
        cleanup()
        raise


@contextlib.contextmanager
def atomic_file(dest: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``dest``.

    Raises:
        OutputExistsError: ``dest`` exists and ``force`` is false.
        EdgerunError: the disk filled up.
    """
    dest = Path(dest)
    _check_dest(dest, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; an export is an ordinary file
    with _cleanup_on_failure(dest, lambda: tmp_path.unlink(missing_ok=True)):
        yield tmp_path
        os.replace(tmp_path, dest)


@contextlib.contextmanager
def atomic_dir(dest: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``dest`` (an existing one only with ``force``).

    Raises:
        OutputExistsError: ``dest`` exists and ``force`` is false.
        EdgerunError: the disk filled up.
    """
    dest = Path(dest)
    _check_dest(dest, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an export is an ordinary directory
    with _cleanup_on_failure(dest, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
