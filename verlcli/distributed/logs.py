"""Where worker output goes: RUN_DIR/logs/, one file per worker, so the console keeps only
the progress bar, one metrics line per step, and warnings (`--verbose` brings it all back).

The trainer sets VERL_LOG_DIR in the workers' environment. A Ray worker then points its
stdout and stderr (the file descriptors, so vLLM's logger, C++ warnings from torch/gloo and
plain prints all follow) at `LOG_DIR/<group>_rank<r>.log` before it builds anything, and
the driver starts Ray with `log_to_driver=False`. The local launcher runs the workers in the
driver's own process, whose stdout is the console: there the `vllm` logger and Python
warnings go to `LOG_DIR/<group>_local.log` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

LOG_DIR_ENV = "VERL_LOG_DIR"
GROUP_ENV = "VERL_WORKER_GROUP"


def log_path(group: str, rank: int | str, env: dict | None = None) -> Path | None:
    """This worker's log file, or None when output should stay where it is (--verbose).
    env: where to look for VERL_LOG_DIR (default: this process's environment)."""
    log_dir = (os.environ if env is None else env).get(LOG_DIR_ENV)
    if not log_dir:
        return None
    return Path(log_dir) / (f"{group}_rank{rank}.log" if isinstance(rank, int) else f"{group}_{rank}.log")


def redirect_process_output(path: Path | None) -> None:
    """Send this process's stdout and stderr (fds 1 and 2) to `path`, appending."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_to(path: Path | None):
    """Within the block, this process's fds 1 and 2 write to `path` (then back to the console):
    an in-process worker's set-up (weight-loading bars, torch's C++ warnings) stays off the console."""
    if path is None:
        yield
        return
    saved = [os.dup(1), os.dup(2)]
    try:
        redirect_process_output(path)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def route_library_logs(path: Path | None) -> None:
    """In-process workers: vLLM's logger and Python warnings to `path`, not the console.

    vLLM configures its own stdout handler when it is imported unless
    VLLM_CONFIGURE_LOGGING=0, so that is set first (a vLLM imported earlier gets its
    handlers replaced instead)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
    for name in ("vllm", "py.warnings"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
            if isinstance(old, logging.FileHandler):  # an earlier run's file, in this process
                old.close()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logging.captureWarnings(True)
