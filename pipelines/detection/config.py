"""A detection pipeline.config (Object Detection API text format) -> DetectorParams, and its validation.

FIELD_MAP lists the pipeline.config fields that are read and the DetectorParams field each one
sets. The correspondence with Model Garden's RetinaNet fields is one table, FIELDS in
pipelines/detection/experiment.py, keyed by the same pipeline.config names.
"""

from __future__ import annotations

import math
import re

from pipelines.config.base import IGNORED, Translation, UserError, check_files
from pipelines.config.base import fail as _fail
from pipelines.config.textproto import TextProto
from pipelines.detection.params import DetectorParams

SSD = "model.ssd"
FE = f"{SSD}.feature_extractor"
HEAD = f"{SSD}.box_predictor.weight_shared_convolutional_box_predictor"
ANCHORS = f"{SSD}.anchor_generator.multiscale_anchor_generator"
CODER = f"{SSD}.box_coder.faster_rcnn_box_coder"
NMS = f"{SSD}.post_processing.batch_non_max_suppression"
MATCHER = f"{SSD}.matcher.argmax_matcher"
MOMENTUM = "train_config.optimizer.momentum_optimizer"
ADAM = "train_config.optimizer.adam_optimizer"
COSINE = f"{MOMENTUM}.learning_rate.cosine_decay_learning_rate"
ADAM_COSINE = f"{ADAM}.learning_rate.cosine_decay_learning_rate"


def _activation(value):
    names = {"RELU_6": "relu6", "RELU": "relu", "SWISH": "swish"}
    if value not in names:
        raise ValueError(f"'{value}' is not supported; supported: {', '.join(names)}")
    return names[value]


# (pipeline.config field, DetectorParams field, conversion). Where each DetectorParams field goes in
# Model Garden is the FIELDS table of pipelines/detection/experiment.py.
FIELD_MAP = [
    (f"{SSD}.num_classes", "num_classes", int),
    (f"{SSD}.image_resizer.fixed_shape_resizer.height", "image_height", int),
    (f"{SSD}.image_resizer.fixed_shape_resizer.width", "image_width", int),
    (f"{FE}.depth_multiplier", "depth_multiplier", float),
    (f"{FE}.min_depth", "min_depth", int),
    (f"{FE}.conv_hyperparams.activation", "activation", _activation),
    (f"{FE}.conv_hyperparams.batch_norm.decay", "batch_norm_decay", float),
    (f"{FE}.conv_hyperparams.batch_norm.epsilon", "batch_norm_epsilon", float),
    (f"{FE}.conv_hyperparams.initializer.random_normal_initializer.stddev", "init_stddev", float),
    (f"{FE}.fpn.min_level", "min_level", int),
    (f"{FE}.fpn.max_level", "max_level", int),
    (f"{FE}.fpn.additional_layer_depth", "fpn_num_filters", int),
    (f"{FE}.use_depthwise", "fpn_separable", bool),
    (f"{HEAD}.depth", "head_num_filters", int),
    (f"{HEAD}.num_layers_before_predictor", "head_num_convs", int),
    (f"{HEAD}.use_depthwise", "head_separable", bool),
    (f"{HEAD}.kernel_size", "head_kernel_size", int),
    (f"{HEAD}.share_prediction_tower", "share_prediction_tower", bool),
    (f"{HEAD}.class_prediction_bias_init", "class_prediction_bias_init", float),
    (f"{HEAD}.conv_hyperparams.batch_norm.decay", "head_batch_norm_decay", float),
    (f"{HEAD}.conv_hyperparams.batch_norm.epsilon", "head_batch_norm_epsilon", float),
    (f"{HEAD}.conv_hyperparams.initializer.random_normal_initializer.stddev", "head_init_stddev", float),
    (f"{ANCHORS}.scales_per_octave", "num_scales", int),
    (f"{ANCHORS}.aspect_ratios", "aspect_ratios", None),
    (f"{ANCHORS}.anchor_scale", "anchor_size", float),
    (f"{CODER}.y_scale", "box_coder_weights[0]", float),
    (f"{CODER}.x_scale", "box_coder_weights[1]", float),
    (f"{CODER}.height_scale", "box_coder_weights[2]", float),
    (f"{CODER}.width_scale", "box_coder_weights[3]", float),
    (f"{SSD}.loss.classification_loss.weighted_sigmoid_focal.alpha", "focal_alpha", float),
    (f"{SSD}.loss.classification_loss.weighted_sigmoid_focal.gamma", "focal_gamma", float),
    (f"{SSD}.loss.classification_weight", "classification_weight", float),
    (f"{SSD}.loss.localization_weight", "localization_weight", float),
    (f"{SSD}.loss.localization_loss.weighted_smooth_l1.delta", "smooth_l1_delta", float),
    (f"{SSD}.normalize_loc_loss_by_codesize", "normalize_loc_loss_by_codesize", bool),
    (f"{MATCHER}.matched_threshold", "match_threshold", float),
    (f"{MATCHER}.unmatched_threshold", "unmatched_threshold", float),
    (f"{NMS}.iou_threshold", "nms_iou_threshold", float),
    (f"{NMS}.score_threshold", "nms_score_threshold", float),
    (f"{NMS}.max_total_detections", "max_detections", int),
    (f"{NMS}.max_detections_per_class", "max_detections_per_class", int),
    ("train_config.batch_size", "batch_size", int),
    ("train_config.num_steps", "num_steps", int),
    (f"{COSINE}.learning_rate_base", "learning_rate", float),
    (f"{COSINE}.warmup_learning_rate", "warmup_learning_rate", float),
    (f"{COSINE}.warmup_steps", "warmup_steps", int),
    (f"{MOMENTUM}.momentum_optimizer_value", "momentum", float),
    # adam_optimizer instead of momentum_optimizer (a oneof: one of the two sets of rows applies)
    (f"{ADAM_COSINE}.learning_rate_base", "learning_rate", float),
    (f"{ADAM_COSINE}.warmup_learning_rate", "warmup_learning_rate", float),
    (f"{ADAM_COSINE}.warmup_steps", "warmup_steps", int),
    (f"{ADAM}.epsilon", "adam_epsilon", float),
    (f"{FE}.conv_hyperparams.regularizer.l2_regularizer.weight", "weight_decay", float),
    ("train_config.fine_tune_checkpoint", "fine_tune_checkpoint", str),
    ("train_config.fine_tune_checkpoint_type", "fine_tune_checkpoint_type", str),
    ("train_config.freeze_variables", "freeze_variables", None),
    ("train_config.update_trainable_variables", "update_trainable_variables", None),
    ("train_input_reader.label_map_path", "label_map_path", str),
    ("train_input_reader.tf_record_input_reader.input_path", "train_files", None),
    ("eval_input_reader.tf_record_input_reader.input_path", "eval_files", None),
]

# data_augmentation_options: option -> {field: the OD API's value when the field is absent}; each option is the
# OD API preprocessor function of that name (pipelines/detection/augment.py). None: no default (see the option).
_PROBABILITY = {"probability": 0.5}
_CROP = dict(min_object_covered=1.0, min_aspect_ratio=0.75, max_aspect_ratio=1.33, min_area=0.1, max_area=1.0,
             overlap_thresh=0.3, clip_boxes=True, random_coef=0.0)
# An ssd_random_crop operation's fields default to the proto's zeros, not to random_crop_image's values.
_SSD_OPERATION = dict(min_object_covered=0.0, min_aspect_ratio=0.0, max_aspect_ratio=0.0, min_area=0.0, max_area=0.0,
                      overlap_thresh=0.0, clip_boxes=True, random_coef=0.0)
AUGMENTATIONS = {
    "random_horizontal_flip": _PROBABILITY,
    "random_vertical_flip": _PROBABILITY,
    "random_rotation90": _PROBABILITY,
    "random_adjust_brightness": {"max_delta": 0.2},
    "random_adjust_contrast": {"min_delta": 0.8, "max_delta": 1.25},
    "random_adjust_hue": {"max_delta": 0.02},
    "random_adjust_saturation": {"min_delta": 0.8, "max_delta": 1.25},
    "random_distort_color": {"color_ordering": 0},
    "random_rgb_to_gray": {"probability": 0.1},
    "random_crop_image": _CROP,
    "ssd_random_crop": {"operations": None},
    "random_image_scale": {"min_scale_ratio": 0.5, "max_scale_ratio": 2.0},
    "random_pad_image": {"min_image_height": 0, "min_image_width": 0, "max_image_height": 0, "max_image_width": 0,
                         "pad_color": None},
    "random_scale_crop_and_pad_to_square": {"output_size": 512, "scale_min": 0.1, "scale_max": 2.0},
    "random_jitter_boxes": {"ratio": 0.05, "jitter_mode": "DEFAULT"},
    "random_black_patches": {"max_black_patches": 10, "probability": 0.5, "size_to_image_ratio": 0.1},
}
# Fields that need what detection training here does not have (keypoints): refused when set.
_KEYPOINT_FIELDS = ("keypoint_flip_permutation", "keypoint_rot_permutation")


def _fields(message, defaults: dict, where: str) -> dict:
    """The message's scalar fields over `defaults`, each converted to its default's type; unknown fields refused."""
    values = dict(defaults)
    for f in message.fields:
        path = f"{where}.{f.name}"
        if f.name in _KEYPOINT_FIELDS:
            raise ValueError(f"{path}: not supported: detection training here has no keypoints; remove it")
        if f.name not in defaults or (f.message is not None and defaults[f.name] is not None):
            raise ValueError(f"{path}: unknown field; fields: {', '.join(defaults) or 'none'}")
        if f.name == "pad_color":  # repeated: `pad_color: [r, g, b]` or the field three times
            values[f.name] = (values[f.name] or []) + [float(v.value) for v in f.values]
            continue
        if f.message is not None:
            continue
        value, default = f.value, defaults[f.name]
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError
            elif isinstance(default, int):
                if isinstance(value, bool) or float(value) != int(value):
                    raise ValueError
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError
            else:
                value = str(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {value!r} is not a finite {type(default).__name__}") from None
        values[f.name] = value
    return values


def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{path}: {message}")


def _check_crop(v: dict, where: str) -> None:
    for name in ("min_object_covered", "overlap_thresh", "random_coef"):
        _require(0.0 <= v[name] <= 1.0, f"{where}.{name}", f"{v[name]} must be in [0, 1]")
    _require(0.0 < v["min_aspect_ratio"] <= v["max_aspect_ratio"], f"{where}.min_aspect_ratio/max_aspect_ratio",
             f"({v['min_aspect_ratio']}, {v['max_aspect_ratio']}) must satisfy 0 < min <= max")
    _require(0.0 < v["min_area"] <= v["max_area"] <= 1.0, f"{where}.min_area/max_area",
             f"({v['min_area']}, {v['max_area']}) must satisfy 0 < min <= max <= 1")


def augmentation(name: str, message, where: str) -> dict:
    """One data_augmentation_options entry -> its settings for pipelines/detection/augment.py, with the OD API's
    values for absent fields; a value the OD API would reject or misuse raises ValueError naming the field."""
    defaults = AUGMENTATIONS[name]
    v = _fields(message, defaults, where)
    if "probability" in v:
        _require(0.0 <= v["probability"] <= 1.0, f"{where}.probability", f"{v['probability']} must be in [0, 1]")
    if name == "random_adjust_brightness":
        _require(v["max_delta"] >= 0, f"{where}.max_delta", f"{v['max_delta']} must be at least 0")
    if name in ("random_adjust_contrast", "random_adjust_saturation"):
        _require(0 <= v["min_delta"] <= v["max_delta"], f"{where}.min_delta/max_delta",
                 f"({v['min_delta']}, {v['max_delta']}) must satisfy 0 <= min <= max")
    if name == "random_adjust_hue":
        _require(0 <= v["max_delta"] <= 0.5, f"{where}.max_delta", f"{v['max_delta']} must be in [0, 0.5]")
    if name == "random_distort_color":
        _require(v["color_ordering"] in (0, 1), f"{where}.color_ordering", f"{v['color_ordering']} must be 0 or 1")
    if name == "random_crop_image":
        _check_crop(v, where)
    if name == "ssd_random_crop":
        operations = []
        for i, f in enumerate(message.all("operations")):
            op = _fields(f.message, _SSD_OPERATION, f"{where}.operations[{i}]")
            _check_crop(op, f"{where}.operations[{i}]")
            operations.append(op)
        v["operations"] = operations
    if name == "random_image_scale":
        _require(0 < v["min_scale_ratio"] <= v["max_scale_ratio"], f"{where}.min_scale_ratio/max_scale_ratio",
                 f"({v['min_scale_ratio']}, {v['max_scale_ratio']}) must satisfy 0 < min <= max")
    if name == "random_pad_image":
        sizes = {}
        for bound in ("min", "max"):
            h, w = (message.first(f"{bound}_image_{side}") for side in ("height", "width"))
            _require((h is None) == (w is None), f"{where}.{bound}_image_height/width", "set both or neither")
            sizes[bound] = [v[f"{bound}_image_height"], v[f"{bound}_image_width"]] if h is not None else None
            for side in ("height", "width"):
                _require(v[f"{bound}_image_{side}"] >= 0, f"{where}.{bound}_image_{side}", "must be at least 0")
        _require(v["pad_color"] is None or len(v["pad_color"]) == 3, f"{where}.pad_color", "must hold 3 values (RGB)")
        v = {"min_image_size": sizes["min"], "max_image_size": sizes["max"], "pad_color": v["pad_color"] or None}
    if name == "random_scale_crop_and_pad_to_square":
        _require(v["output_size"] >= 1, f"{where}.output_size", f"{v['output_size']} must be at least 1")
        _require(0 < v["scale_min"] <= v["scale_max"], f"{where}.scale_min/scale_max",
                 f"({v['scale_min']}, {v['scale_max']}) must satisfy 0 < min <= max")
    if name == "random_jitter_boxes":
        from pipelines.detection.augment import JITTER_MODES

        mode = v["jitter_mode"].lower()
        _require(mode in JITTER_MODES, f"{where}.jitter_mode",
                 f"'{v['jitter_mode']}' is not one of {', '.join(m.upper() for m in JITTER_MODES)}")
        _require(v["ratio"] >= 0, f"{where}.ratio", f"{v['ratio']} must be at least 0")
        v["jitter_mode"] = mode
    if name == "random_black_patches":
        _require(v["max_black_patches"] >= 0, f"{where}.max_black_patches", "must be at least 0")
        _require(0 < v["size_to_image_ratio"] < 1, f"{where}.size_to_image_ratio",
                 f"{v['size_to_image_ratio']} must be in (0, 1)")
    return v


# What each oneof may hold here; anything else is an error that lists these.
SUPPORTED = {
    "model": ["ssd"],
    f"{FE}.type": ["ssd_mobilenet_v2_fpn_keras"],
    f"{SSD}.image_resizer": ["fixed_shape_resizer"],
    f"{SSD}.anchor_generator": ["multiscale_anchor_generator"],
    f"{SSD}.box_coder": ["faster_rcnn_box_coder"],
    f"{SSD}.box_predictor": ["weight_shared_convolutional_box_predictor"],
    f"{SSD}.loss.classification_loss": ["weighted_sigmoid_focal"],
    f"{SSD}.loss.localization_loss": ["weighted_smooth_l1"],
    f"{SSD}.matcher": ["argmax_matcher"],
    f"{SSD}.similarity_calculator": ["iou_similarity"],
    "train_config.optimizer": ["momentum_optimizer", "adam_optimizer", "use_moving_average"],
    f"{MOMENTUM}.learning_rate": ["cosine_decay_learning_rate"],
    f"{ADAM}.learning_rate": ["cosine_decay_learning_rate"],
    "train_config.data_augmentation_options": sorted(AUGMENTATIONS),
    "train_config.fine_tune_checkpoint_type": ["detection", "classification", "full"],
}


def _check_oneofs(doc: TextProto) -> None:
    for path, allowed in SUPPORTED.items():
        if path == f"{FE}.type":
            value = doc.get(path)
            if value is not None and value not in allowed:
                raise _fail(doc.source, path, f"'{value}' is not supported; supported: {', '.join(allowed)}")
            continue
        if path == "train_config.fine_tune_checkpoint_type":
            value = doc.get(path)
            if value not in (None, *allowed):
                raise _fail(doc.source, path, f"'{value}' is not supported; supported: {', '.join(allowed)}")
            continue
        if path == "model":
            names = doc.message_names(path)
        elif path == "train_config.data_augmentation_options":
            names = [n for f in doc.find(path) for n in (g.name for g in f.message.fields)]
        else:
            names = doc.message_names(path)
        for name in names:
            if name not in allowed:
                raise _fail(doc.source, f"{path}.{name}",
                            f"not supported; supported: {', '.join(a for a in allowed if a != 'use_moving_average')}")


# Fields that change the OD API's training loss and have one value here: (field, the value our training
# implements, the OD API's value when the field is absent). Any other value is refused, naming the field.
LOSS_SETTINGS = [
    (f"{SSD}.normalize_loss_by_num_matches", True, True),
    (f"{MATCHER}.force_match_for_each_row", True, False),
    (f"{MATCHER}.ignore_thresholds", False, False),
    (f"{MATCHER}.negatives_lower_than_unmatched", True, True),
    (f"{SSD}.encode_background_as_zeros", True, False),
    (f"{SSD}.add_background_class", True, True),
    (f"{SSD}.explicit_background_class", False, False),
    (f"{SSD}.use_confidences_as_targets", False, False),
    (f"{SSD}.negative_class_weight", 1.0, 1.0),
    (f"{SSD}.implicit_example_weight", 1.0, 1.0),
    (f"{SSD}.loss.expected_loss_weights", "NONE", "NONE"),
    ("train_config.add_regularization_loss", True, True),
]
# Loss parts that the OD API adds when present, and that are not implemented here.
LOSS_PARTS = [f"{SSD}.loss.hard_example_miner", f"{SSD}.loss.random_example_sampler",
              f"{SSD}.loss.equalization_loss", f"{SSD}.mask_head_config", f"{FE}.conv_hyperparams.regularizer.l1_regularizer",
              f"{HEAD}.conv_hyperparams.regularizer.l1_regularizer"]


def _check_loss_settings(doc: TextProto) -> None:
    """The loss is the OD API's (tests/test_detection_loss_parity.py): refuse what would make it differ."""
    for path, ours, absent in LOSS_SETTINGS:
        value = doc.get(path)
        value = absent if value is None else type(ours)(value) if not isinstance(ours, str) else str(value)
        if value != ours:
            shown = str(value).lower() if isinstance(value, bool) else value
            wanted = str(ours).lower() if isinstance(ours, bool) else ours
            where = "" if doc.has(path) else " (the OD API's value when the field is absent)"
            raise _fail(doc.source, path, f"{shown}{where} is not supported: training here implements {wanted}; "
                        f"set `{path.rsplit('.', 1)[1]}: {wanted}`")
    for path in LOSS_PARTS:
        if doc.has(path):
            raise _fail(doc.source, path, "not supported: the training loss here has no such part; remove it")
    focal = f"{SSD}.loss.classification_loss.weighted_sigmoid_focal"
    if doc.has(focal) and not doc.has(f"{focal}.alpha"):
        raise _fail(doc.source, f"{focal}.alpha", "missing: without it the OD API weighs positives and negatives "
                    "alike, which is not supported here; set it (the zoo configs use 0.25)")
    decays = [doc.get(f"{part}.conv_hyperparams.regularizer.l2_regularizer.weight") for part in (FE, HEAD)]
    if decays[1] is not None and float(decays[1]) != float(decays[0] or 0.0):
        raise _fail(doc.source, f"{HEAD}.conv_hyperparams.regularizer.l2_regularizer.weight",
                    f"{decays[1]} differs from the feature extractor's ({decays[0]}); one weight decay is supported")


# (pipeline.config field, DetectorParams field, lowest, highest, lowest allowed?, highest allowed?)
RANGES = [
    (f"{SSD}.num_classes", "num_classes", 1, None, True, True),
    (f"{FE}.depth_multiplier", "depth_multiplier", 0, None, False, True),
    (f"{FE}.min_depth", "min_depth", 1, None, True, True),
    (f"{FE}.conv_hyperparams.batch_norm.decay", "batch_norm_decay", 0, 1, True, False),
    (f"{FE}.conv_hyperparams.batch_norm.epsilon", "batch_norm_epsilon", 0, None, False, True),
    (f"{FE}.conv_hyperparams.initializer.random_normal_initializer.stddev", "init_stddev", 0, None, False, True),
    (f"{FE}.conv_hyperparams.regularizer.l2_regularizer.weight", "weight_decay", 0, None, True, True),
    (f"{FE}.fpn.min_level", "min_level", 3, 7, True, True),
    (f"{FE}.fpn.max_level", "max_level", 3, 7, True, True),
    (f"{FE}.fpn.additional_layer_depth", "fpn_num_filters", 1, None, True, True),
    (f"{HEAD}.depth", "head_num_filters", 1, None, True, True),
    (f"{HEAD}.num_layers_before_predictor", "head_num_convs", 0, None, True, True),
    (f"{HEAD}.kernel_size", "head_kernel_size", 1, None, True, True),
    (f"{HEAD}.conv_hyperparams.batch_norm.decay", "head_batch_norm_decay", 0, 1, True, False),
    (f"{HEAD}.conv_hyperparams.batch_norm.epsilon", "head_batch_norm_epsilon", 0, None, False, True),
    (f"{HEAD}.conv_hyperparams.initializer.random_normal_initializer.stddev", "head_init_stddev", 0, None, False,
     True),
    (f"{ANCHORS}.scales_per_octave", "num_scales", 1, None, True, True),
    (f"{ANCHORS}.anchor_scale", "anchor_size", 0, None, False, True),
    (f"{SSD}.loss.classification_loss.weighted_sigmoid_focal.alpha", "focal_alpha", 0, 1, True, True),
    (f"{SSD}.loss.classification_loss.weighted_sigmoid_focal.gamma", "focal_gamma", 0, None, True, True),
    (f"{SSD}.loss.classification_weight", "classification_weight", 0, None, False, True),
    (f"{SSD}.loss.localization_weight", "localization_weight", 0, None, True, True),
    (f"{SSD}.loss.localization_loss.weighted_smooth_l1.delta", "smooth_l1_delta", 0, None, False, True),
    (f"{MATCHER}.matched_threshold", "match_threshold", 0, 1, True, True),
    (f"{MATCHER}.unmatched_threshold", "unmatched_threshold", 0, 1, True, True),
    (f"{NMS}.iou_threshold", "nms_iou_threshold", 0, 1, True, True),
    (f"{NMS}.score_threshold", "nms_score_threshold", 0, 1, True, False),
    (f"{NMS}.max_total_detections", "max_detections", 1, None, True, True),
    (f"{NMS}.max_detections_per_class", "max_detections_per_class", 1, None, True, True),
    ("train_config.batch_size", "batch_size", 1, None, True, True),
    ("train_config.num_steps", "num_steps", 1, None, True, True),
    ("train_config.optimizer...learning_rate_base", "learning_rate", 0, None, False, True),
    ("train_config.optimizer...warmup_learning_rate", "warmup_learning_rate", 0, None, True, True),
    ("train_config.optimizer...warmup_steps", "warmup_steps", 0, None, True, True),
    (f"{MOMENTUM}.momentum_optimizer_value", "momentum", 0, 1, True, False),
    (f"{ADAM}.epsilon", "adam_epsilon", 0, None, False, True),
    ("eval_config.batch_size", "eval_batch_size", 1, None, True, True),
]


def _interval(low, high, low_ok: bool, high_ok: bool) -> str:
    if high is None:
        return f"at least {low}" if low_ok else f"above {low}"
    return f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"


def _check_ranges(doc: TextProto, params: DetectorParams) -> None:
    for path, name, low, high, low_ok, high_ok in RANGES:
        value = getattr(params, name)
        if not math.isfinite(value):
            raise _fail(doc.source, path, f"{value} is not a finite number")
        too_low = low is not None and (value < low or (value == low and not low_ok))
        too_high = high is not None and (value > high or (value == high and not high_ok))
        if too_low or too_high:
            raise _fail(doc.source, path, f"{value} must be {_interval(low, high, low_ok, high_ok)}")
    for value in params.aspect_ratios:
        if not (math.isfinite(value) and value > 0):
            raise _fail(doc.source, f"{ANCHORS}.aspect_ratios", f"{value} must be above 0")
    for i, value in enumerate(params.box_coder_weights):
        if not (math.isfinite(value) and value > 0):
            raise _fail(doc.source, CODER, f"scale {value} must be above 0")
    if params.unmatched_threshold > params.match_threshold:
        raise _fail(doc.source, f"{MATCHER}.unmatched_threshold",
                    f"{params.unmatched_threshold} is above matched_threshold ({params.match_threshold})")
    if params.warmup_steps > params.num_steps:
        raise _fail(doc.source, "train_config.optimizer...warmup_steps",
                    f"{params.warmup_steps} is more than train_config.num_steps ({params.num_steps})")


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"'{value}' is not a valid regular expression: {e}") from None
    return value


def translate(doc: TextProto, check_paths: bool = True) -> Translation:
    """Read every field of FIELD_MAP into DetectorParams; errors name the field."""
    _check_oneofs(doc)
    if doc.get("model.ssd") is None:
        raise _fail(doc.source, "model.ssd", "missing: only SSD detectors are supported")
    _check_loss_settings(doc)
    params = DetectorParams(num_classes=1)
    # The OD API's value when the field is absent (the proto default), where it differs from ours.
    params.normalize_loc_loss_by_codesize = False
    coder = list(params.box_coder_weights)
    for od_path, name, convert in FIELD_MAP:
        found = doc.find(od_path)
        if not found:
            continue
        try:
            if name in ("aspect_ratios",):
                value = [float(v) for v in doc.get_all(od_path)]
            elif name in ("train_files", "eval_files"):
                value = [str(v) for v in doc.get_all(od_path)]
            elif name in ("freeze_variables", "update_trainable_variables"):
                value = [_regex(str(v)) for v in doc.get_all(od_path)]
            else:
                value = convert(doc.get(od_path))
        except (ValueError, TypeError) as e:
            raise _fail(doc.source, od_path, str(e)) from None
        if name.startswith("box_coder_weights["):
            coder[int(name[-2])] = value
        else:
            setattr(params, name, value)
    params.box_coder_weights = coder
    params.optimizer = "adam" if doc.has(ADAM) else "sgd"

    anchor_levels = (doc.get(f"{ANCHORS}.min_level"), doc.get(f"{ANCHORS}.max_level"))
    if anchor_levels != (None, None) and anchor_levels != (params.min_level, params.max_level):
        raise _fail(doc.source, f"{ANCHORS}.min_level/max_level",
                    f"levels {anchor_levels} must equal the FPN's ({params.min_level}, {params.max_level})")
    _check_ranges(doc, params)
    for name, value in (("height", params.image_height), ("width", params.image_width)):
        # The backbone's stride-32 features are merged with upsampled coarser ones in the FPN.
        if value < 32 or value % 32:
            raise _fail(doc.source, f"{SSD}.image_resizer.fixed_shape_resizer.{name}",
                        f"{value} must be a positive multiple of 32")

    params.augmentations = []
    for i, f in enumerate(doc.find("train_config.data_augmentation_options")):
        for option in f.message.fields:
            where = f"train_config.data_augmentation_options[{i}].{option.name}"
            if option.message is None:
                raise _fail(doc.source, where, "must be a message, e.g. `" + option.name + " { }`")
            try:
                params.augmentations.append([option.name, augmentation(option.name, option.message, where)])
            except ValueError as e:
                raise UserError(doc.source, str(e)) from None

    if params.fine_tune_checkpoint and params.fine_tune_checkpoint_type is None:
        params.fine_tune_checkpoint_type = "detection"
    ignored = [f"{p}: synchronous TPU training setting, ignored" for p in IGNORED if doc.has(p)]
    if check_paths:
        check_files(doc.source, params)
    return Translation(params, ignored)




# ------------------------------------------------------------------------------------- make config


# FREEZE=... shortcuts: regexes over the Object Detection API's variable names (also matched against ours).
FREEZE_PATTERNS = {"backbone": "model/_feature_extractor/classification_backbone/.*",
                   "feature_extractor": "model/_feature_extractor/.*"}

DECAYS = {f"{FE}.conv_hyperparams.batch_norm.decay": ("feature_extractor batch_norm.decay", None),
          f"{HEAD}.conv_hyperparams.batch_norm.decay": ("box_predictor batch_norm.decay", None)}


# make config's settings for options not given, with one of our templates (whose values are the zoo's, for
# 8 TPU cores: batch 128, 50,000 steps, momentum). Measured on a 2-core CPU (bench/RESULTS.md): from random
# weights Adam at 0.003 reaches AP 0.72 on the sample in 800 steps and 0.58 on BCCD in 3,000 where the
# template's momentum finds next to nothing; fine-tuning keeps the template's optimizer (0.005 at batch 8).
DEFAULT_BATCH = 8
DEFAULT_STEPS = {"scratch": 3000, "checkpoint": 2000}
SCRATCH_OPTIMIZER = ("adam", 0.003)


def defaults(doc: TextProto, opts):
    """(opts with make config's defaults filled in, the notes saying so): BATCH 8; STEPS 3,000 from random
    weights, 2,000 from a CHECKPOINT; from random weights OPTIMIZER=adam LR=0.003 unless either is given."""
    import dataclasses

    notes, changes = [], {}
    start = "checkpoint" if opts.checkpoint else "scratch"
    if opts.batch_size is None and int(doc.get("train_config.batch_size") or 0) != DEFAULT_BATCH:
        changes["batch_size"] = DEFAULT_BATCH
    if opts.num_steps is None:
        changes["num_steps"] = DEFAULT_STEPS[start]
    if start == "scratch" and opts.optimizer is None and opts.learning_rate is None:
        changes["optimizer"], changes["learning_rate"] = SCRATCH_OPTIMIZER
        notes.append(f"from random weights: OPTIMIZER={SCRATCH_OPTIMIZER[0]} LR={SCRATCH_OPTIMIZER[1]} "
                     "(the template's momentum learns little from scratch; OPTIMIZER=momentum keeps it)")
    given = [f"{var}={changes[key]}" for var, key in (("BATCH", "batch_size"), ("STEPS", "num_steps")) if key in changes]
    if given:
        notes.append(f"defaults: {' '.join(given)} (the template's batch 128 and 50,000 steps are for 8 TPU cores; "
                     "BATCH= and STEPS= set others)")
    return dataclasses.replace(opts, **changes), notes


def rules(doc: TextProto, opts) -> list[str]:
    """make config's rules only a detector's config has (after the shared ones, config/rewrite.py):
    batch-norm decay for short runs, the fine-tuning checkpoint (CHECKPOINT=, CHECKPOINT_TYPE=),
    frozen variables (FREEZE=). `opts`: config.rewrite.ConfigOptions."""
    from pathlib import Path

    from pipelines.config.rewrite import batch_norm_decay, portable

    notes = batch_norm_decay(doc, DECAYS)
    if opts.checkpoint:
        ckpt = portable(Path(opts.checkpoint)) if Path(opts.checkpoint).exists() or Path(
            str(opts.checkpoint) + ".index").exists() else opts.checkpoint
        ckpt_type = opts.checkpoint_type or _checkpoint_kind(opts.checkpoint) or \
            doc.get("train_config.fine_tune_checkpoint_type") or "detection"
        if not doc.set("train_config.fine_tune_checkpoint", ckpt):
            doc.add("train_config", "fine_tune_checkpoint", ckpt, after="num_steps")
        if not doc.set("train_config.fine_tune_checkpoint_type", ckpt_type):
            doc.add("train_config", "fine_tune_checkpoint_type", ckpt_type, after="fine_tune_checkpoint")
    else:
        for name in ("fine_tune_checkpoint", "fine_tune_checkpoint_type", "fine_tune_checkpoint_version"):
            doc.remove(f"train_config.{name}")
    if opts.freeze:
        doc.remove("train_config.freeze_variables")
        doc.add("train_config", "freeze_variables", FREEZE_PATTERNS[opts.freeze], after="num_steps")
    return notes


def _checkpoint_kind(path: str) -> str | None:
    """'detection' for a detector's checkpoint, 'classification' for a backbone's (None: unreadable,
    left to the checks that name the problem)."""
    import tensorflow as tf

    from pipelines.detection import zoo

    try:
        return zoo.default_kind(path)
    except (ValueError, OSError, tf.errors.OpError):
        return None
