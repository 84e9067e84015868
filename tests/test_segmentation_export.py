"""Segmentation export, evaluation and prediction, for real on a tiny U-Net (EfficientNet-B0, 64x64).

The checkpoints are made here (a few gradient steps, saved the way training saves them), so this
file does not depend on the training code; the TFRecords come from the real data stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)
import numpy as np
import pytest
import tensorflow as tf

from conftest import read_records
from pipelines.workspace import UserError
from pipelines.segmentation.params import SegmenterParams

REPO = Path(__file__).resolve().parent.parent
LABELS = {1: "circle", 2: "square", 3: "triangle", 4: "star"}
STEPS = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """16 generated shape images with class masks, converted by the real data stage."""
    from pipelines.data.sample import generate

    root = tmp_path_factory.mktemp("segmentation-data")
    generate(root / "shapes", num_images=16)
    subprocess.run([sys.executable, "-m", "pipelines", "data", "--dataset", str(root / "shapes"), "--task",
                    "segmentation", "--out", str(root / "data"), "--workers", "1"],
                   cwd=REPO, check=True, capture_output=True)
    return root / "data"


def tiny_params(data_dir: Path) -> SegmenterParams:
    return SegmenterParams(num_classes=4, architecture="unet", backbone="efficientnetb0", image_height=64,
                           image_width=64, decoder_filters=[16, 16, 8, 8, 8], batch_size=4, eval_batch_size=2,
                           train_files=[str(data_dir / "train-*.tfrecord")],
                           eval_files=[str(data_dir / "val-*.tfrecord")],
                           label_map_path=str(data_dir / "label_map.pbtxt"))


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """(params, run_dir, best checkpoint): a few Adam steps on the training images, then checkpoints as
    training writes them (Model Garden's trainer): RUN_DIR/train/ckpt-N by a CheckpointManager, and the best
    one in train/best/ as its best-checkpoint exporter names it (best_ckpt-N, N a save count, not the step)."""
    from pipelines.examples import parse
    from pipelines.segmentation.model import build_model, loss_fn

    tf.keras.utils.set_random_seed(2)
    params = tiny_params(data_dir)
    model = build_model(params, load_encoder_weights=False)
    loss = loss_fn(params)
    optimizer = tf.keras.optimizers.Adam(1e-2)
    step = tf.Variable(0, dtype=tf.int64)

    def resized(serialized):
        ex = parse(serialized)
        image = tf.image.resize(tf.cast(ex["image"], tf.float32), params.input_size)
        mask = tf.image.resize(ex["class_mask"][..., None], params.input_size, method="nearest")[..., 0]
        return image, mask

    files = sorted(tf.io.gfile.glob(params.train_files[0]))
    batches = tf.data.TFRecordDataset(files).map(resized).batch(4).repeat()

    for images, masks in batches.take(STEPS):  # eager: for 6 steps, faster than tracing a tf.function
        with tf.GradientTape() as tape:
            value = loss(masks, model(images, training=True))
        optimizer.apply_gradients(zip(tape.gradient(value, model.trainable_variables), model.trainable_variables))
        step.assign_add(1)
    run_dir = tmp_path_factory.mktemp("run")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=step)
    tf.train.CheckpointManager(checkpoint, str(run_dir / "train"), max_to_keep=2).save(checkpoint_number=STEPS)
    best = tf.train.CheckpointManager(checkpoint, str(run_dir / "train" / "best"), max_to_keep=1,
                                      checkpoint_name="best_ckpt").save()
    (run_dir / "pipeline.config").write_text("# placeholder pipeline.config\n")
    return params, run_dir, best


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The tiny segmenter exported once, into its own BentoML store."""
    from pipelines.engine.export import export

    params, run_dir, _ = run
    bento_home = tmp_path_factory.mktemp("bentoml")
    previous = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(bento_home)
    try:
        lines = []
        saved_model = export(params, run_dir, params.label_map_path, name="shapes-segmenter", log=lines.append)
        yield saved_model, bento_home, lines
    finally:
        if previous is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = previous


@pytest.fixture(scope="module")
def serve(exported):
    return tf.saved_model.load(str(exported[0])).signatures["serving_default"]


@pytest.fixture(scope="module")
def restored(run):
    from pipelines.segmentation.export import restore_model

    params, _, best = run
    return restore_model(params, best)


def test_default_checkpoint_prefers_best(run, tmp_path):
    from pipelines.checkpoints import default as default_checkpoint
    from pipelines.checkpoints import step as checkpoint_step

    _, run_dir, best = run
    assert default_checkpoint(run_dir) == best
    assert checkpoint_step(best) == STEPS  # read from the checkpoint's `global_step` variable
    # Without best/, the latest of train/ (by its state file).
    (tmp_path / "train").mkdir()
    for f in (run_dir / "train").iterdir():
        if f.is_file():
            (tmp_path / "train" / f.name).write_bytes(f.read_bytes())
    assert Path(default_checkpoint(tmp_path)).name == f"ckpt-{STEPS}"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        default_checkpoint(tmp_path / "nothing")


def test_a_checkpoint_of_another_model_is_refused(run, tmp_path):
    from pipelines.segmentation.export import restore_model

    params, _, best = run
    with pytest.raises(UserError, match="not a checkpoint of this unet/efficientnetb0 model with 3 classes"):
        restore_model(dataclasses.replace(params, num_classes=3), best)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        restore_model(params, str(tmp_path / "ckpt-1"))


def test_signature_and_outputs_at_the_input_resolution(run, exported, serve):
    params, run_dir, best = run
    saved_model, _, lines = exported
    assert saved_model == run_dir / "export" / "saved_model"
    for name in ("label_map.pbtxt", "pipeline.config", "metadata.json"):
        assert (run_dir / "export" / name).is_file(), name
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".export")]  # no temporary folder left
    assert any(line.startswith("export check: the SavedModel matches") for line in lines)

    signatures = tf.saved_model.load(str(saved_model)).signatures
    assert sorted(signatures) == ["serving_default", "suggest"]  # suggest: make suggest's (test_suggest.py)
    ranked = {k: v.numpy() for k, v in signatures["suggest"](input_tensor=tf.zeros([1, 50, 70, 3], tf.uint8)).items()}
    assert ranked["probabilities"].shape == (1, *params.input_size, params.output_classes)
    assert ranked["image_features"].ndim == 2 and ranked["image_features"].shape[0] == 1
    (name, spec), = serve.structured_input_signature[1].items()
    assert name == "input_tensor" and spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, None, 3]
    outputs = serve.structured_outputs
    assert set(outputs) == {"segmentation_mask", "probabilities"}
    assert outputs["segmentation_mask"].dtype == tf.int32 and outputs["segmentation_mask"].shape.as_list() == [None] * 3
    assert outputs["probabilities"].dtype == tf.float32
    assert outputs["probabilities"].shape.as_list() == [None, None, None, params.output_classes]

    rng = np.random.default_rng(3)
    for shape in ((2, 157, 263, 3), (1, 40, 33, 3)):  # neither square nor the model's 64x64
        out = {k: v.numpy() for k, v in serve(input_tensor=tf.constant(rng.integers(0, 256, shape, np.uint8))).items()}
        assert out["segmentation_mask"].shape == shape[:3]
        assert out["probabilities"].shape == (*shape[:3], 5)
        assert np.allclose(out["probabilities"].sum(-1), 1.0, atol=1e-5)
        assert (out["segmentation_mask"] == out["probabilities"].argmax(-1)).all()
        assert out["segmentation_mask"].min() >= 0 and out["segmentation_mask"].max() <= 4


def test_export_agrees_with_the_checkpoint_model(run, serve, restored):
    from pipelines.segmentation.export import ExportCheckError, check_export

    params, run_dir, best = run
    # Computed here, independently of the export's code: stretch to 64x64, model, softmax, back, argmax.
    image = read_records(Path(params.eval_files[0]).parent, "val")[0]["image"]
    h, w = image.shape[:2]
    logits = restored.predict(tf.image.resize(tf.cast(image[None], tf.float32), (64, 64)).numpy(), verbose=0)
    ref_probs = tf.image.resize(tf.nn.softmax(logits), (h, w)).numpy()[0]
    out = serve(input_tensor=tf.constant(image[None]))
    got_probs, got_mask = out["probabilities"].numpy()[0], out["segmentation_mask"].numpy()[0]
    assert np.abs(got_probs - ref_probs).max() < 1e-4
    assert np.mean(got_mask == ref_probs.argmax(-1)) >= 0.999
    assert len(np.unique(got_mask)) >= 2, "a trivial one-class map would make this check meaningless"

    # Weights that are not the checkpoint's are refused: the last convolution's kernel, perturbed for a moment.
    kernel = [v for v in restored.trainable_variables if len(v.shape) == 4][-1]
    original = kernel.numpy()
    kernel.assign(original + np.random.default_rng(0).normal(0.0, 1.0, original.shape).astype(np.float32))
    try:
        with pytest.raises(ExportCheckError, match="disagrees with checkpoint"):
            check_export(run_dir / "export" / "saved_model", params, best, model=restored)
    finally:
        kernel.assign(original)


def test_failed_check_keeps_the_previous_export(run, exported, monkeypatch):
    import bentoml

    from pipelines.engine.export import export
    from pipelines.model_store import model_store
    from pipelines.segmentation import export as export_mod

    params, run_dir, _ = run
    _, bento_home, _ = exported
    monkeypatch.setenv("BENTOML_HOME", str(bento_home))
    before = {p.relative_to(run_dir): p.read_bytes() for p in (run_dir / "export").rglob("*") if p.is_file()}
    versions = len(bentoml.models.list("shapes-segmenter", _model_store=model_store()))

    def refuse(*args, **kwargs):
        raise export_mod.ExportCheckError("disagrees (simulated)")

    monkeypatch.setattr(export_mod, "check_export", refuse)
    with pytest.raises(export_mod.ExportCheckError):
        export(params, run_dir, params.label_map_path, name="shapes-segmenter", log=lambda line: None)
    after = {p.relative_to(run_dir): p.read_bytes() for p in (run_dir / "export").rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".export")]
    assert len(bentoml.models.list("shapes-segmenter", _model_store=model_store())) == versions


def test_the_next_export_removes_what_a_killed_one_left(run, monkeypatch):
    """`make export FORMAT=all` killed mid-way left its `.export.tmp-*` folder beside the export; the next
    export removes it (its process is gone, by the PID@HOST in the name), says so, and leaves the folder of
    an export still running alone. The export is stopped right after (its save refused): the clean-up
    comes before."""
    import shutil

    from pipelines.workspace import owner_tag
    from pipelines.engine.export import export
    from pipelines.segmentation import export as export_mod

    params, run_dir, _ = run
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    killed = run_dir / f".export.tmp-{owner_tag(child.pid)}-k3j2"
    running = run_dir / f".export.tmp-{owner_tag(os.getppid())}-x9y8"  # (our parent lives as long as we do)
    try:
        for folder in (killed, running):
            (folder / "saved_model").mkdir(parents=True)
            (folder / "model_int8.tflite").write_bytes(b"\0" * 4096)

        def stop(*args, **kwargs):
            raise RuntimeError("stopped after the clean-up")

        monkeypatch.setattr(export_mod.Exporter, "save", stop)
        lines = []
        with pytest.raises(RuntimeError, match="stopped after the clean-up"):
            export(params, run_dir, params.label_map_path, name="shapes-segmenter", log=lines.append)
        assert not killed.exists() and running.is_dir()
        removed = [line for line in lines if line.startswith("removed ")]
        assert len(removed) == 1 and "removed 1 temporary folder(s)" in removed[0] and killed.name in removed[0]
    finally:
        shutil.rmtree(running, ignore_errors=True)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".export.tmp")]


def test_metadata_and_bentoml_store(run, exported, monkeypatch, tmp_path):
    import bentoml

    from pipelines.model_store import model_store
    from pipelines import tasks

    params, run_dir, best = run
    saved_model, bento_home, _ = exported
    monkeypatch.setenv("BENTOML_HOME", str(bento_home))
    metadata = json.loads((run_dir / "export" / "metadata.json").read_text())
    assert metadata["task"] == "segmentation"
    assert metadata["label_map"] == {str(k): v for k, v in LABELS.items()}
    assert metadata["num_classes"] == 4 and metadata["input_size"] == [64, 64]
    assert (metadata["architecture"], metadata["backbone"]) == ("unet", "efficientnetb0")
    assert metadata["checkpoint"] == best and metadata["step"] == STEPS
    assert metadata["signature"]["outputs"] == ["segmentation_mask", "probabilities"]
    assert metadata["export_check"]["images"] >= 2 and metadata["export_check"]["min_pixel_agreement"] >= 0.999

    assert (bento_home / "models" / "shapes-segmenter" / "latest").is_file()
    stored = bentoml.models.get("shapes-segmenter:latest", _model_store=model_store())
    assert stored.info.metadata["task"] == "segmentation"
    assert stored.info.metadata["label_map"] == LABELS
    for name in ("saved_model/saved_model.pb", "label_map.pbtxt", "metadata.json"):
        assert (Path(stored.path) / name).is_file(), name

    assert tasks.of_export(run_dir / "export").name == "segmentation"
    assert tasks.of_export(saved_model).name == "segmentation"
    (tmp_path / "saved_model").mkdir()
    (tmp_path / "saved_model" / "saved_model.pb").write_bytes(b"")
    assert tasks.of_export(tmp_path).name == "detection"  # exports from before metadata.json
    (tmp_path / "metadata.json").write_text('{"task": "pose"}')
    with pytest.raises(UserError, match="unknown task 'pose'"):
        tasks.of_export(tmp_path)


def test_evaluate_matches_the_savedmodel(run, exported, serve, data_dir):
    from PIL import Image

    from pipelines.engine.evaluate import evaluate
    from pipelines.segmentation.metric import confusion_matrix, iou_metrics

    params, run_dir, best = run
    lines = []
    metrics = evaluate(params, run_dir, log=lines.append)
    stored = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert stored == json.loads(json.dumps(metrics))
    val = read_records(data_dir, "val")
    assert metrics["task"] == "segmentation" and metrics["checkpoint"] == best and metrics["step"] == STEPS
    assert metrics["images"] == len(val)
    names = ["background", "circle", "square", "triangle", "star"]
    assert metrics["confusion_matrix"]["classes"] == names and list(metrics["per_class"]) == names
    cm = np.array(metrics["confusion_matrix"]["counts"])
    assert cm.shape == (5, 5) and cm.sum() == metrics["pixels"]
    assert metrics["pixels"] + metrics["ignored_pixels"] == sum(r["image"].shape[0] * r["image"].shape[1] for r in val)
    assert set(metrics["metrics"]) == {"mean_iou", "mean_iou_foreground", "pixel_accuracy"}
    assert 0.0 <= metrics["metrics"]["mean_iou"] <= 1.0
    for v in metrics["per_class"].values():
        assert set(v) == {"class_id", "iou", "true_pixels", "predicted_pixels"}
    assert any("mean IoU" in line for line in lines)
    assert Image.open(run_dir / "eval" / "confusion_matrix.png").size[0] >= 500
    assert Image.open(run_dir / "eval" / "predictions.png").size[0] >= 1000

    # What the served model gives on the same images, scored independently of evaluate().
    served = np.zeros((5, 5), dtype=np.int64)
    for r in val:
        mask = serve(input_tensor=tf.constant(r["image"][None]))["segmentation_mask"].numpy()[0]
        served += confusion_matrix(r["class_mask"], mask, 5)
    assert np.abs(served - cm).sum() <= 0.002 * cm.sum()  # graph vs graph: at most float-rounding flips
    expected = iou_metrics(served, names)
    assert metrics["metrics"]["mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-3)
    assert metrics["metrics"]["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-3)


def test_predict_writes_palette_masks_of_the_served_classes(exported, serve, tmp_path):
    from PIL import Image

    from pipelines.viz import class_color
    from pipelines.engine.predict import predict

    saved_model, _, _ = exported
    # A photo stored rotated with an EXIF tag: masks are in the upright picture's pixels.
    upright = np.kron(np.random.default_rng(5).integers(0, 255, (9, 13, 3)), np.ones((10, 10, 1))).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.png", exif=exif)
    Image.fromarray(upright).save(tmp_path / "plain.png")
    lines = []
    results = predict(saved_model.parent, [tmp_path / "rotated.png", tmp_path / "plain.png"], tmp_path / "out",
                      log=lines.append)
    expected = serve(input_tensor=tf.constant(upright[None]))["segmentation_mask"].numpy()[0]
    assert [Path(r["image"]).name for r in results] == ["rotated.png", "plain.png"]
    for r in results:
        assert (r["width"], r["height"]) == (130, 90)
        mask = Image.open(r["mask"])
        assert mask.mode == "P" and mask.size == (130, 90)
        assert (np.asarray(mask) == expected).all()
        palette = mask.getpalette()
        for class_id in np.unique(expected):
            color = (0, 0, 0) if class_id == 0 else class_color(int(class_id))
            assert tuple(palette[3 * class_id:3 * class_id + 3]) == color
        assert Image.open(r["overlay"]).size == (130, 90)
        ids, counts = np.unique(expected, return_counts=True)
        assert [c["class_id"] for c in r["classes"]] == ids.tolist()
        assert [c["pixels"] for c in r["classes"]] == counts.tolist()
        assert [c["label"] for c in r["classes"]] == [(["background"] + list(LABELS.values()))[i] for i in ids]
        assert sum(c["fraction"] for c in r["classes"]) == pytest.approx(1.0, abs=1e-4)
    json.dumps(results)
    with pytest.raises(UserError, match="no such file"):
        predict(saved_model.parent, [tmp_path / "missing.jpg"])


# ------------------------------------------------------------------------------------------ TFLite formats


@pytest.fixture(scope="module")
def tflite_run(run, tmp_path_factory):
    """A copy of the run exported with every TFLite format (int8 calibrated on its 12 or so training images)
    and ONNX."""
    import shutil

    from pipelines.engine.export import export

    params, run_dir, _ = run
    copy = tmp_path_factory.mktemp("tflite-run") / "run"
    shutil.copytree(run_dir / "train", copy / "train")
    previous = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(tmp_path_factory.mktemp("bentoml-tflite"))
    try:
        lines = []
        export(params, copy, params.label_map_path, name="shapes-segmenter-tflite",
               device_files=("model.tflite", "model_fp16.tflite", "model_int8.tflite", "model.onnx"), log=lines.append)
    finally:
        if previous is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = previous
    return params, copy, lines


def test_tflite_segmenter_layout(tflite_run):
    from ai_edge_litert.interpreter import Interpreter

    params, run_dir, lines = tflite_run
    export_dir = run_dir / "export"
    assert (export_dir / "labels.txt").read_text().split() == ["background", "circle", "square", "triangle", "star"]
    for name in ("model.tflite", "model_fp16.tflite", "model_int8.tflite"):
        interpreter = Interpreter(model_path=str(export_dir / name))
        (inp,) = interpreter.get_input_details()
        assert list(inp["shape"]) == [1, 64, 64, 3] and inp["dtype"] == np.uint8
        outputs = interpreter.get_output_details()
        assert [list(d["shape"]) for d in outputs] == [[1, 64, 64], [1, 64, 64, 5]]
        assert [d["dtype"] for d in outputs] == [np.int32, np.float32]
        by_name = interpreter.get_signature_runner().get_output_details()
        assert [by_name[k]["index"] for k in ("segmentation_mask", "probabilities")] == [d["index"] for d in outputs]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.shape == [1, 64, 64, 3] and inp.type == "tensor(uint8)"
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("segmentation_mask", [1, 64, 64]),
                                                                  ("probabilities", [1, 64, 64, 5])]
    assert any(line.startswith("formats") for line in lines)


def test_float_tflite_segmenter_agrees_with_the_savedmodel(tflite_run, data_dir):
    """At the model's input size, the float files (TFLite and ONNX) give the SavedModel's probabilities and
    classes."""
    from ai_edge_litert.interpreter import Interpreter

    params, run_dir, _ = tflite_run
    export_dir = run_dir / "export"
    serve_saved = tf.saved_model.load(str(export_dir / "saved_model")).signatures["serving_default"]
    images = [r["image"] for r in read_records(data_dir, "val")]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    runners = {"model.tflite": Interpreter(model_path=str(export_dir / "model.tflite")).get_signature_runner(),
               "model_fp16.tflite": Interpreter(model_path=str(export_dir / "model_fp16.tflite")).get_signature_runner(),
               "model.onnx": lambda input_tensor: dict(zip(("segmentation_mask", "probabilities"),
                                                           session.run(None, {"input_tensor": input_tensor})))}
    for name, tolerance, agreement in (("model.tflite", 1e-4, 0.999), ("model_fp16.tflite", 2e-2, 0.98),
                                       ("model.onnx", 1e-4, 0.999)):
        for image in images:
            x = tf.cast(tf.round(tf.image.resize(tf.cast(image[None], tf.float32), (64, 64))), tf.uint8)
            ref = serve_saved(input_tensor=x)
            got = runners[name](input_tensor=x.numpy())
            difference = np.abs(got["probabilities"] - ref["probabilities"].numpy()).max()
            same = np.mean(got["segmentation_mask"] == ref["segmentation_mask"].numpy())
            assert difference < tolerance and same >= agreement, (name, difference, same)


def test_tflite_formats_measured_and_evaluated_by_the_same_code(tflite_run):
    """metadata.json has every format's size, latency and mean IoU beside the SavedModel's; int8 within 3
    points; evaluate(model=...tflite) gives the stored figure and writes eval-<name>/."""
    from pipelines.engine.evaluate import evaluate

    params, run_dir, _ = tflite_run
    formats = json.loads((run_dir / "export" / "metadata.json").read_text())["formats"]
    assert list(formats) == ["saved_model", "model.tflite", "model_fp16.tflite", "model_int8.tflite", "model.onnx"]
    reference = formats["saved_model"]["value"]
    assert all(entry["metric"] == "mean_iou" and entry["bytes"] > 0 for entry in formats.values())
    assert abs(formats["model.tflite"]["value"] - reference) < 0.005
    assert abs(formats["model.onnx"]["value"] - reference) < 0.005
    assert abs(formats["model_int8.tflite"]["value"] - reference) <= 0.03, formats
    metrics = evaluate(params, run_dir, model=run_dir / "export" / "model_fp16.tflite", log=lambda line: None)
    assert metrics["metrics"]["mean_iou"] == pytest.approx(formats["model_fp16.tflite"]["value"], abs=1e-9)
    assert metrics["step"] == STEPS and (run_dir / "eval-model_fp16.tflite" / "metrics.json").is_file()
    assert not (run_dir / "eval").exists()  # the checkpoint's evaluation is not touched
    with pytest.raises(UserError, match="tflite"):
        evaluate(params, run_dir, model=run_dir / "export" / "saved_model", log=lambda line: None)


def test_a_damaged_device_file_is_refused_in_one_line(tflite_run, tmp_path):
    from pipelines.engine.evaluate import evaluate

    params, run_dir, _ = tflite_run
    for name, says in (("broken.tflite", "not a TFLite model"), ("broken.onnx", "not an ONNX model")):
        (run_dir / "export" / name).write_bytes(b"not a model")
        try:
            with pytest.raises(UserError, match=says):
                evaluate(params, run_dir, model=run_dir / "export" / name, log=lambda line: None)
        finally:
            (run_dir / "export" / name).unlink()
    assert not list(run_dir.glob("eval-broken*"))


def test_format_and_quant_choose_the_device_files():
    from pipelines.cli import _device_files

    assert _device_files("savedmodel", None) == ()
    assert _device_files("tflite", None) == ("model.tflite",)
    assert _device_files("tflite", ("int8", "float16")) == ("model_int8.tflite", "model_fp16.tflite")
    assert _device_files("onnx", None) == ("model.onnx",)
    assert _device_files("all", None) == ("model.tflite", "model_fp16.tflite", "model_int8.tflite", "model.onnx")
    assert _device_files("all", ("int8",)) == ("model_int8.tflite", "model.onnx")
    for kind in ("savedmodel", "onnx"):
        with pytest.raises(UserError, match="--format tflite"):
            _device_files(kind, ("int8",))
