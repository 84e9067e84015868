"""tf.Example schema shared by the Object Detection API and Model Garden, and sharded writing.

Keys written for every image: image/encoded, image/format, image/height, image/width,
image/filename, image/source_id, image/key/sha256, image/object/bbox/{xmin,xmax,ymin,ymax}
(normalised to [0, 1]), image/object/class/text, image/object/class/label (label-map ids),
image/object/is_crowd, image/object/area (pixels). With instance masks: image/object/mask (one
PNG of 0/1 per object). For segmentation: image/segmentation/class/encoded (one PNG of class
ids, 255 = ignore) and image/segmentation/class/format.
"""

from __future__ import annotations

import math
from pathlib import Path

import tensorflow as tf

from pipelines.data.encode import EncodedImage

IMAGES_PER_SHARD = 500  # default shard size when no shard count is given


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def to_example(image: EncodedImage, names: dict[int, str]) -> tf.train.Example:
    w, h = float(image.width), float(image.height)
    objs = image.objects
    feature = {
        "image/encoded": _bytes([image.encoded]),
        "image/format": _bytes([image.format.encode()]),
        "image/height": _ints([image.height]),
        "image/width": _ints([image.width]),
        "image/filename": _bytes([image.key.encode("utf-8")]),
        "image/source_id": _bytes([image.source_id.encode()]),
        "image/key/sha256": _bytes([image.sha256.encode()]),
        "image/object/bbox/xmin": _floats([min(max(o.box[0] / w, 0.0), 1.0) for o in objs]),
        "image/object/bbox/xmax": _floats([min(max(o.box[2] / w, 0.0), 1.0) for o in objs]),
        "image/object/bbox/ymin": _floats([min(max(o.box[1] / h, 0.0), 1.0) for o in objs]),
        "image/object/bbox/ymax": _floats([min(max(o.box[3] / h, 0.0), 1.0) for o in objs]),
        "image/object/class/text": _bytes([names[o.label_id].encode("utf-8") for o in objs]),
        "image/object/class/label": _ints([o.label_id for o in objs]),
        "image/object/is_crowd": _ints([int(o.is_crowd) for o in objs]),
        "image/object/area": _floats([o.area for o in objs]),
    }
    if objs and objs[0].mask_png is not None:
        feature["image/object/mask"] = _bytes([o.mask_png for o in objs])
    if image.class_mask_png is not None:
        feature["image/segmentation/class/encoded"] = _bytes([image.class_mask_png])
        feature["image/segmentation/class/format"] = _bytes([b"png"])
    return tf.train.Example(features=tf.train.Features(feature=feature))


def shard_count(images: int, requested: int | None) -> int:
    if images == 0:
        return 0
    wanted = requested if requested else math.ceil(images / IMAGES_PER_SHARD)
    return max(1, min(wanted, images))


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


class ShardWriter:
    """Writes one split's examples round-robin over its shards (deterministic, streaming)."""

    def __init__(self, folder: Path, split: str, count: int):
        self.names = [shard_name(split, i, count) for i in range(count)]
        self._writers = [tf.io.TFRecordWriter(str(folder / n)) for n in self.names]
        self.written = 0

    def write(self, example: tf.train.Example) -> None:
        self._writers[self.written % len(self._writers)].write(example.SerializeToString(deterministic=True))
        self.written += 1

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
