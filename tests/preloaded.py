"""Entry points run as forks of one process that has already imported torch and the project.

The bad-input table runs dozens of `train.py` / `test.py` / `python -m utils.config` invocations that
stop within their first seconds; a fresh interpreter spends most of that importing torch. A server
(`python tests/preloaded.py`, driven through `Preloaded`) imports what the entry points import, once,
then forks once per request. The child takes the request's working directory, environment, argv,
stdin (/dev/null) and stdout / stderr files and runs the entry point as ``__main__``, then exits as
the interpreter would: the code of `SystemExit` (a message for a non-integer code, 1 and a traceback
for an uncaught exception), after the atexit handlers and with the streams flushed.

What differs from a fresh process: the modules are already imported, so the environment an import
reads (PYTHONPATH, OMP_NUM_THREADS) is the server's: requests that change it need a real process.
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import subprocess
import sys
import traceback
import warnings
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exit_code(code) -> int:
    """What the interpreter exits with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_child(request: dict) -> None:
    """In the forked child: set up the process as `request` says, run the entry point, exit."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((0, os.devnull), (1, request["out"]), (2, request["err"])):
            flags = os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            f = os.open(path, flags, 0o644)
            os.dup2(f, fd)
            os.close(f)
        argv: List[str] = request["argv"]
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                # the module is already imported here (a fresh `python -m` would import it only as __main__)
                warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                                        category=RuntimeWarning)
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python script` sets it
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
        except BaseException:  # noqa: B902 - the interpreter's own handling of an uncaught exception
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream: nothing left to flush
                pass
        os._exit(code)


def serve() -> None:
    """Import the entry points' modules, then run one child per JSON request line on stdin, answering
    each with a JSON line ``{"rc": exit code}`` once the child has ended."""
    sys.path[0] = ROOT
    os.chdir(ROOT)
    import cv2, numpy, PIL.Image, torch, tqdm, yaml  # noqa: E401,F401
    import attacks, datasets, defenses, models  # noqa: E401,F401
    import engine.cli, engine.evaluator, engine.trainer, utils.config  # noqa: E401,F401
    reply = sys.stdout
    for line in sys.stdin:
        reply.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(json.loads(line))
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


class Preloaded:
    """A server process; `run` is a `subprocess.run(cmd, cwd, env, capture_output=True)` for
    ``[sys.executable, script | -m module, args...]``. One request at a time per server."""

    def __init__(self, scratch: str, env: Optional[dict] = None):
        self.scratch = scratch
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.count = 0

    def run(self, cmd: List[str], cwd: str, env: dict) -> subprocess.CompletedProcess:
        assert cmd[0] == sys.executable, cmd
        self.count += 1
        out, err = (os.path.join(self.scratch, f"{self.proc.pid}-{self.count}.{k}") for k in ("out", "err"))
        request = {"argv": cmd[1:], "cwd": str(cwd), "env": env, "out": out, "err": err}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the preloaded server ended (exit code {self.proc.wait()})")
        streams = []
        for path in (out, err):
            with open(path, "rb") as f:
                streams.append(f.read())
            os.remove(path)
        return subprocess.CompletedProcess(cmd, json.loads(answer)["rc"], *streams)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    serve()
