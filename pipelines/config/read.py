"""Read a pipeline.config of either kind: checked against the schema, then translated by the reader of
the kind its `model` block holds."""

from __future__ import annotations

from pathlib import Path

from pipelines.common import UserError, display_path
from pipelines.config import schema, segmentation
from pipelines.config import translate as detection
from pipelines.config.base import Translation, model_kind
from pipelines.config.textproto import TextProto


def translate_any(doc: TextProto, check_paths: bool = True) -> Translation:
    """A detection or a segmentation config, whichever the model block holds."""
    schema.check(doc)
    if model_kind(doc) == "segmentation":
        return segmentation.translate(doc, check_paths=check_paths)
    return detection.translate(doc, check_paths=check_paths)


def load(path: Path, check_paths: bool = True) -> Translation:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(display_path(path), f"cannot read: {e.strerror or e}") from None
    return translate_any(TextProto(text, display_path(path)), check_paths=check_paths)
