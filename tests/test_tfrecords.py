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


def test_our_reader_parses_what_tensorflow_writes(tmp_path):
    """read_records + parse_example (no TensorFlow) on a file written by tf.io.TFRecordWriter: the same
    values as TensorFlow's own parsing, negative ints included; a damaged record is refused."""
    from pipelines.data.tfrecords import parse_example, read_records

    theirs = [_tf_example(_image(OBJECTS[:n], masks=n > 0, class_mask=True)) for n in range(4)]
    theirs[2].features.feature["extra/negative"].int64_list.value.extend([-5, 0, 2**40])
    path = tmp_path / "tf.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for example in theirs:
            writer.write(example.SerializeToString())
    records = list(read_records(path))
    assert len(records) == 4
    for record, example in zip(records, theirs):
        ours = parse_example(record)
        assert set(ours) == set(example.features.feature)
        for key, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind")
            want = list(getattr(feature, kind).value)
            assert ours[key] == pytest.approx(want) if kind == "float_list" else ours[key] == want, key
    assert parse_example(records[2])["extra/negative"] == [-5, 0, 2**40]

    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged record"):
        list(read_records(path))


def test_report_reads_tensorboard_scalars_without_tensorflow(tmp_path):
    """The report's event-file reader gets back what tf.summary wrote (TF2 tensors), step by step."""
    from pipelines.report import read_scalars

    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        for step in range(0, 50, 10):
            tf.summary.scalar("loss", 1.0 / (step + 1), step=step)
            tf.summary.scalar("learning_rate", 0.01 * step, step=step)
    writer.close()
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["loss"]] == [0, 10, 20, 30, 40]
    assert [v for _, v in scalars["loss"]] == pytest.approx([1.0 / (s + 1) for s in range(0, 50, 10)])
    assert scalars["learning_rate"][-1] == (40, pytest.approx(0.4))
