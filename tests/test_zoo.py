"""The Object Detection API's own SSD as the oracle: our network, its checkpoints, `make import`,
fine-tuning from a zoo checkpoint, freezing.

The oracle (tests/odapi_oracle.py) builds the OD API model from the zoo's pipeline.config in a
subprocess, gives it seeded random weights and writes an extracted-zoo folder (pipeline.config,
checkpoint/ckpt-0.*) plus its raw outputs and detections on real photos. Our import of that
checkpoint must reproduce them. The real zoo checkpoint index in ../shared/external/od_zoo/ (names
and shapes, no values) checks the mapping against the file users download.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from conftest import EXTERNAL, run_cli
from pipelines.detection import config as tr
from pipelines.config.textproto import TextProto
from pipelines.detection import od_names, ssd, zoo
from pipelines.detection.export import reference_detections
from pipelines.detection.model import build_model
from pipelines.detection.train import train

ZOO = EXTERNAL / "od_zoo" / "ssd_mobilenet_v2_fpnlite_320x320_coco17_tpu-8"
PHOTOS = ["tf_od_image1_1024x636.jpg", "voc_000342.jpg"]


def zoo_params(config: Path, **overrides):
    params = tr.translate(TextProto(Path(config).read_text(), str(config)), check_paths=False).params
    return dataclasses.replace(params, **overrides)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """The OD API model of the zoo config with random weights: its folder, outputs and photos."""
    if not ZOO.is_dir():
        pytest.skip(f"the zoo sample is not present at {ZOO}")
    from PIL import Image

    from odapi_oracle import run_oracle

    photos = [np.asarray(Image.open(EXTERNAL / "images" / name).convert("RGB")) for name in PHOTOS]
    out = tmp_path_factory.mktemp("oracle")
    outputs = run_oracle(ZOO / "pipeline.config", photos, out, seed=0)
    return out, outputs, photos


@pytest.fixture(scope="module")
def imported_model(oracle):
    folder, outputs, _ = oracle
    params = zoo_params(folder / "pipeline.config")
    model = build_model(params)
    summary = zoo.restore(model, outputs["checkpoint"], "full")
    return params, model, summary


# ------------------------------------------------------------------------------------ the zoo's own file


def test_every_zoo_checkpoint_entry_has_a_place_in_our_network():
    if not ZOO.is_dir():
        pytest.skip(f"the zoo sample is not present at {ZOO}")
    model = build_model(zoo_params(ZOO / "pipeline.config"))
    shapes = dict(tf.train.list_variables(str(ZOO / "checkpoint" / "ckpt-0")))  # the index alone
    table = od_names.od_api_table(model)
    weights = {name for name in shapes if name.endswith(od_names.SUFFIX) and not name.startswith("save_counter")}
    assert len(shapes) == 386 and len(weights) == 384
    assert set(table) == weights  # every weight of the zoo has exactly one variable of ours, and back
    for name, var in table.items():
        assert list(shapes[name]) == var.shape.as_list(), name
    assert len({id(v) for v in table.values()}) == len(model.weights)
    parts = {}
    for name in table:
        parts[od_names.part_of(name)] = parts.get(od_names.part_of(name), 0) + 1
    assert parts == {"backbone": 260, "FPN": 30, "box predictor tower": 88, "box predictor": 3, "class predictor": 3}


def test_the_zoo_index_alone_is_refused_with_one_line(tmp_path):
    """The shared zoo folder has the index but no data file: `make import` says which file is missing."""
    if not ZOO.is_dir():
        pytest.skip(f"the zoo sample is not present at {ZOO}")
    proc = run_cli("import", "--zoo", ZOO, "--run", "zoo", workspace=tmp_path / "ws")
    assert proc.returncode == 2, proc.stderr
    assert "ckpt-0.data-00000-of-00001: missing" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ws" / "zoo").exists()


# ----------------------------------------------------------------------------------------- the oracle


def test_the_oracle_checkpoint_has_the_zoo_layout(oracle):
    if not ZOO.is_dir():
        pytest.skip("no zoo index to compare with")
    _, outputs, _ = oracle
    assert dict(tf.train.list_variables(outputs["checkpoint"])) == dict(
        tf.train.list_variables(str(ZOO / "checkpoint" / "ckpt-0")))


def test_import_uses_every_weight(imported_model):
    _, model, summary = imported_model
    assert summary.restored == len(model.weights) == 384 and not summary.fresh and not summary.unused


def test_raw_outputs_equal_the_od_api(oracle, imported_model):
    """Same preprocessed input -> the same box encodings and class logits, to float rounding."""
    _, outputs, photos = oracle
    params, model, _ = imported_model
    anchors = np.concatenate([a.numpy().reshape(-1, 4) for a in ssd.anchor_boxes(
        params.min_level, params.max_level, params.num_scales, params.aspect_ratios, params.anchor_size,
        (params.image_height, params.image_width)).values()])
    np.testing.assert_allclose(anchors / [320, 320, 320, 320], outputs["anchors"], atol=1e-6)
    for i, photo in enumerate(photos):
        pre = ssd.resize(ssd.preprocess(photo[None]), (params.image_height, params.image_width)).numpy()
        np.testing.assert_allclose(pre, outputs[f"preprocessed_{i}"], atol=1e-6)
        features = model.decoder(model.backbone(pre, training=False), training=False)
        scores, boxes, _ = model.head(features, training=False)
        levels = sorted(boxes, key=int)
        box = np.concatenate([boxes[k].numpy().reshape(1, -1, 4) for k in levels], axis=1)
        cls = np.concatenate([scores[k].numpy().reshape(1, -1, params.num_classes + 1) for k in levels], axis=1)
        assert box.shape == outputs[f"box_encodings_{i}"].shape == (1, 12804, 4)
        np.testing.assert_allclose(box, outputs[f"box_encodings_{i}"], atol=1e-5)
        np.testing.assert_allclose(cls, outputs[f"class_predictions_{i}"], atol=1e-5)


def test_detections_equal_the_od_api_on_real_photos(oracle, imported_model):
    _, outputs, photos = oracle
    params, model, _ = imported_model
    for i, photo in enumerate(photos):
        ours = reference_detections(model, params, photo)
        n = int(outputs[f"num_detections_{i}"][0])
        assert ours["num_detections"] == n and n > 10
        np.testing.assert_array_equal(ours["detection_classes"][:n], outputs[f"detection_classes_{i}"][0, :n] + 1)
        np.testing.assert_allclose(ours["detection_scores"][:n], outputs[f"detection_scores_{i}"][0, :n], atol=1e-5)
        np.testing.assert_allclose(ours["detection_boxes"][:n], outputs[f"detection_boxes_{i}"][0, :n], atol=1e-5)


def test_our_weights_saved_in_the_zoo_layout_are_read_by_the_od_api(oracle, imported_model, tmp_path):
    """zoo.save_od_api: our network's values (here changed from the oracle's) written as an OD API
    checkpoint; the OD API's own model restores every variable of it and gives our raw outputs."""
    from odapi_oracle import run_oracle

    folder, outputs, photos = oracle
    params = zoo_params(folder / "pipeline.config")
    model = build_model(params)
    zoo.restore(model, outputs["checkpoint"], "full")
    rng = np.random.default_rng(1)
    for var in model.trainable_variables:
        var.assign(var.numpy() * rng.uniform(0.5, 1.5, var.shape).astype(np.float32))
    prefix = zoo.save_od_api(model, outputs["checkpoint"], tmp_path / "ours" / "ckpt-0")
    assert tf.train.latest_checkpoint(str(tmp_path / "ours")) == prefix
    again = build_model(params)
    assert zoo.restore(again, prefix, "full").restored == len(model.weights)
    for a, b in zip(model.weights, again.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    theirs = run_oracle(folder / "pipeline.config", photos[:1], tmp_path / "oracle", weights=prefix)
    pre = ssd.resize(ssd.preprocess(photos[0][None]), (params.image_height, params.image_width)).numpy()
    scores, boxes, _ = model.head(model.decoder(model.backbone(pre, training=False), training=False), training=False)
    box = np.concatenate([boxes[k].numpy().reshape(1, -1, 4) for k in sorted(boxes, key=int)], axis=1)
    np.testing.assert_allclose(box, theirs["box_encodings_0"], atol=1e-5)
    assert np.abs(box - outputs["box_encodings_0"]).max() > 1e-3  # not the oracle's first weights


def test_make_import_export_and_predict_reproduce_the_od_api(oracle, tmp_path, monkeypatch):
    """`make import` -> `make export` -> the SavedModel answers like the OD API on the photos;
    `predict` names COCO classes from the label map we ship."""
    folder, outputs, photos = oracle
    ws = tmp_path / "ws"
    env = {"BENTOML_HOME": str(tmp_path / "bentoml")}
    proc = run_cli("import", "--zoo", folder, "--run", "coco", workspace=ws, env=env, check=True)
    assert re.search(r"restored 384 variables from .*'full'\)", proc.stdout), proc.stdout
    assert "save_counter" in proc.stdout
    run = ws / "coco"
    assert (run / "train" / "ckpt-0.index").is_file() and tf.train.latest_checkpoint(str(run / "train"))
    labels = (run / "label_map.pbtxt").read_text()
    assert labels.count("item {") == 80 and "name: 'person'" in labels and "id: 90" in labels
    config = (run / "pipeline.config").read_text()
    assert "fine_tune_checkpoint" not in config and "num_classes: 90" in config
    again = run_cli("import", "--zoo", folder, "--run", "coco", workspace=ws, env=env)
    assert again.returncode == 2 and "exists already" in again.stderr

    run_cli("export", "--run", "coco", workspace=ws, env=env, check=True)
    serve = tf.saved_model.load(str(run / "export" / "saved_model")).signatures["serving_default"]
    for i, photo in enumerate(photos):
        got = serve(input_tensor=tf.constant(photo[None]))
        n = int(outputs[f"num_detections_{i}"][0])
        assert int(got["num_detections"][0]) == n
        np.testing.assert_array_equal(got["detection_classes"][0, :n].numpy(),
                                      outputs[f"detection_classes_{i}"][0, :n] + 1)
        np.testing.assert_allclose(got["detection_scores"][0, :n].numpy(), outputs[f"detection_scores_{i}"][0, :n],
                                   atol=1e-5)
        np.testing.assert_allclose(got["detection_boxes"][0, :n].numpy(), outputs[f"detection_boxes_{i}"][0, :n],
                                   atol=1e-5)
    predicted = run_cli("predict", "--model", run / "export", "--score-threshold", "0.3",
                        EXTERNAL / "images" / PHOTOS[0], workspace=ws, env=env, check=True)
    answer = json.loads(predicted.stdout[predicted.stdout.index("["):])
    coco_names = set(re.findall(r"name: '([^']+)'", labels))
    assert answer[0]["detections"] and {d["label"] for d in answer[0]["detections"]} <= coco_names


def test_import_refuses_a_config_that_does_not_match_the_checkpoint(oracle, tmp_path):
    folder, _, _ = oracle
    for edit, message in ((("num_classes: 90", "num_classes: 5"), "class_predictor"),
                          (('type: "ssd_mobilenet_v2_fpn_keras"', 'type: "ssd_resnet50_v1_fpn_keras"'),
                           "feature_extractor.type: 'ssd_resnet50_v1_fpn_keras' is not supported")):
        other = tmp_path / f"zoo-{len(message)}"
        shutil.copytree(folder, other, ignore=shutil.ignore_patterns("*.npz", "*.json"))
        config = other / "pipeline.config"
        config.write_text(config.read_text().replace(*edit))
        proc = run_cli("import", "--zoo", other, "--run", "x", "--label-map",
                       pipelines_label_map(tmp_path, 5), workspace=tmp_path / "ws")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "ws" / "x").exists()


def pipelines_label_map(folder: Path, classes: int) -> Path:
    path = folder / f"labels-{classes}.pbtxt"
    path.write_text("".join(f"item {{\n  id: {i}\n  name: 'c{i}'\n}}\n" for i in range(1, classes + 1)))
    return path


# ----------------------------------------------------------------------------------------- fine-tuning


def test_fine_tune_from_the_zoo_checkpoint(oracle, tmp_path, sample_dir):
    """make config CHECKPOINT=zoo/checkpoint/ckpt-0 on a 4-class dataset: the summary line says what
    is restored; the first training step starts from the OD API's weights (a learning rate of 1e-12
    moves nothing measurably), with a fresh box predictor."""
    folder, outputs, _ = oracle
    ws = tmp_path / "ws"
    run_cli("data", "--dataset", sample_dir, "--workers", "1", workspace=ws, check=True)
    proc = run_cli("config", "--dataset", sample_dir.name, "--run", "ft", "--batch-size", "2", "--num-steps", "1",
                   "--learning-rate", "1e-12", "--checkpoint", outputs["checkpoint"], workspace=ws, check=True)
    line = next(line for line in proc.stdout.splitlines() if "restored" in line)
    assert re.search(r"restored 290 variables from .*ckpt-0 \(Object Detection API checkpoint, 'detection'\); "
                     r"initialised fresh: box predictor tower, box predictor, class predictor \(4 classes\); "
                     r"not used from the checkpoint: box predictor tower \(88\), box predictor \(3\), "
                     r"class predictor \(3\)", line), line
    config = (ws / "ft" / "pipeline.config").read_text()
    assert 'fine_tune_checkpoint_type: "detection"' in config
    trained = run_cli("train", "--run", "ft", "--eval-every", "0", workspace=ws, check=True, timeout=900)
    assert "restored 290 variables" in trained.stdout
    reader = tf.train.load_checkpoint(outputs["checkpoint"])
    params = zoo_params(ws / "ft" / "pipeline.config", train_files=[], eval_files=[])
    model = build_model(params)
    tf.train.Checkpoint(model=model).read(tf.train.latest_checkpoint(str(ws / "ft" / "train"))).expect_partial()
    table = od_names.od_api_table(model)
    compared = 0
    for name, var in table.items():
        part = od_names.part_of(name)
        if part in ("backbone", "FPN") and "moving_" not in name:
            np.testing.assert_allclose(var.numpy(), reader.get_tensor(name), rtol=1e-5, atol=1e-6, err_msg=name)
            compared += 1
    assert compared > 150
    # The box predictor starts fresh: its kernels are not the checkpoint's (same shapes where classes don't count).
    for name in (od_names.PREDICTOR + "_box_prediction_head/_box_encoder_layers/0/depthwise_kernel" + od_names.SUFFIX,
                 od_names.PREDICTOR + "_head_scope_conv_layers/PredictionTower/0/depthwise_kernel" + od_names.SUFFIX):
        assert table[name].shape == reader.get_variable_to_shape_map()[name]
        assert not np.allclose(table[name].numpy(), reader.get_tensor(name), atol=1e-3), name


def test_classification_restores_a_keras_mobilenet_v2_weights_file(tmp_path):
    """The Keras-application file users download (..._no_top.h5); here one of the same layout."""
    keras_model = zoo.keras_mobilenet_v2(1.0)
    rng = np.random.default_rng(3)
    for v in keras_model.weights:
        v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
    path = tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    keras_model.save_weights(str(path))
    from pipelines.detection.params import DetectorParams

    params = DetectorParams(num_classes=3, image_height=128, image_width=128, fpn_num_filters=16, head_num_filters=16,
                            head_num_convs=1, fine_tune_checkpoint=str(path), fine_tune_checkpoint_type="classification")
    summary = zoo.check(params)
    assert summary.restored == 260 and "Keras MobileNetV2 weights" in str(summary)
    model = build_model(params)
    zoo.restore(model, path, "classification")
    source = [layer for layer in keras_model.layers if layer.weights]
    for src, dst in zip(source, od_names.backbone_layers(model), strict=True):
        for a, b in zip(sorted(src.weights, key=lambda v: v.name.split("/")[-1]),
                        sorted(dst.weights, key=lambda v: v.name.split("/")[-1]), strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(zoo.CheckpointError, match="holds a backbone only"):
        zoo.restore(model, path, "detection")


def test_freeze_variables_leave_the_backbone_untrained(tmp_path, sample_dir):
    """train_config.freeze_variables (OD API names, as FREEZE=backbone writes them): training from a
    known start, the backbone's weights do not move; the FPN's and the head's do."""
    from pipelines.detection.config import FREEZE_PATTERNS
    from pipelines.detection.params import DetectorParams

    data = tmp_path / "data"
    run_cli("data", "--dataset", sample_dir, "--out", data, "--workers", "1", check=True)
    params = DetectorParams(
        num_classes=4, image_height=128, image_width=128, depth_multiplier=0.35, fpn_num_filters=16,
        head_num_filters=16, head_num_convs=1, batch_size=4, num_steps=3, learning_rate=0.5, warmup_learning_rate=0.5,
        warmup_steps=0, train_files=[str(data / "train-*.tfrecord")],
        eval_files=[str(data / "val-*.tfrecord")], label_map_path=str(data / "label_map.pbtxt"),
        freeze_variables=[FREEZE_PATTERNS["backbone"]])
    start = build_model(dataclasses.replace(params, freeze_variables=[]))
    frozen = build_model(params).frozen_variables()
    assert len(frozen) == len(start.backbone.trainable_weights) > 50
    source = tf.train.Checkpoint(model=start, **start.checkpoint_items).write(str(tmp_path / "start" / "ckpt-0"))
    lines = []
    result = train(dataclasses.replace(params, fine_tune_checkpoint=source, fine_tune_checkpoint_type="full"),
                   tmp_path / "run", log=lines.append, steps_per_loop=3)
    assert any(f"froze {len(frozen)} of {len(start.trainable_weights)} trainable variables" in line
               for line in lines), lines
    before, after = tf.train.load_checkpoint(source), tf.train.load_checkpoint(result["checkpoint"])
    moved = {}
    for name in before.get_variable_to_shape_map():
        root = name.split("/")[0]
        if root in ("backbone", "decoder", "head") and "moving_" not in name and ".OPTIMIZER_SLOT" not in name:
            moved.setdefault(root, []).append(not np.array_equal(before.get_tensor(name), after.get_tensor(name)))
    assert not any(moved["backbone"]) and len(moved["backbone"]) > 50
    # (a few head/FPN variables can get no gradient in 3 steps, e.g. a bias under a saturated ReLU6)
    assert np.mean(moved["decoder"]) > 0.8 and np.mean(moved["head"]) > 0.8


def test_the_640_template_builds_the_zoo_layout_too():
    """The 640x640 zoo model has the same variables as the 320x320 one; only the grid grows."""
    from conftest import REPO

    params = zoo_params(REPO / "configs" / "ssd_mobilenet_v2_fpnlite_640x640.config", num_classes=90)
    model = build_model(params)
    if ZOO.is_dir():
        shapes = dict(tf.train.list_variables(str(ZOO / "checkpoint" / "ckpt-0")))
        assert {n: list(s) for n, s in shapes.items() if n.endswith(od_names.SUFFIX) and "save_counter" not in n} == {
            n: v.shape.as_list() for n, v in od_names.od_api_table(model).items()}
    anchors = ssd.anchor_boxes(3, 7, 2, params.aspect_ratios, params.anchor_size, (640, 640))
    assert sum(int(np.prod(a.shape)) // 4 for a in anchors.values()) == 6 * (80 * 80 + 40 * 40 + 20 * 20 + 10 * 10 + 5 * 5)
    out = model(tf.zeros([1, 640, 640, 3]), training=False)
    assert out["detection_boxes"].shape == (1, params.max_detections, 4)


def test_update_trainable_variables_trains_only_what_matches():
    from pipelines.detection.params import DetectorParams

    params = DetectorParams(num_classes=3, image_height=128, image_width=128, depth_multiplier=0.35,
                            fpn_num_filters=16, head_num_filters=16, head_num_convs=1,
                            update_trainable_variables=["model/_box_predictor/.*"])
    model = build_model(params)
    trainable = {id(v) for v in model.trainable_weights}
    assert trainable == {id(v) for v in model.head.trainable_weights}
    assert len(model.frozen_variables()) == len(model.backbone.trainable_weights) + len(model.decoder.trainable_weights)
    ours = build_model(dataclasses.replace(params, update_trainable_variables=[], freeze_variables=["backbone/"]))
    assert {id(v) for v in ours.frozen_variables()} == {id(v) for v in ours.backbone.trainable_weights}
