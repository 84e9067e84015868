"""SSD MobileNet V2 FPNLite exactly as the Object Detection API builds it, on Model Garden parts.

Model Garden gives the MobileNetV2 backbone, the RetinaNet model shell, the anchor labeler, the
losses, the trainer and the checkpointing. What its RetinaNet builds differently from the OD API's
`ssd_mobilenet_v2_fpn_keras` + `weight_shared_convolutional_box_predictor` is replaced here:

- `FPNLite`: the OD API's top-down FPN (KerasFpnTopDownFeatureMaps): 1x1 projections with bias,
  nearest x2 upsampling, separable 3x3 smoothing + batch norm + activation on the merged levels,
  stride-2 separable convs for the levels above the backbone; level 5 is projected from the
  backbone's final 1280-channel conv (`out_relu`).
- `WeightSharedHead`: one tower of convs shared by the box and class predictors
  (`share_prediction_tower`), weights shared across levels, batch norms per level, no biases in the
  tower, the class predictor's bias initialised to `class_prediction_bias_init`.
- `anchor_boxes`: the OD API's multiscale grid (aspect-major order within a location; the grid
  offset is half a stride only where the image size divides the stride).
- `SSDDetectionGenerator`: the OD API's box decoding, per-class NMS (`max_detections_per_class`
  and `max_total_detections`), boxes clipped to the image after NMS.
- Preprocessing: the image scaled to [-1, 1] (`preprocess`), then stretched to the input size with
  the OD API's bilinear resize (`resize`), in that order as SSDMetaArch.preprocess does.

These are built in the task (`build_model`) rather than registered with Model Garden's decoder
and head factories: the head's interface differs from RetinaNetHead's config (one shared tower,
class bias, per-class NMS), so a registered builder would still need these params from outside
Model Garden's config classes. Their settings are the `SSDConfig` below, carried in the
experiment's task config (and so in params.yaml).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Mapping

import tensorflow as tf
import tf_keras

from pipelines.detection import augment

from official.modeling.hyperparams import base_config  # isort: skip
from official.vision.configs import retinanet as retinanet_cfg  # isort: skip
from official.vision.dataloaders import retinanet_input  # isort: skip
from official.vision.modeling import backbones as mg_backbones  # isort: skip
from official.vision.modeling import retinanet_model  # isort: skip
from official.vision.modeling.layers import detection_generator  # isort: skip
from official.vision.ops import preprocess_ops  # isort: skip


@dataclasses.dataclass
class SSDConfig(base_config.Config):
    """The OD API settings Model Garden's RetinaNet config has no field for."""
    fpn_use_depthwise: bool = True  # feature_extractor.use_depthwise
    fpn_kernel_initializer_stddev: float = 0.01  # feature_extractor.conv_hyperparams.initializer
    head_use_depthwise: bool = True  # box_predictor...use_depthwise
    head_kernel_size: int = 3
    share_prediction_tower: bool = True
    class_prediction_bias_init: float = -4.6
    head_norm_momentum: float = 0.997  # box_predictor...conv_hyperparams.batch_norm.decay
    head_norm_epsilon: float = 0.001
    head_kernel_initializer_stddev: float = 0.01
    max_detections_per_class: int = 100
    freeze_variables: list[str] = dataclasses.field(default_factory=list)
    update_trainable_variables: list[str] = dataclasses.field(default_factory=list)
    augmentations: str = "[]"  # data_augmentation_options as JSON [[name, settings], ...] (augment.py)


@dataclasses.dataclass
class SSDTask(retinanet_cfg.RetinaNetTask):
    ssd: SSDConfig = dataclasses.field(default_factory=SSDConfig)


# ---------------------------------------------------------------------------------------------
# Preprocessing

def resize(images: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """The OD API's fixed_shape_resizer: bilinear, without half-pixel centers (TF1's resize)."""
    return tf.compat.v1.image.resize_images(tf.cast(images, tf.float32), list(size),
                                            method=tf.image.ResizeMethod.BILINEAR, align_corners=False)


def preprocess(images: tf.Tensor) -> tf.Tensor:
    """MobileNet scaling of [0, 255] pixels to [-1, 1], the OD API's formula to the bit."""
    return (2.0 / 255.0) * tf.cast(images, tf.float32) - 1.0


# ---------------------------------------------------------------------------------------------
# Anchors

def feature_size(size: int, level: int) -> int:
    """Side of level `level`'s feature map: each stride-2 'SAME' conv rounds up."""
    for _ in range(level):
        size = -(-size // 2)
    return size


def anchor_boxes(min_level: int, max_level: int, num_scales: int, aspect_ratios, anchor_scale: float,
                 image_size) -> dict[str, tf.Tensor]:
    """The OD API's multiscale grid anchors in pixels: {level: [height_l, width_l, anchors * 4]}.

    Within a location the anchors go aspect ratio by aspect ratio, scales inside (index =
    ratio * num_scales + scale). Centres sit at offset + i * stride, the offset being half a
    stride only when the image side is a multiple of the stride (else 0), as in
    MultiscaleGridAnchorGenerator.
    """
    height, width = int(image_size[0]), int(image_size[1])
    scales = [2 ** (float(s) / num_scales) for s in range(num_scales)]
    boxes = collections.OrderedDict()
    for level in range(min_level, max_level + 1):
        stride = 2 ** level
        base = anchor_scale * stride
        sizes = [(s / math.sqrt(a) * base, s * math.sqrt(a) * base) for a in aspect_ratios for s in scales]
        anchor_h = tf.constant([h for h, _ in sizes], tf.float32)
        anchor_w = tf.constant([w for _, w in sizes], tf.float32)
        offset_y = stride / 2.0 if height % stride == 0 else 0.0
        offset_x = stride / 2.0 if width % stride == 0 else 0.0
        cy = tf.range(feature_size(height, level), dtype=tf.float32) * stride + offset_y
        cx = tf.range(feature_size(width, level), dtype=tf.float32) * stride + offset_x
        cy, cx = tf.meshgrid(cy, cx, indexing="ij")
        cy, cx = cy[..., None], cx[..., None]
        level_boxes = tf.stack([cy - 0.5 * anchor_h, cx - 0.5 * anchor_w, cy + 0.5 * anchor_h, cx + 0.5 * anchor_w],
                               axis=-1)
        boxes[str(level)] = tf.reshape(level_boxes, [level_boxes.shape[0], level_boxes.shape[1], -1])
    return boxes


def decode_boxes(codes: tf.Tensor, anchors: tf.Tensor, weights) -> tf.Tensor:
    """The OD API's FasterRcnnBoxCoder.decode ([ty, tx, th, tw] against [ymin, xmin, ymax, xmax])."""
    ymin, xmin, ymax, xmax = tf.unstack(anchors, axis=-1)
    ha, wa = ymax - ymin, xmax - xmin
    yca, xca = ymin + ha / 2.0, xmin + wa / 2.0
    ty, tx, th, tw = tf.unstack(codes, axis=-1)
    ty, tx, th, tw = ty / weights[0], tx / weights[1], th / weights[2], tw / weights[3]
    w, h = tf.exp(tw) * wa, tf.exp(th) * ha
    yc, xc = ty * ha + yca, tx * wa + xca
    return tf.stack([yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0], axis=-1)


# ---------------------------------------------------------------------------------------------
# Layers

def _conv(filters: int, kernel_size: int, depthwise: bool, use_bias: bool, stride: int = 1, regularizer=None,
          stddev: float = 0.01, name: str | None = None, **kwargs):
    """A conv as the OD API builds it from conv_hyperparams: the initializer and regularizer go to the
    depthwise kernel of a separable conv (its pointwise kernel keeps Keras' defaults)."""
    init = tf_keras.initializers.RandomNormal(stddev=stddev)
    if depthwise:
        return tf_keras.layers.SeparableConv2D(filters, kernel_size, strides=stride, padding="same", use_bias=use_bias,
                                               depthwise_initializer=init, depthwise_regularizer=regularizer,
                                               name=name, **kwargs)
    return tf_keras.layers.Conv2D(filters, kernel_size, strides=stride, padding="same", use_bias=use_bias,
                                  kernel_initializer=init, kernel_regularizer=regularizer, name=name, **kwargs)


def _upsample2(x: tf.Tensor) -> tf.Tensor:
    """Nearest-neighbour x2, as ops.nearest_neighbor_upsampling (by broadcasting, exact)."""
    shape = tf.shape(x)
    b, h, w, c = shape[0], shape[1], shape[2], x.shape[-1]
    x = tf.reshape(x, [b, h, 1, w, 1, c]) * tf.ones([1, 1, 2, 1, 2, 1], dtype=x.dtype)
    return tf.reshape(x, [b, h * 2, w * 2, c])


class FPNLite(tf_keras.layers.Layer):
    """The OD API's FPN for ssd_mobilenet_v2_fpn_keras, on Model Garden MobileNetV2 endpoints."""

    def __init__(self, min_level: int = 3, max_level: int = 7, depth: int = 128, use_depthwise: bool = True,
                 activation: str = "relu6", norm_momentum: float = 0.997, norm_epsilon: float = 0.001,
                 kernel_regularizer=None, stddev: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self._config = dict(min_level=min_level, max_level=max_level, depth=depth, use_depthwise=use_depthwise,
                            activation=activation, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)
        self.min_level, self.max_level = min_level, max_level
        self.base_max_level = min(max_level, 5)
        self.activation = tf_keras.activations.get(activation)

        def bn(name):
            return tf_keras.layers.BatchNormalization(momentum=norm_momentum, epsilon=norm_epsilon, name=name)

        # Levels below the top, from the top down: 1x1 lateral projection, smoothing conv + BN.
        down = list(range(self.base_max_level - 1, min_level - 1, -1))
        self.top = _conv(depth, 1, False, True, regularizer=kernel_regularizer, stddev=stddev, name="projection_top")
        self.laterals = [_conv(depth, 1, False, True, regularizer=kernel_regularizer, stddev=stddev,
                               name=f"projection_{level}") for level in down]
        self.smoothing = [_conv(depth, 3, use_depthwise, False, regularizer=kernel_regularizer, stddev=stddev,
                                name=f"smoothing_{level}") for level in down]
        self.smoothing_norms = [bn(f"smoothing_{level}_batchnorm") for level in down]
        # Levels above the backbone: stride-2 conv + BN from the level below.
        up = list(range(self.base_max_level + 1, max_level + 1))
        self.coarse = [_conv(depth, 3, use_depthwise, False, stride=2, regularizer=kernel_regularizer, stddev=stddev,
                             name=f"coarse_{level}") for level in up]
        self.coarse_norms = [bn(f"coarse_{level}_batchnorm") for level in up]

    def call(self, endpoints: Mapping[str, tf.Tensor], training=None) -> dict[str, tf.Tensor]:
        # The backbone's last output (key above its levels) is the final 1x1 conv, at level 5's size.
        top_key = str(max(int(k) for k in endpoints if k.isdigit()))
        x = self.top(endpoints[top_key])
        features = {str(self.base_max_level): x}
        for i, level in enumerate(range(self.base_max_level - 1, self.min_level - 1, -1)):
            x = _upsample2(x) + self.laterals[i](endpoints[str(level)])
            x = self.activation(self.smoothing_norms[i](self.smoothing[i](x), training=training))
            features[str(level)] = x
        x = features[str(self.base_max_level)]
        for i, level in enumerate(range(self.base_max_level + 1, self.max_level + 1)):
            x = self.activation(self.coarse_norms[i](self.coarse[i](x), training=training))
            features[str(level)] = x
        return {str(level): features[str(level)] for level in range(self.min_level, self.max_level + 1)}

    def get_config(self):
        return dict(super().get_config(), **self._config)


class WeightSharedHead(tf_keras.layers.Layer):
    """The OD API's WeightSharedConvolutionalBoxPredictor: towers shared across levels (one tower
    for boxes and classes with share_prediction_tower), a batch norm per level and layer.

    Returns Model Garden's head outputs: ({level: class logits [B, H, W, A * classes]},
    {level: box codes [B, H, W, A * 4]}, {}), classes counting the background at index 0.
    """

    def __init__(self, min_level: int, max_level: int, num_classes: int, num_anchors: int, depth: int = 128,
                 num_convs: int = 4, kernel_size: int = 3, use_depthwise: bool = True,
                 share_prediction_tower: bool = True, class_prediction_bias_init: float = -4.6,
                 activation: str = "relu6", norm_momentum: float = 0.997, norm_epsilon: float = 0.001,
                 kernel_regularizer=None, stddev: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self._config = dict(min_level=min_level, max_level=max_level, num_classes=num_classes,
                            num_anchors=num_anchors, depth=depth, num_convs=num_convs, kernel_size=kernel_size,
                            use_depthwise=use_depthwise, share_prediction_tower=share_prediction_tower,
                            class_prediction_bias_init=class_prediction_bias_init, activation=activation)
        self.levels = list(range(min_level, max_level + 1))
        self.share = share_prediction_tower
        self.activation = tf_keras.activations.get(activation)

        def tower(name):
            convs = [_conv(depth, kernel_size, use_depthwise, False, regularizer=kernel_regularizer, stddev=stddev,
                           name=f"{name}_conv{i}") for i in range(num_convs)]
            norms = [[tf_keras.layers.BatchNormalization(momentum=norm_momentum, epsilon=norm_epsilon,
                                                         name=f"{name}_conv{i}_batchnorm_level{level}")
                      for i in range(num_convs)] for level in self.levels]
            return convs, norms

        self.box_tower, self.box_tower_norms = tower("prediction_tower" if self.share else "box_tower")
        if not self.share:
            self.class_tower, self.class_tower_norms = tower("class_tower")
        if use_depthwise:
            self.box_predictor = tf_keras.layers.SeparableConv2D(num_anchors * 4, kernel_size, padding="same",
                                                                 name="box_predictor")
            self.class_predictor = tf_keras.layers.SeparableConv2D(
                num_anchors * num_classes, kernel_size, padding="same", name="class_predictor",
                bias_initializer=tf_keras.initializers.Constant(class_prediction_bias_init))
        else:
            self.box_predictor = tf_keras.layers.Conv2D(num_anchors * 4, kernel_size, padding="same",
                                                        name="box_predictor")
            self.class_predictor = tf_keras.layers.Conv2D(
                num_anchors * num_classes, kernel_size, padding="same", name="class_predictor",
                bias_initializer=tf_keras.initializers.Constant(class_prediction_bias_init))

    def _tower(self, convs, norms, x, training):
        for conv, norm in zip(convs, norms):
            x = self.activation(norm(conv(x), training=training))
        return x

    def call(self, features: Mapping[str, tf.Tensor], training=None):
        scores, boxes = {}, {}
        for j, level in enumerate(self.levels):
            x = features[str(level)]
            box_features = self._tower(self.box_tower, self.box_tower_norms[j], x, training)
            class_features = box_features if self.share else self._tower(self.class_tower,
                                                                         self.class_tower_norms[j], x, training)
            boxes[str(level)] = self.box_predictor(box_features)
            scores[str(level)] = self.class_predictor(class_features)
        return scores, boxes, {}

    def get_config(self):
        return dict(super().get_config(), **self._config)


class SSDDetectionGenerator(detection_generator.MultilevelDetectionGenerator):
    """The OD API's SSD post-processing: decode, sigmoid, per-class NMS, clip after NMS.

    Per class at most `max_detections_per_class` boxes survive NMS, then the best
    `max_num_detections` over all classes; boxes are clipped to the image afterwards and those left
    without area dropped. The 'tflite' NMS version is Model Garden's (the TFLite custom op).
    """

    def __init__(self, max_detections_per_class: int = 100, **kwargs):
        super().__init__(**kwargs)
        self._config_dict["max_detections_per_class"] = max_detections_per_class

    def get_config(self):
        return self._config_dict

    def __call__(self, raw_boxes, raw_scores, anchor_boxes, image_shape, raw_attributes=None):
        config = self._config_dict
        if config["nms_version"] == "tflite" or not config["apply_nms"]:
            return super().__call__(raw_boxes, raw_scores, anchor_boxes, image_shape, raw_attributes)
        boxes, scores = [], []
        for level in sorted(raw_boxes, key=int):
            batch = tf.shape(raw_boxes[level])[0]
            codes = tf.cast(tf.reshape(raw_boxes[level], [batch, -1, 4]), tf.float32)
            logits = tf.cast(raw_scores[level], tf.float32)
            num_classes = logits.shape[-1] // (raw_boxes[level].shape[-1] // 4)
            logits = tf.reshape(logits, [batch, -1, num_classes])
            anchors = tf.reshape(tf.cast(anchor_boxes[level], tf.float32), [batch, -1, 4])
            boxes.append(decode_boxes(codes, anchors, config["box_coder_weights"] or [10.0, 10.0, 5.0, 5.0]))
            scores.append(tf.sigmoid(logits)[:, :, 1:])  # column 0 is the background
        boxes, scores = tf.concat(boxes, axis=1), tf.concat(scores, axis=1)
        max_total = config["max_num_detections"]
        nmsed_boxes, nmsed_scores, nmsed_classes, valid = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :], scores, max_output_size_per_class=config["max_detections_per_class"],
            max_total_size=max_total, iou_threshold=config["nms_iou_threshold"],
            score_threshold=config["pre_nms_score_threshold"], pad_per_class=False, clip_boxes=False)
        # Clip to the image after NMS, and drop what lies wholly outside it (OD API's clip_to_window).
        if image_shape is not None:
            size = tf.cast(tf.tile(image_shape[:, None, :], [1, 1, 2]), tf.float32)
            nmsed_boxes = tf.clip_by_value(nmsed_boxes, 0.0, size)
        area = (nmsed_boxes[..., 2] - nmsed_boxes[..., 0]) * (nmsed_boxes[..., 3] - nmsed_boxes[..., 1])
        keep = (area > 0) & (tf.range(max_total)[None, :] < valid[:, None])
        order = tf.argsort(tf.cast(~keep, tf.int32), axis=1, stable=True)  # kept ones first, in score order
        keep = tf.gather(keep, order, batch_dims=1)
        mask = tf.cast(keep, tf.float32)
        return {
            "num_detections": tf.reduce_sum(tf.cast(keep, tf.int32), axis=1),
            "detection_boxes": tf.gather(nmsed_boxes, order, batch_dims=1) * mask[..., None],
            "detection_scores": tf.gather(nmsed_scores, order, batch_dims=1) * mask,
            "detection_classes": (tf.cast(tf.gather(nmsed_classes, order, batch_dims=1), tf.int32) + 1)
            * tf.cast(keep, tf.int32),
            "detection_attributes": {},
        }


class SSDModel(retinanet_model.RetinaNetModel):
    """Model Garden's RetinaNet model with the OD API's variable freezing: variables whose names
    match `freeze` (or, when `train_only` is given, do not match it) are left out of
    `trainable_variables`, so the trainer computes no gradient for them. Names matched are the OD
    API's (`model/_feature_extractor/...`, as its checkpoints name them) and ours (`backbone/`,
    `decoder/` or `head/` followed by the Keras variable name)."""

    def __init__(self, *args, freeze: list[str] | None = None, train_only: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._freeze = list(freeze or [])
        self._train_only = list(train_only or [])

    def frozen_variables(self) -> list[tf.Variable]:
        if not self._freeze and not self._train_only:
            return []
        from pipelines.detection.od_names import od_api_names

        names = od_api_names(self)
        for part in ("backbone", "decoder", "head"):  # ours: the part, then the Keras variable name
            for var in getattr(self, part).weights:
                names.setdefault(id(var), []).append(f"{part}/{var.name.split(':')[0]}")
        frozen = []
        for var in super().trainable_weights:
            candidates = names.get(id(var), [var.name])
            if self._train_only and not any(re.match(p, n) for p in self._train_only for n in candidates):
                frozen.append(var)
            elif any(re.match(p, n) for p in self._freeze for n in candidates):
                frozen.append(var)
        return frozen

    @property
    def trainable_weights(self):
        weights = super().trainable_weights
        if not self._freeze and not self._train_only:
            return weights
        if not hasattr(self, "_frozen_ids"):
            self._frozen_ids = {id(v) for v in self.frozen_variables()}
        return [w for w in weights if id(w) not in self._frozen_ids]


def build_model(task: SSDTask, l2_regularizer=None) -> SSDModel:
    """The network a pipeline.config describes, built and called once (variables created)."""
    m, s = task.model, task.ssd
    input_specs = tf_keras.layers.InputSpec(shape=[None] + list(m.input_size))
    # Model Garden's backbone factory, less one difference: the OD API's MobileNetV2 (conv_hyperparams
    # overriding the feature extractor's) puts the L2 regularizer on the depthwise kernels too.
    b, norm = m.backbone.get(), m.norm_activation
    backbone = mg_backbones.MobileNet(
        model_id=b.model_id, filter_size_scale=b.filter_size_scale, input_specs=input_specs,
        stochastic_depth_drop_rate=b.stochastic_depth_drop_rate,
        flat_stochastic_depth_drop_rate=b.flat_stochastic_depth_drop_rate, output_stride=b.output_stride,
        output_intermediate_endpoints=b.output_intermediate_endpoints, use_sync_bn=norm.use_sync_bn,
        norm_momentum=norm.norm_momentum, norm_epsilon=norm.norm_epsilon, kernel_regularizer=l2_regularizer,
        regularize_depthwise=True)
    act = m.norm_activation
    decoder = FPNLite(min_level=m.min_level, max_level=m.max_level, depth=m.decoder.fpn.num_filters,
                      use_depthwise=s.fpn_use_depthwise, activation=act.activation, norm_momentum=act.norm_momentum,
                      norm_epsilon=act.norm_epsilon, kernel_regularizer=l2_regularizer,
                      stddev=s.fpn_kernel_initializer_stddev, name="fpn_lite")
    num_anchors = m.anchor.num_scales * len(m.anchor.aspect_ratios)
    head = WeightSharedHead(min_level=m.min_level, max_level=m.max_level, num_classes=m.num_classes,
                            num_anchors=num_anchors, depth=m.head.num_filters, num_convs=m.head.num_convs,
                            kernel_size=s.head_kernel_size, use_depthwise=s.head_use_depthwise,
                            share_prediction_tower=s.share_prediction_tower,
                            class_prediction_bias_init=s.class_prediction_bias_init, activation=act.activation,
                            norm_momentum=s.head_norm_momentum, norm_epsilon=s.head_norm_epsilon,
                            kernel_regularizer=l2_regularizer, stddev=s.head_kernel_initializer_stddev,
                            name="weight_shared_head")
    g = m.detection_generator
    post = dict(g.tflite_post_processing.as_dict(), input_image_size=tuple(m.input_size[:2]))
    generator = SSDDetectionGenerator(
        max_detections_per_class=s.max_detections_per_class, apply_nms=g.apply_nms, pre_nms_top_k=g.pre_nms_top_k,
        pre_nms_score_threshold=g.pre_nms_score_threshold, nms_iou_threshold=g.nms_iou_threshold,
        max_num_detections=g.max_num_detections, nms_version=g.nms_version, use_cpu_nms=g.use_cpu_nms,
        tflite_post_processing_config=post, box_coder_weights=g.box_coder_weights)
    anchors = anchor_boxes(m.min_level, m.max_level, m.anchor.num_scales, m.anchor.aspect_ratios, m.anchor.anchor_size,
                           m.input_size[:2])
    model = SSDModel(backbone, decoder, head, generator, anchor_boxes=anchors, min_level=m.min_level,
                     max_level=m.max_level, freeze=s.freeze_variables, train_only=s.update_trainable_variables)
    model(tf.zeros([1, *m.input_size], tf.float32), training=False)
    return model


class SSDParser(retinanet_input.Parser):
    """Model Garden's RetinaNet parser (decoding, augmentation, anchor labelling) with the OD API's
    anchors and its MobileNet scaling: Model Garden normalises with ImageNet's mean and standard
    deviation, which is undone here (a linear map: the pixels come out as x / 127.5 - 1, within
    float rounding)."""

    def __init__(self, *, task: SSDTask, dtype: str = "float32", skip_crowd_during_training: bool = True, **kwargs):
        # Crowd boxes are dropped here (`_without_crowds`), not by Model Garden's parser: its version ties
        # constants to the inputs with control dependencies, which tf.data's deterministic rewrite of a
        # parallel map (a seeded run, pipelines/engine/train.py `seeded`) cannot split.
        super().__init__(dtype="float32", skip_crowd_during_training=False, **kwargs)
        self._drop_crowds = skip_crowd_during_training
        m = task.model
        self._out_dtype = dtype
        self._augmentations = json.loads(task.ssd.augmentations)
        self._od_anchors = lambda image_size: anchor_boxes(m.min_level, m.max_level, m.anchor.num_scales,
                                                           m.anchor.aspect_ratios, m.anchor.anchor_size, image_size)

    def _to_mobilenet(self, image):
        mean = tf.constant(preprocess_ops.MEAN_NORM, tf.float32)
        std = tf.constant(preprocess_ops.STDDEV_NORM, tf.float32)
        image = (image * std + mean) * 2.0 - 1.0
        return tf.cast(image, self._out_dtype)

    @staticmethod
    def _without_crowds(data: dict) -> dict:
        """The decoded example without its crowd objects (classes, boxes, crowd flags, areas)."""
        keep = tf.where(tf.logical_not(data["groundtruth_is_crowd"]))[:, 0]
        keys = ("groundtruth_classes", "groundtruth_boxes", "groundtruth_is_crowd", "groundtruth_area")
        return {**data, **{key: tf.gather(data[key], keep) for key in keys if key in data}}

    def _augment(self, data: dict) -> dict:
        """The config's data_augmentation_options on the decoded image (float, [0, 255]) and its objects.
        The image goes on to Model Garden's parser in [0, 1] floats, which its normalisation takes as they are."""
        example = {key: data[key] for key in augment.OBJECT_FIELDS if key in data}
        example.update(image=tf.cast(data["image"], tf.float32), boxes=data["groundtruth_boxes"])
        example = augment.augment(example, self._augmentations)
        out = {**data, **{key: example[key] for key in augment.OBJECT_FIELDS if key in data}}
        return {**out, "image": example["image"] / 255.0, "groundtruth_boxes": example["boxes"]}

    def _parse_train_data(self, data, anchor_labeler=None, input_anchor=None):
        if self._drop_crowds:
            data = self._without_crowds(data)
        if self._augmentations:
            data = self._augment(data)
        image, labels = super()._parse_train_data(data, anchor_labeler, input_anchor=self._od_anchors)
        return self._to_mobilenet(image), labels

    def _parse_eval_data(self, data, anchor_labeler=None, input_anchor=None):
        image, labels = super()._parse_eval_data(data, anchor_labeler, input_anchor=self._od_anchors)
        return self._to_mobilenet(image), labels
