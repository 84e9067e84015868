"""The OD API oracle (tests/odapi_oracle.py) on the zoo's SSD MobileNet V2 FPNLite 320x320.

Before anything is compared against the oracle, the oracle itself must be right: its checkpoint has
exactly the variables (names and shapes) of the real zoo checkpoint, and its random weights give
outputs of the expected shapes with activations of sane scale and real detections.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from odapi_oracle import run_oracle

ZOO_MODEL = "od_zoo/ssd_mobilenet_v2_fpnlite_320x320_coco17_tpu-8"
PHOTOS = ["tf_od_image1_1024x636.jpg", "voc_000342.jpg"]  # 1024x636 and 500x375
NUM_CLASSES = 90
# Levels 3-7 of a 320x320 input: 40, 20, 10, 5 and 3 cells a side, 6 anchors per cell.
FEATURE_MAP_SHAPES = [[1, 40, 40, 128], [1, 20, 20, 128], [1, 10, 10, 128], [1, 5, 5, 128], [1, 3, 3, 128]]
NUM_ANCHORS = 6 * (40 * 40 + 20 * 20 + 10 * 10 + 5 * 5 + 3 * 3)  # 12804
MAX_DETECTIONS = 100


@pytest.fixture(scope="module")
def zoo_dir() -> Path:
    external = Path(__file__).resolve().parents[2] / "shared" / "external"
    if not external.is_dir():
        pytest.skip(f"third-party samples not present at {external}")
    return external / ZOO_MODEL


@pytest.fixture(scope="module")
def oracle(zoo_dir, tmp_path_factory) -> tuple[Path, dict]:
    images = [np.asarray(Image.open(zoo_dir.parents[1] / "images" / name).convert("RGB")) for name in PHOTOS]
    out = tmp_path_factory.mktemp("odapi-oracle")
    return out, run_oracle(zoo_dir / "pipeline.config", images, out, seed=0)


def test_checkpoint_matches_zoo_layout(oracle, zoo_dir):
    import tensorflow as tf

    out, outputs = oracle
    assert outputs["checkpoint"] == str(out / "checkpoint" / "ckpt-0")
    # Same folder layout as an extracted zoo model: pipeline.config + checkpoint/{checkpoint,ckpt-0.*}.
    assert (out / "pipeline.config").read_text() == (zoo_dir / "pipeline.config").read_text()
    assert tf.train.latest_checkpoint(str(out / "checkpoint")) == outputs["checkpoint"]

    # list_variables reads names and shapes from the index alone (the zoo copy has no data file).
    zoo = tf.train.list_variables(str(zoo_dir / "checkpoint" / "ckpt-0"))
    ours = tf.train.list_variables(outputs["checkpoint"])
    assert len(zoo) == 386
    assert ours == zoo
    assert [tuple(entry) for entry in json.loads((out / "variables.json").read_text())] == zoo


def test_outputs_shapes(oracle):
    _, outputs = oracle
    anchors = outputs["anchors"]
    assert anchors.shape == (NUM_ANCHORS, 4)
    # Normalized [ymin, xmin, ymax, xmax]; the coarse levels' anchors reach past the image.
    assert np.all(anchors[:, 2] > anchors[:, 0]) and np.all(anchors[:, 3] > anchors[:, 1])
    for i in range(len(PHOTOS)):
        assert np.array_equal(outputs[f"anchors_{i}"], anchors)
        assert outputs[f"preprocessed_{i}"].shape == (1, 320, 320, 3)
        assert outputs[f"true_image_shapes_{i}"].tolist() == [[320, 320, 3]]
        assert outputs[f"feature_map_shapes_{i}"].tolist() == FEATURE_MAP_SHAPES
        assert outputs[f"box_encodings_{i}"].shape == (1, NUM_ANCHORS, 4)
        assert outputs[f"class_predictions_{i}"].shape == (1, NUM_ANCHORS, NUM_CLASSES + 1)
        assert outputs[f"detection_boxes_{i}"].shape == (1, MAX_DETECTIONS, 4)
        assert outputs[f"detection_scores_{i}"].shape == (1, MAX_DETECTIONS)
        assert outputs[f"detection_classes_{i}"].shape == (1, MAX_DETECTIONS)
        assert outputs[f"num_detections_{i}"].shape == (1,)


def test_outputs_are_informative(oracle):
    """Random weights that still behave like a detector: O(1) activations, confident detections."""
    _, outputs = oracle
    for i in range(len(PHOTOS)):
        # Neither blown up nor vanished nor saturated at ReLU6's 6 through 17 MobileNetV2 blocks.
        assert np.all((outputs[f"feature_map_std_{i}"] > 0.1) & (outputs[f"feature_map_std_{i}"] < 10))
        scores = outputs[f"detection_scores_{i}"][0]
        classes = outputs[f"detection_classes_{i}"][0]
        boxes = outputs[f"detection_boxes_{i}"][0]
        assert (scores > 0.3).sum() >= 10
        assert np.all(np.diff(scores) <= 0)
        # Post-processed boxes are clipped to the image; classes are 0-based, background removed.
        assert boxes.min() >= 0 and boxes.max() <= 1
        assert np.all((classes >= 0) & (classes < NUM_CLASSES) & (classes == np.round(classes)))
    # The two photos must give different predictions: the image actually flows through the net.
    assert not np.allclose(outputs["class_predictions_0"], outputs["class_predictions_1"], atol=1e-3)
