"""label_map.pbtxt in the Object Detection API's format, and its JSON sidecar."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipelines.common import UserError, display_path
from pipelines.data.items import Category


def _quote(name: str) -> str:
    return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_label_map(categories: list[Category]) -> str:
    lines = ["# Written by `python -m pipelines data`. Ids 1..K; 0 is reserved for the background.\n"]
    for cat in categories:
        lines.append(f"item {{\n  id: {cat.label_id}\n  name: {_quote(cat.name)}\n}}\n")
    return "".join(lines)


def write_label_map(folder: Path, categories: list[Category]) -> None:
    (folder / "label_map.pbtxt").write_text(format_label_map(categories), encoding="utf-8")
    sidecar = {"classes": [{"id": c.label_id, "name": c.name, "source_id": c.source_id} for c in categories]}
    (folder / "label_map.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")


_ITEM = re.compile(r"item\s*\{(.*?)\}", re.S)
_ID = re.compile(r"\bid\s*:\s*(-?\d+)")
_NAME = re.compile(r"""\b(?:display_)?name\s*:\s*(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")""")


def read_label_map(path: Path) -> dict[int, str]:
    """Parse an OD API label map (ours or a user's); `name` wins over `display_name`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(display_path(path), f"cannot read label map: {e.strerror or e}") from None
    text = re.sub(r"#[^\n]*", "", text)
    labels: dict[int, str] = {}
    for n, body in enumerate(_ITEM.findall(text), start=1):
        ids = _ID.findall(body)
        names = {m.group(0).split(":")[0].strip(): (m.group(1) if m.group(1) is not None else m.group(2))
                 for m in _NAME.finditer(body)}
        name = names.get("name", names.get("display_name"))
        if not ids or name is None:
            raise UserError(display_path(path), f"item {n} needs an id and a name")
        label_id = int(ids[0])
        if label_id < 1 or label_id in labels:
            raise UserError(display_path(path), f"item {n}: id {label_id} is " +
                            ("reserved for the background" if label_id < 1 else "used twice"))
        labels[label_id] = re.sub(r"\\(.)", r"\1", name)
    if not labels:
        raise UserError(display_path(path), "no items in label map")
    return labels
