"""Image manifests (one row per image: its prompt, seed, path and sha256), written by the
sampler and checked by everything that reads the images: a missing or changed image is an
error that names it, not a table computed from other images than the manifest lists."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .files import DamagedFileError, damaged, rebuild_hint


def image_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_table(path: str | Path):
    """A Parquet table the workflow wrote; a damaged one is an error saying how to rebuild it."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
        raise damaged(path, err, rebuild_hint(path)) from None


def read_manifest(path: str | Path, verify: bool = True):
    """A manifest, its images checked against the digests it lists (`verify`): each missing
    or changed image is an error naming it and how to redraw it."""
    frame = read_table(path)
    if verify and "image_sha256" in frame.columns:
        redraw = (f"rerun the same command with --forcerun {path}: the sampler redraws only "
                  "the images its folder lacks")  # fmt: skip
        for image, digest in zip(frame["path"], frame["image_sha256"], strict=True):
            if not Path(image).is_file():
                raise DamagedFileError(f"{image} is missing (listed in {path}): {redraw}")
            if image_sha256(image) != digest:
                raise DamagedFileError(
                    f"{image} is not the image {path} lists (its sha256 changed): delete the "
                    f"image, then {redraw}"
                )
    return frame
