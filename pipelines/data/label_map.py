"""label_map.pbtxt in the Object Detection API's format, and its JSON sidecar.

Both directions go through protobuf's text format proper: names are written with its escaping
(a quote, backslash, newline, `#` or `}` in a class name survives), and read back by protobuf's
own text_format parser into the OD API's StringIntLabelMap message, defined here at run time (the
OD API itself is not installed). So a user's label map is read as the OD API reads it: comments,
single or double quotes, `display_name`, fields in any order, and the OD API's other fields.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pipelines.workspace import UserError, display_path
from pipelines.data.checks import blank_name
from pipelines.data.items import Category


def _quote(name: str) -> str:
    from google.protobuf import text_encoding

    return "'" + text_encoding.CEscape(name, as_utf8=True) + "'"


def format_label_map(categories: list[Category]) -> str:
    lines = ["# Written by `python -m pipelines data`. Ids 1..K; 0 is reserved for the background.\n"]
    for cat in categories:
        lines.append(f"item {{\n  id: {cat.label_id}\n  name: {_quote(cat.name)}\n}}\n")
    return "".join(lines)


def write_label_map(folder: Path, categories: list[Category]) -> None:
    (folder / "label_map.pbtxt").write_text(format_label_map(categories), encoding="utf-8")
    sidecar = {"classes": [{"id": c.label_id, "name": c.name, "source_id": c.source_id} for c in categories]}
    (folder / "label_map.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _label_map_class():
    """object_detection.protos.StringIntLabelMap, as its .proto declares it (proto2)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="pipelines_string_int_label_map.proto",
                                               package="pipelines.label_map", syntax="proto2")

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    enum = proto.enum_type.add(name="LVISFrequency")
    for number, value in enumerate(("FREQUENCY_UNSPECIFIED", "FREQUENT", "COMMON", "RARE")):
        enum.value.add(name=value, number=number)
    item = proto.message_type.add(name="StringIntLabelMapItem")
    keypoint = item.nested_type.add(name="KeypointMap")
    keypoint.field.add(name="id", number=1, type=F.TYPE_INT32, label=opt)
    keypoint.field.add(name="label", number=2, type=F.TYPE_STRING, label=opt)
    for name, number, kind, label, type_name in (
            ("name", 1, F.TYPE_STRING, opt, None),
            ("id", 2, F.TYPE_INT32, opt, None),
            ("display_name", 3, F.TYPE_STRING, opt, None),
            ("keypoints", 4, F.TYPE_MESSAGE, rep, ".pipelines.label_map.StringIntLabelMapItem.KeypointMap"),
            ("ancestor_ids", 5, F.TYPE_INT32, rep, None),
            ("descendant_ids", 6, F.TYPE_INT32, rep, None),
            ("frequency", 7, F.TYPE_ENUM, opt, ".pipelines.label_map.LVISFrequency"),
            ("instance_count", 8, F.TYPE_INT32, opt, None)):
        f = item.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            f.type_name = type_name
    top = proto.message_type.add(name="StringIntLabelMap")
    top.field.add(name="item", number=1, type=F.TYPE_MESSAGE, label=rep,
                  type_name=".pipelines.label_map.StringIntLabelMapItem")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("pipelines.label_map.StringIntLabelMap"))


def parse_label_map(text: str, source: str = "<label map>") -> dict[int, str]:
    """Label-map text -> {id: name}; `name` wins over `display_name`. UserError naming `source`."""
    from google.protobuf import text_format

    label_map = _label_map_class()()
    try:
        # Fields the OD API added after the ones above are skipped, as an older OD API would not.
        text_format.Parse(text, label_map, allow_unknown_field=True)
    except text_format.ParseError as e:
        raise UserError(source, f"not a valid label map: {str(e).splitlines()[0]}") from None
    labels: dict[int, str] = {}
    for n, item in enumerate(label_map.item, start=1):
        name = item.name if item.HasField("name") else item.display_name if item.HasField("display_name") else None
        if not item.HasField("id") or name is None:
            raise UserError(source, f"item {n} needs an id and a name")
        blank = blank_name(name)
        if blank:
            raise UserError(source, f"item {n} (id {item.id}): {blank}: every class needs a name")
        if item.id < 1 or item.id in labels:
            raise UserError(source, f"item {n}: id {item.id} is " +
                            ("reserved for the background" if item.id < 1 else "used twice"))
        labels[item.id] = name
    if not labels:
        raise UserError(source, "no items in label map")
    return labels


def read_label_map(path: Path) -> dict[int, str]:
    """Parse an OD API label map (ours or a user's); `name` wins over `display_name`."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # (a BOM, as Windows editors write)
    except OSError as e:
        raise UserError(display_path(path), f"cannot read label map: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(display_path(path), f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    return parse_label_map(text, display_path(path))
