"""What segmentation adds to predict and serving: the classes a mask holds, and for each image a
class-mask PNG in palette mode (pixel value = class id: 0 background, 1..K the label map's ids;
colours as everywhere, pipelines/viz.py) and an overlay PNG of the image with its classes tinted and
outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.workspace import UserError
from pipelines.model_store import MASK_OUTPUT
from pipelines.viz import mask_image, overlay

BACKGROUND = "background"
# The segmenter runs at most this many pixels on a side and scales its mask up to the image: its
# probabilities at full size would take H x W x classes floats (1.9 GB for a 6300x6300 photo).
MAX_MASK_SIDE_ENV = "PIPELINES_MAX_MASK_SIDE"
DEFAULT_MAX_MASK_SIDE = 2048


def working_size(height: int, width: int, max_side: int) -> tuple[int, int] | None:
    """(height, width) to run an image at so that its longer side is at most `max_side`; None when it fits."""
    scale = max_side / max(height, width)
    if scale >= 1:
        return None
    return max(1, round(height * scale)), max(1, round(width * scale))


def nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A class mask scaled to size = (height, width), nearest neighbour."""
    import cv2

    return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def class_pixels(mask: np.ndarray, labels: dict[int, str]) -> list[dict]:
    """The classes present in a mask, by id: label, pixels, share of the image."""
    ids, counts = np.unique(mask, return_counts=True)
    return [{"label": BACKGROUND if i == 0 else labels.get(int(i), str(int(i))), "class_id": int(i),
             "pixels": int(n), "fraction": round(float(n) / mask.size, 6)} for i, n in zip(ids, counts)]


class Predictions:
    """The segmentation part of `python -m pipelines predict` (pipelines/engine/predict.py): per image, the
    classes found ({"label", "class_id", "pixels", "fraction"}), NAME_mask.png and NAME_overlay.png."""

    outputs = (MASK_OUTPUT,)
    pictures = "class mask(s) and overlay(s)"

    def __init__(self, labels: dict[int, str], metadata: dict, min_area: int | None = None):
        from pipelines.annotator.drafts import default_min_area

        if min_area is not None and min_area < 0:
            raise UserError(None, f"--min-area {min_area} must be 0 or more pixels")
        self.labels = labels
        self.min_area = default_min_area() if min_area is None else min_area

    def run(self, serve, image: np.ndarray) -> dict:
        """The signature's outputs on one image, the mask at the image's size (an image larger than
        PIPELINES_MAX_MASK_SIDE on a side runs scaled down, its mask scaled back up)."""
        from pipelines.common import env_number
        from pipelines.serving.images import resize_to

        height, width = image.shape[:2]
        size = working_size(height, width, int(env_number(MAX_MASK_SIDE_ENV, DEFAULT_MAX_MASK_SIDE)))
        if size is None:
            return serve(image[None])
        outputs = serve(resize_to(image, size)[None])
        return {**outputs, MASK_OUTPUT: nearest(outputs[MASK_OUTPUT][0], (height, width))[None]}

    def drafts(self, image: np.ndarray, outputs: dict, model: str) -> list[dict]:
        """Each connected region of at least min_area pixels as a coco-annotator annotation."""
        from pipelines.annotator.drafts import region_annotations

        return region_annotations(outputs[MASK_OUTPUT][0], self.min_area, model)

    def __call__(self, image: np.ndarray, outputs: dict, stem: Path) -> dict:
        mask = outputs[MASK_OUTPUT][0]
        mask_path, overlay_path = stem.with_name(stem.name + "_mask.png"), stem.with_name(stem.name + "_overlay.png")
        mask_image(mask).save(mask_path)
        Image.fromarray(overlay(image, mask)).save(overlay_path)
        return {"classes": class_pixels(mask, self.labels), "mask": str(mask_path), "overlay": str(overlay_path)}
