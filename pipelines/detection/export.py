"""Export a trained detector as a SavedModel with the Object Detection API's serving signature.

RUN_DIR/export/ gets saved_model/, params.yaml (the Model Garden experiment), label_map.pbtxt,
metadata.json and, when RUN_DIR has one, pipeline.config. `serving_default` takes `input_tensor`, uint8
[batch, height, width, 3] of any size, and returns, like the OD API:

    num_detections     float32 [batch]
    detection_boxes    float32 [batch, N, 4]  normalized [ymin, xmin, ymax, xmax] of the input image
    detection_scores   float32 [batch, N]
    detection_classes  float32 [batch, N]     label-map ids

Model Garden's DetectionModule does the resizing (the training's stretch to height x width) and,
with the export_config set in build_experiment, the normalization to the input image and the
float casts. Before the export replaces the previous one, its detections on a few images are
compared with the checkpoint model's own; a mismatch raises ExportCheckError. The export is then
recorded in the BentoML model store ($BENTOML_HOME, default ~/bentoml), with the same metadata
that export/metadata.json holds (its "task": "detection" tells exports of the two tasks apart).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras

from pipelines.common import atomic_output_dir
from pipelines.data.label_map import read_label_map
from pipelines.detection.experiment import build_experiment
from pipelines.detection import ssd
from pipelines.detection.params import DetectorParams
from pipelines.detection.train import build_model
# model_store is re-exported: callers (and tests) open the store through this module too.
from pipelines.model_store import check_images, model_store, save_to_bentoml, tag_name, write_metadata  # noqa: F401

from official.core import train_utils  # isort: skip
from official.vision.serving import detection  # isort: skip

OUTPUT_KEYS = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")
INPUT_NAME = "input_tensor"  # the OD API's serving input name


class ExportCheckError(RuntimeError):
    """The SavedModel does not reproduce the checkpoint model's detections."""


class ODAPIDetectionModule(detection.DetectionModule):
    """Model Garden's DetectionModule serving the OD API's SSD (pipelines/detection/ssd.py): the
    image stretched with the OD API's resize and scaled to [-1, 1], its anchors, its post-processing;
    only the OD API's four outputs (no image_info)."""

    def _build_model(self):
        return ssd.build_model(self.params.task)

    def _build_anchor_boxes(self):
        m = self.params.task.model
        return ssd.anchor_boxes(m.min_level, m.max_level, m.anchor.num_scales, m.anchor.aspect_ratios,
                                m.anchor.anchor_size, self._input_image_size)

    def _build_inputs(self, image):
        height, width = self._input_image_size
        original = tf.cast(tf.shape(image)[:2], tf.float32)
        resized = ssd.resize(ssd.preprocess(image[None]), (height, width))[0]
        size = tf.constant([height, width], tf.float32)
        image_info = tf.stack([original, size, size / original, tf.zeros([2])])
        return resized, self._build_anchor_boxes(), image_info

    def serve(self, images):
        outputs = super().serve(images)
        return {key: outputs[key] for key in OUTPUT_KEYS}


def _experiment(params: DetectorParams):
    params = dataclasses.replace(params, fine_tune_checkpoint=None, fine_tune_checkpoint_type=None)
    return build_experiment(params, "", gpus=0)


def save_signature(module: ODAPIDetectionModule, folder: Path) -> None:
    """Save the serving signature and the model's variables, and nothing else.

    tf.saved_model.save of the Keras model itself (what Model Garden's export_base does) also traces
    and stores every layer's call functions so that the Keras objects can be revived: for this
    network that tripled the save time (23 s -> 6 s without) and made loading 8x slower (7.5 s ->
    0.9 s), for a signature nobody calls those functions through."""
    signatures = module.get_inference_signatures({"image_tensor": tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY})
    root = tf.Module()
    root.model_variables = list(module.model.variables)  # what the signature reads, tracked for saving
    tf.saved_model.save(root, str(folder), signatures=signatures)


def reference_detections(model: tf_keras.Model, params: DetectorParams, image: np.ndarray) -> dict:
    """The checkpoint model on one uint8 image, preprocessed as the OD API does; boxes normalized to the
    input image. Written independently of DetectionModule's batching, to check the export against."""
    size = [params.image_height, params.image_width]
    x = ssd.resize(ssd.preprocess(tf.convert_to_tensor(image[None], tf.uint8)), size)
    out = model(x, image_shape=tf.constant([size], tf.float32), training=False)
    boxes = tf.clip_by_value(out["detection_boxes"][0] / tf.constant(size * 2, tf.float32), 0.0, 1.0)
    return {"num_detections": int(out["num_detections"][0]), "detection_boxes": boxes.numpy(),
            "detection_scores": out["detection_scores"][0].numpy(),
            "detection_classes": out["detection_classes"][0].numpy().astype(np.float32)}


def compare(ref: dict, got: dict, top: int = 20, score_tol: float = 1e-4,
            box_tol: float = 2e-3) -> tuple[str | None, float]:
    """(None, largest box difference) when `got` (one image's SavedModel outputs) matches `ref`,
    else (what differs, ...). Detections are matched as sets over the top `top`, so that near-equal
    scores may swap places; a match has the same class, score and box within the tolerances.
    """
    n = int(ref["num_detections"])
    if int(got["num_detections"]) != n:
        return f"num_detections {int(got['num_detections'])} != {n}", float("nan")
    k = min(n, top)
    rs, gs = ref["detection_scores"][:k], got["detection_scores"][:k]
    if not np.allclose(rs, gs, atol=score_tol):
        return f"scores differ by up to {np.abs(rs - gs).max():.2e}", float("nan")
    window = min(n, k + 5)
    largest = 0.0
    for i in range(k):
        diffs = [np.abs(got["detection_boxes"][j] - ref["detection_boxes"][i]).max() for j in range(window)
                 if got["detection_classes"][j] == ref["detection_classes"][i]
                 and abs(got["detection_scores"][j] - ref["detection_scores"][i]) <= score_tol]
        if not diffs or min(diffs) > box_tol:
            return (f"detection {i} (class {ref['detection_classes'][i]:g}, score {ref['detection_scores'][i]:.4f}, "
                    f"box {np.round(ref['detection_boxes'][i], 4).tolist()}) has no match"), float("nan")
        largest = max(largest, float(min(diffs)))
    return None, largest


def check_export(saved_model_dir: str | Path, params: DetectorParams, checkpoint: str,
                 images: list[np.ndarray] | None = None, model: tf_keras.Model | None = None) -> dict:
    """Run the SavedModel and the checkpoint model on `images`; raise ExportCheckError on a mismatch.

    `model`: the checkpoint's model if already restored (else it is built and restored here)."""
    images = images if images is not None else check_images(params)
    if model is None:
        model = build_model(params)
        tf.train.Checkpoint(model=model).read(checkpoint).expect_partial().assert_existing_objects_matched()
    serve = tf.saved_model.load(str(saved_model_dir)).signatures["serving_default"]
    max_box = 0.0
    for n, image in enumerate(images):
        ref = reference_detections(model, params, image)
        out = serve(**{INPUT_NAME: tf.convert_to_tensor(image[None])})
        got = {key: out[key].numpy()[0] for key in OUTPUT_KEYS}
        problem, box_difference = compare(ref, got)
        if problem:
            raise ExportCheckError(f"{saved_model_dir}: image {n} ({image.shape[1]}x{image.shape[0]}): the SavedModel "
                                   f"disagrees with checkpoint {checkpoint}: {problem}")
        max_box = max(max_box, box_difference)
    return {"images": len(images), "max_box_difference": max_box}


def export(params: DetectorParams, run_dir: str | Path, label_map_path: str | Path, name: str | None = None,
           checkpoint: str | None = None, log=print) -> Path:
    """Export RUN_DIR/train's latest (or the given) checkpoint to RUN_DIR/export/saved_model; returns it.

    The BentoML model is named `name` (default: RUN_DIR's folder name, as a valid tag).
    """
    run_dir = Path(run_dir)
    checkpoint = checkpoint or tf.train.latest_checkpoint(str(run_dir / "train"))
    if not checkpoint:
        raise FileNotFoundError(f"{run_dir / 'train'}: no checkpoint to export; train first")
    label_map = read_label_map(Path(label_map_path))
    if max(label_map) > params.num_classes:
        raise ValueError(f"{label_map_path}: ids up to {max(label_map)} but the model has {params.num_classes} classes")
    exp = _experiment(params)
    policy = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy("float32")  # a mixed_float16 training still exports float32
    try:
        final = run_dir / "export"
        with atomic_output_dir(final) as tmp:
            module = ODAPIDetectionModule(exp, batch_size=None, input_type="image_tensor", input_name=INPUT_NAME,
                                          input_image_size=[params.image_height, params.image_width])
            tf.train.Checkpoint(model=module.model).read(checkpoint).expect_partial().assert_existing_objects_matched()
            save_signature(module, tmp / "saved_model")
            train_utils.serialize_config(exp, str(tmp))
            shutil.copyfile(label_map_path, tmp / "label_map.pbtxt")
            if (run_dir / "pipeline.config").is_file():
                shutil.copyfile(run_dir / "pipeline.config", tmp / "pipeline.config")
            check = check_export(tmp / "saved_model", params, checkpoint, model=module.model)
            log(f"export check: the SavedModel matches {checkpoint} on {check['images']} images "
                f"(largest box difference {check['max_box_difference']:.1e})")
            metadata = {
                "task": "detection",
                "label_map": {int(k): v for k, v in sorted(label_map.items())},
                "num_classes": params.num_classes,
                "input_size": [params.image_height, params.image_width],
                "signature": {"input": f"{INPUT_NAME}: uint8 [batch, height, width, 3]", "outputs": list(OUTPUT_KEYS)},
                "checkpoint": str(checkpoint),
                "export_check": check,
            }
            write_metadata(tmp, metadata)  # inside the temporary folder: it lands with the rest, or not at all
    finally:
        tf_keras.mixed_precision.set_global_policy(policy)
    tag = save_to_bentoml(final, tag_name(name or run_dir.resolve().name, "detector"), metadata)
    log(f"exported {final / 'saved_model'}; BentoML model {tag}")
    return final / "saved_model"
