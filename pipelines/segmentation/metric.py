"""Segmentation's metric, written once for training (the validation mean IoU that picks the best
checkpoint) and for `make eval` (metrics.json): a confusion matrix of pixel counts and the IoUs of it.

One rule for the truth's class ids, in both: pixels labelled IGNORE_LABEL (255) are left out, and so
are ids outside 0..C-1 (a mask written with another label map), as the loss leaves them out; those are
counted (`out_of_range_pixels`), and `make eval` reports the count. A predicted id outside 0..C-1
cannot come from an argmax over C classes: it is a ValueError.

IoU of a class = true positives / (true + predicted - true positives) pixels. A class absent from both
the truth and the predictions has no IoU and is left out of the means.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras

from pipelines.examples import IGNORE_LABEL
from pipelines.segmentation import TASK

METRIC = TASK.metric  # mean IoU: the validation metric that picks the best checkpoint


def _checked(truth, pred, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth of shape {truth.shape} and prediction of shape {pred.shape}")
    bad = pred[(pred < 0) | (pred >= num_classes)]
    if bad.size:
        raise ValueError(f"prediction has class id {int(bad[0])}, outside 0..{num_classes - 1}")
    return truth, pred, (truth >= 0) & (truth < num_classes)


def confusion_matrix(truth, pred, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes] pixel counts, rows = true class, columns = predicted class; truth
    ids outside 0..num_classes - 1 (IGNORE_LABEL among them) left out."""
    truth, pred, counted = _checked(truth, pred, num_classes)
    truth, pred = truth[counted].astype(np.int64), pred[counted].astype(np.int64)
    counts = np.bincount(truth * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def out_of_range_pixels(truth, num_classes: int) -> int:
    """Pixels of `truth` left out of the counts for an id outside 0..num_classes - 1 other than IGNORE_LABEL."""
    truth = np.asarray(truth)
    return int(np.sum(((truth < 0) | (truth >= num_classes)) & (truth != IGNORE_LABEL)))


def class_ious(cm) -> np.ndarray:
    """float64 [C]: each class's IoU, NaN for a class in neither the truth nor the predictions."""
    cm = np.asarray(cm, dtype=np.float64)
    hits = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, hits / np.where(union > 0, union, 1), np.nan)


def mean_iou(cm) -> float:
    """Mean IoU of the classes present in the truth or the predictions (0 when none is)."""
    ious = class_ious(cm)
    return float(np.nanmean(ious)) if not np.isnan(ious).all() else 0.0


def iou_metrics(cm, names: list[str]) -> dict:
    """Metrics of a confusion matrix (rows = truth) whose classes are `names` (index 0 = background):
    {"mean_iou" (classes present, background included), "mean_iou_foreground" (classes 1..K present),
    "pixel_accuracy", "per_class": {name: {"class_id", "iou", "true_pixels", "predicted_pixels"}}}; means
    and accuracy are None when nothing is there. A class predicted but absent from the truth counts with
    IoU 0."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {len(names)} class names")
    ious = [None if np.isnan(iou) else float(iou) for iou in class_ious(cm)]
    present = [iou for iou in ious if iou is not None]
    present_foreground = [iou for iou in ious[1:] if iou is not None]
    true, predicted, total = cm.sum(axis=1), cm.sum(axis=0), int(cm.sum())
    return {
        "mean_iou": float(np.mean(present)) if present else None,
        "mean_iou_foreground": float(np.mean(present_foreground)) if present_foreground else None,
        "pixel_accuracy": float(np.diag(cm).sum() / total) if total else None,
        "per_class": {name: {"class_id": c, "iou": ious[c], "true_pixels": int(true[c]),
                             "predicted_pixels": int(predicted[c])} for c, name in enumerate(names)},
    }


def class_names(labels: dict[int, str], num_classes: int) -> list[str]:
    """Names of the model's classes 0..K: "background", then the label map's (the id where it has none)."""
    names = ["background"] + [labels.get(i, str(i)) for i in range(1, num_classes + 1)]
    if names.count("background") > 1:  # a label-map class named so: keep the names distinct keys
        names[0] = "(background)"
    return names


# --------------------------------------------------------------------------------- in the training graph


def confusion_matrix_tf(labels, logits, num_classes: int):
    """The same counts inside a tf.function, as float32 [C, C] from (masks, logits): the argmax of the
    logits is the prediction; the same truth ids left out. float32 counts are exact while a call sees fewer
    than 2**24 pixels (64 images of 512x512); MeanIoU adds them up in float64."""
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    predictions = tf.reshape(tf.argmax(logits, axis=-1, output_type=tf.int32), [-1])
    counted = (labels >= 0) & (labels < num_classes)  # also leaves out IGNORE_LABEL (255): C <= 255
    index = tf.where(counted, labels * num_classes + predictions, 0)
    counts = tf.math.bincount(index, weights=tf.cast(counted, tf.float32), minlength=num_classes * num_classes,
                              maxlength=num_classes * num_classes)
    return tf.reshape(counts, [num_classes, num_classes])


class MeanIoU(tf_keras.metrics.Metric):
    """Mean IoU over a confusion matrix of (masks, logits) batches, the `mean_iou` rule in the graph.
    reset_state / update_state / result, summed over replicas by Keras."""

    def __init__(self, num_classes: int, name: str = METRIC, **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.confusion = self.add_weight(name="confusion", shape=(num_classes, num_classes),
                                         dtype=tf.float64, initializer="zeros")

    def update_state(self, labels, logits, sample_weight=None):
        del sample_weight
        self.confusion.assign_add(tf.cast(confusion_matrix_tf(labels, logits, self.num_classes), tf.float64))

    def result(self):
        confusion = tf.convert_to_tensor(self.confusion)
        hits = tf.linalg.diag_part(confusion)
        union = tf.reduce_sum(confusion, 0) + tf.reduce_sum(confusion, 1) - hits
        present = union > 0
        ious = tf.where(present, hits / tf.where(present, union, 1.0), 0.0)
        count = tf.reduce_sum(tf.cast(present, tf.float64))
        return tf.cast(tf.math.divide_no_nan(tf.reduce_sum(ious), count), tf.float32)

    def reset_state(self):
        self.confusion.assign(tf.zeros_like(self.confusion))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}
