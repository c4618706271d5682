"""One logger per run: console plus ``<exp_dir>/<kind>-<timestamp>.log`` (never overwritten)."""
from __future__ import annotations

import logging
import os
import sys
import time

NAME = "segrobust"
TEED_ENV = "SEGROBUST_LOG_TEED"  # set by the launchers, which already tee the console into exp_dir


def log_path(exp_dir: str, kind: str) -> str:
    """A fresh `<kind>-YYYYmmdd_HHMMSS.log` path; a suffix is added if that name exists."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    path, n = os.path.join(exp_dir, f"{kind}-{stamp}.log"), 1
    while os.path.exists(path):
        path, n = os.path.join(exp_dir, f"{kind}-{stamp}-{n}.log"), n + 1
    return path


class _FileHandler(logging.FileHandler):
    """A log file that falls silent when it cannot be written (e.g. a full disk): the console
    still has every line, and the run's own error says what failed."""

    def handleError(self, record: logging.LogRecord) -> None:
        logging.getLogger(NAME).removeHandler(self)


def setup_logger(exp_dir: str, kind: str, main_process: bool = True) -> logging.Logger:
    """Console logging on the main process; a log file too unless a launcher tees the console."""
    logger = logging.getLogger(NAME)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if main_process and not os.environ.get(TEED_ENV):
        os.makedirs(exp_dir, exist_ok=True)
        fh = _FileHandler(log_path(exp_dir, kind))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(NAME)
