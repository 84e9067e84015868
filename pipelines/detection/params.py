"""The detector's settings, in the terms of the model we build: the one interface between the
user's pipeline.config (translated in pipelines/config/) and Model Garden (pipelines/detection/).

"SSD MobileNet V2 FPNLite" is a RetinaNet-style single-shot detector: MobileNetV2 backbone, FPN
with separable convolutions, a weight-shared separable box/class head, focal loss and multiscale
anchors. Every field below says which pipeline.config field it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DetectorParams:
    num_classes: int  # label-map classes K (ssd.num_classes); Model Garden gets K + 1 (0 = background)
    image_height: int = 320  # image_resizer.fixed_shape_resizer.height
    image_width: int = 320  # image_resizer.fixed_shape_resizer.width

    # backbone: feature_extractor { type: 'ssd_mobilenet_v2_fpn_keras' depth_multiplier ... }
    depth_multiplier: float = 1.0  # -> MobileNet filter_size_scale
    min_depth: int = 16  # feature_extractor.min_depth: the FPN's depth is max(depth * multiplier, min_depth)
    activation: str = "relu6"  # conv_hyperparams.activation RELU_6
    batch_norm_decay: float = 0.997  # conv_hyperparams.batch_norm.decay (backbone and FPN)
    batch_norm_epsilon: float = 0.001  # conv_hyperparams.batch_norm.epsilon
    init_stddev: float = 0.01  # conv_hyperparams.initializer.random_normal_initializer.stddev

    # FPN: feature_extractor.fpn { min_level max_level additional_layer_depth }
    min_level: int = 3
    max_level: int = 7
    fpn_num_filters: int = 128  # fpn.additional_layer_depth
    fpn_separable: bool = True  # the "Lite" of FPNLite

    # head: box_predictor.weight_shared_convolutional_box_predictor
    head_num_filters: int = 128  # depth
    head_num_convs: int = 4  # num_layers_before_predictor
    head_separable: bool = True  # use_depthwise
    head_kernel_size: int = 3  # kernel_size
    share_prediction_tower: bool = True  # one tower for the box and the class predictors
    class_prediction_bias_init: float = -4.6
    head_batch_norm_decay: float = 0.997  # box_predictor's conv_hyperparams.batch_norm
    head_batch_norm_epsilon: float = 0.001
    head_init_stddev: float = 0.01

    # anchors: anchor_generator.multiscale_anchor_generator
    num_scales: int = 2  # scales_per_octave
    aspect_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0, 0.5])
    anchor_size: float = 4.0  # anchor_scale

    # box_coder.faster_rcnn_box_coder { y_scale x_scale height_scale width_scale }
    box_coder_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])

    # loss: classification_loss.weighted_sigmoid_focal { alpha gamma }, localization weights
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    classification_weight: float = 1.0
    localization_weight: float = 1.0
    smooth_l1_delta: float = 1.0  # localization_loss.weighted_smooth_l1.delta
    normalize_loc_loss_by_codesize: bool = True  # the localisation loss averages the 4 box coordinates
    # matcher.argmax_matcher: IoU >= match_threshold: positive; < unmatched_threshold: negative; between: ignored
    match_threshold: float = 0.5
    unmatched_threshold: float = 0.5

    # post_processing.batch_non_max_suppression
    nms_iou_threshold: float = 0.6
    nms_score_threshold: float = 1e-8
    max_detections: int = 100  # max_total_detections
    max_detections_per_class: int = 100

    # train_config
    batch_size: int = 128
    num_steps: int = 50000
    learning_rate: float = 0.08  # cosine_decay_learning_rate.learning_rate_base
    warmup_learning_rate: float = 0.026666  # warmup_learning_rate
    warmup_steps: int = 1000
    optimizer: str = "sgd"  # momentum_optimizer ("sgd") or adam_optimizer ("adam")
    momentum: float = 0.9  # momentum_optimizer.momentum_optimizer_value
    adam_epsilon: float = 1e-8  # adam_optimizer.epsilon
    weight_decay: float = 4e-5  # conv_hyperparams.regularizer.l2_regularizer.weight
    # data_augmentation_options: [option name, its settings] in the config's order (pipelines/detection/augment.py)
    augmentations: list[list] = field(default_factory=list)
    fine_tune_checkpoint: str | None = None
    fine_tune_checkpoint_type: str | None = None  # "detection" or "classification"
    freeze_variables: list[str] = field(default_factory=list)  # regexes: not trained
    update_trainable_variables: list[str] = field(default_factory=list)  # regexes: only these trained
    # Not a pipeline.config field: the run's seed (workspace/RUN/run.json; `make config/train SEED=N`):
    # initialisation, data order and augmentation.
    seed: int = 0

    # train_input_reader / eval_input_reader
    train_files: list[str] = field(default_factory=list)  # TFRecord paths or globs
    eval_files: list[str] = field(default_factory=list)
    eval_batch_size: int = 8
    label_map_path: str | None = None
