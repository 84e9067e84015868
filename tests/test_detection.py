"""Detection with Model Garden, for real on a tiny detector: training, resuming, fine-tuning, export.

The detector is shrunk (128x128 or 64x64 input, MobileNetV2 x0.35, 16-filter FPN and head with one
conv) so that the whole file runs in a few minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)
import numpy as np
import pytest
import tensorflow as tf

from pipelines.detection.experiment import FIELDS, build_experiment
from pipelines.detection.params import DetectorParams
from pipelines.detection.model import build_model
from pipelines.detection.train import latest_step, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """24 generated shape images (4 classes) converted to TFRecords by the real data stage."""
    from pipelines.data.sample import generate

    root = tmp_path_factory.mktemp("detection-data")
    generate(root / "shapes", num_images=24)
    subprocess.run([sys.executable, "-m", "pipelines", "data", "--dataset", str(root / "shapes"),
                    "--out", str(root / "data"), "--workers", "1"], cwd=REPO, check=True, capture_output=True)
    return root / "data"


def tiny_params(data_dir: Path, **overrides) -> DetectorParams:
    fields = dict(
        num_classes=4, image_height=128, image_width=128, depth_multiplier=0.35, fpn_num_filters=16,
        head_num_filters=16, head_num_convs=1, batch_size=4, num_steps=30, learning_rate=0.2,
        warmup_learning_rate=0.2, warmup_steps=0,
        train_files=[str(data_dir / "train-*.tfrecord")], eval_files=[str(data_dir / "val-*.tfrecord")],
        eval_batch_size=4, label_map_path=str(data_dir / "label_map.pbtxt"))
    fields.update(overrides)
    return DetectorParams(**fields)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> tuple[DetectorParams, Path, dict]:
    """A tiny detector trained 30 steps (5 per loop) on the 19 training images, without augmentation
    (seeded: the training seeds itself from params.seed, 0)."""
    params = tiny_params(data_dir)
    run_dir = tmp_path_factory.mktemp("run")
    lines = []
    result = train(params, run_dir, log=lines.append, steps_per_loop=5)
    result["lines"] = lines
    return params, run_dir, result


def checkpoint_values(prefix: str, root: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith(root + "/") and ".OPTIMIZER_SLOT" not in k}  # weights, not momentum


# ---------------------------------------------------------------------------------------------- config


def test_experiment_maps_params(data_dir, tmp_path):
    params = DetectorParams(num_classes=4, train_files=["a-*.tfrecord"], eval_files=["b-*.tfrecord"])
    exp = build_experiment(params, gpus=0)
    m = exp.task.model
    assert m.num_classes == 5 and m.input_size == [320, 320, 3]
    assert m.backbone.type == "mobilenet" and m.backbone.mobilenet.model_id == "MobileNetV2"
    assert m.decoder.fpn.num_filters == 128 and exp.task.ssd.fpn_use_depthwise
    assert (m.head.num_convs, m.head.num_filters) == (4, 128)
    ssd = exp.task.ssd
    assert (ssd.head_use_depthwise, ssd.share_prediction_tower, ssd.head_kernel_size) == (True, True, 3)
    assert np.isclose(ssd.class_prediction_bias_init, -4.6) and ssd.max_detections_per_class == 100
    assert (m.norm_activation.norm_momentum, m.norm_activation.norm_epsilon) == (0.997, 0.001)
    assert (m.anchor.num_scales, m.anchor.aspect_ratios, m.anchor.anchor_size) == (2, [1.0, 2.0, 0.5], 4.0)
    assert m.detection_generator.box_coder_weights == [10.0, 10.0, 5.0, 5.0]
    assert m.detection_generator.nms_version == "batched" and m.detection_generator.nms_iou_threshold == 0.6
    assert m.norm_activation.activation == "relu6"
    assert (exp.task.losses.focal_loss_alpha, exp.task.losses.focal_loss_gamma) == (0.25, 2.0)
    assert exp.task.losses.l2_weight_decay == 4e-5
    opt = exp.trainer.optimizer_config
    assert opt.optimizer.type == "sgd" and opt.optimizer.sgd.momentum == 0.9
    assert opt.learning_rate.cosine.initial_learning_rate == 0.08
    assert (opt.learning_rate.cosine.offset, opt.learning_rate.cosine.decay_steps) == (1000, 49000)
    assert (opt.warmup.linear.warmup_steps, opt.warmup.linear.warmup_learning_rate) == (1000, 0.026666)
    assert exp.task.train_data.input_path == ["a-*.tfrecord"] and exp.task.train_data.global_batch_size == 128
    assert exp.task.validation_data.input_path == ["b-*.tfrecord"] and not exp.task.validation_data.is_training
    assert exp.trainer.train_steps == 50000 and exp.trainer.validation_steps == -1
    assert exp.task.annotation_file is None and exp.task.per_category_metrics
    assert exp.runtime.mixed_precision_dtype == "float32" and exp.runtime.distribution_strategy == "one_device"
    gpu = build_experiment(params, gpus=2)
    assert gpu.runtime.mixed_precision_dtype == "float16" and gpu.runtime.distribution_strategy == "mirrored"
    # The OD API's cosine schedule: linear warmup to the base rate, then cosine to 0 at num_steps.
    from official.modeling.optimization import OptimizerFactory

    lr = OptimizerFactory(opt).build_learning_rate()
    assert np.isclose(float(lr(0)), 0.026666) and np.isclose(float(lr(1000)), 0.08)
    assert np.isclose(float(lr(25500)), 0.04, rtol=1e-4) and np.isclose(float(lr(50000)), 0.0, atol=1e-7)
    assert len({mg for _, mg, _ in FIELDS}) == len(FIELDS)  # one row per Model Garden field


# ---------------------------------------------------------------------------------------------- train


def test_tiny_detector_loss_goes_down(trained):
    params, run_dir, result = trained
    losses = [h["total_loss"] for h in result["history"]]
    assert [h["step"] for h in result["history"]] == [5, 10, 15, 20, 25, 30]
    # Loops of 5 steps at lr 0.2 on 19 images: noisy loop by loop, and the path differs between CPUs (oneDNN picks
    # its kernels by instruction set): it must get clearly below the first loop's loss and stay below it.
    assert min(losses[1:]) < 0.93 * losses[0] and np.mean(losses[-3:]) < losses[0], losses
    assert result["final_step"] == 30 and result["start_step"] == 0
    assert latest_step(run_dir / "train") == 30
    assert list((run_dir / "train" / "train").glob("events.out.tfevents.*")), "no TensorBoard summaries"
    assert (run_dir / "train" / "params.yaml").is_file()
    progress = [line for line in result["lines"] if line.startswith("step ")]
    assert len(progress) == 6 and all("steps/s" in line and "ETA" in line for line in progress)


def test_seeded_runs_repeat_exactly(data_dir, tmp_path):
    """The same seed twice: the same losses, loop for loop, with augmentation on (flips, crops and colour
    changes are random ops in tf.data's parallel parser map); another seed: other losses. The process is left
    as it was (op determinism is switched off again)."""
    from tensorflow.python.framework import config as tf_config

    from pipelines.detection.config import AUGMENTATIONS

    augmentations = [["random_horizontal_flip", dict(AUGMENTATIONS["random_horizontal_flip"])],
                     ["random_crop_image", dict(AUGMENTATIONS["random_crop_image"], min_object_covered=0.0, min_area=0.5)],
                     ["random_distort_color", {"color_ordering": 0}]]
    params = tiny_params(data_dir, num_steps=2, augmentations=augmentations, seed=5)
    losses = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        result = train(dataclasses.replace(params, seed=seed), tmp_path / name, log=lambda _: None, steps_per_loop=1)
        losses.append([h["total_loss"] for h in result["history"]])
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert losses[2] != losses[0]
    assert not tf_config.is_op_determinism_enabled()


def test_crowd_objects_are_left_out_of_training_targets():
    from pipelines.detection.ssd import SSDParser

    data = {"groundtruth_classes": tf.constant([1, 2, 3], tf.int64),
            "groundtruth_boxes": tf.constant([[0.0, 0, 1, 1], [0, 0, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2]]),
            "groundtruth_is_crowd": tf.constant([False, True, False]), "groundtruth_area": tf.constant([4.0, 2, 1]),
            "image": tf.zeros([4, 4, 3], tf.uint8)}
    kept = SSDParser._without_crowds(data)
    assert kept["groundtruth_classes"].numpy().tolist() == [1, 3]
    assert np.allclose(kept["groundtruth_boxes"].numpy(), [[0, 0, 1, 1], [0.1, 0.1, 0.2, 0.2]])
    assert kept["groundtruth_area"].numpy().tolist() == [4.0, 1.0] and not kept["groundtruth_is_crowd"].numpy().any()
    assert kept["image"] is data["image"]


def test_killed_run_resumes_from_its_checkpoint(data_dir, tmp_path):
    params = tiny_params(data_dir, image_height=64, image_width=64, num_steps=60, learning_rate=0.05,
                         warmup_learning_rate=0.05)
    (tmp_path / "params.json").write_text(json.dumps(dataclasses.asdict(params)))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipelines.detection.train", str(tmp_path / "params.json"), str(run_dir),
           "--steps-per-loop", "2"]
    with open(tmp_path / "first.log", "w") as out:  # a file, not a pipe nobody reads while it runs
        first = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        # A checkpoint counts once the trainer's state file names it (what a restart restores).
        while tf.train.latest_checkpoint(str(run_dir / "train")) is None and first.poll() is None \
                and time.time() < deadline:
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = int(tf.train.latest_checkpoint(str(run_dir / "train")).rsplit("-", 1)[1])
    assert first.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert 0 < killed_at < params.num_steps

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["start_step"] == killed_at and result["final_step"] == params.num_steps
    assert f"resuming from step {killed_at}" in second.stdout
    steps = [int(line.split()[1].split("/")[0]) for line in second.stdout.splitlines() if line.startswith("step ")]
    assert steps[0] == killed_at + 2 and steps[-1] == params.num_steps, steps
    assert latest_step(run_dir / "train") == params.num_steps


def test_training_removes_what_a_killed_one_left_and_runs_alone(tmp_path, monkeypatch):
    """What a training killed mid-save leaves in train/ (TensorFlow's PREFIX_temp/ folders and
    checkpoint.tmp<hex> state files, our .evals.json.tmp-*) goes at the next training of the run, which
    holds RUN_DIR/.train.lock meanwhile: a second training of the same run is refused. (The engine's
    loop itself is replaced here: nothing trains.)"""
    import fcntl

    from pipelines.workspace import UserError, owner_tag
    from pipelines.engine import train as engine

    model_dir = tmp_path / "run" / "train"
    (model_dir / "best").mkdir(parents=True)
    kept = ["ckpt-4.index", "ckpt-4.data-00000-of-00001", "checkpoint", "evals.json", "params.yaml"]
    for name in kept:
        (model_dir / name).write_text("x")
    (model_dir / "best" / "best_ckpt-1.index").write_text("x")
    (model_dir / "ckpt-6_temp").mkdir()
    (model_dir / "ckpt-6_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 4096)
    (model_dir / "best" / "best_ckpt-2_temp").mkdir()
    (model_dir / ("checkpoint.tmp" + "0123456789abcdef" * 2)).write_text("x")
    (model_dir / f".evals.json.tmp-{owner_tag()}-k3j2").write_text("[")
    calls = []
    monkeypatch.setattr(engine, "_run", lambda *args: calls.append(args) or {"final_step": 0})
    lines = []
    engine.run(None, None, model_dir, "train", lines.append)
    assert len(calls) == 1
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(kept + ["best"])
    assert [p.name for p in (model_dir / "best").iterdir()] == ["best_ckpt-1.index"]
    assert len(lines) == 1 and lines[0].startswith("removed 2 temporary folder(s) and 2 temporary file(s) left in ")
    assert not (tmp_path / "run" / ".train.lock").exists()

    with open(tmp_path / "run" / ".train.lock", "w") as lock:
        lock.write("4242\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=r"another training \(pid 4242\) is writing this folder"):
            engine.run(None, None, model_dir, "train", lines.append)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------- fine-tune


def test_full_fine_tune_restores_backbone_decoder_and_head(trained, tmp_path):
    """Through train(): the trainer's first checkpoint holds the source's weights (lr 0, so one step
    changes no trainable weight; batch-norm moving statistics do move and are not compared)."""
    params, run_dir, _ = trained
    source = tf.train.latest_checkpoint(str(run_dir / "train"))
    ft = dataclasses.replace(params, fine_tune_checkpoint=source, fine_tune_checkpoint_type="full",
                             num_steps=1, learning_rate=0.0, warmup_learning_rate=0.0)
    lines = []
    result = train(ft, tmp_path, log=lines.append)
    assert result["final_step"] == 1
    for root in ("backbone", "decoder", "head"):
        want, got = checkpoint_values(source, root), checkpoint_values(result["checkpoint"], root)
        assert want.keys() == got.keys() and len(want) > 10
        for key in want:
            if "moving_" not in key:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_detection_fine_tune_restores_the_feature_extractor_only(trained):
    """'detection' restores what the OD API's restore_from_objects('detection') does: backbone and
    FPN; the box predictor (tower, box and class predictors) starts fresh, whatever its classes."""
    from official.core import task_factory

    from pipelines.detection import zoo

    params, run_dir, _ = trained
    source = tf.train.latest_checkpoint(str(run_dir / "train"))
    for num_classes in (params.num_classes, 2):
        ft = dataclasses.replace(params, num_classes=num_classes, fine_tune_checkpoint=source,
                                 fine_tune_checkpoint_type="detection")
        exp = build_experiment(ft, gpus=0)
        assert exp.task.init_checkpoint_modules == "detection"
        task = task_factory.get_task(exp.task)
        model = task.build_model()
        summary = zoo.restore(model, source, "detection")
        reference = build_model(params)
        tf.train.Checkpoint(model=reference).read(source).expect_partial().assert_existing_objects_matched()
        for part in ("backbone", "decoder"):
            for got, want in zip(getattr(model, part).weights, getattr(reference, part).weights, strict=True):
                np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=got.name)
        for layer in ("box_tower", "box_predictor"):  # kernels: fresh, not the source's
            got, want = getattr(model.head, layer), getattr(reference.head, layer)
            got, want = (got[0], want[0]) if isinstance(got, list) else (got, want)
            assert not np.array_equal(got.weights[0].numpy(), want.weights[0].numpy()), f"{layer} restored"
        assert summary.restored == len(model.backbone.weights) + len(model.decoder.weights)
        assert f"initialised fresh: box predictor tower, box predictor, class predictor ({num_classes} classes)" in \
            str(summary)


def test_classification_fine_tune_restores_the_backbone(data_dir, tmp_path):
    from official.core import task_factory
    from official.vision.configs import backbones
    from official.vision.configs import image_classification as ic

    cls_cfg = ic.ImageClassificationTask(model=ic.ImageClassificationModel(
        num_classes=10, input_size=[96, 96, 3],
        backbone=backbones.Backbone(type="mobilenet", mobilenet=backbones.MobileNet(
            model_id="MobileNetV2", filter_size_scale=0.35))))
    classifier = task_factory.get_task(cls_cfg).build_model()
    for v in classifier.backbone.weights:  # distinctive values, not an initialiser's
        v.assign(tf.random.stateless_uniform(v.shape, seed=[7, len(v.name)], minval=0.5, maxval=1.5))
    # Saved as Model Garden's trainer saves it: the model plus its checkpoint_items (backbone).
    prefix = tf.train.Checkpoint(model=classifier, **classifier.checkpoint_items).save(str(tmp_path / "cls" / "ckpt"))

    params = tiny_params(data_dir, fine_tune_checkpoint=prefix, fine_tune_checkpoint_type="classification")
    exp = build_experiment(params, gpus=0)
    assert exp.task.init_checkpoint_modules == "classification"
    task = task_factory.get_task(exp.task)
    detector = task.build_model()
    task.initialize(detector)
    pairs = list(zip(detector.backbone.weights, classifier.backbone.weights, strict=True))
    assert len(pairs) > 100
    for got, want in pairs:
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=got.name)


def test_fine_tune_refuses_a_foreign_checkpoint(data_dir, tmp_path):
    from pipelines.detection import zoo

    module = tf.Module()
    module.v = tf.Variable(1.0)
    prefix = tf.train.Checkpoint(model=module).save(str(tmp_path / "other" / "ckpt"))
    tf.train.Checkpoint(feature_extractor=tf.Variable(1.0)).write(str(tmp_path / "foreign"))
    for path in (prefix, str(tmp_path / "foreign")):
        with pytest.raises(zoo.CheckpointError, match="neither an Object Detection API checkpoint"):
            zoo.check(tiny_params(data_dir, fine_tune_checkpoint=path, fine_tune_checkpoint_type="detection"))


# ---------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The tiny trained detector exported once (with its own BentoML store)."""
    from pipelines.engine.export import export

    bento_home = tmp_path_factory.mktemp("bentoml")
    previous = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(bento_home)
    try:
        params, run_dir, _ = trained
        (run_dir / "pipeline.config").write_text("# placeholder pipeline.config\n")
        saved_model = export(params, run_dir, params.label_map_path, name="shapes-detector", log=lambda line: None)
        yield saved_model, bento_home
    finally:
        if previous is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = previous


def test_export_serves_od_api_outputs_and_is_in_bentoml(trained, exported, monkeypatch):
    import bentoml

    from pipelines.detection import export as export_mod
    from pipelines.model_store import model_store

    saved_model, bento_home = exported
    monkeypatch.setenv("BENTOML_HOME", str(bento_home))
    params, run_dir, _ = trained
    assert saved_model == run_dir / "export" / "saved_model"
    for name in ("label_map.pbtxt", "pipeline.config", "params.yaml", "metadata.json"):
        assert (run_dir / "export" / name).is_file(), name
    metadata = json.loads((run_dir / "export" / "metadata.json").read_text())
    assert metadata["task"] == "detection" and metadata["num_classes"] == 4
    assert metadata["label_map"] == {"1": "circle", "2": "square", "3": "triangle", "4": "star"}
    # Not evaluated yet: no threshold chosen on the val set, the default and why.
    assert metadata["score_threshold"] == 0.5
    assert metadata["score_threshold_source"] == "default: the run has no eval/metrics.json"

    loaded = tf.saved_model.load(str(saved_model))
    assert sorted(loaded.signatures) == ["serving_default", "suggest"]  # suggest: make suggest's (test_suggest.py)
    features = loaded.signatures["suggest"](input_tensor=tf.zeros([1, 60, 90, 3], tf.uint8))["image_features"]
    assert features.shape == (1, 5 * 16)  # the five FPN levels (3..7) of depth fpn_num_filters, averaged
    serve = loaded.signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, None, 3]
    assert {k: v.dtype for k, v in serve.structured_outputs.items()} == {
        "num_detections": tf.float32, "detection_boxes": tf.float32,
        "detection_scores": tf.float32, "detection_classes": tf.float32}

    rng = np.random.default_rng(3)
    odd = rng.integers(0, 256, (157, 263, 3), dtype=np.uint8)  # non-square, not a multiple of anything
    out = {k: v.numpy() for k, v in serve(input_tensor=tf.constant(np.stack([odd, odd[::-1]]))).items()}
    assert out["num_detections"].shape == (2,) and out["detection_boxes"].shape[:2] == out["detection_scores"].shape
    assert set(np.unique(out["detection_classes"])) <= {1.0, 2.0, 3.0, 4.0}
    assert out["detection_boxes"].min() >= 0.0 and out["detection_boxes"].max() <= 1.0
    ymin, xmin, ymax, xmax = np.moveaxis(out["detection_boxes"], -1, 0)
    assert (ymax >= ymin).all() and (xmax >= xmin).all()
    assert np.all(np.diff(out["detection_scores"], axis=1) <= 1e-6)  # sorted by score

    # The same image through the checkpoint model, preprocessed and converted independently.
    model = build_model(params)
    tf.train.Checkpoint(model=model).read(tf.train.latest_checkpoint(str(run_dir / "train"))).expect_partial()
    ref = export_mod.reference_detections(model, params, odd)
    problem, difference = export_mod.compare(ref, {k: v[0] for k, v in out.items()})
    assert problem is None and difference < 1e-4, problem

    # A model that disagrees with its checkpoint is refused.
    broken = {**ref, "detection_boxes": ref["detection_boxes"] + 0.05}
    assert export_mod.compare(ref, broken)[0] is not None

    assert (bento_home / "models" / "shapes-detector" / "latest").is_file()
    stored = bentoml.models.get("shapes-detector:latest", _model_store=model_store())
    assert stored.info.metadata["task"] == "detection"
    assert stored.info.metadata["label_map"] == {1: "circle", 2: "square", 3: "triangle", 4: "star"}
    assert (Path(stored.path) / "saved_model" / "saved_model.pb").is_file()
    assert (Path(stored.path) / "label_map.pbtxt").is_file()


def test_predict_prints_json_and_draws_boxes(trained, exported, tmp_path):
    import json

    from PIL import Image

    from conftest import run_cli

    saved_model, _ = exported
    params, run_dir, _ = trained
    # A photo stored rotated with an EXIF tag: predictions are in the upright picture's pixels.
    upright = (np.random.default_rng(5).integers(0, 255, (90, 130, 3))).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(upright).save(tmp_path / "plain.png")
    proc = run_cli("predict", "--model", run_dir / "export", "--score-threshold", "0", "--out", tmp_path / "drawn",
                   tmp_path / "rotated.jpg", tmp_path / "plain.png", check=True)
    results = json.loads(proc.stdout)
    assert [Path(r["image"]).name for r in results] == ["rotated.jpg", "plain.png"]
    for r in results:  # the rotated file is stored 90 wide: its EXIF orientation was applied
        assert (r["width"], r["height"]) == (130, 90)
        assert r["detections"], "threshold 0 keeps every detection"
        for d in r["detections"]:
            assert d["label"] == {1: "circle", 2: "square", 3: "triangle", 4: "star"}[d["class_id"]]
            b = d["box"]
            assert 0 <= b["xmin"] <= b["xmax"] <= 130 and 0 <= b["ymin"] <= b["ymax"] <= 90
        assert Image.open(r["drawn"]).size == (130, 90)
    # make predict: the same answer, by RUN (here a run folder) and FILES.
    import subprocess

    from conftest import REPO

    made = subprocess.run(["make", "-s", "--no-print-directory", "predict", f"RUN={run_dir}",
                           f"FILES={tmp_path / 'plain.png'}", "SCORE=0", f"OUT={tmp_path / 'made'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    assert [{k: v for k, v in r.items() if k != "drawn"} for r in json.loads(made.stdout)] == \
        [{k: v for k, v in results[1].items() if k != "drawn"}]
    proc = run_cli("predict", "--model", run_dir / "export", tmp_path / "missing.jpg")
    assert proc.returncode == 2 and "missing.jpg: no such file" in proc.stderr
    proc = run_cli("predict", "--model", tmp_path, tmp_path / "plain.png")
    assert proc.returncode == 2 and "no SavedModel here" in proc.stderr


def test_evaluate_scores_what_the_export_serves(trained, exported, data_dir):
    """`make eval` (the engine's loop, detection's evaluator) against the exported SavedModel run on the
    same val records and scored with pycocotools here, independently: the same AP."""
    import json

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pipelines import examples
    from pipelines.engine.evaluate import evaluate

    params, run_dir, _ = trained
    saved_model, _ = exported
    lines = []
    metrics = evaluate(params, run_dir, log=lines.append)
    assert json.loads((run_dir / "eval" / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["task"] == "detection" and metrics["step"] == params.num_steps
    assert metrics["checkpoint"].endswith(f"ckpt-{params.num_steps}")  # no best kept without --with-eval
    for png in ("pr_curve.png", "threshold.png", "confusion_matrix.png", "predictions.png"):
        assert (run_dir / "eval" / png).stat().st_size > 1000
    # The confusion matrix at the chosen threshold accounts for every labelled object once.
    matrix = metrics["confusion"]
    assert matrix["classes"][-1] == "background" and matrix["score_threshold"] == (
        metrics["operating_point"] or {}).get("score_threshold", matrix["score_threshold"])
    assert sum(sum(row) for row in matrix["counts"][:-1]) == metrics["objects"]
    assert any(line.startswith("COCO box metrics on") for line in lines)

    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    images, truth, found = [], [], []
    for record in examples.read(params.eval_files):
        h, w = record.height, record.width
        image_id = len(images) + 1
        images.append({"id": image_id, "width": w, "height": h})
        for (x0, y0, x1, y1), cls in zip(record.boxes, record.classes):
            truth.append({"id": len(truth) + 1, "image_id": image_id, "category_id": int(cls), "iscrowd": 0,
                          "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
        out = serve(input_tensor=tf.constant(record.image[None]))
        n = int(out["num_detections"][0])
        for (y0, x0, y1, x1), score, cls in zip(out["detection_boxes"][0, :n].numpy() * [h, w, h, w],
                                                out["detection_scores"][0, :n].numpy(),
                                                out["detection_classes"][0, :n].numpy()):
            found.append({"image_id": image_id, "category_id": int(cls), "score": float(score),
                          "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
    assert metrics["images"] == len(images) and metrics["objects"] == len(truth)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": truth,
                  "categories": [{"id": i} for i in range(1, params.num_classes + 1)]}
    gt.createIndex()
    coco = COCOeval(gt, gt.loadRes(found), "bbox")
    coco.evaluate()
    coco.accumulate()
    coco.summarize()
    assert metrics["metrics"]["AP"] == pytest.approx(coco.stats[0], abs=1e-3)
    assert metrics["metrics"]["AP50"] == pytest.approx(coco.stats[1], abs=1e-3)

    # The default score threshold: chosen on these detections, printed, stored by the export, used by predict.
    from pipelines.detection.evaluate import choose_threshold
    from pipelines.detection.predict import DEFAULT_SCORE_THRESHOLD, Predictions
    from pipelines.engine.export import export

    point = metrics["operating_point"]
    independent = choose_threshold(coco, {})
    assert (point is None) == (independent is None)
    threshold = point["score_threshold"] if point else DEFAULT_SCORE_THRESHOLD
    if point:
        assert point["score_threshold"] == pytest.approx(independent["score_threshold"])
        assert 0 < point["precision"] <= 1 and 0 < point["recall"] <= 1
        assert any(line.startswith(f"default score threshold {threshold:.3f}")
                   for line in "\n".join(lines).splitlines())
    export(params, run_dir, params.label_map_path, name="shapes-detector", log=lines.append)
    metadata = json.loads((run_dir / "export" / "metadata.json").read_text())
    assert metadata["score_threshold"] == pytest.approx(threshold)
    assert metadata["score_threshold_source"].startswith("best F1 on val" if point else "default")
    assert Predictions({1: "circle"}, metadata).score_threshold == pytest.approx(threshold)
    assert Predictions({1: "circle"}, metadata, score_threshold=0.9).score_threshold == 0.9
