"""Reading the data stage's segmentation TFRecords with tf.data: parsing, augmentation, batching.

Images come out as float32 RGB in 0..255 at the model's input size (the model normalises them
itself), masks as uint8 class ids with 255 for "ignore" (crowd regions, and the padding that
scaling down adds).
"""

from __future__ import annotations

import tensorflow as tf

from pipelines.engine import distribute
from pipelines.examples import IGNORE_LABEL, check_class_masks, find_files, parse
from pipelines.segmentation.params import SegmenterParams

# Serialized records kept for shuffling: a few thousand encoded images is tens of MB.
SHUFFLE_BUFFER = 2048


def resize(params: SegmenterParams, image: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Stretch an image (bilinear) and its mask (nearest neighbour) to the input size: what the
    validation set and, with augmentation off, the training set see."""
    size = [params.image_height, params.image_width]
    image = tf.image.resize(image, size, method="bilinear")
    mask = tf.image.resize(mask[..., None], size, method="nearest")[..., 0]
    image.set_shape([params.image_height, params.image_width, 3])
    mask.set_shape([params.image_height, params.image_width])
    return tf.cast(image, tf.float32), tf.cast(mask, tf.uint8)


def augment(params: SegmenterParams, image: tf.Tensor, mask: tf.Tensor,
            seed: int | tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Randomly scale, crop or pad, and flip an image and its mask alike.

    image uint8 [H, W, 3], mask uint8 [H, W] -> image float32 [h, w, 3] in 0..255, mask uint8 [h, w]
    at the input size (h, w). One factor s in [aug_scale_min, aug_scale_max] scales the picture to
    (h * s, w * s), i.e. s relative to the stretched-to-fit picture, so s = 1 is exactly `resize`.
    A larger picture is cropped at a random place; a smaller one is placed at a random place on a
    canvas of the input size, padded with 0 (image) and 255 (mask, ignored by loss and metrics).
    Then the horizontal (and vertical) flips of the params, each with probability 1/2.

    The image is resized bilinear, the mask only nearest neighbour, so it holds only the values it
    had. `seed` (an int or a shape [2] integer tensor) makes the result reproducible (the training
    set gives each element its own); without it every call draws anew. Pure TensorFlow: usable
    inside `Dataset.map`.
    """
    if seed is None:
        # One stateful draw, then only stateless ops: the same code path as a seeded call.
        seed = tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    elif isinstance(seed, int):
        seed = tf.constant([seed, 0], tf.int32)
    # u: scale, crop/pad offset y, offset x, horizontal flip, vertical flip.
    u = tf.random.stateless_uniform([5], seed=seed)
    height, width = params.image_height, params.image_width
    scale = params.aug_scale_min + u[0] * (params.aug_scale_max - params.aug_scale_min)
    scaled_h = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), 1)
    scaled_w = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), 1)
    # Resize the original once, straight to the scaled size (not via the input size, which
    # would blur the image twice).
    image = tf.image.resize(image, [scaled_h, scaled_w], method="bilinear")
    mask = tf.image.resize(mask[..., None], [scaled_h, scaled_w], method="nearest")

    def place(extent, target, fraction):
        """Per axis: (pad before, pad after, crop start). Exactly one of pad and crop is non-zero."""
        slack = tf.abs(extent - target)
        offset = tf.minimum(tf.cast(fraction * tf.cast(slack + 1, tf.float32), tf.int32), slack)
        pad_before = tf.where(extent < target, offset, 0)
        pad_after = tf.maximum(target - extent, 0) - pad_before
        crop = tf.where(extent > target, offset, 0)
        return pad_before, pad_after, crop

    top, bottom, crop_y = place(scaled_h, height, u[1])
    left, right, crop_x = place(scaled_w, width, u[2])
    paddings = [[top, bottom], [left, right], [0, 0]]
    image = tf.pad(image, paddings, constant_values=0.0)[crop_y:crop_y + height, crop_x:crop_x + width]
    mask = tf.pad(mask, paddings, constant_values=IGNORE_LABEL)[crop_y:crop_y + height, crop_x:crop_x + width]

    if params.random_horizontal_flip:
        flip = u[3] < 0.5
        image = tf.where(flip, tf.reverse(image, [1]), image)
        mask = tf.where(flip, tf.reverse(mask, [1]), mask)
    if params.random_vertical_flip:
        flip = u[4] < 0.5
        image = tf.where(flip, tf.reverse(image, [0]), image)
        mask = tf.where(flip, tf.reverse(mask, [0]), mask)
    image.set_shape([height, width, 3])
    mask = mask[..., 0]
    mask.set_shape([height, width])
    return tf.cast(image, tf.float32), tf.cast(mask, tf.uint8)


def _read(files: list[str], shuffle_seed: int | None = None) -> tf.data.Dataset:
    """The records of `files`: in order, or (with a seed) the files in a seeded random order, read
    interleaved in a fixed pattern (tf.data keeps a parallel interleave's order deterministic)."""
    if shuffle_seed is None:
        return tf.data.TFRecordDataset(files, num_parallel_reads=min(len(files), 4))
    dataset = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=shuffle_seed)
    return dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 4),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def check_inputs(params: SegmenterParams) -> None:
    """ValueError naming the globs or file when the train (or eval) files match nothing or hold no masks."""
    check_class_masks(find_files(params.train_files, "train_files"), "train_files")
    if params.eval_files:
        check_class_masks(find_files(params.eval_files, "eval_files"), "eval_files")


def _per_replica(batch_size: int, input_context: tf.distribute.InputContext | None) -> int:
    return input_context.get_per_replica_batch_size(batch_size) if input_context else batch_size


def train_dataset(params: SegmenterParams,
                  input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Endless, shuffled, augmented batches (drop remainder) of (images float32 [B, H, W, 3] in 0..255,
    masks uint8 [B, H, W]) from `params.train_files`, B = batch_size (per replica with an input context)."""
    files = find_files(params.train_files, "train_files")
    check_class_masks(files, "train_files")
    batch_size = _per_replica(params.batch_size, input_context)
    # params.seed fixes the order and every augmentation (drawn from the seed and the record's place in the
    # stream). Every worker of a multi-worker run reads the same stream and decodes only the places of each
    # global batch its replicas train on: together they train on the batches of a single machine.
    seed = params.seed * 1009
    start, stop = distribute.worker_part(params.batch_size, input_context)

    def load(index, serialized):
        example = parse(serialized)
        element_seed = tf.stack([tf.constant(seed, tf.int64), index])  # stateless: the same in any thread
        return augment(params, example["image"], example["class_mask"], seed=element_seed)

    # Shuffle the serialized records (small), then decode and augment in parallel.
    dataset = _read(files, shuffle_seed=seed).shuffle(SHUFFLE_BUFFER, seed=seed).repeat().enumerate()
    if (start, stop) != (0, params.batch_size):
        dataset = dataset.filter(lambda index, _: (index % params.batch_size >= start) &
                                 (index % params.batch_size < stop))
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def val_dataset(params: SegmenterParams,
                input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """One pass over `params.eval_files` in order, resized to the input size, not augmented:
    batches (last one possibly smaller) of eval_batch_size (images float32, masks uint8). Not split between
    the workers of a multi-worker run: each evaluates the whole set (engine/distribute.py)."""
    files = find_files(params.eval_files, "eval_files")
    check_class_masks(files, "eval_files")
    batch_size = _per_replica(params.eval_batch_size, input_context)

    def load(serialized):
        example = parse(serialized)
        return resize(params, example["image"], example["class_mask"])

    dataset = _read(files).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
