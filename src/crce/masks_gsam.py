"""Grounded SAM through transformers' own classes: MACE's transformers route
(Shilin-LU/MACE at 057e7a6, transformer_gsam_utils.py and data_preparation_transformers.py):
GroundingDINO (`IDEA-Research/grounding-dino-base`) finds boxes of the label above the box
threshold (0.3) as transformers' zero-shot-object-detection pipeline does (the label's tokens,
the image processor, `post_process_object_detection`, boxes as whole pixels), SAM
(`facebook/sam-vit-huge`) masks the best-scoring box (any of its three masks), and the mask
is refined to its largest outer contour, filled (`polygon_refinement=True`, opencv).

Two official defects are fixed (README fidelity table): the route passes the concept as a
string where a list of labels is read, so each character becomes a label ("s.", "h.", ...):
here the concept is one label; and it crashes when nothing is detected (`max()` of no
detection): here the image is masked whole (crce.masks counts how often). SAM decodes each box
alone, so masking only the best box gives the mask the official keeps of all of them. The
paper's configs name the SAM-HQ route (`use_sam_hq`), which needs the Grounded-Segment-Anything
repository built with CUDA; SAM through transformers is the route the MACE README gives for
that case, and what runs here offline.
"""

from __future__ import annotations

import numpy as np

DETECTOR = "IDEA-Research/grounding-dino-base"
SEGMENTER = "facebook/sam-vit-huge"


class MaskModelError(RuntimeError):
    pass


def polygon_refined(mask: np.ndarray) -> np.ndarray | None:
    """The largest outer contour of the mask, filled (mask_to_polygon + polygon_to_mask)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)  # fmt: skip
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    filled = np.zeros(mask.shape, dtype=np.uint8)
    cv2.fillPoly(filled, [largest.reshape(-1, 2).astype(np.int32)], color=(255,))
    return filled > 0


class GroundedSam:
    def __init__(self, device="cpu", detector: str = DETECTOR, segmenter: str = SEGMENTER,
                 polygon: bool = True):  # fmt: skip
        import torch
        from transformers import (
            AutoModelForZeroShotObjectDetection,
            AutoProcessor,
            SamModel,
            SamProcessor,
        )

        self.device, self.polygon, self.torch = torch.device(device), polygon, torch
        try:
            self.detection = AutoProcessor.from_pretrained(detector)
            self.detector = AutoModelForZeroShotObjectDetection.from_pretrained(detector)
            self.segmentation = SamProcessor.from_pretrained(segmenter)
            self.segmenter = SamModel.from_pretrained(segmenter)
        except Exception as err:  # OSError, ValueError: a missing or unreadable folder or id
            raise MaskModelError(
                f"cannot load the mask models (detector {detector!r}, SAM {segmenter!r}): "
                f"{type(err).__name__}: {err}. On a cluster without internet run the "
                "`download` target first."
            ) from err
        self.detector.to(self.device).eval()
        self.segmenter.to(self.device).eval()

    def box(self, image, label: str, threshold: float) -> list[int] | None:
        """The best box of `label` above `threshold` (xmin, ymin, xmax, ymax), or None."""
        text = label if label.endswith(".") else f"{label}."  # transformer_gsam_utils.py L136
        tokens = self.detection.tokenizer(text, return_tensors="pt").to(self.device)
        pixels = self.detection.image_processor(image, return_tensors="pt").to(self.device)
        with self.torch.no_grad():
            outputs = self.detector(**tokens, **pixels)
        found = self.detection.image_processor.post_process_object_detection(
            outputs, threshold=threshold, target_sizes=[(image.height, image.width)]
        )[0]
        if not len(found["scores"]):
            return None
        return found["boxes"][int(found["scores"].argmax())].int().tolist()

    def mask(self, image, box: list[int]) -> np.ndarray | None:
        inputs = self.segmentation(images=image, input_boxes=[[box]], return_tensors="pt")
        inputs = inputs.to(self.device)
        with self.torch.no_grad():
            outputs = self.segmenter(**inputs)
        masks = self.segmentation.post_process_masks(
            masks=outputs.pred_masks.cpu(),
            original_sizes=inputs["original_sizes"].cpu(),
            reshaped_input_sizes=inputs["reshaped_input_sizes"].cpu(),
        )[0]
        mask = (masks[0].float().mean(0) > 0).numpy()  # refine_masks: any of the three
        return polygon_refined(mask) if self.polygon else mask

    def masks(self, images, label: str, threshold: float) -> list[np.ndarray | None]:
        out = []
        for image in images:
            box = self.box(image, label, threshold)
            out.append(None if box is None else self.mask(image, box))
        return out
