"""Segmentation metrics on hand-made masks whose IoU is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.segmentation.evaluate import draw_predictions, format_metrics, plot_confusion_matrix
from pipelines.segmentation.metric import (MeanIoU, class_names, confusion_matrix, confusion_matrix_tf, iou_metrics,
                                           mean_iou, out_of_range_pixels)

NAMES = ["background", "cat", "dog", "bird"]


def test_hand_computed_case():
    truth = np.array([[0, 1, 1],
                      [0, 2, 255]])
    pred = np.array([[0, 1, 2],
                     [1, 2, 2]])  # the last pixel is ignored: its prediction must not count
    cm = confusion_matrix(truth, pred, 4)
    assert cm.tolist() == [[1, 1, 0, 0],
                           [0, 1, 1, 0],
                           [0, 0, 1, 0],
                           [0, 0, 0, 0]]
    m = iou_metrics(cm, NAMES)
    # background: 1 hit / (2 true + 1 predicted - 1) = 1/2; cat: 1 / (2 + 2 - 1) = 1/3; dog: 1 / (1 + 2 - 1) = 1/2;
    # bird is in neither the truth nor the predictions: no IoU, left out of the means.
    assert m["per_class"]["background"] == {"class_id": 0, "iou": pytest.approx(0.5), "true_pixels": 2,
                                            "predicted_pixels": 1}
    assert m["per_class"]["cat"]["iou"] == pytest.approx(1 / 3)
    assert m["per_class"]["dog"] == {"class_id": 2, "iou": pytest.approx(0.5), "true_pixels": 1, "predicted_pixels": 2}
    assert m["per_class"]["bird"] == {"class_id": 3, "iou": None, "true_pixels": 0, "predicted_pixels": 0}
    assert m["mean_iou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert m["mean_iou_foreground"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)
    json.dumps(m)  # plain Python types only


def test_perfect_and_false_positive_classes():
    truth = np.array([[0, 0, 1],
                      [0, 1, 1]])
    m = iou_metrics(confusion_matrix(truth, truth, 4), NAMES)
    assert m["mean_iou"] == 1.0 and m["mean_iou_foreground"] == 1.0 and m["pixel_accuracy"] == 1.0
    assert m["per_class"]["dog"]["iou"] is None and m["per_class"]["bird"]["iou"] is None

    # A class predicted where the truth has none is a false positive: IoU 0, and it counts in the means.
    pred = np.array([[0, 3, 1],
                     [0, 1, 1]])
    m = iou_metrics(confusion_matrix(truth, pred, 4), NAMES)
    assert m["per_class"]["bird"]["iou"] == 0.0
    assert m["per_class"]["background"]["iou"] == pytest.approx(2 / 3)
    assert m["mean_iou"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["mean_iou_foreground"] == pytest.approx((1 + 0) / 2)
    assert m["pixel_accuracy"] == pytest.approx(5 / 6)


def test_foreground_mean_without_any_foreground():
    truth = np.zeros((2, 3), dtype=np.uint8)
    m = iou_metrics(confusion_matrix(truth, truth, 4), NAMES)
    assert m["mean_iou"] == 1.0 and m["mean_iou_foreground"] is None


def test_everything_ignored():
    truth = np.full((2, 3), 255, dtype=np.uint8)
    cm = confusion_matrix(truth, np.ones((2, 3), dtype=np.int32), 4)
    assert cm.sum() == 0
    m = iou_metrics(cm, NAMES)
    assert m["mean_iou"] is None and m["mean_iou_foreground"] is None and m["pixel_accuracy"] is None


def test_images_add_up_and_match_a_pixel_loop():
    rng = np.random.default_rng(0)
    truths = [rng.choice([0, 1, 2, 3, 255], size=(7, 11)).astype(np.uint8) for _ in range(3)]
    preds = [rng.integers(0, 4, size=(7, 11)).astype(np.int32) for _ in range(3)]
    total = sum(confusion_matrix(t, p, 4) for t, p in zip(truths, preds))
    expected = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(truths, preds):
        for a, b in zip(t.ravel(), p.ravel()):
            if a != 255:
                expected[a, b] += 1
    assert (total == expected).all()
    assert total.dtype == np.int64


def test_out_of_range_truth_is_left_out_and_counted_the_same_in_training_and_evaluation():
    """One rule for ids the model does not have (a mask from another label map): training's metric (in the
    graph) and evaluation's (NumPy) both leave them out like 255 and give the same counts and mean IoU;
    evaluation reports how many pixels it left out."""
    import tensorflow as tf

    truth = np.array([[0, 7, 1, 255], [3, 3, 9, 1]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 3], [3, 2, 1, 0]])
    counts = confusion_matrix(truth, pred, 4)
    assert counts.sum() == 5 and out_of_range_pixels(truth, 4) == 2
    in_graph = confusion_matrix_tf(tf.constant(truth), tf.one_hot(pred, 4), 4).numpy()
    assert (in_graph == counts).all()
    metric = MeanIoU(4)
    metric.update_state(tf.constant(truth), tf.one_hot(pred, 4))
    assert float(metric.result()) == pytest.approx(mean_iou(counts), abs=1e-6)
    assert mean_iou(counts) == pytest.approx(iou_metrics(counts, NAMES)["mean_iou"])
    text = format_metrics({"images": 1, "pixels": 5, "ignored_pixels": 1, "step": 1, "out_of_range_pixels": 2,
                           "first_out_of_range": "a.png", "metrics": iou_metrics(counts, NAMES),
                           "per_class": iou_metrics(counts, NAMES)["per_class"]})
    assert "warning: 2 pixel(s) of the val masks have class ids the model does not have (first in a.png)" in text


def test_bad_predictions_and_shapes_are_errors():
    with pytest.raises(ValueError, match="prediction has class id 4"):
        confusion_matrix(np.array([[0, 1]]), np.array([[0, 4]]), 4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match="4 class names"):
        iou_metrics(np.zeros((3, 3)), NAMES)


def test_class_names():
    assert class_names({1: "cat", 2: "dog"}, 3) == ["background", "cat", "dog", "3"]
    assert class_names({1: "background"}, 1) == ["(background)", "background"]  # distinct keys in per_class


def test_plots_and_table(tmp_path):
    truth = np.array([[0, 1, 1], [0, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 2], [1, 2, 2]], dtype=np.int32)
    cm = confusion_matrix(truth, pred, 4) * 1500
    plot_confusion_matrix(cm, NAMES, tmp_path / "cm.png")
    assert Image.open(tmp_path / "cm.png").size[0] >= 500

    image = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    big_truth = np.kron(truth, np.ones((20, 20), dtype=np.uint8))
    big_pred = np.kron(pred, np.ones((20, 20), dtype=np.int32))
    draw_predictions([(image, big_truth, big_pred, "some/file.jpg")] * 3, NAMES, tmp_path / "pred.png")
    sheet = Image.open(tmp_path / "pred.png")
    assert sheet.size[0] == 4 * 300 and sheet.size[1] > 2 * 300

    m = iou_metrics(cm, NAMES)
    text = format_metrics({"images": 1, "pixels": int(cm.sum()), "ignored_pixels": 1500, "step": 7,
                           "metrics": {k: m[k] for k in ("mean_iou", "mean_iou_foreground", "pixel_accuracy")},
                           "per_class": m["per_class"]})
    assert "cat" in text and "33.3" in text and "n/a" in text and "mean IoU 44.4%" in text


def test_wrong_pixels_are_striped_and_right_ones_untouched():
    from pipelines.viz import WRONG_COLOR, mark_wrong

    image = np.full((40, 50, 3), 100, np.uint8)
    wrong = np.zeros((40, 50), bool)
    wrong[10:30, 20:45] = True
    marked = mark_wrong(image, wrong)
    white = (marked == WRONG_COLOR).all(axis=-1)
    assert not white[~wrong].any() and (marked[~wrong] == 100).all()  # right pixels as they were
    assert 0.2 < white[wrong].mean() < 0.6  # stripes and outline, the region's colour still between them
    assert white[10, 20:45].all() and white[10:30, 20].all()  # its outline
