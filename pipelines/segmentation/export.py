"""Export a trained segmenter as a SavedModel: a uint8 image of any size in, its class mask out.

RUN_DIR/export/ gets saved_model/, label_map.pbtxt, metadata.json and, when RUN_DIR has one,
pipeline.config. `serving_default` takes `input_tensor`, uint8 [batch, height, width, 3] of any
size, and returns, at the input's own resolution:

    segmentation_mask  int32   [batch, height, width]         0 = background, 1..K = label-map ids
    probabilities      float32 [batch, height, width, K + 1]  softmax over background and the K classes

`segment` is that computation: the image is stretched to the model's input size (bilinear, as the
training's data pipeline does), the softmax of the logits is resized back to the image's size
(bilinear, so that region edges follow the image rather than the model's coarser grid) and the
argmax taken there. `make eval` measures this same function. Before the export replaces the
previous one, the SavedModel's outputs on a few images are compared with the checkpoint model's;
a mismatch raises ExportCheckError. The export is then recorded in the BentoML model store
($BENTOML_HOME, default ~/bentoml) with the same metadata as export/metadata.json.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines.common import UserError, atomic_output_dir, display_path
from pipelines.data.label_map import read_label_map
from pipelines.model_store import check_images, save_to_bentoml, tag_name, write_metadata
from pipelines.segmentation.params import SegmenterParams

INPUT_NAME = "input_tensor"  # the OD API's serving input name, as the detection export uses
MASK_KEY = "segmentation_mask"
PROBABILITIES_KEY = "probabilities"
OUTPUT_KEYS = (MASK_KEY, PROBABILITIES_KEY)
# Graph and eager runs of the same weights differ by float rounding only; a pixel whose two best
# classes are within that rounding may flip, hence agreement slightly below 1.
MIN_PIXEL_AGREEMENT = 0.999
MAX_PROBABILITY_DIFFERENCE = 1e-3


class ExportCheckError(RuntimeError):
    """The SavedModel does not reproduce the checkpoint model's segmentation."""


# ------------------------------------------------------------------------------------------ checkpoints


def _latest_in(folder: Path) -> str | None:
    """The latest checkpoint of a folder: by its `checkpoint` state file, else the highest ckpt-N."""
    latest = tf.train.latest_checkpoint(str(folder))
    if latest:
        return latest
    numbered = [(int(m.group(1)), p) for p in folder.glob("*.index") if (m := re.search(r"-(\d+)\.index$", p.name))]
    return str(max(numbered)[1].with_suffix("")) if numbered else None


def default_checkpoint(run_dir: Path) -> str:
    """RUN_DIR/train/best/'s checkpoint (the best by val IoU) when there is one, else RUN_DIR/train's latest."""
    train = Path(run_dir) / "train"
    for folder in (train / "best", train):
        if folder.is_dir() and (found := _latest_in(folder)):
            return found
    raise FileNotFoundError(f"{display_path(train)}: no checkpoint; train first")


def checkpoint_step(checkpoint: str) -> int | None:
    """The training step saved in the checkpoint (its `step` variable), else the N of its ckpt-N name."""
    try:
        return int(tf.train.load_checkpoint(checkpoint).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    except (tf.errors.OpError, ValueError, KeyError):
        match = re.search(r"-(\d+)$", str(checkpoint))
        return int(match.group(1)) if match else None


@contextlib.contextmanager
def _float32():
    """A mixed_float16 training (GPU) still exports and evaluates a float32 model: the checkpoint's
    variables are float32 either way, and float16 compute would only lose precision on a CPU."""
    import tf_keras

    policy = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        tf_keras.mixed_precision.set_global_policy(policy)


def restore_model(params: SegmenterParams, checkpoint: str) -> tf.keras.Model:
    """The Keras segmenter (float32) with the checkpoint's weights; UserError when they are not this model's."""
    from pipelines.segmentation.model import build_model
    from pipelines.segmentation.train import restore

    with _float32():
        model = build_model(params, load_encoder_weights=False)
    try:
        restore(model, checkpoint)
    except ValueError:
        raise UserError(checkpoint, f"not a checkpoint of this {params.architecture}/{params.backbone} model with "
                        f"{params.num_classes} classes (is it from another pipeline.config?)") from None
    return model


# ------------------------------------------------------------------------------------------ serving


def segment(model, input_size: tuple[int, int], images: tf.Tensor) -> dict[str, tf.Tensor]:
    """uint8 [B, h, w, 3] of any size -> {segmentation_mask: int32 [B, h, w], probabilities: float32
    [B, h, w, K + 1]}: what the export serves and what `make eval` measures."""
    size = tf.shape(images)[1:3]
    x = tf.image.resize(tf.cast(images, tf.float32), input_size, method="bilinear")
    probabilities = tf.nn.softmax(model(x, training=False), axis=-1)
    # Bilinear weights are a convex combination: the resized probabilities still sum to 1.
    probabilities = tf.image.resize(probabilities, size, method="bilinear")
    return {MASK_KEY: tf.argmax(probabilities, axis=-1, output_type=tf.int32), PROBABILITIES_KEY: probabilities}


class SegmentationModule(tf.Module):
    """The serving signature around a Keras segmenter.

    Only the model's variables are tracked, not the Keras model itself: saving a tracked Keras
    model makes tf.saved_model.save trace every layer's call for Keras' own loader, which makes the
    export about 5x and its loading about 10x slower, for functions serving never calls."""

    def __init__(self, model: tf.keras.Model, input_size: tuple[int, int]):
        super().__init__(name="segmenter")
        self.model_variables = list(model.variables)
        self._segment = functools.partial(segment, model, tuple(input_size))  # not a Trackable: not tracked

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)])
    def serve(self, input_tensor):
        return self._segment(input_tensor)


def check_export(saved_model_dir: str | Path, params: SegmenterParams, checkpoint: str,
                 images: list[np.ndarray] | None = None, model: tf.keras.Model | None = None) -> dict:
    """Run the SavedModel and the checkpoint's Keras model (eagerly) on `images`; raise ExportCheckError
    when an output has the wrong size, fewer than 99.9% of the pixels get the same class, or a
    probability differs by more than 1e-3. Returns the worst agreement and difference seen."""
    images = images if images is not None else check_images(params)
    model = model if model is not None else restore_model(params, checkpoint)
    serve = tf.saved_model.load(str(saved_model_dir)).signatures["serving_default"]
    worst_agreement, largest_difference = 1.0, 0.0
    for n, image in enumerate(images):
        where = f"{saved_model_dir}: image {n} ({image.shape[1]}x{image.shape[0]})"
        ref = {k: v.numpy()[0] for k, v in segment(model, params.input_size, tf.constant(image[None])).items()}
        got = {k: v.numpy()[0] for k, v in serve(**{INPUT_NAME: tf.constant(image[None])}).items()}
        if got[MASK_KEY].shape != image.shape[:2] or got[PROBABILITIES_KEY].shape != ref[PROBABILITIES_KEY].shape:
            raise ExportCheckError(f"{where}: outputs of shape {got[MASK_KEY].shape} and "
                                   f"{got[PROBABILITIES_KEY].shape}, expected the input's size and "
                                   f"{params.output_classes} classes")
        agreement = float(np.mean(got[MASK_KEY] == ref[MASK_KEY]))
        difference = float(np.abs(got[PROBABILITIES_KEY] - ref[PROBABILITIES_KEY]).max())
        if agreement < MIN_PIXEL_AGREEMENT or difference > MAX_PROBABILITY_DIFFERENCE:
            raise ExportCheckError(f"{where}: the SavedModel disagrees with checkpoint {checkpoint}: "
                                   f"{100 * agreement:.2f}% of the pixels get the same class, "
                                   f"probabilities differ by up to {difference:.2e}")
        worst_agreement, largest_difference = min(worst_agreement, agreement), max(largest_difference, difference)
    return {"images": len(images), "min_pixel_agreement": worst_agreement,
            "max_probability_difference": largest_difference}


def export(params: SegmenterParams, run_dir: str | Path, label_map_path: str | Path, name: str | None = None,
           checkpoint: str | None = None, log=print) -> Path:
    """Export RUN_DIR/train's best (else latest) or the given checkpoint to RUN_DIR/export/saved_model;
    returns it. The BentoML model is named `name` (default: RUN_DIR's folder name, as a valid tag)."""
    run_dir = Path(run_dir)
    checkpoint = str(checkpoint or default_checkpoint(run_dir))
    label_map = read_label_map(Path(label_map_path))
    if max(label_map) > params.num_classes:
        raise UserError(label_map_path, f"ids up to {max(label_map)} but the model has {params.num_classes} classes")
    model = restore_model(params, checkpoint)
    final = run_dir / "export"
    with atomic_output_dir(final) as tmp:
        module = SegmentationModule(model, params.input_size)
        tf.saved_model.save(module, str(tmp / "saved_model"), signatures={"serving_default": module.serve})
        shutil.copyfile(label_map_path, tmp / "label_map.pbtxt")
        if (run_dir / "pipeline.config").is_file():
            shutil.copyfile(run_dir / "pipeline.config", tmp / "pipeline.config")
        check = check_export(tmp / "saved_model", params, checkpoint, model=model)
        log(f"export check: the SavedModel matches {checkpoint} on {check['images']} images "
            f"({100 * check['min_pixel_agreement']:.2f}% of pixels or more get the same class, "
            f"probabilities within {check['max_probability_difference']:.1e})")
        metadata = {
            "task": "segmentation",
            "label_map": {int(k): v for k, v in sorted(label_map.items())},
            "num_classes": params.num_classes,
            "input_size": [params.image_height, params.image_width],
            "architecture": params.architecture,
            "backbone": params.backbone,
            "signature": {
                "input": f"{INPUT_NAME}: uint8 [batch, height, width, 3]",
                "outputs": list(OUTPUT_KEYS),
                "output_specs": {
                    MASK_KEY: "int32 [batch, height, width]: 0 = background, 1..K = label-map ids",
                    PROBABILITIES_KEY: f"float32 [batch, height, width, {params.output_classes}]: "
                                       "softmax over background and the label map's classes",
                },
            },
            "checkpoint": checkpoint,
            "step": checkpoint_step(checkpoint),
            "export_check": check,
        }
        write_metadata(tmp, metadata)  # inside the temporary folder: it lands with the rest, or not at all
    tag = save_to_bentoml(final, tag_name(name or run_dir.resolve().name, "segmenter"), metadata)
    log(f"exported {display_path(final / 'saved_model')}; BentoML model {tag}")
    return final / "saved_model"
