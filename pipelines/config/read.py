"""Read a pipeline.config of any task: checked against the schema, then translated by the reader of
the task its `model` block names (pipelines/tasks.py)."""

from __future__ import annotations

from pathlib import Path

from pipelines import tasks
from pipelines.workspace import UserError, display_path
from pipelines.config import schema
from pipelines.config.base import Translation, model_kind
from pipelines.config.textproto import TextProto


def translate_any(doc: TextProto, check_paths: bool = True) -> Translation:
    """A config of any registered task, translated by the reader of the task its model block names."""
    schema.check(doc)
    task = tasks.of_config_block(model_kind(doc))
    translation = task.load("translate")(doc, check_paths=check_paths)
    translation.task = task
    return translation


def load(path: Path, check_paths: bool = True) -> Translation:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(display_path(path), f"cannot read: {e.strerror or e}") from None
    return translate_any(TextProto(text, display_path(path)), check_paths=check_paths)
