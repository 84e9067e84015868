"""Checks of a detection run that only the model builder can make."""

from __future__ import annotations

from pipelines.detection.params import DetectorParams


def check_engine(params: DetectorParams, source: str, restore: bool = False) -> str | None:
    """What only the model builder can tell (sizes it cannot build, a checkpoint it cannot restore),
    as a user error naming the config, before any stage starts. With `restore`, the fine-tuning
    checkpoint is restored into a freshly built model (a dry run of training's start) and the
    one-line summary of what it restores is returned."""
    from pipelines.workspace import UserError
    from pipelines.detection import zoo
    from pipelines.detection.experiment import validate

    try:
        validate(params)
        if params.fine_tune_checkpoint:
            if restore:
                return str(zoo.check(params))
            zoo.layout(params.fine_tune_checkpoint)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(source, str(e)) from None
    return None
