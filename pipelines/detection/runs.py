"""A run: workspace/RUN/ with its pipeline.config, train/, eval/ and export/ folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipelines.common import UserError, display_path, workspace_dir
from pipelines.config import translate as tr
from pipelines.detection.params import DetectorParams


def run_dir(run: str) -> Path:
    """RUN is a name under workspace/, or a path to a run folder."""
    named = workspace_dir() / run
    if named.is_dir() or not Path(run).is_dir():
        return named
    return Path(run)


def load_run(run: str) -> tuple[DetectorParams, Path, list[str]]:
    """The run's pipeline.config, checked (fields and paths) and translated; paths made absolute."""
    folder = run_dir(run)
    config = folder / "pipeline.config"
    if not config.is_file():
        raise UserError(display_path(config), f"no pipeline.config: run `make config DATASET=... RUN={run}` first")
    translation = tr.load(config)
    p = translation.params

    def absolute(value):
        return str(tr.resolve_path(value).resolve()) if value else value

    params = dataclasses.replace(
        p, train_files=[absolute(f) for f in p.train_files], eval_files=[absolute(f) for f in p.eval_files],
        label_map_path=absolute(p.label_map_path), fine_tune_checkpoint=absolute(p.fine_tune_checkpoint))
    check_engine(params, display_path(config))
    return params, folder, translation.ignored


def check_engine(params: DetectorParams, source: str) -> None:
    """What only the model builder can tell (sizes it cannot build, a checkpoint it cannot restore),
    as a user error naming the config, before any stage starts."""
    from pipelines.detection.experiment import fine_tune_modules, validate

    try:
        validate(params)
        fine_tune_modules(params)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(source, str(e)) from None
