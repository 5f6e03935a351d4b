"""Per-job logging: every step writes to its rule's log file (and to stderr)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def job_log(path: str | Path | None, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Route logging to `path`; an exception is logged with its traceback, then re-raised.
    The job ends with the Snakemake that started it (crce.jobs.watch_parent)."""
    from .jobs import watch_parent

    watch_parent()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    # Chatty HTTP libraries would log request URLs and headers at INFO.
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logger = logging.getLogger("crce")
    # Where the job ran: on a cluster, the scheduler's job id and the GPUs it granted.
    logger.info(
        "host %s, SLURM_JOB_ID=%s, CUDA_VISIBLE_DEVICES=%s",
        socket.gethostname(),
        os.environ.get("SLURM_JOB_ID", "-"),
        os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
    )
    try:
        yield logger
    except Exception as err:
        logger.error("%s", err, exc_info=True)
        raise
    finally:
        for handler in handlers:
            handler.flush()
