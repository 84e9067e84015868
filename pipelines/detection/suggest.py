"""Detection's part of `make suggest` (pipelines/annotator/suggest.py): how unsure the detector is about one
image, from the suggest signature's detections (pipelines/detection/export.py) of the image and, for the
images the first pass finds most doubtful, of its mirror image.

First pass, every image: each detection scored at least half the export's score threshold is uncertain as
far as its score is near the threshold (1 at the threshold, 0 at a score of 0 or 1). Second pass, the
shortlisted images only (pipelines/annotator/suggest.py SHORTLIST): the mirror image is run too and each
detection is paired with its counterpart in the other view (same class, IoU >= 0.5, best scores first). A
pair is uncertain as far as its mean score is near the threshold or as far as the two views disagree (the
score difference plus the mean score times 1 - IoU); a detection seen in one view only disagrees by its score
times 1.5, so a confident box the mirror image does not have counts fully. The image's uncertainty is the sum
over its detections, capped at 1 each: about the number of boxes the person will have to fix, so an image
with many doubtful objects comes before one with a single one (Brust et al. 2019, sum of per-box
uncertainties; Elezi et al. 2022 and Yu et al. 2022, CALD: agreement between an image and its flipped copy).

Each box's part is weighted by its class: the labelled boxes' mean count per class over that class's count
(clipped to MIN_WEIGHT..MAX_WEIGHT), so that every class counts alike, as it does in the mean AP, and a
folder where one class makes most of the boxes does not rank images by that class's boxes alone (Brust et al.
2019, class weights by labelled frequency). Without labelled boxes, or when the labels name none of the
model's classes, every weight is 1.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipelines.detection.predict import default_score_threshold
from pipelines.model_store import DETECTION_OUTPUTS

MATCH_IOU = 0.5
MIN_WEIGHT, MAX_WEIGHT = 0.1, 10.0  # class weights (module docstring); a class with no labelled box: MAX_WEIGHT


class View(NamedTuple):
    """One view's detections at or above the floor: boxes [N, 4] (normalized, the image's frame), scores, classes."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def above(self, floor: float) -> View:
        keep = self.scores >= floor
        return View(self.boxes[keep], self.scores[keep], self.classes[keep])


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    y0, x0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    y1, x1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


class Uncertainty:
    """view(signature outputs) -> the compact View kept per image; uncertainty(view, mirror view or None) ->
    (score, reason): module docstring."""

    outputs = DETECTION_OUTPUTS
    mirrored = True  # the shortlisted images' score takes their mirror image's view too

    def __init__(self, metadata: dict, class_counts: dict[str, int] | None = None):
        self.threshold = default_score_threshold(metadata)
        self.floor = self.threshold / 2
        self.weights = class_weights(metadata.get("label_map") or {}, class_counts or {})

    def weight(self, class_id) -> float:
        return self.weights.get(int(class_id), 1.0)

    def view(self, outputs: dict, mirror: bool = False) -> View:
        """The first image's detections scored floor / 2 or more; `mirror`: it was the mirror image, its boxes
        are mapped back into the image's frame."""
        n = int(outputs["num_detections"][0])
        found = View(np.asarray(outputs["detection_boxes"][0][:n], np.float64),
                     np.asarray(outputs["detection_scores"][0][:n], np.float64),
                     np.asarray(outputs["detection_classes"][0][:n])).above(self.floor / 2)
        if mirror:  # [ymin, xmin, ymax, xmax] of the mirror image -> of the image
            b = found.boxes
            found = found._replace(boxes=np.stack([b[:, 0], 1.0 - b[:, 3], b[:, 2], 1.0 - b[:, 1]], axis=-1))
        return found

    def nearness(self, score: np.ndarray) -> np.ndarray:
        """1 at the threshold, falling linearly to 0 at whichever of 0 and 1 is farther from it."""
        t = self.threshold
        return np.clip(1.0 - np.abs(score - t) / max(t, 1.0 - t, 1e-6), 0.0, 1.0)

    def __call__(self, image: View, mirror: View | None = None) -> tuple[float, str]:
        image = image.above(self.floor)
        per_box, near, one_view = [], 0, 0
        if mirror is None:
            closeness = self.nearness(image.scores)
            per_box = [c * self.weight(k) for c, k in zip(closeness, image.classes)]
            near = int((closeness >= 0.5).sum())
        else:
            free = np.ones(len(mirror.scores), bool)
            for i in np.argsort(-image.scores, kind="stable"):
                candidates = np.flatnonzero(free & (mirror.classes == image.classes[i]))
                ious = _iou(image.boxes[i], mirror.boxes[candidates]) if len(candidates) else np.zeros(0)
                if len(ious) and ious.max() >= MATCH_IOU:
                    j = candidates[int(np.argmax(ious))]
                    free[j] = False
                    mean = (image.scores[i] + mirror.scores[j]) / 2
                    disagreement = abs(image.scores[i] - mirror.scores[j]) + mean * (1.0 - ious.max())
                else:
                    mean, disagreement = image.scores[i] / 2, 1.5 * image.scores[i]
                    one_view += 1
                closeness = float(self.nearness(np.asarray(mean)))
                near += closeness >= 0.5
                per_box.append(min(1.0, max(closeness, disagreement)) * self.weight(image.classes[i]))
            for j in np.flatnonzero(free & (mirror.scores >= self.floor)):  # seen in the mirror image only
                per_box.append(min(1.0, 1.5 * mirror.scores[j]) * self.weight(mirror.classes[j]))
                one_view += 1
        if not per_box:
            return 0.0, f"nothing scored {self.floor:.2f} or more"
        parts = [f"{len(per_box)} box(es)"]
        if near:
            parts.append(f"{near} near the threshold {self.threshold:.2f}")
        if one_view:
            parts.append(f"{one_view} seen in only one of the image and its mirror image")
        return float(np.sum(per_box)), ", ".join(parts)


def class_weights(label_map: dict, counts: dict[str, int]) -> dict[int, float]:
    """{class id: weight} (module docstring) from the export's label map ({id: name}) and the labelled boxes
    per class name; {} (every weight 1) when the labelled boxes name none of the classes."""
    names = {int(k): str(v) for k, v in label_map.items()}
    seen = {k: counts.get(name, 0) for k, name in names.items()}
    total = sum(seen.values())
    if not total:
        return {}
    mean = total / len(seen)
    return {k: float(np.clip(mean / n, MIN_WEIGHT, MAX_WEIGHT)) if n else MAX_WEIGHT for k, n in seen.items()}
