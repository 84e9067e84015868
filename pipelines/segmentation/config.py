"""pipeline.config with a `model { segmentation { ... } }` block -> SegmenterParams, and its validation.

The file has the same text format and the same train_config, train_input_reader, eval_input_reader
and label_map_path fields as a detection config, so `make config` rewrites both the same way; only
the model block is our own (docs/segmentation.md, "Segmentation config").
"""

from __future__ import annotations

import json

from pipelines.config.textproto import TextProto
from pipelines.config.base import IGNORED, PLACEHOLDER, Translation, check_files, learning_rate_path, resolve_path
from pipelines.config.base import fail as _fail
from pipelines.segmentation.params import ARCHITECTURES, SegmenterParams

SEG = "model.segmentation"
RESIZER = f"{SEG}.image_resizer.fixed_shape_resizer"
OPTIMIZER = "train_config.optimizer"

# The backbones segmentation_models 1.0.1 offers (sm.Backbones.models_names(); a test keeps them
# equal), listed here so that `make config` can check the name without loading TensorFlow.
BACKBONES = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "seresnet18", "seresnet34", "seresnet50",
    "seresnet101", "seresnet152", "seresnext50", "seresnext101", "senet154", "resnext50", "resnext101", "vgg16",
    "vgg19", "densenet121", "densenet169", "densenet201", "inceptionresnetv2", "inceptionv3", "mobilenet",
    "mobilenetv2", "efficientnetb0", "efficientnetb1", "efficientnetb2", "efficientnetb3", "efficientnetb4",
    "efficientnetb5", "efficientnetb6", "efficientnetb7"]

# (pipeline.config field, SegmenterParams field, conversion)
FIELD_MAP = [
    (f"{SEG}.num_classes", "num_classes", int),
    (f"{SEG}.architecture", "architecture", str),
    (f"{SEG}.backbone", "backbone", str),
    (f"{RESIZER}.height", "image_height", int),
    (f"{RESIZER}.width", "image_width", int),
    (f"{SEG}.encoder_freeze", "encoder_freeze", bool),
    (f"{SEG}.pyramid_filters", "pyramid_filters", int),
    (f"{SEG}.psp_filters", "psp_filters", int),
    (f"{SEG}.dropout", "dropout", float),
    (f"{SEG}.batch_norm_decay", "batch_norm_decay", float),
    ("train_config.batch_size", "batch_size", int),
    ("train_config.num_steps", "num_steps", int),
    ("train_input_reader.label_map_path", "label_map_path", str),
    ("eval_config.batch_size", "eval_batch_size", int),
]

SUPPORTED = {
    "model": ["segmentation"],
    f"{SEG}.image_resizer": ["fixed_shape_resizer"],
    f"{SEG}.loss": ["dice", "categorical_focal", "categorical_crossentropy"],
    OPTIMIZER: ["adam_optimizer", "momentum_optimizer", "use_moving_average"],
    "learning_rate": ["cosine_decay_learning_rate", "constant_learning_rate"],
    "train_config.data_augmentation_options": ["random_horizontal_flip", "random_vertical_flip", "random_image_scale"],
}
PSP_DOWNSAMPLE = 8  # segmentation_models' PSPNet default: input sides must be multiples of 6 * 8


def _names(doc: TextProto, path: str) -> list[str]:
    return [n for n in doc.message_names(path) if n != "use_moving_average"]


def _one_of(doc: TextProto, path: str, allowed: list[str]) -> list[str]:
    names = doc.message_names(path)
    for name in names:
        if name not in allowed:
            raise _fail(doc.source, f"{path}.{name}",
                        f"not supported; supported: {', '.join(a for a in allowed if a != 'use_moving_average')}")
    return names


def translate(doc: TextProto, check_paths: bool = True) -> Translation:
    """Read a segmentation pipeline.config into SegmenterParams; errors name the field."""
    src = doc.source
    _one_of(doc, "model", SUPPORTED["model"])
    _one_of(doc, f"{SEG}.image_resizer", SUPPORTED[f"{SEG}.image_resizer"])
    p = SegmenterParams(num_classes=1)
    for path, name, convert in FIELD_MAP:
        if not doc.has(path):
            continue
        try:
            value = convert(doc.get(path))
        except (ValueError, TypeError) as e:
            raise _fail(src, path, str(e)) from None
        setattr(p, name, value)

    if p.num_classes < 1:
        raise _fail(src, f"{SEG}.num_classes", "must be at least 1")
    if p.architecture not in ARCHITECTURES:
        raise _fail(src, f"{SEG}.architecture", f"'{p.architecture}' is not supported; supported: {', '.join(ARCHITECTURES)}")
    if p.backbone not in BACKBONES:
        raise _fail(src, f"{SEG}.backbone", f"'{p.backbone}' is not supported; supported: {', '.join(BACKBONES)}")
    if not 0.0 < p.batch_norm_decay < 1.0:  # also false for NaN
        raise _fail(src, f"{SEG}.batch_norm_decay", f"{p.batch_norm_decay} must be between 0 and 1 (exclusive)")
    step = 6 * PSP_DOWNSAMPLE if p.architecture == "pspnet" else 32
    for name, value in (("height", p.image_height), ("width", p.image_width)):
        # The encoder downsamples 32 times (PSPNet: pools a stride-8 map into 1, 2, 3 and 6 bins).
        if value < step or value % step:
            raise _fail(src, f"{RESIZER}.{name}", f"{value} must be a positive multiple of {step}"
                        + (" for pspnet" if step != 32 else ""))

    weights = doc.get(f"{SEG}.encoder_weights")
    if weights is not None:
        weights = str(weights)
        p.encoder_weights = None if weights.lower() in ("none", "") else (
            "imagenet" if weights.lower() == "imagenet" else weights)
    if doc.has(f"{SEG}.decoder_filters"):
        try:
            p.decoder_filters = [int(v) for v in doc.get_all(f"{SEG}.decoder_filters")]
        except (ValueError, TypeError) as e:
            raise _fail(src, f"{SEG}.decoder_filters", str(e)) from None
        if p.architecture not in ("unet", "linknet"):
            raise _fail(src, f"{SEG}.decoder_filters", f"only for unet and linknet, not {p.architecture}")
        if len(p.decoder_filters) != 5 or min(p.decoder_filters) < 1:
            raise _fail(src, f"{SEG}.decoder_filters", "must be 5 positive numbers, one per decoder block")
    if not 0.0 <= p.dropout < 1.0:
        raise _fail(src, f"{SEG}.dropout", f"{p.dropout} must be at least 0 and below 1")

    _read_loss(doc, p)
    _read_optimizer(doc, p)
    _read_augmentation(doc, p)
    p.train_files = [str(v) for v in doc.get_all("train_input_reader.tf_record_input_reader.input_path")]
    p.eval_files = [str(v) for v in doc.get_all("eval_input_reader.tf_record_input_reader.input_path")]
    if p.batch_size < 1 or p.num_steps < 1:
        raise _fail(src, "train_config", "batch_size and num_steps must be at least 1")

    ignored = [f"{f}: synchronous TPU training setting, ignored" for f in IGNORED if doc.has(f)]
    if doc.has("train_config.fine_tune_checkpoint"):
        raise _fail(src, "train_config.fine_tune_checkpoint",
                    f"not used by segmentation models: set {SEG}.encoder_weights to a backbone weights file "
                    "(or CHECKPOINT=file.h5 with make config)")
    if check_paths:
        check_files(src, p)
        check_segmentation_files(src, p)
    return Translation(p, ignored)


def _read_loss(doc: TextProto, p: SegmenterParams) -> None:
    terms = _one_of(doc, f"{SEG}.loss", SUPPORTED[f"{SEG}.loss"])
    if not terms:
        return  # the defaults: Dice + categorical focal
    loss = f"{SEG}.loss"
    try:
        p.dice_weight = float(doc.get(f"{loss}.dice.weight", 1.0)) if "dice" in terms else 0.0
        p.focal_weight = float(doc.get(f"{loss}.categorical_focal.weight", 1.0)) if "categorical_focal" in terms else 0.0
        p.focal_alpha = float(doc.get(f"{loss}.categorical_focal.alpha", p.focal_alpha))
        p.focal_gamma = float(doc.get(f"{loss}.categorical_focal.gamma", p.focal_gamma))
        p.cross_entropy_weight = (float(doc.get(f"{loss}.categorical_crossentropy.weight", 1.0))
                                  if "categorical_crossentropy" in terms else 0.0)
    except (ValueError, TypeError) as e:
        raise _fail(doc.source, loss, str(e)) from None
    if p.dice_weight + p.focal_weight + p.cross_entropy_weight <= 0:
        raise _fail(doc.source, loss, "the weights of its terms add up to 0")


def _read_optimizer(doc: TextProto, p: SegmenterParams) -> None:
    src = doc.source
    optimizers = [n for n in _one_of(doc, OPTIMIZER, SUPPORTED[OPTIMIZER]) if n != "use_moving_average"]
    if not optimizers:
        return
    if len(optimizers) > 1:
        raise _fail(src, OPTIMIZER, f"one optimizer expected, found {', '.join(optimizers)}")
    p.optimizer = optimizers[0].removesuffix("_optimizer")
    opt = f"{OPTIMIZER}.{optimizers[0]}"
    _one_of(doc, f"{opt}.learning_rate", SUPPORTED["learning_rate"])
    schedule_path, schedule = learning_rate_path(doc)
    try:
        if p.optimizer == "momentum":
            p.momentum = float(doc.get(f"{opt}.momentum_optimizer_value", p.momentum))
        if schedule == "constant_learning_rate":
            p.schedule = "constant"
            p.learning_rate = float(doc.get(f"{schedule_path}.learning_rate", p.learning_rate))
            p.warmup_steps = 0
        elif schedule == "cosine_decay_learning_rate":
            p.schedule = "cosine"
            p.learning_rate = float(doc.get(f"{schedule_path}.learning_rate_base", p.learning_rate))
            p.warmup_learning_rate = float(doc.get(f"{schedule_path}.warmup_learning_rate", p.warmup_learning_rate))
            p.warmup_steps = int(doc.get(f"{schedule_path}.warmup_steps", 0))
            total = int(doc.get(f"{schedule_path}.total_steps", p.num_steps))
            if total != p.num_steps:
                raise _fail(src, f"{schedule_path}.total_steps",
                            f"{total} must equal train_config.num_steps ({p.num_steps}): the schedule ends with training")
            if p.warmup_steps > p.num_steps:
                raise _fail(src, f"{schedule_path}.warmup_steps", f"{p.warmup_steps} is more than num_steps {p.num_steps}")
    except (ValueError, TypeError) as e:
        raise _fail(src, schedule_path or opt, str(e)) from None
    if p.learning_rate <= 0:
        raise _fail(src, schedule_path or opt, "the learning rate must be above 0")


def _read_augmentation(doc: TextProto, p: SegmenterParams) -> None:
    path = "train_config.data_augmentation_options"
    options = {}
    for f in doc.find(path):
        for g in f.message.fields:
            if g.name not in SUPPORTED[path]:
                raise _fail(doc.source, f"{path}.{g.name}", f"not supported; supported: {', '.join(SUPPORTED[path])}")
            options[g.name] = g
    p.random_horizontal_flip = "random_horizontal_flip" in options
    p.random_vertical_flip = "random_vertical_flip" in options
    p.aug_scale_min = p.aug_scale_max = 1.0
    if "random_image_scale" in options:
        scale = f"{path}.random_image_scale"
        try:
            p.aug_scale_min = float(doc.get(f"{scale}.min_scale_ratio", 0.5))
            p.aug_scale_max = float(doc.get(f"{scale}.max_scale_ratio", 2.0))
        except (ValueError, TypeError) as e:
            raise _fail(doc.source, scale, str(e)) from None
        if not 0 < p.aug_scale_min <= p.aug_scale_max:
            raise _fail(doc.source, scale, "needs 0 < min_scale_ratio <= max_scale_ratio")


def check_segmentation_files(source: str, p: SegmenterParams) -> None:
    """The TFRecords carry class masks, and a local encoder weights file exists."""
    summary = resolve_path(p.label_map_path).parent / "summary.json"
    if summary.is_file():
        try:
            task = json.loads(summary.read_text()).get("task")
        except (OSError, ValueError):
            task = None
        if task and task != "segmentation":
            raise _fail(source, "train_input_reader.tf_record_input_reader.input_path",
                        f"the TFRecords beside {p.label_map_path} were written for {task} and have no class masks: "
                        "run `make data DATASET=... TASK=segmentation`")
    weights = p.encoder_weights
    if weights not in (None, "imagenet"):
        if PLACEHOLDER in weights or not resolve_path(weights).is_file():
            raise _fail(source, f"{SEG}.encoder_weights",
                        f"no such file: {weights} (a Keras .h5 weights file of the {p.backbone} backbone without "
                        "its top, or 'imagenet' to use the Keras cache, or 'none')")


# ------------------------------------------------------------------------------------- make config


def rules(doc: TextProto, opts) -> list[str]:
    """make config's rules only a segmenter's config has (after the shared ones, config/rewrite.py):
    batch-norm decay for short runs (the field is added when absent: SegmenterParams' default then
    applies), its encoder weights (CHECKPOINT=). `opts`: config.rewrite.ConfigOptions."""
    from pathlib import Path

    from pipelines.config.rewrite import batch_norm_decay, portable

    notes = batch_norm_decay(doc, {f"{SEG}.batch_norm_decay": ("batch_norm_decay", SegmenterParams.batch_norm_decay)},
                             after="encoder_freeze")
    if opts.checkpoint:  # a backbone weights file (or 'imagenet', or 'none')
        value = opts.checkpoint if opts.checkpoint.lower() in ("imagenet", "none") else portable(Path(opts.checkpoint))
        if not doc.set(f"{SEG}.encoder_weights", value):
            doc.add(SEG, "encoder_weights", value, after="backbone")
    if opts.checkpoint_type:
        notes.append("CHECKPOINT_TYPE does not apply to segmentation models: ignored")
    if opts.freeze:
        notes.append("FREEZE does not apply to segmentation models (use encoder_freeze): ignored")
    return notes


DEFAULT_BATCH = 8
DEFAULT_STEPS = 2000
SCRATCH_LR = 0.003


def defaults(doc, opts):
    """(opts with make config's defaults filled in, the notes saying so), for one of our templates: BATCH 8,
    STEPS 2,000, and from random encoder weights (no CHECKPOINT) LR=0.003 unless OPTIMIZER or LR is given
    (the demo's recipe; the templates' batch 16 and 10,000 steps are for a GPU)."""
    import dataclasses

    notes, changes = [], {}
    if opts.batch_size is None and int(doc.get("train_config.batch_size") or 0) != DEFAULT_BATCH:
        changes["batch_size"] = DEFAULT_BATCH
    if opts.num_steps is None:
        changes["num_steps"] = DEFAULT_STEPS
    scratch = not opts.checkpoint and str(doc.get(f"{SEG}.encoder_weights") or "none").strip('"') == "none"
    if scratch and opts.optimizer is None and opts.learning_rate is None:
        changes["learning_rate"] = SCRATCH_LR
        notes.append(f"from random weights: LR={SCRATCH_LR} (what learns from scratch on a CPU, as in the demo)")
    given = [f"{var}={changes[key]}" for var, key in (("BATCH", "batch_size"), ("STEPS", "num_steps")) if key in changes]
    if given:
        notes.append(f"defaults: {' '.join(given)} (the template's batch 16 and 10,000 steps are for a GPU; "
                     "BATCH= and STEPS= set others)")
    return dataclasses.replace(opts, **changes), notes
