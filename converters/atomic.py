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


def _disk_full(dest: Path) -> EdgerunError:
    return EdgerunError(f"no space left on the device while writing {dest}; nothing was written there")


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
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise _disk_full(dest) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


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
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise _disk_full(dest) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
