"""Which fields a pipeline.config may hold: the Object Detection API's own schema, checked before
anything reads the file.

`odapi_fields.json` lists every message reachable from the OD API's TrainEvalPipelineConfig (its
`model` kept to `ssd`), generated from the OD API's protos (`python tests/odapi_oracle.py --schema
pipelines/config/odapi_fields.json`; a test keeps it equal to them). Our own `model { segmentation
{ ... } }` block is described below in the same terms. `check(doc)` walks the parsed file and
refuses, with the line and a "did you mean" hint where one is close:

- a field name its message does not have (a typo would otherwise be silently ignored);
- a non-repeated field given twice (the OD API's reader keeps the last one, ours the first);
- a message where a value belongs, or the reverse; a value of the wrong type (a number for a
  string, text for a number, `2.5` for an integer); an enum value the enum does not have.

Value ranges (num_steps >= 1, ...) are the translators' business: they know what each field means.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from pathlib import Path

from pipelines.workspace import UserError
from pipelines.config.textproto import Field, Message, TextProto

SCHEMA_FILE = Path(__file__).with_name("odapi_fields.json")
SEGMENTATION = "pipelines.SegmentationModel"

# model { segmentation { ... } }: our block (pipelines/segmentation/config.py reads it).
_SEGMENTATION_MESSAGES = {
    SEGMENTATION: {
        "num_classes": [False, "int"], "architecture": [False, "string"], "backbone": [False, "string"],
        "image_resizer": [False, "message:object_detection.protos.ImageResizer"],
        "encoder_weights": [False, "string"], "encoder_freeze": [False, "bool"],
        "decoder_filters": [True, "int"], "pyramid_filters": [False, "int"], "psp_filters": [False, "int"],
        "dropout": [False, "float"], "batch_norm_decay": [False, "float"],
        "loss": [False, "message:pipelines.SegmentationLoss"],
    },
    "pipelines.SegmentationLoss": {
        "dice": [False, "message:pipelines.LossTerm"],
        "categorical_focal": [False, "message:pipelines.LossTerm"],
        "categorical_crossentropy": [False, "message:pipelines.LossTerm"],
    },
    "pipelines.LossTerm": {"weight": [False, "float"], "alpha": [False, "float"], "gamma": [False, "float"]},
}

_INT = re.compile(r"[-+]?(0|[1-9]\d*|0[xX][0-9a-fA-F]+|0[0-7]+)")
_FLOAT = re.compile(r"[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?[fF]?|inf(inity)?|nan)", re.I)
_BOOL = {"true", "false", "True", "False", "t", "f", "1", "0"}


@functools.lru_cache(maxsize=1)
def schema() -> dict:
    data = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    messages = dict(data["messages"])
    messages.update(_SEGMENTATION_MESSAGES)
    model = data["messages"]["object_detection.protos.DetectionModel"]
    messages["object_detection.protos.DetectionModel"] = {**model, "segmentation": [False, f"message:{SEGMENTATION}"]}
    return {"root": data["root"], "messages": messages, "enums": data["enums"]}


def check(doc: TextProto) -> None:
    """Raise UserError (file, line, field path) at the first field the schema refuses."""
    s = schema()
    _check_message(doc, doc.root, s["root"], "", s)


def _line(doc: TextProto, pos: int) -> int:
    return doc.text.count("\n", 0, pos) + 1


def _fail(doc: TextProto, f: Field, path: str, message: str) -> UserError:
    return UserError(doc.source, f"line {_line(doc, f.start)}: {path}: {message}")


def _check_message(doc: TextProto, message: Message, type_name: str, prefix: str, s: dict) -> None:
    fields = s["messages"][type_name]
    seen: dict[str, Field] = {}
    for f in message.fields:
        path = f"{prefix}.{f.name}" if prefix else f.name
        spec = fields.get(f.name)
        if spec is None:
            where = f"in {prefix}" if prefix else "at the top level"
            close = difflib.get_close_matches(f.name, list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else (
                f"; it has: {', '.join(fields)}" if len(fields) <= 12 else "")
            raise _fail(doc, f, path, f"unknown field {where}{hint}")
        repeated, kind = spec
        if not repeated and f.name in seen:
            raise _fail(doc, f, path, f"given twice (first on line {_line(doc, seen[f.name].start)}); "
                                      "it takes one value")
        seen[f.name] = f
        if kind == "map":  # no map fields in the blocks we read; accept what the OD API accepts
            continue
        if kind.startswith("message:"):
            if f.message is None:
                raise _fail(doc, f, path, "is a message: write it as `" + f.name + " { ... }`")
            _check_message(doc, f.message, kind.split(":", 1)[1], path, s)
            continue
        if f.message is not None:
            raise _fail(doc, f, path, f"takes a value ({kind.split(':')[0]}), not a message")
        if len(f.values) != 1 and not repeated:
            raise _fail(doc, f, path, "takes one value, not a list")
        for value in f.values:
            problem = _value_problem(value.text, kind, s)
            if problem:
                raise _fail(doc, f, path, problem)


def _value_problem(text: str, kind: str, s: dict) -> str | None:
    quoted = text[:1] in "'\""
    if kind == "string":
        return None if quoted else f"{text} must be a quoted string"
    if quoted:
        return f"{text} must be a {kind.split(':')[0]}, not a string"
    if kind == "int":
        return None if _INT.fullmatch(text) else f"{text} must be an integer"
    if kind == "float":
        return None if _FLOAT.fullmatch(text) else f"{text} must be a number"
    if kind == "bool":
        return None if text in _BOOL else f"{text} must be true or false"
    if kind.startswith("enum:"):
        names = s["enums"][kind.split(":", 1)[1]]
        if text in names or _INT.fullmatch(text):  # text format takes an enum's number too
            return None
        close = difflib.get_close_matches(text, names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{text} is not one of {', '.join(names)}{hint}"
    return None
