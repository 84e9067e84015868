"""COCO evaluation on hand-made cases whose metrics are known."""

from __future__ import annotations

import pytest
from PIL import Image

from pipelines.detection.evaluate import choose_threshold, coco_eval, format_metrics, plot_pr

LABELS = {1: "cat", 2: "dog"}


def _case(n_images=4):
    images = [{"id": 10 + i, "width": 200, "height": 100, "file_name": f"{i}.jpg"} for i in range(n_images)]
    annotations = []
    for i in range(n_images):
        for k, cls in enumerate((1, 2)):
            x = 10 + 90 * k
            annotations.append({"id": len(annotations) + 1, "image_id": 10 + i, "category_id": cls,
                                "bbox": [x, 20, 60, 50], "area": 3000.0, "iscrowd": 0})
    return images, annotations


def _detections(annotations, keep=lambda a: True, shift=0.0, category=None, score=0.9):
    return [{"image_id": a["image_id"], "category_id": category or a["category_id"], "score": score,
             "bbox": [a["bbox"][0] + shift, a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
            for a in annotations if keep(a)]


def test_perfect_detections_score_one():
    images, annotations = _case()
    stats, per_class, _ = coco_eval(images, annotations, _detections(annotations), LABELS)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)
    assert per_class == {"cat": {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)},
                         "dog": {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}}
    assert stats["APs"] == -1.0 and stats["APm"] == pytest.approx(1.0)  # area 3000 is "medium"


def test_wrong_class_or_place_scores_zero():
    images, annotations = _case()
    cats = _detections(annotations, keep=lambda a: a["category_id"] == 1)
    dogs_called_cats = _detections(annotations, keep=lambda a: a["category_id"] == 2, category=1, score=0.5)
    stats, per_class, _ = coco_eval(images, annotations, cats + dogs_called_cats, LABELS)
    assert per_class["dog"]["AP"] == 0.0
    assert per_class["cat"]["AP"] == pytest.approx(1.0)  # its false positives all rank below its hits
    stats, _, _ = coco_eval(images, annotations, _detections(annotations, shift=200.0), LABELS)
    assert stats["AP"] == 0.0
    stats, _, _ = coco_eval(images, annotations, [], LABELS)
    assert stats["AP"] in (0.0, -1.0) and stats["AR100"] in (0.0, -1.0)


def test_half_found_and_loose_boxes():
    images, annotations = _case()
    stats, _, _ = coco_eval(images, annotations, _detections(annotations, keep=lambda a: a["image_id"] < 12), LABELS)
    assert stats["AR100"] == pytest.approx(0.5)
    assert stats["AP"] == pytest.approx(0.5, abs=0.02)  # precision 1 up to recall 0.5, then 0
    # Shifted by 15 px of 60: IoU 2250/3750 = 0.6, a hit at the thresholds 0.50, 0.55 and 0.60: AP = 3/10.
    stats, _, _ = coco_eval(images, annotations, _detections(annotations, shift=15.0), LABELS)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == 0.0
    assert stats["AP"] == pytest.approx(0.3, abs=0.01)


def test_crowd_regions_are_ignored(tmp_path):
    images, annotations = _case(1)
    annotations.append({"id": 99, "image_id": 10, "category_id": 1, "bbox": [0, 0, 200, 100], "area": 20000.0,
                        "iscrowd": 1})
    detections = _detections(annotations[:2]) + [
        {"image_id": 10, "category_id": 1, "score": 0.5, "bbox": [150, 5, 40, 40]}]  # inside the crowd region
    stats, per_class, evaluator = coco_eval(images, annotations, detections, LABELS)
    assert per_class["cat"]["AP"] == pytest.approx(1.0)  # the extra box matched the crowd: no false positive
    plot_pr(evaluator, LABELS, tmp_path / "pr.png")
    assert Image.open(tmp_path / "pr.png").size[0] > 500


def _scored(annotation, score, shift=0.0):
    return _detections([annotation], shift=shift, score=score)[0]


def test_default_threshold_maximises_f1_over_all_classes():
    images, annotations = _case()  # 8 objects: a cat and a dog in each of 4 images
    cats = [a for a in annotations if a["category_id"] == 1]
    dogs = [a for a in annotations if a["category_id"] == 2]
    detections = [
        _scored(cats[0], 0.9), _scored(cats[1], 0.85), _scored(cats[2], 0.8),
        _scored(cats[3], 0.75, shift=100.0),  # misplaced: a false positive
        _scored(dogs[0], 0.7), _scored(dogs[3], 0.6, shift=-100.0),  # a hit, a false positive
        _scored(dogs[1], 0.4), _scored(dogs[2], 0.35),
        _scored(cats[0], 0.3, shift=100.0), _scored(dogs[1], 0.2, shift=-100.0)]
    _, _, evaluator = coco_eval(images, annotations, detections, LABELS)
    point = choose_threshold(evaluator, LABELS)
    # Ranked: 0.9 T, 0.85 T, 0.8 T, 0.75 F, 0.7 T, 0.6 F, 0.4 T, 0.35 T, 0.3 F, 0.2 F. F1 after each:
    # .222 .400 .545 .500 .615 .571 .667 .750 .706 .667: the best keeps the first 8 (6 hits of 8 objects).
    assert point["score_threshold"] == pytest.approx(0.35)
    assert point["precision"] == pytest.approx(0.75) and point["recall"] == pytest.approx(0.75)
    assert point["f1"] == pytest.approx(0.75)
    assert point["detections"] == 8 and point["objects"] == 8 and point["iou"] == pytest.approx(0.5)
    assert point["per_class"] == {
        "cat": {"precision": pytest.approx(0.75), "recall": pytest.approx(0.75), "objects": 4, "detections": 4},
        "dog": {"precision": pytest.approx(0.75), "recall": pytest.approx(0.75), "objects": 4, "detections": 4}}
    text = format_metrics({"metrics": dict.fromkeys(["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"], 0.5),
                           "images": 4, "objects": 8, "step": 1, "per_class": {"cat": {"AP": 0.5, "AP50": 0.5}},
                           "operating_point": point})
    assert "default score threshold 0.350" in text and "precision 0.750, recall 0.750" in text


def test_default_threshold_keeps_equal_scores_together_and_ignores_crowd_matches():
    images, annotations = _case(1)  # a cat and a dog
    annotations.append({"id": 99, "image_id": 10, "category_id": 1, "bbox": [0, 0, 200, 100], "area": 20000.0,
                        "iscrowd": 1})
    cat, dog = annotations[0], annotations[1]
    detections = [_scored(cat, 0.8), _scored(dog, 0.6), _scored(dog, 0.6, shift=-100.0),
                  {"image_id": 10, "category_id": 1, "score": 0.95, "bbox": [150, 5, 40, 40]}]  # on the crowd
    _, _, evaluator = coco_eval(images, annotations, detections, LABELS)
    point = choose_threshold(evaluator, LABELS)
    # The crowd match counts neither way; at 0.6 both dogs come in together: F1 at 0.8 is 2/3 (P 1, R 0.5),
    # at 0.6 it is 0.8 (P 2/3, R 1). Stopping between the two 0.6s is no threshold.
    assert point["score_threshold"] == pytest.approx(0.6)
    assert point["precision"] == pytest.approx(2 / 3) and point["recall"] == pytest.approx(1.0)
    assert point["detections"] == 3 and point["objects"] == 2


def test_no_detection_no_threshold():
    images, annotations = _case(1)
    _, _, evaluator = coco_eval(images, annotations, [], LABELS)
    assert choose_threshold(evaluator, LABELS) is None


def test_confusion_counts_right_wrong_missed_and_false_detections():
    """[truth, prediction] with background last: a right box on the diagonal, a box of the wrong class off it,
    an object nobody found in the background column, a detection of nothing in the background row; below
    the threshold, detections do not count; each true box is claimed once."""
    from pipelines.detection.evaluate import confusion

    images, annotations = _case(n_images=2)  # per image: a cat at x 10-70, a dog at x 100-160
    cat0, dog0, cat1, _ = annotations
    detections = _detections([cat0], score=0.9)  # right
    detections += _detections([cat0], score=0.8)  # the same cat again: its box is claimed, so a false detection
    detections += _detections([dog0], category=1, score=0.7)  # a dog called cat
    detections += _detections([cat1], score=0.2)  # below the threshold: the cat of image 1 is missed
    detections += [{"image_id": 11, "category_id": 2, "score": 0.95, "bbox": [10, 80, 5, 5]}]  # nothing there
    counts = confusion(annotations, detections, [1, 2], threshold=0.5)
    # rows: true cat, dog, background; columns: predicted cat, dog, background
    assert counts.tolist() == [[1, 0, 1],   # cat: found once, missed once (image 1)
                               [1, 0, 1],   # dog: taken for a cat (image 0), missed (image 1)
                               [1, 1, 0]]   # background: the repeated cat, the dog box on nothing
    assert confusion(annotations, detections, [1, 2], threshold=0.1)[0].tolist() == [2, 0, 0]


def test_threshold_plot_marks_the_chosen_threshold(tmp_path):
    from pipelines.detection.evaluate import plot_threshold

    images, annotations = _case()
    detections = _detections(annotations, score=0.8) + _detections(annotations, shift=45.0, score=0.4)
    _, _, evaluator = coco_eval(images, annotations, detections, LABELS)
    point = choose_threshold(evaluator, LABELS)
    assert point["score_threshold"] == pytest.approx(0.8) and point["f1"] == pytest.approx(1.0)
    assert plot_threshold(evaluator, point, tmp_path / "threshold.png")
    assert Image.open(tmp_path / "threshold.png").size[0] > 500
    _, _, empty = coco_eval(images, annotations, [], LABELS)
    assert not plot_threshold(empty, None, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
