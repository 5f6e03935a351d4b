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
    """How to rebuild a workflow output and everything made from it. (Deleting it is not
    enough: Snakemake does not remake a missing file whose products are up to date.)"""
    return f"rerun the same command with --forcerun {path} to rebuild it and what is made from it"


SOURCES = ".sources.json"  # beside a product: the digest of the delta it came from


def sources_of(product: str | Path) -> Path:
    """Where a product's record of its delta lives: beside it (a folder's: inside it)."""
    path = Path(product)
    if path.suffix:
        return path.with_name(path.name.split(".")[0] + SOURCES)
    return path / SOURCES


def record_sources(product: str | Path, delta: str | Path | None) -> None:
    """Beside `product`: the delta it was made from (sha256, size, mtime), or none."""
    import json

    from .digests import files_sha256

    record = {"delta": None}
    if delta:
        stat = Path(delta).stat()
        record = {"delta": str(delta), "sha256": files_sha256([delta]), "size": stat.st_size,
                  "mtime_ns": stat.st_mtime_ns}  # fmt: skip
    sources_of(product).write_text(json.dumps(record, indent=2) + "\n")


def inherit_sources(product: str | Path, made_from: str | Path) -> None:
    """Beside `product`: the delta record of `made_from` (judgments are of their images')."""
    record = recorded_delta(made_from)
    if record is None:
        record_sources(product, None)
    else:
        sources_of(product).write_text(sources_of(made_from).read_text())


def recorded_delta(product: str | Path) -> dict | None:
    import json

    path = sources_of(product)
    return json.loads(path.read_text()) if path.is_file() else None


def stale(product: str | Path, delta: str | Path) -> bool:
    """`product` exists, is newer than the delta at `delta` (else Snakemake remakes it
    itself) and records another delta (a different file restored with an old mtime): what it
    says is not of the delta there. The stat is compared first, the sha256 only when the stat
    differs."""
    from .digests import files_sha256

    record, delta = recorded_delta(product), Path(delta)
    if not (Path(product).exists() and record and record.get("sha256") and delta.is_file()):
        return False
    stat = delta.stat()
    if stat.st_mtime_ns > Path(product).stat().st_mtime_ns:
        return False
    if (stat.st_size, stat.st_mtime_ns) == (record.get("size"), record.get("mtime_ns")):
        return False
    return files_sha256([delta]) != record["sha256"]


def write_json(data: dict, output: str | Path) -> None:
    """`data` as indented JSON, atomically: a reader never sees half a file."""
    import json

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(output)
