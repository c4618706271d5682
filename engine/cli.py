"""Command-line entry shared by train.py and test.py: parse, load config, run, one-line errors.

Nothing here imports torch: a config that is refused is refused at once, before the entry point's
`run` loads torch and the models.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional

from utils.atomic import CAUSES, write_error
from utils.config import load_config
from utils.errors import SetupError
from utils.logger import setup_logger

from .paths import output_lock


def one_line(e: Exception) -> str:
    """The message itself, also when a DataLoader worker re-raised it with its traceback attached."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and "Traceback" in str(e):
        return lines[-1].split("SetupError: ", 1)[-1]
    return lines[0] if lines else type(e).__name__


class LineTracker:
    """A proxy of a text stream that remembers whether the last character written ended a line
    (a progress bar leaves its line open: it redraws it after a carriage return)."""

    def __init__(self, stream):
        self.stream, self.line_open = stream, False

    def write(self, text: str) -> int:
        if text:
            self.line_open = not text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def print_error(line: str) -> None:
    """`line` on stderr as a line of its own: progress bars still open are closed first (an error
    raised in a loop's body leaves its bar open) and a line a bar left open is ended."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    if getattr(sys.stderr, "line_open", False):
        sys.stderr.write("\n")
    print(line, file=sys.stderr)


def main(kind: str, run: Callable, argv: Optional[List[str]] = None) -> int:
    """`python {kind}.py --config FILE [section.key=value ...]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog=f"{kind}.py", description=f"{kind} a segmentation model from a YAML config")
    parser.add_argument("--config", required=True, help="experiment YAML (see config/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.005 test.eps=[4,8]")
    # the deprecated torch.distributed.launch passes --local-rank / --local_rank; torchrun sets LOCAL_RANK
    parser.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    if kind == "test":
        parser.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                            help="combine the result folders of test.shard=[i,n] runs into <result> (docs/scale.md)")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    lock, notes = None, []
    stderr = sys.stderr
    sys.stderr = LineTracker(stderr)  # progress bars made from now on write through it
    main_process = int(os.environ.get("RANK", 0)) == 0
    try:
        try:
            cfg = load_config(args.config, args.overrides)
        except SetupError as e:  # the same config on every process: the same error
            e.everywhere = True
            raise
        if main_process:  # before the first write of any process: see utils/folder_lock.py
            lock = output_lock(kind, cfg)
            lock.log = notes.append
            lock.acquire()
        log = setup_logger(cfg.exp_dir, kind, main_process=main_process)
        for note in notes:
            log.warning(note)
        log.info(f"config {args.config}" + (f" with overrides {' '.join(args.overrides)}" if args.overrides else ""))
        if getattr(args, "merge", None):
            run(cfg, merge=args.merge)
        else:
            run(cfg)
        return 0
    except SetupError as e:
        if main_process or not getattr(e, "everywhere", False):  # under torchrun: once, from rank 0
            print_error(f"error: {one_line(e)}")
        return 2
    except OSError as e:  # a write that failed outside `atomic_write` (an image, a plot, a log)
        if e.errno not in CAUSES:
            raise
        print_error(f"error: {write_error(e.filename or 'a file', e)}")
        return 2
    except FloatingPointError as e:
        print_error(f"error: training stopped: {e}; the last good checkpoint is kept")
        return 3
    finally:
        if lock is not None:
            lock.release()
        sys.stderr = stderr
        dist = sys.modules.get("utils.dist")  # loaded (with torch) only by a run that got that far
        if dist is not None:
            dist.cleanup()
