"""Files a command writes besides the store (trained models, reports, plots): checked
before the work starts, and written atomically so a crash never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from oodcli.errors import UsageError
from oodcli.store import _mutation


def check_output_file(path: Path, what: str = "--out") -> Path:
    """Refuse, before hours of work, an output file that could not be written: a folder at
    that path, a file where a folder should be, or a folder this process cannot write to."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path} cannot be written: {parent} is a file, not a folder")
    if parent == path.parent:
        try:  # a real write, since permission bits do not tell (read-only mounts, root)
            with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
                pass
        except OSError as exc:
            raise UsageError(f"{what} {path} cannot be written ({exc.strerror}); pick another path") from None
    elif not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {path} cannot be written: {parent} is not writable; pick another path")
    return path


def check_output_folder(path: Path, what: str) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file; give a folder path")
    check_output_file(path / ".probe", what)
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then rename onto ``path``: readers see the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")  # one fixed name: a run after a crash replaces it
    _mutation()
    try:
        write(tmp)
        _mutation()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
