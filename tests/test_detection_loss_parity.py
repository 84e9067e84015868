"""Training loss parity with the Object Detection API (issue 26, item 1): the same batch and the same
weights through our training loss (Model Garden's RetinaNet loss, configured from pipeline.config by
pipelines/detection/experiment.py, on the labels of our parser) and through the OD API model's own
`loss()` (tests/odapi_oracle.py, the research code from the registry) give the same classification,
localisation and regularisation losses, and the same gradients.

Batch norms run in inference mode on both sides (same weights, no batch statistics), so that what is
compared is the loss itself: target assignment, box encoding, focal loss, normalisation, weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import EXTERNAL
from pipelines.config.textproto import TextProto
from pipelines.detection import config as tr
from pipelines.detection import zoo

ZOO = EXTERNAL / "od_zoo" / "ssd_mobilenet_v2_fpnlite_320x320_coco17_tpu-8"
PHOTOS = ["tf_od_image1_1024x636.jpg", "voc_000342.jpg"]
# Objects per photo, normalized [ymin, xmin, ymax, xmax], and label-map ids (any of the zoo's 90).
# Coordinates off round values: an anchor at IoU 0.5 exactly would be matched or not by float rounding.
GROUNDTRUTH = [
    (np.array([[0.113, 0.052, 0.617, 0.389], [0.291, 0.507, 0.943, 0.911], [0.703, 0.097, 0.811, 0.183]],
              np.float32), np.array([1, 18, 44])),
    # The second object, thin, overlaps no anchor by half (best IoU 0.39): matched only by force_match_for_each_row.
    (np.array([[0.207, 0.188, 0.794, 0.713], [0.497, 0.482, 0.526, 0.642]], np.float32), np.array([3, 62])),
]
# Loss fields of pipeline.config changed from the zoo's values: ours must follow them as the OD API does.
CHANGED = [("unmatched_threshold: 0.5", "unmatched_threshold: 0.4"), (" matched_threshold: 0.5", " matched_threshold: 0.6"),
           ("normalize_loc_loss_by_codesize: true", "normalize_loc_loss_by_codesize: false"),
           ("alpha: 0.25", "alpha: 0.4"), ("gamma: 2.0", "gamma: 1.5"), ("classification_weight: 1.0", "classification_weight: 2.0"),
           ("localization_weight: 1.0", "localization_weight: 0.7"),
           ("weighted_smooth_l1 {\n", "weighted_smooth_l1 {\n          delta: 0.5\n"),
           ("weight: 3.9999998989515007e-05", "weight: 0.0004")]

@pytest.fixture(scope="module", params=["zoo", "changed"])
def parity(request, tmp_path_factory):
    """(folder with the config and the oracle's checkpoints, the oracle's outputs, photos), for the zoo's
    pipeline.config and for one with every loss field we read changed (CHANGED)."""
    if not ZOO.is_dir():
        pytest.skip(f"the zoo sample is not present at {ZOO}")
    from PIL import Image

    from odapi_oracle import run_oracle

    photos = [np.asarray(Image.open(EXTERNAL / "images" / name).convert("RGB").resize((320, 320), Image.BILINEAR))
              for name in PHOTOS]
    out = tmp_path_factory.mktemp(f"loss-oracle-{request.param}")
    config = ZOO / "pipeline.config"
    if request.param == "changed":
        text = config.read_text()
        for before, after in CHANGED:
            assert before in text, before
            text = text.replace(before, after)
        config = out / "changed.config"
        config.write_text(text)
    oracle = run_oracle(config, photos, out, seed=0, groundtruth=GROUNDTRUTH)
    return out, oracle, photos

def our_loss(folder: Path, checkpoint: str, photos, training: bool = False):
    """(model, images, labels, {total, cls, box, reg}, gradients) of our training loss on the photos as one batch."""
    from pipelines.detection.experiment import build_experiment
    from pipelines.detection.train import DetectionTask

    params = tr.translate(TextProto((folder / "pipeline.config").read_text(), "pipeline.config"),
                          check_paths=False).params
    # The loss is compared on the batch as given: the config's data_augmentation_options are off here
    # (the oracle calls loss() on the unaugmented batch; augmentation parity is test_detection_augment's).
    params = dataclasses.replace(params, batch_size=len(photos), augmentations=[])
    exp = build_experiment(params)
    task = DetectionTask(exp.task)
    model = task.build_model()
    summary = zoo.restore(model, checkpoint, "full")
    assert summary.restored == len(model.weights), summary
    parser = task.parser(exp.task.train_data)  # Model Garden's own flip and scale jitter are off (experiment FIELDS)
    images, labels = [], []
    for photo, (boxes, classes) in zip(photos, GROUNDTRUTH):
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) * 320 * 320
        decoded = {"image": tf.constant(photo), "height": tf.constant(320), "width": tf.constant(320),
                   "source_id": tf.constant("0"), "groundtruth_boxes": tf.constant(boxes),
                   "groundtruth_classes": tf.constant(classes, tf.int64),
                   "groundtruth_is_crowd": tf.zeros(len(classes), tf.bool),
                   "groundtruth_area": tf.constant(area, tf.float32)}
        image, label = parser._parse_train_data(decoded)  # hflip off: no random draw; 320 -> 320: no resize
        images.append(image)
        labels.append({k: v for k, v in label.items() if k != "groundtruths"})
    images = tf.stack(images)
    labels = tf.nest.map_structure(lambda *xs: tf.stack(xs), *labels)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        outputs = model(images, image_shape=labels["image_info"][:, 1, :], anchor_boxes=labels["anchor_boxes"],
                        training=training)
        total, cls, box, model_loss = task.build_losses(outputs=outputs, labels=labels, aux_losses=model.losses)
    grads = tape.gradient(total, variables)
    losses = exp.task.losses
    return model, images, labels, {"total": float(total), "cls": float(cls) * losses.loss_weight,
                           "box": float(box) * losses.box_loss_weight * losses.loss_weight,
                           "reg": float(total) - float(model_loss) * losses.loss_weight}, grads

def test_same_targets(parity):
    """Anchor matching (thresholds, forced matches), classes and encoded boxes, anchor by anchor."""
    from official.vision.losses import loss_utils

    out, oracle, photos = parity
    _, _, labels, _, _ = our_loss(out, oracle["checkpoint"], photos)
    ours = labels["box_weights"].numpy() > 0
    theirs = oracle["loss_reg_weights"] > 0
    assert ours.sum() > 0 and (ours == theirs).all(), (ours.sum(), theirs.sum(), np.argwhere(ours != theirs))
    classes = loss_utils.multi_level_flatten(labels["cls_targets"], last_dim=None).numpy()
    # The OD API's class targets are one-hot with the background in column 0: argmax is the label-map id.
    np.testing.assert_array_equal(classes[ours], oracle["loss_cls_targets"].argmax(-1)[theirs])
    assert 62 in classes[ours]  # the object no anchor overlaps by half, matched by force
    # Anchors between the two thresholds are ignored (weight 0); the OD API's weights are per class.
    np.testing.assert_array_equal(labels["cls_weights"].numpy(), oracle["loss_cls_weights"][..., 0])
    boxes = loss_utils.multi_level_flatten(labels["box_targets"], last_dim=4).numpy()
    np.testing.assert_allclose(boxes[ours], oracle["loss_reg_targets"][theirs], atol=1e-4)

def test_same_batch_same_weights_same_loss(parity):
    out, oracle, photos = parity
    _, images, _, ours, _ = our_loss(out, oracle["checkpoint"], photos)
    np.testing.assert_allclose(images.numpy(), oracle["loss_batch_preprocessed"], atol=1e-5)
    theirs = {"cls": float(oracle["loss_classification"]), "box": float(oracle["loss_localization"]),
              "reg": float(oracle["loss_regularization"]), "total": float(oracle["loss_total"])}
    print("ours", ours, "\nOD API", theirs)
    for key in ("cls", "box", "reg", "total"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (key, ours, theirs)

def test_same_batch_same_weights_same_gradients(parity):
    out, oracle, photos = parity
    model, _, _, _, grads = our_loss(out, oracle["checkpoint"], photos)

    theirs_model, _, _, _, _ = our_loss(out, oracle["gradients"], photos)  # their gradients, restored as weights
    worst = []
    for var, grad, held in zip(model.trainable_variables, grads, theirs_model.trainable_variables):
        g, t = grad.numpy(), held.numpy()
        scale = max(np.abs(t).max(), 1e-8)
        worst.append((float(np.abs(g - t).max() / scale), var.name))
    worst.sort(reverse=True)
    print(worst[:5])
    assert worst[0][0] < 1e-3, worst[:5]
