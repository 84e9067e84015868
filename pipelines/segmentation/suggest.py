"""Segmentation's part of `make suggest` (pipelines/annotator/suggest.py): how unsure the segmenter is about
one image, from the suggest signature's class probabilities (at the model's input size).

Pixel entropy (normalized by log of the number of classes, so 0..1) averaged over the pixels that are
foreground or next to it: predicted foreground, pixels with a foreground probability of 0.25 or more, and
a border of 1/32 of the image around them. The background far from any object is left out: it is nearly
always certain and would dilute the score of an image with small objects; what remains is where a person's
correction changes the mask (Wang et al. 2016, entropy sampling; Mackowiak et al. 2018, CEREALS, for
uncertainty concentrated at region borders).
"""

from __future__ import annotations

import numpy as np

from pipelines.model_store import PROBABILITIES_OUTPUT

FOREGROUND_PROBABILITY = 0.25


class Uncertainty:
    """view(signature outputs) -> the compact (score, share of the image scored) kept per image;
    uncertainty(view, None) -> (score, reason): module docstring. One view: no mirror image."""

    outputs = (PROBABILITIES_OUTPUT,)
    mirrored = False

    def __init__(self, metadata: dict, class_counts: dict[str, int] | None = None):
        del metadata, class_counts

    def __call__(self, view: tuple[float, float] | None, mirror=None) -> tuple[float, str]:
        if view is None:
            return 0.0, "no foreground found"
        score, share = view
        return score, f"mean pixel entropy {score:.2f} over {100 * share:.0f}% of the image (objects and their borders)"

    def view(self, outputs: dict, mirror: bool = False) -> tuple[float, float] | None:
        import cv2

        p = np.asarray(outputs[PROBABILITIES_OUTPUT][0], np.float64)
        classes = p.shape[-1]
        entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=-1) / np.log(max(classes, 2))
        foreground = (p.argmax(axis=-1) != 0) | (1.0 - p[..., 0] >= FOREGROUND_PROBABILITY)
        if not foreground.any():
            return None
        radius = max(1, round(min(p.shape[:2]) / 32))
        region = cv2.dilate(foreground.astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)) > 0
        return float(entropy[region].mean()), float(region.mean())
