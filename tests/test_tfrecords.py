"""The TFRecord writer against TensorFlow itself: same Example bytes, readable, checksummed."""

from __future__ import annotations

import pipelines  # noqa: F401
import pytest
import tensorflow as tf

from pipelines.data.encode import EncodedImage, EncodedObject
from pipelines.data.tfrecords import ShardWriter, example_features, serialize_example

NAMES = {1: "cat", 2: "crème brûlée", 300: "x" * 200}


def _image(objects, masks=False, class_mask=False):
    return EncodedImage(
        key="sub dir/ü.jpg", source_id="123456789012", encoded=bytes(range(256)) * 40, format="jpeg",
        width=640, height=480, sha256="ab" * 32,
        objects=[EncodedObject(box=b, label_id=l, is_crowd=c, area=a, mask_png=b"\x89PNG" + str(l).encode() if masks else None)
                 for b, l, c, a in objects],
        class_mask_png=b"\x89PNGclass" if class_mask else None)


def _tf_example(image: EncodedImage) -> tf.train.Example:
    """The same example built with TensorFlow's own classes."""
    def floats(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=v))

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=v))

    def raw(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=v))

    o = image.objects
    feature = {
        "image/encoded": raw([image.encoded]), "image/format": raw([b"jpeg"]),
        "image/height": ints([image.height]), "image/width": ints([image.width]),
        "image/filename": raw([image.key.encode()]), "image/source_id": raw([image.source_id.encode()]),
        "image/key/sha256": raw([image.sha256.encode()]),
        "image/object/bbox/xmin": floats([min(max(x.box[0] / 640, 0), 1) for x in o]),
        "image/object/bbox/xmax": floats([min(max(x.box[2] / 640, 0), 1) for x in o]),
        "image/object/bbox/ymin": floats([min(max(x.box[1] / 480, 0), 1) for x in o]),
        "image/object/bbox/ymax": floats([min(max(x.box[3] / 480, 0), 1) for x in o]),
        "image/object/class/text": raw([NAMES[x.label_id].encode() for x in o]),
        "image/object/class/label": ints([x.label_id for x in o]),
        "image/object/is_crowd": ints([int(x.is_crowd) for x in o]),
        "image/object/area": floats([x.area for x in o]),
    }
    if o and o[0].mask_png is not None:
        feature["image/object/mask"] = raw([x.mask_png for x in o])
    if image.class_mask_png is not None:
        feature["image/segmentation/class/encoded"] = raw([image.class_mask_png])
        feature["image/segmentation/class/format"] = raw([b"png"])
    return tf.train.Example(features=tf.train.Features(feature=feature))


OBJECTS = [((10.5, 20.25, 300.0, 470.0), 1, False, 55123.5), ((-3.0, 0.0, 700.0, 10.0), 300, True, 12.0),
           ((100.0, 100.0, 101.0, 101.0), 2, False, 1.0)]


@pytest.mark.parametrize("objects,masks,class_mask", [
    (OBJECTS, True, True), (OBJECTS, False, False), ([], False, False), ([], False, True)])
def test_example_bytes_equal_tensorflows(objects, masks, class_mask):
    image = _image(objects, masks, class_mask)
    ours = serialize_example(example_features(image, NAMES))
    theirs = _tf_example(image)
    assert tf.train.Example.FromString(ours) == theirs
    assert ours == theirs.SerializeToString(deterministic=True)


def test_records_read_back_with_tensorflow_and_checksums_are_checked(tmp_path):
    examples = [serialize_example(example_features(_image(OBJECTS[:n], masks=True), NAMES)) for n in range(4)]
    writer = ShardWriter(tmp_path, "train", 2)
    for example in examples:
        writer.write(example)
    writer.close()
    assert writer.names == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    read = [list(tf.data.TFRecordDataset(str(tmp_path / n)).as_numpy_iterator()) for n in writer.names]
    assert read == [[examples[0], examples[2]], [examples[1], examples[3]]]  # round-robin, in order

    spec = {"image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
            "image/object/class/label": tf.io.VarLenFeature(tf.int64),
            "image/height": tf.io.FixedLenFeature([], tf.int64),
            "image/filename": tf.io.FixedLenFeature([], tf.string)}
    parsed = tf.io.parse_single_example(read[1][1], spec)
    assert parsed["image/height"].numpy() == 480
    assert parsed["image/filename"].numpy().decode() == "sub dir/ü.jpg"
    assert list(parsed["image/object/class/label"].values.numpy()) == [1, 300, 2]

    shard = tmp_path / writer.names[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # flip one byte inside the first record's data
    shard.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(shard)).as_numpy_iterator())
