"""Build the segmentation_models network of SegmenterParams, and its loss.

The network ends in logits (float32 even under mixed precision); softmax is applied by the loss
and by the export. Input: float32 RGB in 0..255 of size image_height x image_width; each
backbone's own normalization is part of the model (see `preprocess`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import tensorflow as tf

from pipelines.examples import IGNORE_LABEL
from pipelines.segmentation.params import SegmenterParams


class EncoderWeightsError(ValueError):
    """The encoder weights the config asks for cannot be loaded; the message says what to do."""


def _sm():
    import segmentation_models as sm  # imported late: it prints its framework on import

    return sm


@contextlib.contextmanager
def _no_downloads():
    """Keras' get_file looks in its cache (~/.keras/models) first; a download attempt means the file
    is missing there. Turn that attempt into an EncoderWeightsError naming the file and place."""
    from tf_keras.src.utils import data_utils

    def refuse(origin, fpath, *args, **kwargs):
        name = os.path.basename(fpath)
        raise EncoderWeightsError(
            f"encoder_weights 'imagenet': {name} is not in the Keras cache; place it at {fpath} "
            f"(the file published at {origin}), or set encoder_weights to a local .h5 file or 'none'")

    original = data_utils.urlretrieve
    data_utils.urlretrieve = refuse
    try:
        yield
    finally:
        data_utils.urlretrieve = original


def preprocess(params: SegmenterParams, images: tf.Tensor) -> tf.Tensor:
    """RGB 0..255 float -> the backbone's expected input (segmentation_models' preprocessing)."""
    return _sm().get_preprocessing(params.backbone)(images)


def build_network(params: SegmenterParams, encoder_weights: str | None = None) -> tf.keras.Model:
    sm = _sm()
    if params.backbone not in sm.Backbones.models_names():
        raise ValueError(f"backbone '{params.backbone}' is not supported; supported: "
                         f"{', '.join(sm.Backbones.models_names())}")
    shape = (params.image_height, params.image_width, 3)
    common = dict(input_shape=shape, classes=params.output_classes, activation="linear",
                  encoder_weights=encoder_weights, encoder_freeze=params.encoder_freeze)
    if params.architecture == "unet":
        extra = {"decoder_filters": tuple(params.decoder_filters)} if params.decoder_filters else {}
        network = sm.Unet(params.backbone, **common, **extra)
    elif params.architecture == "linknet":
        extra = {"decoder_filters": tuple(params.decoder_filters)} if params.decoder_filters else {}
        network = sm.Linknet(params.backbone, **common, **extra)
    elif params.architecture == "fpn":
        network = sm.FPN(params.backbone, **common, pyramid_block_filters=params.pyramid_filters,
                         pyramid_dropout=params.dropout or None)
    elif params.architecture == "pspnet":
        network = sm.PSPNet(params.backbone, **common, psp_conv_filters=params.psp_filters,
                            psp_dropout=params.dropout or None)
    else:
        raise ValueError(f"architecture '{params.architecture}' is not supported; supported: unet, fpn, linknet, "
                         "pspnet")
    set_batch_norm_decay(network, params.batch_norm_decay)
    return network


def set_batch_norm_decay(network: tf.keras.Model, decay: float) -> int:
    """Give every batch-norm layer of the network the moving-average decay `decay` (Keras reads a layer's
    momentum when the training step is traced, so this holds for the whole run); returns how many.

    The backbones come with their ImageNet trainings' decays (EfficientNet 0.99, MobileNetV2 0.999),
    averages over 100 and 1000 steps: a run of a few hundred steps from scratch then evaluates and
    serves with statistics of its first, random weights (MobileNetV2 U-Net, 800 steps: val mean IoU
    0.19 at 0.999, 0.63 at 0.9; bench/RESULTS.md)."""
    layers = [layer for layer in network.submodules if isinstance(layer, tf.keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = decay
    return len(layers)


def build_model(params: SegmenterParams, load_encoder_weights: bool = True) -> tf.keras.Model:
    """images float32 [B, H, W, 3] in 0..255 -> logits float32 [B, H, W, K + 1].

    With load_encoder_weights=False the encoder starts random whatever the config says (for
    restoring a checkpoint, which holds every weight anyway)."""
    weights = params.encoder_weights if load_encoder_weights else None
    with _no_downloads():
        network = build_network(params, "imagenet" if weights == "imagenet" else None)
    if weights not in (None, "imagenet"):
        load_encoder_file(network, Path(weights))
    inputs = tf.keras.Input((params.image_height, params.image_width, 3), name="image")
    logits = network(preprocess(params, inputs))
    logits = tf.keras.layers.Activation("linear", dtype="float32", name="logits")(logits)
    return tf.keras.Model(inputs, logits, name=f"{params.architecture}_{params.backbone}")


def load_encoder_file(network: tf.keras.Model, path: Path) -> int:
    """Load a backbone weights file (.h5, by layer name) into the network; returns the layers loaded."""
    import h5py

    if not path.is_file():
        raise EncoderWeightsError(f"encoder_weights: no such file {path}")
    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            names = {n.decode() if isinstance(n, bytes) else n for n in group.attrs.get("layer_names", [])}
    except OSError as e:
        raise EncoderWeightsError(f"encoder_weights: {path} is not a Keras .h5 weights file ({e})") from None
    matching = [layer.name for layer in network.layers if layer.name in names and layer.weights]
    if not matching:
        raise EncoderWeightsError(f"encoder_weights: no layer of {path} matches the backbone's layer names "
                                  "(is it a weights file of this backbone, without its top?)")
    try:
        network.load_weights(str(path), by_name=True)
    except ValueError as e:
        raise EncoderWeightsError(f"encoder_weights: {path} does not fit this backbone: {e}") from None
    return len(matching)


def loss_fn(params: SegmenterParams):
    """labels int [B, H, W] (255 ignored), logits [B, H, W, C] -> scalar loss: weighted sum of
    Dice, categorical focal and cross-entropy terms, each over the valid pixels only. With several
    replicas, Dice's sums and the pixel count are those of the global batch, and the per-pixel terms
    are multiplied by the replicas (engine/distribute.py): they add up to one device's loss."""
    from pipelines.engine.distribute import num_replicas, replica_sum

    num = params.output_classes
    eps = 1e-5

    def loss(labels, logits):
        logits = tf.cast(logits, tf.float32)
        labels = tf.cast(labels, tf.int32)
        valid = tf.cast(tf.not_equal(labels, IGNORE_LABEL), tf.float32)
        onehot = tf.one_hot(tf.where(labels == IGNORE_LABEL, 0, labels), num) * valid[..., None]
        probs = tf.nn.softmax(logits) * valid[..., None]
        count = tf.maximum(replica_sum(tf.reduce_sum(valid)), 1.0) / num_replicas()
        total = tf.constant(0.0)
        if params.dice_weight:
            inter = replica_sum(tf.reduce_sum(probs * onehot, axis=[0, 1, 2]))
            denom = replica_sum(tf.reduce_sum(probs, axis=[0, 1, 2]) + tf.reduce_sum(onehot, axis=[0, 1, 2]))
            dice = 1.0 - tf.reduce_mean((2.0 * inter + eps) / (denom + eps))
            total += params.dice_weight * dice
        log_probs = tf.nn.log_softmax(logits)
        if params.focal_weight:
            p = tf.exp(log_probs)
            focal = -params.focal_alpha * tf.pow(1.0 - p, params.focal_gamma) * log_probs * onehot
            total += params.focal_weight * tf.reduce_sum(focal) / count
        if params.cross_entropy_weight:
            total += params.cross_entropy_weight * tf.reduce_sum(-log_probs * onehot) / count
        return total

    return loss
