"""Writing tf.Examples (the keys of pipelines/examples.py, which the Object Detection API and Model
Garden read too) into sharded TFRecord files.

The data stage does not import TensorFlow: its worker processes serialise each tf.Example with
the small protobuf encoder below, and the writer frames records as TFRecord files are framed
(length, masked CRC-32C of the length, data, masked CRC-32C of the data). Both formats are
stable and documented; the tests read everything back with TensorFlow's own readers and compare
the bytes with tf.train.Example's.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import google_crc32c

from pipelines import examples as ex

IMAGES_PER_SHARD = 500  # default shard size when no shard count is given
FLOAT32_MAX = 3.4028234663852886e38


# --- tf.Example protobuf encoding --------------------------------------------------------------
# message Example { Features features = 1; }
# message Features { map<string, Feature> feature = 1; }
# message Feature { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
# message BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
# message Int64List { repeated int64 value = 1 [packed]; }

def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64: negative numbers as two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bytes_feature(values) -> bytes:
    return _field(1, b"".join(_field(1, v) for v in values))


def float_feature(values) -> bytes:
    """A FloatList; a NaN or infinite value is refused (ValueError): no record ever holds one."""
    for v in values:
        if not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):  # (a larger one would be infinite as float32)
            raise ValueError(f"refusing to write the non-finite number {v} to a TFRecord")
    packed = struct.pack(f"<{len(values)}f", *values)
    return _field(2, _field(1, packed) if values else b"")


def int64_feature(values) -> bytes:
    packed = b"".join(_varint(int(v)) for v in values)
    return _field(3, _field(1, packed) if values else b"")


def serialize_example(features: dict[str, bytes]) -> bytes:
    """An Example from encoded Feature messages, keys sorted (deterministic bytes)."""
    entries = b"".join(_field(1, _field(1, key.encode()) + _field(2, features[key])) for key in sorted(features))
    return _field(1, entries)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of a message: varints as ints, length-delimited as bytes."""
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(data, at)
        elif wire == 2:
            length, at = _read_varint(data, at)
            value, at = data[at:at + length], at + length
        elif wire == 5:
            value, at = data[at:at + 4], at + 4
        elif wire == 1:
            value, at = data[at:at + 8], at + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def parse_example(data: bytes) -> dict[str, list]:
    """A serialized tf.Example -> {key: list of bytes, floats or ints} (no TensorFlow needed)."""
    out: dict[str, list] = {}
    for _, _, entries in _fields(data):  # Example.features
        for _, _, entry in _fields(entries):  # Features.feature map entries
            key, values = "", []
            for number, _, part in _fields(entry):
                if number == 1:
                    key = part.decode()
                    continue
                for kind, _, lst in _fields(part):  # Feature: the one list it holds
                    for _, wire, item in _fields(lst):
                        if kind == 1:
                            values.append(bytes(item))
                        elif kind == 2:
                            values.extend(struct.unpack(f"<{len(item) // 4}f", item) if wire == 2
                                          else struct.unpack("<f", item))
                        else:
                            ints = []
                            if wire == 2:
                                at = 0
                                while at < len(item):
                                    v, at = _read_varint(item, at)
                                    ints.append(v)
                            else:
                                ints.append(item)
                            values.extend(v - (1 << 64) if v >= 1 << 63 else v for v in ints)
            out[key] = values
    return out


def example_features(image, names: dict[int, str]) -> dict[str, bytes]:
    """The feature map of one encoded image (an encode.EncodedImage)."""
    w, h = float(image.width), float(image.height)
    objs = image.objects

    def norm(values, size):
        return [min(max(v / size, 0.0), 1.0) for v in values]

    feature = {
        ex.IMAGE: bytes_feature([image.encoded]),
        ex.FORMAT: bytes_feature([image.format.encode()]),
        ex.HEIGHT: int64_feature([image.height]),
        ex.WIDTH: int64_feature([image.width]),
        ex.FILENAME: bytes_feature([image.key.encode("utf-8")]),
        ex.SOURCE_ID: bytes_feature([image.source_id.encode()]),
        ex.SHA256: bytes_feature([image.sha256.encode()]),
        ex.XMIN: float_feature(norm([o.box[0] for o in objs], w)),
        ex.XMAX: float_feature(norm([o.box[2] for o in objs], w)),
        ex.YMIN: float_feature(norm([o.box[1] for o in objs], h)),
        ex.YMAX: float_feature(norm([o.box[3] for o in objs], h)),
        ex.CLASS_TEXT: bytes_feature([names[o.label_id].encode("utf-8") for o in objs]),
        ex.CLASS_LABEL: int64_feature([o.label_id for o in objs]),
        ex.IS_CROWD: int64_feature([int(o.is_crowd) for o in objs]),
        ex.AREA: float_feature([o.area for o in objs]),
    }
    if objs and objs[0].mask_png is not None:
        feature[ex.INSTANCE_MASKS] = bytes_feature([o.mask_png for o in objs])
    if image.class_mask_png is not None:
        feature[ex.CLASS_MASK] = bytes_feature([image.class_mask_png])
        feature[ex.CLASS_MASK_FORMAT] = bytes_feature([b"png"])
    return feature


# --- TFRecord files ----------------------------------------------------------------------------

def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def read_records(path: Path):
    """The records of a TFRecord file (or of TensorBoard's event files, framed the same way), each checked
    against its CRC; a last record cut short (a file still being written) ends the iteration."""
    data = Path(path).read_bytes()
    at = 0
    while at + 12 <= len(data):
        header = data[at:at + 8]
        if data[at + 8:at + 12] != _masked_crc(header):
            raise ValueError(f"{path}: damaged record header at byte {at}")
        (length,) = struct.unpack("<Q", header)
        start, end = at + 12, at + 12 + length
        if end + 4 > len(data):
            return
        record = data[start:end]
        if data[end:end + 4] != _masked_crc(record):
            raise ValueError(f"{path}: damaged record at byte {at}")
        yield record
        at = end + 4


def shard_count(images: int, requested: int | None) -> int:
    if images == 0:
        return 0
    wanted = requested if requested else math.ceil(images / IMAGES_PER_SHARD)
    return max(1, min(wanted, images))


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


class ShardWriter:
    """Writes one split's serialized examples round-robin over its shards (deterministic, streaming)."""

    def __init__(self, folder: Path, split: str, count: int):
        self.names = [shard_name(split, i, count) for i in range(count)]
        self._files = [open(folder / n, "wb") for n in self.names]
        self.written = 0

    def write(self, serialized: bytes) -> None:
        self._files[self.written % len(self._files)].write(frame_record(serialized))
        self.written += 1

    def close(self) -> None:
        for f in self._files:
            f.close()
