"""Checks of a detection run that only the model builder can make."""

from __future__ import annotations

from pipelines.detection.params import DetectorParams


def check_engine(params: DetectorParams, source: str) -> None:
    """What only the model builder can tell (sizes it cannot build, a checkpoint it cannot restore),
    as a user error naming the config, before any stage starts."""
    from pipelines.common import UserError
    from pipelines.detection.experiment import fine_tune_modules, validate

    try:
        validate(params)
        fine_tune_modules(params)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(source, str(e)) from None
