"""Detection's part of `make suggest` (pipelines/annotator/suggest.py): how unsure the detector is about one
image, from the suggest signature's outputs (pipelines/detection/export.py: the image's detections, its
mirror image's, from one forward pass).

Each detection scored at least half the export's score threshold, in the image or in its mirror image, is
paired with its counterpart in the other view (same class, IoU >= 0.5, best scores first). A pair is
uncertain as far as its mean score is near the threshold (1 at the threshold, 0 at a score of 0 or 1) or
as far as the two views disagree (the score difference plus the mean score times 1 - IoU); a detection seen
in one view only disagrees by its score times 1.5, so a confident box the mirror image does not have counts
fully. The image's uncertainty is the sum over its detections, capped at 1 each: about the number of boxes
the person will have to fix, so an image with many doubtful objects comes before one with a single one
(Brust et al. 2019, sum of per-box uncertainties; Elezi et al. 2022 and Yu et al. 2022, CALD: agreement
between an image and its flipped copy).
"""

from __future__ import annotations

import numpy as np

from pipelines.detection.predict import default_score_threshold
from pipelines.model_store import DETECTION_OUTPUTS

MATCH_IOU = 0.5


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    y0, x0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    y1, x1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def _view(outputs: dict, prefix: str, floor: float):
    n = int(outputs[f"{prefix}num_detections"][0])
    scores = np.asarray(outputs[f"{prefix}detection_scores"][0][:n], np.float64)
    keep = scores >= floor
    return (np.asarray(outputs[f"{prefix}detection_boxes"][0][:n], np.float64)[keep], scores[keep],
            np.asarray(outputs[f"{prefix}detection_classes"][0][:n])[keep])


class Uncertainty:
    """uncertainty(outputs of the suggest signature on one image) -> (score, reason): module docstring."""

    outputs = (*DETECTION_OUTPUTS, *(f"mirror_{key}" for key in DETECTION_OUTPUTS))

    def __init__(self, metadata: dict):
        self.threshold = default_score_threshold(metadata)
        self.floor = self.threshold / 2

    def nearness(self, score: np.ndarray) -> np.ndarray:
        """1 at the threshold, falling linearly to 0 at whichever of 0 and 1 is farther from it."""
        t = self.threshold
        return np.clip(1.0 - np.abs(score - t) / max(t, 1.0 - t, 1e-6), 0.0, 1.0)

    def __call__(self, outputs: dict) -> tuple[float, str]:
        boxes, scores, classes = _view(outputs, "", self.floor)
        m_boxes, m_scores, m_classes = _view(outputs, "mirror_", self.floor / 2)
        free = np.ones(len(m_scores), bool)
        per_box, near, one_view = [], 0, 0
        for i in np.argsort(-scores, kind="stable"):
            candidates = np.flatnonzero(free & (m_classes == classes[i]))
            ious = _iou(boxes[i], m_boxes[candidates]) if len(candidates) else np.zeros(0)
            if len(ious) and ious.max() >= MATCH_IOU:
                j = candidates[int(np.argmax(ious))]
                free[j] = False
                mean = (scores[i] + m_scores[j]) / 2
                disagreement = abs(scores[i] - m_scores[j]) + mean * (1.0 - ious.max())
            else:
                mean, disagreement = scores[i] / 2, 1.5 * scores[i]
                one_view += 1
            closeness = float(self.nearness(np.asarray(mean)))
            near += closeness >= 0.5
            per_box.append(min(1.0, max(closeness, disagreement)))
        for j in np.flatnonzero(free & (m_scores >= self.floor)):  # seen in the mirror image only
            per_box.append(min(1.0, 1.5 * m_scores[j]))
            one_view += 1
        total = float(np.sum(per_box)) if per_box else 0.0
        if not per_box:
            return 0.0, f"nothing scored {self.floor:.2f} or more"
        parts = [f"{len(per_box)} box(es)"]
        if near:
            parts.append(f"{near} near the threshold {self.threshold:.2f}")
        if one_view:
            parts.append(f"{one_view} seen in only one of the image and its mirror image")
        return total, ", ".join(parts)
