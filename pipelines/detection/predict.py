"""What detection adds to predict and serving: the signature's outputs as detections (label, class id,
score, box in the image's pixels), and each image drawn with its boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.workspace import UserError
from pipelines.model_store import DETECTION_OUTPUTS
from pipelines.viz import draw_detections


DEFAULT_SCORE_THRESHOLD = 0.5  # when the validation set cannot choose one (no detection or no object)


def default_score_threshold(metadata: dict) -> float:
    """The export's default score threshold (metadata.json, chosen on the val set by make eval), or
    DEFAULT_SCORE_THRESHOLD for an export written before it was stored."""
    value = metadata.get("score_threshold")
    ok = isinstance(value, (int, float)) and 0.0 <= value <= 1.0
    return float(value) if ok else DEFAULT_SCORE_THRESHOLD


def detections_of(outputs: dict, width: int, height: int, labels: dict[int, str], score_threshold: float) -> list[dict]:
    n = int(outputs["num_detections"][0])
    found = []
    for (ymin, xmin, ymax, xmax), score, cls in zip(outputs["detection_boxes"][0][:n],
                                                    outputs["detection_scores"][0][:n],
                                                    outputs["detection_classes"][0][:n]):
        if score < score_threshold:
            continue
        class_id = int(cls)
        found.append({"label": labels.get(class_id, str(class_id)), "class_id": class_id, "score": round(float(score), 4),
                      "box": {"xmin": round(float(xmin) * width, 1), "ymin": round(float(ymin) * height, 1),
                              "xmax": round(float(xmax) * width, 1), "ymax": round(float(ymax) * height, 1)}})
    return found


class Predictions:
    """The detection part of `python -m pipelines predict` (pipelines/engine/predict.py): per image, its
    detections at or above score_threshold (default: the export's, chosen on the val set) and NAME.png with
    their boxes drawn; for `make prelabel`, its boxes drafted as coco-annotator annotations (at most
    max_detections, best first)."""

    outputs = DETECTION_OUTPUTS
    pictures = "image(s) with boxes"

    def __init__(self, labels: dict[int, str], metadata: dict, score_threshold: float | None = None,
                 max_detections: int | None = None):
        if score_threshold is None:
            score_threshold = default_score_threshold(metadata)
        if not 0.0 <= score_threshold <= 1.0:
            raise UserError(None, f"--score {score_threshold} must be between 0 and 1")
        if max_detections is not None and max_detections < 1:
            raise UserError(None, f"--max-detections {max_detections} must be 1 or more")
        self.labels = labels
        self.score_threshold = score_threshold
        self.max_detections = max_detections

    def run(self, serve, image: np.ndarray) -> dict:
        """The signature's outputs on one image (it resizes to the network's input itself)."""
        return serve(image[None])

    def drafts(self, image: np.ndarray, outputs: dict, model: str) -> list[dict]:
        from pipelines.annotator.drafts import box_annotation

        h, w = image.shape[:2]
        found = detections_of(outputs, w, h, self.labels, self.score_threshold)[:self.max_detections]
        return [box_annotation(d["box"], d["class_id"], d["score"], model) for d in found]

    def __call__(self, image: np.ndarray, outputs: dict, stem: Path) -> dict:
        h, w = image.shape[:2]
        found = detections_of(outputs, w, h, self.labels, self.score_threshold)
        drawn = stem.with_name(stem.name + ".png")
        draw_detections(image, found).save(drawn)
        return {"detections": found, "drawn": str(drawn)}
