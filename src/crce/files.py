"""Outputs on disk: written with the user's umask (a lab shares its results), and read with an
error that names a damaged file and says how to rebuild it."""

from __future__ import annotations

import os
from pathlib import Path


class DamagedFileError(RuntimeError):
    """A file the workflow wrote that cannot be read back; the message says how to rebuild it."""


def honour_umask(path: str | Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the permissions the user's umask
    asks for: safetensors and some savers create files readable by their owner only."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        mode = 0o777 if item.is_dir() else 0o666
        item.chmod(mode & ~mask)


def damaged(path: str | Path, err: Exception, rebuild: str) -> DamagedFileError:
    """The error for a file that cannot be read: its path, why, and how to rebuild it."""
    reason = " ".join(str(err).split()) or type(err).__name__
    return DamagedFileError(f"{path} is damaged or incomplete ({reason[:300]}): {rebuild}")


def rebuild_hint(path: str | Path) -> str:
    """How to rebuild a workflow output: delete it and rerun the same command."""
    return f"delete {path} and rerun the same command to rebuild it"
