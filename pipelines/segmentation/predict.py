"""What segmentation adds to predict and serving: the classes a mask holds, and for each image a
class-mask PNG in palette mode (pixel value = class id: 0 background, 1..K the label map's ids;
colours as everywhere, pipelines/viz.py) and an overlay PNG of the image with its classes tinted and
outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.model_store import MASK_OUTPUT
from pipelines.viz import mask_image, overlay

BACKGROUND = "background"


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

    def __init__(self, labels: dict[int, str], metadata: dict):
        self.labels = labels

    def __call__(self, image: np.ndarray, outputs: dict, stem: Path) -> dict:
        mask = outputs[MASK_OUTPUT][0]
        mask_path, overlay_path = stem.with_name(stem.name + "_mask.png"), stem.with_name(stem.name + "_overlay.png")
        mask_image(mask).save(mask_path)
        Image.fromarray(overlay(image, mask)).save(overlay_path)
        return {"classes": class_pixels(mask, self.labels), "mask": str(mask_path), "overlay": str(overlay_path)}
