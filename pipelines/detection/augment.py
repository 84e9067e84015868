"""The Object Detection API's `data_augmentation_options`, with its semantics, in the detector's input pipeline.

Each option is the OD API preprocessor function of the same name (object_detection/core/preprocessor.py),
split in two:

- `draw(settings, example)`: the random values the OD API draws, from the same distributions;
- `apply(settings, example, draws)`: the deterministic rest, given those values.

The draws are named as the OD API's PreprocessorCache names them ("horizontal_flip", "strict_crop_image",
...; "uniform:i" for the i-th plain uniform draw of a function that has no cache entry), so that a test hands
the same values to the OD API's own functions and compares the outputs exactly
(tests/test_detection_augment.py).

An example is a dict: "image" float32 [H, W, 3] with values in [0, 255] (the OD API augments the decoded image
before resizing it to the network's input, as here), "boxes" float32 [N, 4] normalized (ymin, xmin, ymax, xmax),
and any other per-object fields listed in `OBJECT_FIELDS` ([N, ...]), which follow the boxes when objects are
dropped. Options run in the order the pipeline.config lists them, each drawing anew for every example.

The settings of each option (its pipeline.config fields, with the OD API's values where a field is absent)
are read and checked by pipelines/detection/config.py (`AUGMENTATIONS`).
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple

import tensorflow as tf

# Per-object fields of a decoded example kept in step with its boxes.
OBJECT_FIELDS = ("groundtruth_classes", "groundtruth_is_crowd", "groundtruth_area")
INT32_MAX = 2**31 - 1


class Option(NamedTuple):
    draw: Callable[[dict, dict], dict]
    apply: Callable[[dict, dict, dict], dict]


def _uniform(shape=(), low=0.0, high=1.0, dtype=tf.float32):
    return tf.random.uniform(list(shape), low, high, dtype=dtype)


def _gather(example: dict, keep: tf.Tensor) -> dict:
    """The example with only the objects at `keep` (boxes and every per-object field)."""
    return {key: tf.gather(value, keep) if key == "boxes" or key in OBJECT_FIELDS else value
            for key, value in example.items()}


def _change_frame(boxes, window):
    """Boxes in the coordinates of `window` (ymin, xmin, ymax, xmax, normalized), as box_list_ops does."""
    height, width = window[2] - window[0], window[3] - window[1]
    shifted = boxes - tf.stack([window[0], window[1], window[0], window[1]])
    return shifted * tf.stack([1.0 / height, 1.0 / width, 1.0 / height, 1.0 / width])


def _completely_outside(boxes, window):
    """True for boxes with no part inside `window` (touching its edge counts as outside)."""
    return tf.reduce_any(tf.stack([boxes[:, 0] >= window[2], boxes[:, 1] >= window[3],
                                   boxes[:, 2] <= window[0], boxes[:, 3] <= window[1]], axis=1), axis=1)


# ------------------------------------------------------------------------------ flips and rotation

def _coin(name):
    return lambda s, ex: {name: _uniform()}


def _when(flag, then, otherwise):
    return tf.cond(flag, then, otherwise)


def _flip(name: str, image_fn, boxes_fn) -> Option:
    def apply(s, ex, d):
        do = d[name] < s["probability"]
        image = _when(do, lambda: image_fn(ex["image"]), lambda: ex["image"])
        boxes = _when(do, lambda: boxes_fn(ex["boxes"]), lambda: ex["boxes"])
        return {**ex, "image": image, "boxes": boxes}

    return Option(_coin(name), apply)


def _boxes_left_right(b):
    return tf.stack([b[:, 0], 1.0 - b[:, 3], b[:, 2], 1.0 - b[:, 1]], axis=1)


def _boxes_up_down(b):
    return tf.stack([1.0 - b[:, 2], b[:, 1], 1.0 - b[:, 0], b[:, 3]], axis=1)


def _boxes_rot90(b):
    """Boxes of an image turned 90 degrees counter-clockwise (tf.image.rot90)."""
    return tf.stack([1.0 - b[:, 3], b[:, 0], 1.0 - b[:, 1], b[:, 2]], axis=1)


# ------------------------------------------------------------------------------ colour

def _colour(name: str, low: Callable[[dict], float], high: Callable[[dict], float], adjust) -> Option:
    """An option drawing one factor in [low, high) and applying `adjust` to the [0, 1] image, clipped."""
    def draw(s, ex):
        return {name: _uniform((), low(s), high(s))}

    def apply(s, ex, d):
        image = tf.clip_by_value(adjust(ex["image"] / 255, d[name]) * 255, 0.0, 255.0)
        return {**ex, "image": image}

    return Option(draw, apply)


BRIGHTNESS = _colour("adjust_brightness", lambda s: -s["max_delta"], lambda s: s["max_delta"],
                     tf.image.adjust_brightness)
CONTRAST = _colour("adjust_contrast", lambda s: s["min_delta"], lambda s: s["max_delta"], tf.image.adjust_contrast)
HUE = _colour("adjust_hue", lambda s: -s["max_delta"], lambda s: s["max_delta"], tf.image.adjust_hue)
SATURATION = _colour("adjust_saturation", lambda s: s["min_delta"], lambda s: s["max_delta"],
                     tf.image.adjust_saturation)

# random_distort_color: fixed settings, in one of two orders.
DISTORT_STEPS = {
    0: [(BRIGHTNESS, {"max_delta": 32.0 / 255.0}), (SATURATION, {"min_delta": 0.5, "max_delta": 1.5}),
        (HUE, {"max_delta": 0.2}), (CONTRAST, {"min_delta": 0.5, "max_delta": 1.5})],
    1: [(BRIGHTNESS, {"max_delta": 32.0 / 255.0}), (CONTRAST, {"min_delta": 0.5, "max_delta": 1.5}),
        (SATURATION, {"min_delta": 0.5, "max_delta": 1.5}), (HUE, {"max_delta": 0.2})],
}


def _distort_draw(s, ex):
    return {name: value for option, fixed in DISTORT_STEPS[s["color_ordering"]]
            for name, value in option.draw(fixed, ex).items()}


def _distort_apply(s, ex, d):
    for option, fixed in DISTORT_STEPS[s["color_ordering"]]:
        ex = option.apply(fixed, ex, d)
    return ex


def _gray_apply(s, ex, d):
    def gray():
        luma = tf.reduce_sum(ex["image"] * [0.2989, 0.5870, 0.1140], axis=-1, keepdims=True)
        return tf.image.grayscale_to_rgb(luma)

    image = _when(d["rgb_to_gray"] > s["probability"], lambda: ex["image"], gray)
    return {**ex, "image": image}


# ------------------------------------------------------------------------------ crops

def _crop_window_draw(ex, min_object_covered, aspect_ratio_range, area_range):
    """tf.image.sample_distorted_bounding_box's window (begin, size, normalized box) for the example's boxes,
    drawn statelessly from a seed taken from the op-level random stream (reproducible in seeded runs)."""
    seed = tf.random.uniform([2], 0, INT32_MAX, dtype=tf.int32)
    covered = tf.expand_dims(tf.clip_by_value(ex["boxes"], 0.0, 1.0), 1)
    begin, size, box = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(ex["image"]), bounding_boxes=covered, seed=seed, min_object_covered=min_object_covered,
        aspect_ratio_range=list(aspect_ratio_range), area_range=list(area_range), max_attempts=100,
        use_image_if_no_bounding_boxes=True)
    return begin, size, box


def _strict_crop(ex, window_draw, overlap_thresh, clip_boxes):
    """The OD API's _strict_random_crop_image given its window: the image cut to the window; objects completely
    outside it, or with less than `overlap_thresh` of their area inside, dropped; boxes in the window's
    coordinates, clipped to it when `clip_boxes`."""
    begin, size, box = window_draw
    end = begin + size
    image = ex["image"][begin[0]:end[0], begin[1]:end[1], :]
    window = tf.reshape(box, [4])
    inside = tf.where(tf.logical_not(_completely_outside(ex["boxes"], window)))[:, 0]
    ex = _gather(ex, inside)
    boxes = ex["boxes"]
    heights = tf.maximum(0.0, tf.minimum(boxes[:, 2], window[2]) - tf.maximum(boxes[:, 0], window[0]))
    widths = tf.maximum(0.0, tf.minimum(boxes[:, 3], window[3]) - tf.maximum(boxes[:, 1], window[1]))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = tf.where((heights * widths) / areas >= overlap_thresh)[:, 0]
    ex = _gather(ex, keep)
    boxes = _change_frame(ex["boxes"], window)
    boxes = tf.where(clip_boxes, tf.clip_by_value(boxes, 0.0, 1.0), boxes)
    return {**ex, "image": image, "boxes": boxes}


def _unchanged_or(ex, crop_fn, skip):
    """crop_fn(ex) unless `skip`; both branches give tensors of the same kinds (shapes may differ)."""
    return tf.cond(skip, lambda: dict(ex), crop_fn)


def _crop_draw(s, ex):
    draws = {"strict_crop_image": _crop_window_draw(ex, s["min_object_covered"],
                                                    (s["min_aspect_ratio"], s["max_aspect_ratio"]),
                                                    (s["min_area"], s["max_area"]))}
    if s["random_coef"] >= sys.float_info.min:
        draws["crop_image"] = _uniform()
    return draws


def _crop_apply(s, ex, d):
    def crop():
        return _strict_crop(ex, d["strict_crop_image"], s["overlap_thresh"], tf.constant(s["clip_boxes"]))

    if s["random_coef"] < sys.float_info.min:
        return crop()
    return _unchanged_or(ex, crop, tf.logical_not(d["crop_image"] > s["random_coef"]))


# ssd_random_crop without `operations`: the OD API function's own defaults (7 operations).
SSD_CROP_DEFAULTS = [dict(min_object_covered=c, min_aspect_ratio=0.5, max_aspect_ratio=2.0, min_area=0.1, max_area=1.0,
                          overlap_thresh=c, clip_boxes=True, random_coef=0.15)
                     for c in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]


def _ssd_operations(s):
    return s["operations"] or SSD_CROP_DEFAULTS


def _ssd_crop_draw(s, ex):
    ops = _ssd_operations(s)
    selector = tf.random.uniform([], 0, len(ops), dtype=tf.int32)
    branches = [lambda op=op: _crop_window_draw(ex, op["min_object_covered"],
                                                (op["min_aspect_ratio"], op["max_aspect_ratio"]),
                                                (op["min_area"], op["max_area"])) for op in ops]
    return {"selector_tuples": selector, "crop_image": _uniform(),
            "strict_crop_image": tf.switch_case(selector, branches)}


def _ssd_crop_apply(s, ex, d):
    ops = _ssd_operations(s)
    sel = d["selector_tuples"]

    def pick(name, dtype=tf.float32):
        return tf.gather(tf.constant([op[name] for op in ops], dtype), sel)

    def crop():
        return _strict_crop(ex, d["strict_crop_image"], pick("overlap_thresh"), pick("clip_boxes", tf.bool))

    coef = pick("random_coef")
    # An operation with random_coef 0 always crops; otherwise it crops when the draw is above its coef.
    skip = tf.logical_and(coef >= sys.float_info.min, tf.logical_not(d["crop_image"] > coef))
    return _unchanged_or(ex, crop, skip)


# ------------------------------------------------------------------------------ scale and pad

def _image_scale_draw(s, ex):
    return {"image_scale": _uniform((), s["min_scale_ratio"], s["max_scale_ratio"])}


def _image_scale_apply(s, ex, d):
    shape = tf.cast(tf.shape(ex["image"])[:2], tf.float32)
    size = tf.cast(shape * d["image_scale"], tf.int32)
    image = tf.compat.v1.image.resize_images(ex["image"], size, align_corners=True)
    return {**ex, "image": image}


def _random_integer(low, high):
    return tf.random.uniform([], low, high, dtype=tf.int32)


def _pad_draw(s, ex):
    """(target height, target width, offset y, offset x), as random_pad_image draws them: the target size in
    [min, max) (default: the image's size to twice it), the offset in [0, target - size)."""
    hw = tf.shape(ex["image"])[:2]
    low = tf.stack(s["min_image_size"]) if s["min_image_size"] else hw
    high = tf.stack(s["max_image_size"]) if s["max_image_size"] else hw * 2
    high, low = tf.maximum(high, hw), tf.maximum(low, hw)
    target = [tf.cond(high[i] > low[i], lambda i=i: _random_integer(low[i], high[i]), lambda i=i: high[i])
              for i in range(2)]
    offset = [tf.cond(target[i] > hw[i], lambda i=i: _random_integer(0, target[i] - hw[i]),
                      lambda: tf.constant(0, tf.int32)) for i in range(2)]
    return {"pad_image": (target[0], target[1], offset[0], offset[1])}


def _pad_apply(s, ex, d):
    target_h, target_w, off_y, off_x = d["pad_image"]
    image = ex["image"]
    color = tf.constant(s["pad_color"], tf.float32) if s["pad_color"] else tf.reduce_mean(image, axis=[0, 1])
    hw = tf.shape(image)[:2]
    padded = tf.image.pad_to_bounding_box(image, off_y, off_x, target_h, target_w)
    ones = tf.image.pad_to_bounding_box(tf.ones_like(image), off_y, off_x, target_h, target_w)
    padded += (1.0 - ones) * color
    window = tf.cast(tf.stack([-off_y, -off_x, target_h - off_y, target_w - off_x]), tf.float32)
    window /= tf.cast(tf.stack([hw[0], hw[1], hw[0], hw[1]]), tf.float32)
    return {**ex, "image": padded, "boxes": _change_frame(ex["boxes"], window)}


def _scale_crop_pad_draw(s, ex):
    return {"uniform:0": _uniform((), s["scale_min"], s["scale_max"]), "uniform:1": _uniform(),
            "uniform:2": _uniform()}


def _scale_crop_pad_apply(s, ex, d):
    """random_scale_crop_and_pad_to_square: the image scaled so its longer side is scale x output_size, a random
    output_size square cut from it, padded with zeros to output_size x output_size."""
    out = s["output_size"]
    hw = tf.shape(ex["image"])[:2]
    longest = tf.cast(tf.reduce_max(hw), tf.float32)
    scale = d["uniform:0"]
    scaled_h = tf.cast(scale * out * (tf.cast(hw[0], tf.float32) / longest), tf.int32)
    scaled_w = tf.cast(scale * out * (tf.cast(hw[1], tf.float32) / longest), tf.int32)
    off_y = tf.cast(tf.maximum(0.0, tf.cast(scaled_h - out, tf.float32)) * d["uniform:1"], tf.int32)
    off_x = tf.cast(tf.maximum(0.0, tf.cast(scaled_w - out, tf.float32)) * d["uniform:2"], tf.int32)
    image = tf.compat.v1.image.resize_images(ex["image"], [scaled_h, scaled_w], method=tf.image.ResizeMethod.BILINEAR)
    image = tf.image.pad_to_bounding_box(image[off_y:off_y + out, off_x:off_x + out, :], 0, 0, out, out)
    window = tf.cast(tf.stack([off_y, off_x, off_y + out, off_x + out]), tf.float32)
    window /= tf.cast(tf.stack([scaled_h, scaled_w, scaled_h, scaled_w]), tf.float32)
    boxes = _change_frame(ex["boxes"], window)
    ex = _gather({**ex, "boxes": boxes}, tf.where(tf.logical_not(_completely_outside(boxes, [0.0, 0.0, 1.0, 1.0])))[:, 0])
    return {**ex, "image": image, "boxes": tf.clip_by_value(ex["boxes"], 0.0, 1.0)}


# ------------------------------------------------------------------------------ boxes and patches

JITTER_MODES = ("default", "expand", "shrink", "expand_symmetric", "shrink_symmetric", "expand_symmetric_xy",
                "shrink_symmetric_xy")


def _jitter_range(s):
    mode, ratio = s["jitter_mode"], s["ratio"]
    if mode.startswith("shrink"):
        return -ratio, 0.0
    if mode.startswith("expand"):
        return 0.0, ratio
    return -ratio, ratio


def _jitter_draw(s, ex):
    low, high = _jitter_range(s)
    columns = 2 if "symmetric" in s["jitter_mode"] else 4
    return {"uniform:0": tf.random.uniform(tf.stack([tf.shape(ex["boxes"])[0], columns]), low, high)}


def _jitter_apply(s, ex, d):
    """random_jitter_boxes: each box's sides moved by up to `ratio` of its size (around its centre for the
    symmetric modes, kept inside the image there), then clipped to the image."""
    boxes = ex["boxes"]
    ymin, xmin, ymax, xmax = tf.unstack(tf.transpose(boxes))
    height, width = ymax - ymin, xmax - xmin
    ycenter, xcenter = ymin + height / 2.0, xmin + width / 2.0
    height, width = tf.maximum(tf.abs(height), 1e-6), tf.maximum(tf.abs(width), 1e-6)
    distortion = 1.0 + d["uniform:0"]
    mode = s["jitter_mode"]
    if "symmetric" in mode:
        dh, dw = distortion[:, 0], distortion[:, 1]
        max_h = tf.abs(tf.minimum(2.0 * ycenter / height, 2.0 * (1 - ycenter) / height))
        max_w = tf.abs(tf.minimum(2.0 * xcenter / width, 2.0 * (1 - xcenter) / width))
        if mode.endswith("_xy"):
            dh = dw = distortion[:, 0]
            max_h = max_w = tf.minimum(max_w, max_h)
        dh, dw = tf.clip_by_value(dh, -max_h, max_h), tf.clip_by_value(dw, -max_w, max_w)
        ymin, ymax = ycenter - height * dh / 2.0, ycenter + height * dh / 2.0
        xmin, xmax = xcenter - width * dw / 2.0, xcenter + width * dw / 2.0
    else:
        ymin, ymax = ycenter - height * distortion[:, 0] / 2.0, ycenter + height * distortion[:, 2] / 2.0
        xmin, xmax = xcenter - width * distortion[:, 1] / 2.0, xcenter + width * distortion[:, 3] / 2.0
    return {**ex, "boxes": tf.clip_by_value(tf.stack([ymin, xmin, ymax, xmax], axis=1), 0.0, 1.0)}


def _patches_draw(s, ex):
    draws = {}
    high = 1.0 - s["size_to_image_ratio"]
    for i in range(s["max_black_patches"]):
        draws[f"black_patches:{i}"] = _uniform()
        draws[f"add_black_patch:{i}y"] = _uniform((), 0.0, high)
        draws[f"add_black_patch:{i}x"] = _uniform((), 0.0, high)
    return draws


def _patches_apply(s, ex, d):
    """random_black_patches: up to max_black_patches black squares of side size_to_image_ratio x the shorter
    side, each with `probability`."""
    image = ex["image"]
    hw = tf.shape(image)[:2]
    side = tf.cast(tf.minimum(tf.cast(hw[0], tf.float32), tf.cast(hw[1], tf.float32)) * s["size_to_image_ratio"],
                   tf.int32)
    for i in range(s["max_black_patches"]):
        def patch(image=image, i=i):
            y = tf.cast(d[f"add_black_patch:{i}y"] * tf.cast(hw[0], tf.float32), tf.int32)
            x = tf.cast(d[f"add_black_patch:{i}x"] * tf.cast(hw[1], tf.float32), tf.int32)
            square = tf.image.pad_to_bounding_box(tf.ones(tf.stack([side, side, 3])), y, x, hw[0], hw[1])
            return image * (1.0 - square)

        image = _when(d[f"black_patches:{i}"] > s["probability"], lambda image=image: image, patch)
    return {**ex, "image": image}


# ------------------------------------------------------------------------------ the table

OPTIONS: dict[str, Option] = {
    "random_horizontal_flip": _flip("horizontal_flip", tf.image.flip_left_right, _boxes_left_right),
    "random_vertical_flip": _flip("vertical_flip", tf.image.flip_up_down, _boxes_up_down),
    "random_rotation90": _flip("rotation90", tf.image.rot90, _boxes_rot90),
    "random_adjust_brightness": BRIGHTNESS,
    "random_adjust_contrast": CONTRAST,
    "random_adjust_hue": HUE,
    "random_adjust_saturation": SATURATION,
    "random_distort_color": Option(_distort_draw, _distort_apply),
    "random_rgb_to_gray": Option(_coin("rgb_to_gray"), _gray_apply),
    "random_crop_image": Option(_crop_draw, _crop_apply),
    "ssd_random_crop": Option(_ssd_crop_draw, _ssd_crop_apply),
    "random_image_scale": Option(_image_scale_draw, _image_scale_apply),
    "random_pad_image": Option(_pad_draw, _pad_apply),
    "random_scale_crop_and_pad_to_square": Option(_scale_crop_pad_draw, _scale_crop_pad_apply),
    "random_jitter_boxes": Option(_jitter_draw, _jitter_apply),
    "random_black_patches": Option(_patches_draw, _patches_apply),
}


@tf.autograph.experimental.do_not_convert  # plain graph code (tf.cond where a draw decides); nothing to convert
def augment(example: dict, options: list, record: list | None = None) -> dict:
    """`example` after each (name, settings) of `options` in turn. `record`, when given, receives each option's
    draws (a dict per option), for tests that replay them through the OD API."""
    for name, settings in options:
        option = OPTIONS[name]
        draws = option.draw(settings, example)
        if record is not None:
            record.append(draws)
        example = option.apply(settings, example, draws)
    return example
