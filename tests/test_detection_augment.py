"""data_augmentation_options against the Object Detection API's own preprocessor.

Each option is run by pipelines/detection/augment.py with its random draws recorded; the same draws go to
the OD API's preprocessor_builder + preprocessor.preprocess (tests/odapi_oracle.py), and the images, boxes
and classes must agree. Then what the oracle cannot show: the draws follow the OD API's distributions, the
options read from a pipeline.config reach the training input, and bad settings are refused by name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from pipelines.config.textproto import TextProto
from pipelines.detection import augment
from pipelines.detection.config import AUGMENTATIONS, augmentation
from pipelines.workspace import REPO_ROOT, UserError

ZOO_CROP = ("random_crop_image { min_object_covered: 0.0 min_aspect_ratio: 0.75 max_aspect_ratio: 3.0 "
            "min_area: 0.75 max_area: 1.0 overlap_thresh: 0.0 random_coef: 0.375 }")
SSD_OPERATIONS = ("ssd_random_crop { operations { min_object_covered: 0.3 min_aspect_ratio: 0.5 max_aspect_ratio: 2.0 "
                  "min_area: 0.1 max_area: 1.0 overlap_thresh: 0.3 random_coef: 0.15 } "
                  "operations { min_object_covered: 0.7 min_aspect_ratio: 0.5 max_aspect_ratio: 2.0 min_area: 0.3 "
                  "max_area: 1.0 overlap_thresh: 0.7 clip_boxes: false random_coef: 0.0 } }")
# One pipeline.config snippet per case: every option, default and non-default settings, and a chain.
CONFIGS = [
    ["random_horizontal_flip { }"],
    ["random_vertical_flip { probability: 0.7 }"],
    ["random_rotation90 { }"],
    ["random_adjust_brightness { max_delta: 0.3 }"],
    ["random_adjust_contrast { }"],
    ["random_adjust_hue { max_delta: 0.1 }"],
    ["random_adjust_saturation { min_delta: 0.5 max_delta: 1.5 }"],
    ["random_distort_color { }"],
    ["random_distort_color { color_ordering: 1 }"],
    ["random_rgb_to_gray { probability: 0.5 }"],
    [ZOO_CROP],
    ["random_crop_image { min_object_covered: 0.5 min_area: 0.2 overlap_thresh: 0.7 clip_boxes: false }"],
    ["ssd_random_crop { }"],
    [SSD_OPERATIONS],
    ["random_image_scale { min_scale_ratio: 0.6 max_scale_ratio: 1.4 }"],
    ["random_pad_image { }"],
    ["random_pad_image { min_image_height: 70 min_image_width: 90 max_image_height: 120 max_image_width: 130 "
     "pad_color: [10.0, 20.0, 30.0] }"],
    ["random_scale_crop_and_pad_to_square { output_size: 96 scale_min: 0.5 scale_max: 2.0 }"],
    ["random_jitter_boxes { }"],
    ["random_jitter_boxes { ratio: 0.2 jitter_mode: SHRINK_SYMMETRIC_XY }"],
    ["random_jitter_boxes { ratio: 0.3 jitter_mode: EXPAND_SYMMETRIC }"],
    ["random_black_patches { max_black_patches: 4 probability: 0.6 size_to_image_ratio: 0.2 }"],
    ["random_horizontal_flip { }", ZOO_CROP, "random_distort_color { }"],
]
BOXES = np.array([[0.1, 0.1, 0.5, 0.4], [0.3, 0.5, 0.9, 0.95], [0.05, 0.6, 0.2, 0.9], [0.6, 0.05, 0.98, 0.3]],
                 np.float32)
CLASSES = np.array([1, 2, 3, 1], np.int64)


def _image(seed: int, height: int = 60, width: int = 80) -> np.ndarray:
    """A smooth colour picture with edges (hue, contrast and crops all change it visibly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    image = np.stack([255 * y, 255 * x, 128 + 100 * np.sin(8 * x * y)], -1) + rng.normal(0, 20, (height, width, 3))
    image[10:30, 20:45] = rng.integers(0, 255, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def _options(snippets: list[str]) -> list:
    """(name, settings) for each snippet, read by the config reader as a pipeline.config's would be."""
    doc = TextProto("".join(f"data_augmentation_options {{ {s} }}\n" for s in snippets))
    options = []
    for i, entry in enumerate(doc.find("data_augmentation_options")):
        option = entry.message.fields[0]
        options.append([option.name, augmentation(option.name, option.message, f"options[{i}].{option.name}")])
    return options


def _numpy(draws):
    if isinstance(draws, dict):
        return {k: _numpy(v) for k, v in draws.items()}
    if isinstance(draws, tuple):
        return tuple(_numpy(v) for v in draws)
    return draws.numpy()


def test_every_option_equals_the_odapi_preprocessor_on_the_same_draws(tmp_path):
    from tests.odapi_oracle import run_augment_oracle

    cases, ours = [], []
    for number, snippets in enumerate(CONFIGS):
        options = _options(snippets)
        for draw in range(3):
            tf.random.set_seed(1000 * number + draw)
            image = _image(draw)
            record: list = []
            out = augment.augment({"image": tf.cast(image, tf.float32), "boxes": tf.constant(BOXES),
                                   "groundtruth_classes": tf.constant(CLASSES)}, options, record)
            ours.append((snippets, draw, out))
            cases.append({"options": "".join(f"data_augmentation_options {{ {s} }}\n" for s in snippets),
                          "image": image, "boxes": BOXES, "classes": CLASSES, "draws": [_numpy(d) for d in record]})
    theirs = run_augment_oracle(cases, tmp_path)
    changed = 0
    for (snippets, draw, out), reference in zip(ours, theirs):
        what = f"{' + '.join(snippets)} (draw {draw})"
        assert out["image"].shape == reference["image"].shape, what
        np.testing.assert_allclose(out["image"].numpy(), reference["image"], atol=2e-3, err_msg=what)
        np.testing.assert_allclose(out["boxes"].numpy(), reference["boxes"], atol=1e-6, err_msg=what)
        assert out["groundtruth_classes"].numpy().tolist() == reference["classes"].tolist(), what
        changed += out["image"].shape != (60, 80, 3) or not np.allclose(out["boxes"].numpy(), BOXES)
    assert changed > 20  # the draws did move things: the comparison is not between untouched inputs


def test_draws_follow_the_odapi_distributions():
    """Coins land with the configured probability, factors spread over the configured range, crop windows
    respect the area and aspect ranges and cover min_object_covered of an object."""
    tf.random.set_seed(7)
    example = {"image": tf.zeros([100, 120, 3]), "boxes": tf.constant(BOXES), "groundtruth_classes": CLASSES}
    flips = [augment.OPTIONS["random_vertical_flip"].draw({"probability": 0.7}, example)["vertical_flip"]
             for _ in range(2000)]
    assert np.mean(np.array(flips) < 0.7) == pytest.approx(0.7, abs=0.04)
    deltas = [augment.OPTIONS["random_adjust_brightness"].draw({"max_delta": 0.3}, example)["adjust_brightness"]
              for _ in range(500)]
    assert -0.3 <= min(deltas) < -0.25 and 0.25 < max(deltas) <= 0.3
    crop = _options(["random_crop_image { min_object_covered: 0.5 min_area: 0.3 max_area: 0.8 "
                     "min_aspect_ratio: 0.5 max_aspect_ratio: 2.0 }"])[0][1]
    for _ in range(50):
        begin, size, box = augment.OPTIONS["random_crop_image"].draw(crop, example)["strict_crop_image"]
        h, w = int(size[0]), int(size[1])
        assert 0.3 * 12000 * 0.95 <= h * w <= 0.8 * 12000 * 1.05 or (h, w) == (100, 120)
        y0, x0, y1, x1 = box.numpy().reshape(4)
        inter = np.clip(np.minimum(BOXES[:, 2:], [y1, x1]) - np.maximum(BOXES[:, :2], [y0, x0]), 0, None).prod(1)
        assert (inter / np.prod(BOXES[:, 2:] - BOXES[:, :2], 1)).max() >= 0.5 - 1e-3 or (h, w) == (100, 120)


def test_boxes_stay_on_their_objects():
    """A white square on black, through every option with geometry: its box still frames the white pixels."""
    image = np.zeros([80, 100, 3], np.float32)
    image[20:50, 30:70] = 255.0
    box = np.array([[20 / 80, 30 / 100, 50 / 80, 70 / 100]], np.float32)
    names = ["random_horizontal_flip { probability: 1.0 }", "random_vertical_flip { probability: 1.0 }",
             "random_rotation90 { probability: 1.0 }", "random_crop_image { min_object_covered: 1.0 min_area: 0.5 }",
             "random_pad_image { }", "random_image_scale { }",
             "random_scale_crop_and_pad_to_square { output_size: 128 scale_min: 0.8 scale_max: 1.2 }"]
    for seed, snippet in enumerate(names):
        tf.random.set_seed(seed)
        out = augment.augment({"image": tf.constant(image), "boxes": tf.constant(box),
                               "groundtruth_classes": tf.constant([1], tf.int64)}, _options([snippet]))
        picture = out["image"].numpy()[..., 0] > 128
        assert out["boxes"].shape[0] == 1, snippet
        ys, xs = np.nonzero(picture)
        h, w = picture.shape
        found = [ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w]
        np.testing.assert_allclose(out["boxes"].numpy()[0], found, atol=2.5 / min(h, w), err_msg=snippet)


def test_zoo_options_reach_the_training_input(tmp_path):
    """The template's options, read by `make config`'s reader, are what the parser of the experiment applies."""
    from pipelines.detection.config import translate
    from pipelines.detection.experiment import build_experiment

    text = (REPO_ROOT / "configs" / "ssd_mobilenet_v2_fpnlite_320x320.config").read_text()
    params = translate(TextProto(text, "pipeline.config"), check_paths=False).params
    assert [name for name, _ in params.augmentations] == ["random_horizontal_flip", "random_crop_image"]
    crop = params.augmentations[1][1]
    assert crop["min_area"] == 0.75 and crop["max_aspect_ratio"] == 3.0 and crop["random_coef"] == 0.0
    assert crop["clip_boxes"] is True  # the OD API's value when the field is absent
    exp = build_experiment(params, gpus=0)
    assert json.loads(exp.task.ssd.augmentations) == params.augmentations
    assert not exp.task.train_data.parser.aug_rand_hflip and exp.task.train_data.parser.aug_scale_max == 1.0


@pytest.mark.parametrize("snippet, message", [
    ("random_jpeg_quality { }", "random_jpeg_quality: not supported; supported: random_adjust_brightness"),
    ("random_crop_image { min_area: 0.0 }", "random_crop_image.min_area/max_area: (0.0, 1.0) must satisfy"),
    ("random_crop_image { min_aera: 0.5 }", "random_crop_image.min_aera: unknown field; fields: min_object_covered"),
    ("random_horizontal_flip { keypoint_flip_permutation: 1 }", "keypoint_flip_permutation: not supported"),
    ("random_horizontal_flip { probability: 1.5 }", "probability: 1.5 must be in [0, 1]"),
    ("random_jitter_boxes { jitter_mode: SIDEWAYS }", "jitter_mode: 'SIDEWAYS' is not one of DEFAULT, EXPAND"),
    ("random_pad_image { min_image_height: 10 }", "random_pad_image.min_image_height/width: set both or neither"),
    ("random_distort_color { color_ordering: 2 }", "color_ordering: 2 must be 0 or 1"),
    ("ssd_random_crop { operations { min_object_covered: 0.1 } }",
     "ssd_random_crop.operations[0].min_aspect_ratio/max_aspect_ratio: (0.0, 0.0) must satisfy 0 < min <= max"),
    ("random_adjust_hue { max_delta: nan }", "max_delta: nan is not a finite float"),
])
def test_bad_settings_are_refused_by_name(snippet, message):
    from pipelines.detection.config import translate

    text = (REPO_ROOT / "configs" / "ssd_mobilenet_v2_fpnlite_320x320.config").read_text()
    text = text.replace("random_horizontal_flip {\n    }", snippet, 1)
    with pytest.raises(UserError) as error:
        translate(TextProto(text, "my.config"), check_paths=False)
    assert "my.config" in str(error.value) and message in str(error.value), str(error.value)


def test_every_option_has_settings_and_an_implementation():
    assert set(AUGMENTATIONS) == set(augment.OPTIONS)
