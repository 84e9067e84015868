"""The tf.Example contract of our TFRecords: its keys, IGNORE_LABEL, and the one decoder every stage reads
them with.

The data stage writes them (pipelines/data/tfrecords.py, without TensorFlow); the Object Detection
API's and Model Garden's readers take the same keys. Every image: its encoded bytes, format, size,
filename, source id and SHA-256, and its objects' boxes (normalised to [0, 1]), class names and
label-map ids, crowd flags and areas (pixels). With instance masks, one 0/1 PNG per object; for
segmentation, one PNG of class ids per image, IGNORE_LABEL where no class applies (crowd regions).
TensorFlow is imported only by the decoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
FILENAME = "image/filename"
SOURCE_ID = "image/source_id"
SHA256 = "image/key/sha256"
XMIN, XMAX = "image/object/bbox/xmin", "image/object/bbox/xmax"
YMIN, YMAX = "image/object/bbox/ymin", "image/object/bbox/ymax"
CLASS_TEXT = "image/object/class/text"
CLASS_LABEL = "image/object/class/label"
IS_CROWD = "image/object/is_crowd"
AREA = "image/object/area"
INSTANCE_MASKS = "image/object/mask"
CLASS_MASK = "image/segmentation/class/encoded"
CLASS_MASK_FORMAT = "image/segmentation/class/format"

IGNORE_LABEL = 255  # class-mask value that losses and metrics skip (crowd regions, padding)


@dataclass
class Example:
    """One decoded record: the image as a person sees it, with its ground truth in pixels."""
    image: np.ndarray  # uint8 [H, W, 3]
    filename: str
    source_id: str
    boxes: np.ndarray  # float64 [N, 4] xmin, ymin, xmax, ymax in pixels
    classes: np.ndarray  # int64 [N] label-map ids
    crowd: np.ndarray | None  # int64 [N], None when the record has no is_crowd key
    area: np.ndarray  # float64 [N]
    class_mask: np.ndarray | None  # uint8 [H, W] class ids (IGNORE_LABEL ignored), None without one

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def find_files(patterns: list[str], what: str) -> list[str]:
    """The TFRecord files the globs match, sorted; ValueError naming the globs when none does."""
    import tensorflow as tf

    files = sorted({f for pattern in patterns for f in tf.io.gfile.glob(pattern)})
    if not files:
        raise ValueError(f"{what}: no TFRecord file matches {', '.join(patterns) if patterns else '(none given)'}")
    return files


def check_class_masks(files: list[str], what: str) -> None:
    """Read the first record: segmentation needs the class-mask PNG that only TASK=segmentation writes."""
    import tensorflow as tf

    for path in files:
        for raw in tf.data.TFRecordDataset(path).take(1):
            feature = tf.train.Example.FromString(raw.numpy()).features.feature.get(CLASS_MASK)
            if feature is None or not feature.bytes_list.value or not feature.bytes_list.value[0]:
                raise ValueError(f"{what}: {path} has no segmentation masks ({CLASS_MASK}); run the data stage "
                                 "with TASK=segmentation (python -m pipelines data --task segmentation)")
            return
    raise ValueError(f"{what}: no records in {', '.join(files)}")


def decode(raw: bytes, where: str = "") -> Example:
    """A serialized record -> Example. ValueError naming `where` for a class mask whose size is not the
    image's."""
    import tensorflow as tf

    feats = tf.train.Example.FromString(raw).features.feature

    def floats(key):
        return np.array(feats[key].float_list.value, np.float64) if key in feats else np.zeros(0)

    def ints(key):
        return np.array(feats[key].int64_list.value, np.int64) if key in feats else np.zeros(0, np.int64)

    def text(key):
        return feats[key].bytes_list.value[0].decode("utf-8") if key in feats and feats[key].bytes_list.value else ""

    image = tf.io.decode_image(feats[IMAGE].bytes_list.value[0], channels=3, expand_animations=False).numpy()
    h, w = image.shape[:2]
    filename = text(FILENAME) or where
    mask = None
    if CLASS_MASK in feats and feats[CLASS_MASK].bytes_list.value and feats[CLASS_MASK].bytes_list.value[0]:
        mask = tf.io.decode_png(feats[CLASS_MASK].bytes_list.value[0], channels=1).numpy()[..., 0]
        if mask.shape != (h, w):
            raise ValueError(f"{filename}: mask of {mask.shape[1]}x{mask.shape[0]} for an image of {w}x{h}")
    return Example(
        image=image, filename=filename, source_id=text(SOURCE_ID),
        boxes=np.stack([floats(XMIN) * w, floats(YMIN) * h, floats(XMAX) * w, floats(YMAX) * h], axis=-1),
        classes=ints(CLASS_LABEL), crowd=ints(IS_CROWD) if IS_CROWD in feats else None, area=floats(AREA),
        class_mask=mask)


def read(patterns: list[str], what: str = "eval_files", class_masks: bool = False) -> Iterator[Example]:
    """Every record of the files the globs match, in file order, decoded one at a time. With
    `class_masks`, every file must have them (checked on its first record before any is yielded).
    UserError naming the globs, or the file and record."""
    import tensorflow as tf

    from pipelines.workspace import UserError, display_path

    try:
        files = find_files(patterns, what)
        if class_masks:
            check_class_masks(files, what)
    except ValueError as e:
        raise UserError(None, str(e)) from None
    for path in files:
        for n, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            try:
                yield decode(raw, f"record {n}")
            except ValueError as e:
                raise UserError(display_path(Path(path)), str(e)) from None


def parse(serialized):
    """The graph decoder tf.data pipelines use: a serialized record -> {"image": uint8 [H, W, 3],
    "class_mask": uint8 [H, W] (empty when the record has none), "filename": string}."""
    import tensorflow as tf

    parsed = tf.io.parse_single_example(serialized, {
        IMAGE: tf.io.FixedLenFeature([], tf.string),
        FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
        CLASS_MASK: tf.io.FixedLenFeature([], tf.string, default_value=""),
    })
    image = tf.io.decode_image(parsed[IMAGE], channels=3, expand_animations=False)
    mask = tf.io.decode_png(parsed[CLASS_MASK], channels=1)[..., 0]
    image.set_shape([None, None, 3])
    mask.set_shape([None, None])
    return {"image": image, "class_mask": mask, "filename": parsed[FILENAME]}
