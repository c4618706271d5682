"""Writes that cannot lose the previous state: every file a run leaves (checkpoints, config.yaml,
per-image counts, metrics.json) goes through `atomic_write`.

The data goes to ``<path>.tmp.<pid>``, is flushed to disk, and only then renamed over `path`: a kill,
a full disk or a file-size limit at any moment leaves either the previous file or the complete new one,
never a truncated one. A failed write removes its own temporary file and raises `WriteError`, one
line naming the file and the cause (the entry points print it and exit 2).
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import IO, Iterator, Optional

from .errors import SetupError

# causes a user can act on, worded for the one error line
CAUSES = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large for the size limit (ulimit -f)",
          errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
          errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


class WriteError(SetupError):
    """A file could not be written; earlier files are intact and no temporary file is left."""


def describe(e: OSError) -> str:
    """'no space left on the device (ENOSPC)' for the errors in `CAUSES`, else the system's text."""
    name = errno.errorcode.get(e.errno or 0, "")
    text = CAUSES.get(e.errno, e.strerror or str(e))
    return f"{text} ({name})" if name else text


def write_error(path: str, e: OSError) -> WriteError:
    return WriteError(f"cannot write {path}: {describe(e)}; earlier files are kept")


class _Recorder:
    """File wrapper that remembers the OSError of a failed write: torch.save reports it as a
    RuntimeError of its zip writer, which no longer says why."""

    def __init__(self, f: IO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (not possible on every file system: then it is skipped)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path) as f: ...``: `f` is a temporary file that replaces `path` once the
    block has finished and the data is on disk. On any failure the temporary file is removed and
    `path` keeps its previous content; a failed write raises `WriteError`."""
    folder = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(tmp, mode)
    except OSError as e:
        raise write_error(path, e) from None
    rec = _Recorder(f)
    try:
        yield rec
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException as e:
        cause: Optional[OSError] = rec.error or (e if isinstance(e, OSError) else None)
        try:
            f.close()  # flushes what is buffered: may fail again on a full disk
        except OSError as close_error:
            cause = cause or close_error
        try:
            os.remove(tmp)
        except OSError:
            pass
        if cause is not None and not isinstance(e, SetupError):
            raise write_error(path, cause) from None
        raise
    fsync_folder(folder)


@contextmanager
def named_write(path: str) -> Iterator[str]:
    """``with named_write(path): image.save(path)``: for the many small output files (prediction
    PNGs, example panels) that need no atomic replacement, as they live in a staging folder: a
    failed write removes the partial file and raises `WriteError` naming it."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        yield path
    except OSError as e:
        try:
            os.remove(path)
        except OSError:
            pass
        raise write_error(path, e) from None

