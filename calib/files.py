"""Writing files safely: the one atomic writer every module uses (ONNX, QuantState, engines, caches).

    atomic_write(path, content, *, force=True) -> path
content: bytes, or a function that writes a given temporary path (e.g. `lambda tmp: onnx.save(m, tmp)`).
The data goes to a temporary file in the same folder, is flushed to disk, gets the permissions a
plain `open(path, "w")` would give it, and is renamed into place: a reader never sees a partial
file, and an error or Ctrl-C leaves nothing behind (nor a changed old file).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["OutputError", "atomic_write"]


class OutputError(ValueError):
    """A bad output request (existing file without --force, unwritable folder, ...); the message says what to change."""

    user_facing = True


def atomic_write(path: str | os.PathLike, content: bytes | Callable[[Path], object], *, force: bool = True) -> Path:
    """Write `content` to `path` atomically (module docstring). force=False: an existing file is an OutputError."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if isinstance(content, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            content(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
