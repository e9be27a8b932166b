"""Write a file so that a reader sees the old content or the complete new one, never a partial file."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import suppress
from typing import IO, Any, Callable


def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (best effort where directories cannot be opened)."""
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=folder)
    try:
        with os.fdopen(fd, 'wb' if binary else 'w', encoding=None if binary else 'utf-8') as f:
            mask = os.umask(0o022)  # reading the umask means setting it
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give the file the usual permissions
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_json(obj: Any, path: str, indent: int = 2) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=indent), binary=False)
