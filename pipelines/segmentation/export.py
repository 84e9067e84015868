"""Segmentation's part of `make export` (pipelines/engine/export.py): a SavedModel taking a uint8 image
of any size and giving its class mask. `serving_default` takes `input_tensor`, uint8 [batch, height, width, 3] of any
size, and returns, at the input's own resolution:

    segmentation_mask  int32   [batch, height, width]         0 = background, 1..K = label-map ids
    probabilities      float32 [batch, height, width, K + 1]  softmax over background and the K classes

For `make export FORMAT=tflite|onnx` (pipelines/engine/formats.py) the model is converted at its fixed
input size: uint8 [1, H, W, 3] in (the image stretched to the model's size); out, in this order,
`segmentation_mask` int32 [1, H, W] and `probabilities` float32 [1, H, W, K + 1] at that size.

`segment` is that computation: the image is stretched to the model's input size (bilinear, as the
training's data pipeline does), the softmax of the logits is resized back to the image's size
(bilinear, so that region edges follow the image rather than the model's coarser grid) and the
argmax taken there. `make eval` measures this same function. Before the export replaces the
previous one, the SavedModel's outputs on a few images are compared with the checkpoint model's;
a mismatch raises ExportCheckError.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines.workspace import UserError
from pipelines.engine.export import ExportCheckError
from pipelines.model_store import (FEATURES_OUTPUT, INPUT_NAME, MASK_OUTPUT, PROBABILITIES_OUTPUT,
                                   SEGMENTATION_OUTPUTS, SUGGEST_SIGNATURE, check_images)
from pipelines.segmentation.params import SegmenterParams

# Graph and eager runs of the same weights differ by float rounding only; a pixel whose two best
# classes are within that rounding may flip, hence agreement slightly below 1.
MIN_PIXEL_AGREEMENT = 0.999
MAX_PROBABILITY_DIFFERENCE = 1e-3


def restore_model(params: SegmenterParams, checkpoint: str) -> tf.keras.Model:
    """The Keras segmenter (float32) with the checkpoint's weights; UserError when they are not this model's."""
    from pipelines.checkpoints import restore
    from pipelines.engine.export import float32_policy
    from pipelines.segmentation.model import build_model

    with float32_policy():
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
    return {MASK_OUTPUT: tf.argmax(probabilities, axis=-1, output_type=tf.int32), PROBABILITIES_OUTPUT: probabilities}


def deepest_layer(network: tf.keras.Model):
    """The layer of a segmentation_models network whose output is the smallest in space (the last such one):
    the encoder's output, where the decoder starts (PSPNet: its coarsest pooled branch)."""
    deepest, smallest = None, None
    for layer in network.layers[1:]:
        shape = layer.output_shape
        if not isinstance(shape, tuple) or len(shape) != 4 or shape[1] is None or shape[2] is None:
            continue
        if smallest is None or shape[1] * shape[2] <= smallest:
            deepest, smallest = layer, shape[1] * shape[2]
    return deepest


def suggest_function(params: SegmenterParams, model: tf.keras.Model):
    """uint8 [B, h, w, 3] of any size -> {probabilities: float32 [B, H, W, K + 1] at the model's input size,
    FEATURES_OUTPUT: float32 [B, C], the deepest layer's output averaged over space}: one forward pass."""
    from pipelines.segmentation.model import preprocess

    network = next(layer for layer in model.layers if isinstance(layer, tf.keras.Model))
    both = tf.keras.Model(network.input, [network.output, deepest_layer(network).output])
    size = tuple(params.input_size)

    def suggest(images):
        x = tf.image.resize(tf.cast(images, tf.float32), size, method="bilinear")
        logits, deep = both(preprocess(params, x), training=False)
        return {PROBABILITIES_OUTPUT: tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1),
                FEATURES_OUTPUT: tf.reduce_mean(tf.cast(deep, tf.float32), axis=[1, 2])}
    return suggest


class SegmentationModule(tf.Module):
    """The serving signature around a Keras segmenter, and the suggest signature (make suggest's).

    Only the model's variables are tracked, not the Keras model itself: saving a tracked Keras
    model makes tf.saved_model.save trace every layer's call for Keras' own loader, which makes the
    export about 5x and its loading about 10x slower, for functions serving never calls."""

    def __init__(self, model: tf.keras.Model, params: SegmenterParams):
        super().__init__(name="segmenter")
        self.model_variables = list(model.variables)
        self._segment = functools.partial(segment, model, tuple(params.input_size))  # not a Trackable: not tracked
        self._suggest = suggest_function(params, model)  # a plain function: not tracked either

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)])
    def serve(self, input_tensor):
        return self._segment(input_tensor)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)])
    def suggest(self, input_tensor):
        return self._suggest(input_tensor)


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
        if got[MASK_OUTPUT].shape != image.shape[:2] or got[PROBABILITIES_OUTPUT].shape != ref[PROBABILITIES_OUTPUT].shape:
            raise ExportCheckError(f"{where}: outputs of shape {got[MASK_OUTPUT].shape} and "
                                   f"{got[PROBABILITIES_OUTPUT].shape}, expected the input's size and "
                                   f"{params.output_classes} classes")
        agreement = float(np.mean(got[MASK_OUTPUT] == ref[MASK_OUTPUT]))
        difference = float(np.abs(got[PROBABILITIES_OUTPUT] - ref[PROBABILITIES_OUTPUT]).max())
        if agreement < MIN_PIXEL_AGREEMENT or difference > MAX_PROBABILITY_DIFFERENCE:
            raise ExportCheckError(f"{where}: the SavedModel disagrees with checkpoint {checkpoint}: "
                                   f"{100 * agreement:.2f}% of the pixels get the same class, "
                                   f"probabilities differ by up to {difference:.2e}")
        worst_agreement, largest_difference = min(worst_agreement, agreement), max(largest_difference, difference)
    return {"images": len(images), "min_pixel_agreement": worst_agreement,
            "max_probability_difference": largest_difference}


class Exporter:
    """Segmentation's part of `make export` (pipelines/engine/export.py): SegmentationModule saved,
    checked pixel by pixel; the metadata names the architecture and backbone; and its TFLite function."""

    outputs = SEGMENTATION_OUTPUTS
    tflite_output_order = SEGMENTATION_OUTPUTS
    tflite_first_label = 0  # the class map's 0 is the background: labels.txt's first line
    default_name = "segmenter"  # the BentoML model name when the run's name is not a valid one

    def __init__(self, params: SegmenterParams):
        self.params = params

    def save(self, checkpoint: str, saved_model_dir: Path, folder: Path) -> tf.keras.Model:
        model = restore_model(self.params, checkpoint)
        module = SegmentationModule(model, self.params)
        tf.saved_model.save(module, str(saved_model_dir),
                            signatures={"serving_default": module.serve, SUGGEST_SIGNATURE: module.suggest})
        return model

    def check(self, saved_model_dir: Path, checkpoint: str, model: tf.keras.Model) -> dict:
        return check_export(saved_model_dir, self.params, checkpoint, model=model)

    @staticmethod
    def describe_check(check: dict) -> str:
        return (f"{100 * check['min_pixel_agreement']:.2f}% of pixels or more get the same class, "
                f"probabilities within {check['max_probability_difference']:.1e}")

    def metadata(self, run_dir: Path, checkpoint: str, log=print) -> dict:
        return {"architecture": self.params.architecture, "backbone": self.params.backbone}

    def signature_notes(self) -> dict:
        return {"output_specs": {
            MASK_OUTPUT: "int32 [batch, height, width]: 0 = background, 1..K = label-map ids",
            PROBABILITIES_OUTPUT: f"float32 [batch, height, width, {self.params.output_classes}]: "
                               "softmax over background and the label map's classes"}}

    def tflite_function(self, model: tf.keras.Model):
        """uint8 [1, H, W, 3] -> {segmentation_mask, probabilities} at the model's input size."""
        size = tuple(self.params.input_size)

        @tf.function(input_signature=[tf.TensorSpec([1, *size, 3], tf.uint8, name=INPUT_NAME)])
        def segment_fixed(input_tensor):
            probabilities = tf.nn.softmax(model(tf.cast(input_tensor, tf.float32), training=False), axis=-1)
            return {MASK_OUTPUT: tf.argmax(probabilities, axis=-1, output_type=tf.int32),
                    PROBABILITIES_OUTPUT: probabilities}
        return segment_fixed

    @staticmethod
    def device_input(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A uint8 image of any size as a device file's input: stretched to `size` (bilinear, as `segment`)."""
        resized = tf.image.resize(tf.cast(image[None], tf.float32), size, method="bilinear")
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()

    def onnx_function(self, model: tf.keras.Model):
        """The ONNX file computes what the TFLite file does."""
        return self.tflite_function(model)

    @staticmethod
    def onnx_outputs(raw: dict, image_size: tuple[int, int]) -> dict:
        return Exporter.tflite_outputs(raw, image_size)

    @staticmethod
    def tflite_outputs(raw: dict, image_size: tuple[int, int]) -> dict:
        """The TFLite outputs as the SavedModel's (batch of 1): probabilities resized back to the image
        (bilinear), the class of each of its pixels taken there, as `segment` does."""
        probabilities = tf.image.resize(tf.constant(raw[PROBABILITIES_OUTPUT], tf.float32), image_size,
                                        method="bilinear")
        return {MASK_OUTPUT: tf.argmax(probabilities, axis=-1, output_type=tf.int32).numpy(),
                PROBABILITIES_OUTPUT: probabilities.numpy()}
