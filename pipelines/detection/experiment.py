"""DetectorParams -> Model Garden's RetinaNet ExperimentConfig, extended with `task.ssd`.

SSD MobileNet V2 FPNLite (Object Detection API) is trained as a Model Garden RetinaNet task whose
network is the OD API's own (pipelines/detection/ssd.py): Model Garden's MobileNetV2 backbone, the
OD API's FPNLite decoder, weight-shared head, anchor grid and post-processing; the settings Model
Garden's config has no field for are in `task.ssd` (ssd.SSDConfig). `FIELDS` below is the whole correspondence, one row per Model Garden field:
the pipeline.config field it comes from, the Model Garden field, and how the value is computed.
`build_experiment` applies the rows in order; the few settings that are not a translation of a
pipeline.config field (hardware, loop and checkpoint sizes, eval and export details) are set after
it, in the open. `NOT_HONOURED` lists where Model Garden cannot do what the OD API does.
`python -m pipelines.detection.experiment` prints the table.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from pipelines.detection import TASK
from pipelines.detection.params import DetectorParams
from pipelines.detection.ssd import SSDTask
from pipelines.engine import train as engine

# Registers Model Garden's vision tasks and configs ('retinanet', 'image_classification', ...).
from official.vision import registry_imports  # noqa: F401  isort: skip
from official.core import config_definitions as cfg  # isort: skip
from official.vision.configs import backbones, decoders  # isort: skip
from official.vision.configs import retinanet as retinanet_cfg  # isort: skip


def _steps_per_loop(p: DetectorParams) -> int:
    """Loop size: progress, summaries and checkpoints every loop; about 10 per run, at most 100 steps."""
    return min(100, max(1, p.num_steps // 10))


def _cosine_decay_steps(p: DetectorParams) -> int:
    return max(1, p.num_steps - p.warmup_steps)


# (Object Detection API pipeline.config field, Model Garden ExperimentConfig field, value from DetectorParams)
# The OD API field names are relative to `model.ssd` unless they start with train_config/ or *_input_reader.
Row = tuple[str, str, Callable[[DetectorParams], Any]]
FIELDS: list[Row] = [
    # model
    ("num_classes (K; label-map ids 1..K)", "task.model.num_classes", lambda p: p.num_classes + 1),  # 0 = background
    ("image_resizer.fixed_shape_resizer.{height,width}", "task.model.input_size",
     lambda p: [p.image_height, p.image_width, 3]),
    ("feature_extractor.type ssd_mobilenet_v2_fpn_keras", "task.model.backbone.mobilenet.model_id",
     lambda p: "MobileNetV2"),
    ("feature_extractor.depth_multiplier", "task.model.backbone.mobilenet.filter_size_scale",
     lambda p: p.depth_multiplier),
    ("feature_extractor.conv_hyperparams.activation (FPN + head; MobileNetV2 is always relu6)",
     "task.model.norm_activation.activation", lambda p: p.activation),
    ("feature_extractor.fpn.min_level", "task.model.min_level", lambda p: p.min_level),
    ("feature_extractor.fpn.max_level", "task.model.max_level", lambda p: p.max_level),
    # The OD API's depth_fn: the FPN's depth scales with the multiplier, never below min_depth.
    ("feature_extractor.fpn.additional_layer_depth x depth_multiplier, min_depth",
     "task.model.decoder.fpn.num_filters", lambda p: max(int(p.fpn_num_filters * p.depth_multiplier), p.min_depth)),
    ("feature_extractor.use_depthwise (FPNLite: separable FPN convs)", "task.ssd.fpn_use_depthwise",
     lambda p: p.fpn_separable),
    ("feature_extractor.conv_hyperparams.batch_norm.decay", "task.model.norm_activation.norm_momentum",
     lambda p: p.batch_norm_decay),
    ("feature_extractor.conv_hyperparams.batch_norm.epsilon", "task.model.norm_activation.norm_epsilon",
     lambda p: p.batch_norm_epsilon),
    ("feature_extractor.conv_hyperparams.initializer.random_normal_initializer.stddev",
     "task.ssd.fpn_kernel_initializer_stddev", lambda p: p.init_stddev),
    ("box_predictor.weight_shared_convolutional_box_predictor.depth", "task.model.head.num_filters",
     lambda p: p.head_num_filters),
    ("box_predictor.weight_shared_convolutional_box_predictor.num_layers_before_predictor",
     "task.model.head.num_convs", lambda p: p.head_num_convs),
    ("box_predictor.weight_shared_convolutional_box_predictor.use_depthwise", "task.ssd.head_use_depthwise",
     lambda p: p.head_separable),
    ("box_predictor.weight_shared_convolutional_box_predictor.kernel_size", "task.ssd.head_kernel_size",
     lambda p: p.head_kernel_size),
    ("box_predictor.weight_shared_convolutional_box_predictor.share_prediction_tower",
     "task.ssd.share_prediction_tower", lambda p: p.share_prediction_tower),
    ("box_predictor.weight_shared_convolutional_box_predictor.class_prediction_bias_init",
     "task.ssd.class_prediction_bias_init", lambda p: p.class_prediction_bias_init),
    ("box_predictor...conv_hyperparams.batch_norm.decay", "task.ssd.head_norm_momentum",
     lambda p: p.head_batch_norm_decay),
    ("box_predictor...conv_hyperparams.batch_norm.epsilon", "task.ssd.head_norm_epsilon",
     lambda p: p.head_batch_norm_epsilon),
    ("box_predictor...conv_hyperparams.initializer.random_normal_initializer.stddev",
     "task.ssd.head_kernel_initializer_stddev", lambda p: p.head_init_stddev),
    ("anchor_generator.multiscale_anchor_generator.scales_per_octave", "task.model.anchor.num_scales",
     lambda p: p.num_scales),
    ("anchor_generator.multiscale_anchor_generator.aspect_ratios", "task.model.anchor.aspect_ratios",
     lambda p: [float(a) for a in p.aspect_ratios]),
    ("anchor_generator.multiscale_anchor_generator.anchor_scale", "task.model.anchor.anchor_size",
     lambda p: p.anchor_size),
    # Model Garden uses one set of weights to encode the targets (parser) and to decode (generator).
    ("box_coder.faster_rcnn_box_coder.{y,x,height,width}_scale", "task.model.detection_generator.box_coder_weights",
     lambda p: [float(w) for w in p.box_coder_weights]),
    ("post_processing.batch_non_max_suppression (per-class NMS, combined)",
     "task.model.detection_generator.nms_version", lambda p: "batched"),
    ("post_processing.batch_non_max_suppression.iou_threshold", "task.model.detection_generator.nms_iou_threshold",
     lambda p: p.nms_iou_threshold),
    ("post_processing.batch_non_max_suppression.score_threshold",
     "task.model.detection_generator.pre_nms_score_threshold", lambda p: p.nms_score_threshold),
    ("post_processing.batch_non_max_suppression.max_total_detections",
     "task.model.detection_generator.max_num_detections", lambda p: p.max_detections),
    ("post_processing.batch_non_max_suppression.max_detections_per_class",
     "task.ssd.max_detections_per_class", lambda p: p.max_detections_per_class),
    ("post_processing.batch_non_max_suppression.max_total_detections", "task.max_num_eval_detections",
     lambda p: p.max_detections),
    # loss. OD API total = cw * focal + lw * smooth_l1 / 4 (normalize_loc_loss_by_codesize); Model Garden
    # total = loss_weight * (focal + box_loss_weight * huber), its Huber averaging the 4 coordinates.
    # Both divided by the batch's matched anchors (normalize_loss_by_num_matches): DetectionTask.build_losses.
    ("loss.classification_loss.weighted_sigmoid_focal.alpha", "task.losses.focal_loss_alpha",
     lambda p: p.focal_alpha),
    ("loss.classification_loss.weighted_sigmoid_focal.gamma", "task.losses.focal_loss_gamma",
     lambda p: p.focal_gamma),
    ("loss.classification_weight", "task.losses.loss_weight", lambda p: p.classification_weight),
    # Model Garden's Huber averages the 4 coordinates: normalize_loc_loss_by_codesize. Without it the
    # OD API sums them, 4 times as much.
    ("loss.localization_weight / loss.classification_weight (x4 without normalize_loc_loss_by_codesize)",
     "task.losses.box_loss_weight",
     lambda p: p.localization_weight / p.classification_weight * (1 if p.normalize_loc_loss_by_codesize else 4)),
    # Targets are scaled by the box coder weights as in the OD API, so its smooth L1 delta applies as is.
    ("loss.localization_loss.weighted_smooth_l1.delta", "task.losses.huber_loss_delta", lambda p: p.smooth_l1_delta),
    ("matcher.argmax_matcher.matched_threshold", "task.train_data.parser.match_threshold",
     lambda p: p.match_threshold),
    ("matcher.argmax_matcher.unmatched_threshold", "task.train_data.parser.unmatched_threshold",
     lambda p: p.unmatched_threshold),
    # OD API's Keras L2 regularizer is l2(weight / 2); Model Garden builds l2(l2_weight_decay / 2) and
    # multiplies it by loss_weight with the rest of the loss, hence the division.
    ("*conv_hyperparams.regularizer.l2_regularizer.weight / loss.classification_weight",
     "task.losses.l2_weight_decay", lambda p: p.weight_decay / p.classification_weight),
    # train_config
    ("train_config.batch_size", "task.train_data.global_batch_size", lambda p: p.batch_size),
    ("train_config.num_steps", "trainer.train_steps", lambda p: p.num_steps),
    ("train_config.optimizer.{momentum_optimizer (SGD), adam_optimizer}", "trainer.optimizer_config.optimizer.type",
     lambda p: p.optimizer),
    ("train_config.optimizer.momentum_optimizer.momentum_optimizer_value",
     "trainer.optimizer_config.optimizer.sgd.momentum", lambda p: p.momentum),
    ("train_config.optimizer.adam_optimizer.epsilon", "trainer.optimizer_config.optimizer.adam.epsilon",
     lambda p: p.adam_epsilon),
    ("train_config.optimizer...cosine_decay_learning_rate", "trainer.optimizer_config.learning_rate.type",
     lambda p: "cosine"),
    ("...cosine_decay_learning_rate.learning_rate_base",
     "trainer.optimizer_config.learning_rate.cosine.initial_learning_rate", lambda p: p.learning_rate),
    # OD API: the cosine starts when the warmup ends and reaches 0 at total_steps.
    ("...cosine_decay_learning_rate.total_steps - warmup_steps",
     "trainer.optimizer_config.learning_rate.cosine.decay_steps", _cosine_decay_steps),
    ("...cosine_decay_learning_rate.warmup_steps", "trainer.optimizer_config.learning_rate.cosine.offset",
     lambda p: p.warmup_steps),
    ("...cosine_decay_learning_rate.warmup_steps (linear warmup)", "trainer.optimizer_config.warmup.type",
     lambda p: "linear" if p.warmup_steps > 0 else None),
    ("...cosine_decay_learning_rate.warmup_steps", "trainer.optimizer_config.warmup.linear.warmup_steps",
     lambda p: p.warmup_steps),
    ("...cosine_decay_learning_rate.warmup_learning_rate",
     "trainer.optimizer_config.warmup.linear.warmup_learning_rate", lambda p: p.warmup_learning_rate),
    # The OD API's options run in the parser (pipelines/detection/augment.py); Model Garden's own flip and scale
    # jitter are off.
    ("train_config.data_augmentation_options", "task.ssd.augmentations", lambda p: json.dumps(p.augmentations)),
    ("train_config.data_augmentation_options (in task.ssd)", "task.train_data.parser.aug_rand_hflip", lambda p: False),
    ("train_config.data_augmentation_options (in task.ssd)", "task.train_data.parser.aug_scale_min", lambda p: 1.0),
    ("train_config.data_augmentation_options (in task.ssd)", "task.train_data.parser.aug_scale_max", lambda p: 1.0),
    # fixed_shape_resizer stretches the image to height x width: no aspect ratio kept, no padding.
    ("image_resizer.fixed_shape_resizer (stretch)", "task.train_data.parser.keep_aspect_ratio", lambda p: False),
    ("image_resizer.fixed_shape_resizer (stretch)", "task.validation_data.parser.keep_aspect_ratio",
     lambda p: False),
    ("image_resizer.fixed_shape_resizer (no padding)", "task.train_data.parser.pad", lambda p: False),
    ("image_resizer.fixed_shape_resizer (no padding)", "task.validation_data.parser.pad", lambda p: False),
    ("train_config.freeze_variables", "task.ssd.freeze_variables", lambda p: list(p.freeze_variables)),
    ("train_config.update_trainable_variables", "task.ssd.update_trainable_variables",
     lambda p: list(p.update_trainable_variables)),
    ("train_config.fine_tune_checkpoint", "task.init_checkpoint", lambda p: p.fine_tune_checkpoint or None),
    # detection: backbone + FPN, and the head when its classes and anchors match; classification: backbone
    ("train_config.fine_tune_checkpoint_type", "task.init_checkpoint_modules",
     lambda p: (p.fine_tune_checkpoint_type or "detection") if p.fine_tune_checkpoint else "all"),
    # input readers
    ("train_input_reader.tf_record_input_reader.input_path", "task.train_data.input_path",
     lambda p: list(p.train_files)),
    ("eval_input_reader.tf_record_input_reader.input_path", "task.validation_data.input_path",
     lambda p: list(p.eval_files)),
    ("eval_config.batch_size", "task.validation_data.global_batch_size", lambda p: p.eval_batch_size),
    ("eval_config.include_metrics_per_category", "task.per_category_metrics", lambda p: True),
]

# What Model Garden cannot do as the Object Detection API does (DetectorParams field: how it differs).
NOT_HONOURED = {
    "activation": "FPN and head only: Model Garden's MobileNetV2 blocks are always relu6",
}


def _set(config, dotted: str, value) -> None:
    """config.a.b.c = value, refusing names the config does not have (Config accepts any name)."""
    *parents, name = dotted.split(".")
    node = config
    for part in parents:
        node = getattr(node, part)
    if not hasattr(node, name):
        raise AttributeError(f"Model Garden config has no field {dotted}")
    setattr(node, name, value)


def validate(params: DetectorParams) -> None:
    # The FPN adds upsampled level l+1 to level l: sizes must halve exactly down to the backbone's
    # deepest level (5 for MobileNetV2); levels above it may round up, as the anchors do.
    stride = 2 ** min(params.max_level, 5)
    if params.image_height % stride or params.image_width % stride:
        raise ValueError(f"image size {params.image_height}x{params.image_width}: height and width must be "
                         f"multiples of {stride} for the FPN")
    if params.min_level > params.max_level:
        raise ValueError(f"FPN min_level {params.min_level} > max_level {params.max_level}")
    if params.classification_weight <= 0:
        raise ValueError("classification_weight must be positive (it scales Model Garden's whole loss)")


def default_eval_every(params: DetectorParams) -> int:
    """Evaluations during training (make train's default): five per run."""
    return max(1, params.num_steps // 5)


def build_experiment(params: DetectorParams, steps_per_loop: int | None = None,
                     gpus: int | None = None, eval_every: int | None = None) -> cfg.ExperimentConfig:
    """The Model Garden RetinaNet experiment for `params`.

    `gpus` defaults to the GPUs TensorFlow sees: mixed precision (float16 compute, dynamic loss
    scale) and the distribution strategy depend on it.
    """
    validate(params)
    exp = retinanet_cfg.retinanet()
    exp.task = SSDTask(**exp.task.as_dict())
    exp.task.model.backbone = backbones.Backbone(type="mobilenet", mobilenet=backbones.MobileNet())
    exp.task.model.decoder = decoders.Decoder(type="fpn", fpn=decoders.FPN())
    for _, path, value in FIELDS:
        _set(exp, path, value(params))

    # Not a translation of pipeline.config fields.
    exp.task.model.norm_activation.use_sync_bn = False
    exp.task.annotation_file = None  # COCO ground truth from the eval TFRecords themselves
    exp.task.use_coco_metrics = True
    # The OD API's serving outputs: boxes normalized to the input image, float counts and classes.
    exp.task.export_config.output_normalized_coordinates = True
    exp.task.export_config.cast_num_detections_to_float = True
    exp.task.export_config.cast_detection_classes_to_float = True
    exp.task.train_data.is_training = True
    exp.task.train_data.shuffle_buffer_size = 2048  # the OD API input reader's default
    exp.task.train_data.seed = params.seed  # file and record order (augmentation: engine.seed_everything)
    exp.task.train_data.deterministic = True
    exp.task.validation_data.is_training = False
    exp.task.validation_data.drop_remainder = False  # every val image is evaluated once
    mixed = engine.set_runtime(exp, gpus) > 0
    exp.task.train_data.dtype = exp.task.validation_data.dtype = "float16" if mixed else "float32"

    loop = steps_per_loop or _steps_per_loop(params)
    exp.trainer.steps_per_loop = loop
    exp.trainer.summary_interval = loop
    exp.trainer.checkpoint_interval = loop
    every = eval_every or default_eval_every(params)  # in whole loops, at least one
    exp.trainer.validation_interval = min(params.num_steps, max(loop, -(-every // loop) * loop))
    exp.trainer.validation_steps = -1  # the whole val set, as the reader does not repeat it
    exp.trainer.max_to_keep = 5
    # With evaluations during training (make train's default), the best by COCO AP is kept.
    engine.keep_best(exp, TASK)
    exp.validate()
    exp.lock()
    return exp


def table() -> str:
    """FIELDS as text, for a reader comparing the two formats."""
    width = max(len(od) for od, _, _ in FIELDS)
    return "\n".join(f"{od:<{width}}  ->  {mg}" for od, mg, _ in FIELDS)


if __name__ == "__main__":
    print(table())
