"""Masks of the concept in a reference set's images, for a method whose loss reads inside
them (MACE's data preparation, data_preparation_transformers.py): a segmenter named in the
method's request, run by the `reference_images` job after it draws the images.

A segmenter is `gsam` (GroundingDINO then SAM, crce.masks_gsam) or a class named
`module:Class` (the toy world's foreground): built with the device, it answers
`masks(images, label, threshold)` with one boolean array per image, or None for an image
where it finds nothing. Such an image is masked whole (the official route crashes there:
`max()` of no detection), and the job's log and the set's metadata count how often.
"""

from __future__ import annotations

import logging

import numpy as np

from .plugins import PluginError, load_object

log = logging.getLogger(__name__)

GSAM = "gsam"


def segmenter(spec: dict, device):
    """The request's segmenter; `gsam` loads its two models (`detector`, `sam`)."""
    if spec["segmenter"] == GSAM:
        from .masks_gsam import GroundedSam

        return GroundedSam(device=device, detector=spec["detector"], segmenter=spec["sam"])
    return load_object(spec["segmenter"], "segmenter")(device=device)


def segment_images(spec: dict, paths: list[str], device) -> tuple[np.ndarray, int]:
    """[n, H, W] uint8 masks (1 inside) of `spec["label"]` in each image, and how many
    images fell back to the whole image."""
    from PIL import Image

    from .masks_gsam import MaskModelError

    try:
        found = segmenter(spec, device)
    except (MaskModelError, PluginError) as err:  # say whose masks they were
        raise type(err)(f"masks of {spec['label']!r}: {err}") from err
    images = [Image.open(p).convert("RGB") for p in paths]
    masks = found.masks(images, spec["label"], spec["threshold"])
    out, whole = [], 0
    for image, mask in zip(images, masks, strict=True):
        if mask is None or not mask.any():
            whole += 1
            mask = np.ones((image.height, image.width), dtype=bool)
        out.append(mask.astype(np.uint8))
    if whole:
        log.warning("%d of %d images: no %r found, masked whole", whole, len(paths), spec["label"])
    return np.stack(out), whole
