"""File digests for provenance records, with no third-party imports (every env can use it)."""

from __future__ import annotations

import hashlib


def files_sha256(paths) -> str:
    """One sha256 over the files' bytes in order, read in 1 MiB chunks (checkpoints are GBs)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
