"""One run per output folder: a training run holds its exp_dir, an evaluation its result folder.

The lock is an advisory ``flock`` on a small file (``<exp_dir>/train.lock``, ``<result>.lock``
next to the result folder, which an evaluation replaces as a whole when it publishes) that also
records the holder's host, pid, command and start time for the message a second run gets. The
kernel releases a ``flock`` when its process dies, however it dies: a lock file left by a killed run
is taken over by the next one, with a line saying so. The file is removed when the run ends.
On a shared file system the lock covers every host that honours ``flock`` (NFSv4, Lustre and
GPFS with locking enabled).

Under DDP only rank 0 takes it (``engine/cli.py``), before it joins the process group; no rank
writes before the group is formed, so no rank writes before the lock is held.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Callable, Optional

from .atomic import describe
from .errors import SetupError

try:
    import fcntl
except ImportError:  # not on Windows: there, runs are not locked
    fcntl = None


def check_folder(folder: str, key: str) -> None:
    """`folder` (config `key`) must be a folder or not exist yet; a file there is refused."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SetupError(f"{key}: {folder} is a file, not a folder")


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _who(h: dict) -> str:
    if not h:
        return "another run"
    return (f"{h.get('command', 'a run')} (pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
            f"started {h.get('started', '?')})")


class FolderLock:
    """``with FolderLock(lock_file, what):`` holds `lock_file` or raises SetupError naming the holder.

    `what` names the protected folder in the messages, e.g. "exp_dir exp/run1"."""

    def __init__(self, path: str, what: str, log: Optional[Callable[[str], None]] = None):
        self.path, self.what, self.fd = path, what, None
        self.log = log or (lambda msg: print(msg, file=sys.stderr))

    def acquire(self) -> "FolderLock":
        if fcntl is None:
            return self
        folder = os.path.dirname(self.path) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise SetupError(f"{self.what}: cannot create {folder}: {describe(e)}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise SetupError(f"{self.what}: cannot create the lock file {self.path}: {describe(e)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SetupError(f"{self.what} is in use by {_who(_holder(self.path))}; wait for it to end "
                                 f"or choose another folder") from None
            except OSError as e:
                os.close(fd)
                raise SetupError(f"{self.what}: cannot lock {self.path}: {describe(e)}") from None
            # the holder before us may have removed the file after we opened it: then we hold a lock
            # on a file nobody else sees, and try again on the current one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        before = _holder(self.path)
        if before:  # a run that ended cleanly removes the file: this one was killed
            self.log(f"taking over the lock of {self.what} left by {_who(before)}, which is no longer running")
        record = {"command": " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])[:200],
                  "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = json.dumps(record).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:
            pass  # the lock itself is held; only the holder's description is missing
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still holding it: see the samestat check in `acquire`
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_held(path: str) -> Optional[str]:
    """The holder's description if another process holds the lock file `path`, else None (does not
    take it; for checks before processes start, e.g. tools/preflight.py)."""
    if fcntl is None or not os.path.isfile(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return _who(_holder(path))
    finally:
        os.close(fd)
