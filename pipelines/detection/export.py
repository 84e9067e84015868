"""Detection's part of `make export` (pipelines/engine/export.py): a SavedModel with the Object
Detection API's serving signature, and params.yaml (the Model Garden experiment). `serving_default` takes `input_tensor`, uint8
[batch, height, width, 3] of any size, and returns, like the OD API:

    num_detections     float32 [batch]
    detection_boxes    float32 [batch, N, 4]  normalized [ymin, xmin, ymax, xmax] of the input image
    detection_scores   float32 [batch, N]
    detection_classes  float32 [batch, N]     label-map ids

For `make export FORMAT=tflite` (pipelines/engine/formats.py) the same network is converted with Model
Garden's TFLite post-processing (the detection generator's 'tflite' NMS version, which becomes the
TFLite_Detection_PostProcess op): uint8 [1, H, W, 3] in; out, in this order, as the Object Detection
API's TFLite models give them:

    detection_boxes    float32 [1, N, 4]  normalized [ymin, xmin, ymax, xmax] of the input (not clipped)
    detection_classes  float32 [1, N]     0-based: label-map id - 1 (labels.txt line n is class n)
    detection_scores   float32 [1, N]
    num_detections     float32 [1]

Its NMS is the op's fast one (the OD API's TFLite default): boxes chosen class-agnostically, each with
its best class. Measured on the sample it gives the SavedModel's AP (bench/RESULTS.md); the op's
per-class ("regular") NMS loses whole classes when the interpreter runs it on several threads.

`make export FORMAT=onnx` converts the SavedModel's computation at the fixed input size (uint8 [1, H, W,
3] in, the four outputs above, per-class NMS as the SavedModel) with tf2onnx.

Model Garden's DetectionModule does the resizing (the training's stretch to height x width) and,
with the export_config set in build_experiment, the normalization to the input image and the
float casts. Before the export replaces the previous one, its detections on a few images are
compared with the checkpoint model's own; a mismatch raises ExportCheckError.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras

from pipelines import checkpoints
from pipelines.workspace import display_path
from pipelines.detection.model import build_model, inference_experiment
from pipelines.detection import ssd
from pipelines.detection.params import DetectorParams
from pipelines.engine.export import ExportCheckError
from pipelines.model_store import DETECTION_OUTPUTS, FEATURES_OUTPUT, INPUT_NAME, SUGGEST_SIGNATURE, check_images

from official.core import train_utils  # isort: skip
from official.vision.serving import detection  # isort: skip



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
        return {key: outputs[key] for key in DETECTION_OUTPUTS}

    def suggest(self, images):
        """uint8 [B, H, W, 3] -> serve's four outputs and FEATURES_OUTPUT: each FPN level averaged over space,
        the levels concatenated, [B, levels * depth]; one forward pass. (make suggest runs it on an image's
        mirror image for the second view: pipelines/detection/suggest.py.)"""
        x, anchors, info = self.preprocess(images)
        model = self.model
        features = model.decoder(model.backbone(x, training=False), training=False)
        logits, codes, _ = model.head(features, training=False)
        found = model.detection_generator(codes, logits, anchors, info[:, 1, :])
        found = self._normalize_coordinates(dict(found), ["detection_boxes"], info)
        levels = sorted(features, key=int)
        return {"num_detections": tf.cast(found["num_detections"], tf.float32),
                "detection_boxes": found["detection_boxes"], "detection_scores": found["detection_scores"],
                "detection_classes": tf.cast(found["detection_classes"], tf.float32),
                FEATURES_OUTPUT: tf.concat([tf.reduce_mean(tf.cast(features[k], tf.float32), axis=[1, 2])
                                            for k in levels], axis=-1)}


def save_signature(module: ODAPIDetectionModule, folder: Path) -> None:
    """Save the serving signature, the suggest signature (make suggest's) and the model's variables, and
    nothing else.

    tf.saved_model.save of the Keras model itself (what Model Garden's export_base does) also traces
    and stores every layer's call functions so that the Keras objects can be revived: for this
    network that tripled the save time (23 s -> 6 s without) and made loading 8x slower (7.5 s ->
    0.9 s), for a signature nobody calls those functions through."""
    signatures = module.get_inference_signatures({"image_tensor": tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY})
    signatures[SUGGEST_SIGNATURE] = tf.function(module.suggest).get_concrete_function(
        tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME))
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
        checkpoints.restore(model, checkpoint)
    serve = tf.saved_model.load(str(saved_model_dir)).signatures["serving_default"]
    max_box = 0.0
    for n, image in enumerate(images):
        ref = reference_detections(model, params, image)
        out = serve(**{INPUT_NAME: tf.convert_to_tensor(image[None])})
        got = {key: out[key].numpy()[0] for key in DETECTION_OUTPUTS}
        problem, box_difference = compare(ref, got)
        if problem:
            raise ExportCheckError(f"{saved_model_dir}: image {n} ({image.shape[1]}x{image.shape[0]}): the SavedModel "
                                   f"disagrees with checkpoint {checkpoint}: {problem}")
        max_box = max(max_box, box_difference)
    return {"images": len(images), "max_box_difference": max_box}


TFLITE_OUTPUTS = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")


class Exporter:
    """Detection's part of `make export` (pipelines/engine/export.py): the module above saved with its
    Model Garden experiment (params.yaml), checked detection by detection; and its TFLite function."""

    outputs = DETECTION_OUTPUTS
    tflite_output_order = TFLITE_OUTPUTS
    tflite_first_label = 1  # TFLite class 0 is label-map id 1
    default_name = "detector"  # the BentoML model name when the run's name is not a valid one

    def __init__(self, params: DetectorParams):
        self.params = params
        self.exp = inference_experiment(params)

    def save(self, checkpoint: str, saved_model_dir: Path, folder: Path) -> tf_keras.Model:
        params = self.params
        module = ODAPIDetectionModule(self.exp, batch_size=None, input_type="image_tensor", input_name=INPUT_NAME,
                                      input_image_size=[params.image_height, params.image_width])
        checkpoints.restore(module.model, checkpoint)
        save_signature(module, saved_model_dir)
        train_utils.serialize_config(self.exp, str(folder))
        return module.model

    def check(self, saved_model_dir: Path, checkpoint: str, model: tf_keras.Model) -> dict:
        return check_export(saved_model_dir, self.params, checkpoint, model=model)

    @staticmethod
    def describe_check(check: dict) -> str:
        return f"largest box difference {check['max_box_difference']:.1e}"

    def metadata(self, run_dir: Path, checkpoint: str, log=print) -> dict:
        """The default score threshold of the served detections: the one `make eval` chose on the val set
        for this checkpoint (eval/metrics.json), else DEFAULT_SCORE_THRESHOLD, saying why."""
        from pipelines.detection.predict import DEFAULT_SCORE_THRESHOLD

        path = Path(run_dir) / "eval" / "metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        point = metrics.get("operating_point")
        if point and metrics.get("checkpoint") == checkpoint:
            log(f"default score threshold {point['score_threshold']:.3f} (chosen on val by make eval: precision "
                f"{point['precision']:.3f}, recall {point['recall']:.3f})")
            return {"score_threshold": point["score_threshold"],
                    "score_threshold_source": f"best F1 on val at IoU {point['iou']:.2f} ({display_path(path)}): "
                                              f"precision {point['precision']:.3f}, recall {point['recall']:.3f}"}
        why = ("eval/metrics.json is of another checkpoint" if point else
               "make eval found no detection or object on val" if metrics else "the run has no eval/metrics.json")
        log(f"default score threshold {DEFAULT_SCORE_THRESHOLD} ({why}; make eval RUN=... then make export chooses "
            "one on the val set)")
        return {"score_threshold": DEFAULT_SCORE_THRESHOLD, "score_threshold_source": f"default: {why}"}

    def signature_notes(self) -> dict:
        return {}

    def tflite_function(self, model: tf_keras.Model):
        """uint8 [1, H, W, 3] -> TFLITE_OUTPUTS: the checkpoint model's network, then Model Garden's TFLite
        post-processing with the run's NMS settings (fast NMS, one class per box, anchors normalized)."""
        params, m = self.params, self.exp.task.model
        size = (params.image_height, params.image_width)
        anchors = ssd.anchor_boxes(m.min_level, m.max_level, m.anchor.num_scales, m.anchor.aspect_ratios,
                                   m.anchor.anchor_size, size)
        per_location = m.anchor.num_scales * len(m.anchor.aspect_ratios)
        generator = ssd.SSDDetectionGenerator(
            apply_nms=True, nms_version="tflite", box_coder_weights=[float(w) for w in params.box_coder_weights],
            tflite_post_processing_config={
                "max_detections": params.max_detections, "max_classes_per_detection": 1, "use_regular_nms": False,
                "nms_score_threshold": params.nms_score_threshold, "nms_iou_threshold": params.nms_iou_threshold,
                "normalize_anchor_coordinates": True, "input_image_size": size})

        @tf.function(input_signature=[tf.TensorSpec([1, *size, 3], tf.uint8, name=INPUT_NAME)])
        def detect(input_tensor):
            features = model.decoder(model.backbone(ssd.preprocess(input_tensor), training=False), training=False)
            logits, box_codes, _ = model.head(features, training=False)
            foreground = {}  # without column 0 (the background): the op's classes are then 0-based label ids - 1
            for level, x in logits.items():
                shape = tf.shape(x)
                x = tf.reshape(x, [1, shape[1], shape[2], per_location, m.num_classes])[..., 1:]
                foreground[level] = tf.reshape(x, [1, shape[1], shape[2], per_location * (m.num_classes - 1)])
            out = generator(box_codes, foreground, anchors, None)
            return {name: out[name] for name in TFLITE_OUTPUTS}
        return detect

    @staticmethod
    def device_input(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A uint8 image of any size as a device file's input: stretched to `size` with the OD API's resize."""
        return tf.cast(tf.clip_by_value(tf.round(ssd.resize(image[None], size)), 0, 255), tf.uint8).numpy()

    def onnx_function(self, model: tf_keras.Model):
        """uint8 [1, H, W, 3] -> the SavedModel's outputs (its post-processing: per-class NMS, boxes clipped)
        at the model's input size, for the ONNX converter: the model's parts called one by one, as its call does,
        with anchors made inside the function (constants of its graph; the model's own are eager tensors the
        converter would turn into inputs)."""
        params, m = self.params, self.exp.task.model
        size = (params.image_height, params.image_width)

        @tf.function(input_signature=[tf.TensorSpec([1, *size, 3], tf.uint8, name=INPUT_NAME)])
        def detect(input_tensor):
            anchors = ssd.anchor_boxes(m.min_level, m.max_level, m.anchor.num_scales, m.anchor.aspect_ratios,
                                       m.anchor.anchor_size, size)
            features = model.decoder(model.backbone(ssd.preprocess(input_tensor), training=False), training=False)
            logits, box_codes, _ = model.head(features, training=False)
            out = model.detection_generator(box_codes, logits, {level: a[None] for level, a in anchors.items()},
                                            tf.constant([size], tf.float32))
            return {"num_detections": tf.cast(out["num_detections"], tf.float32),
                    "detection_boxes": tf.clip_by_value(out["detection_boxes"] / tf.constant(size * 2, tf.float32),
                                                        0.0, 1.0),
                    "detection_scores": out["detection_scores"],
                    "detection_classes": tf.cast(out["detection_classes"], tf.float32)}
        return detect

    @staticmethod
    def onnx_outputs(raw: dict, image_size: tuple[int, int]) -> dict:
        """The ONNX file's outputs are the SavedModel's already (boxes normalized, so to any image too)."""
        return raw

    @staticmethod
    def tflite_outputs(raw: dict, image_size: tuple[int, int]) -> dict:
        """The TFLite outputs as the SavedModel's (batch of 1): label-map ids, boxes clipped to the image."""
        return {"num_detections": raw["num_detections"].astype(np.float32),
                "detection_boxes": np.clip(raw["detection_boxes"], 0.0, 1.0),
                "detection_scores": raw["detection_scores"],
                "detection_classes": raw["detection_classes"] + 1.0}
