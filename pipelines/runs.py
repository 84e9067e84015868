"""A run: workspace/RUN/ with its pipeline.config, train/, eval/ and export/ folders.

The config's model block says which family the run trains: `ssd` (pipelines/detection/) or
`segmentation` (pipelines/segmentation/).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pipelines.common import UserError, display_path, workspace_dir
from pipelines.config import base, read
from pipelines.config.base import SKIP_MEMORY_CHECK, memory_advice
from pipelines.detection.params import DetectorParams
from pipelines.segmentation.params import SegmenterParams


def run_dir(run: str) -> Path:
    """RUN is a name under workspace/, or a path to a run folder."""
    named = workspace_dir() / run
    if named.is_dir() or not Path(run).is_dir():
        return named
    return Path(run)


def _absolute(value: str | None) -> str | None:
    return str(base.resolve_path(value).resolve()) if value else value


def load_run(run: str, need_data: bool = True) -> tuple[DetectorParams | SegmenterParams, Path, list[str]]:
    """The run's pipeline.config, checked (fields and paths) and translated; paths made absolute.

    need_data=False (export): the TFRecords and the fine-tuning checkpoint need not exist (a run made
    by `make import` has none), only the label map."""
    folder = run_dir(run)
    config = folder / "pipeline.config"
    if not config.is_file():
        raise UserError(display_path(config), f"no pipeline.config: run `make config DATASET=... RUN={run}` first")
    translation = read.load(config, check_paths=need_data)
    p = translation.params
    if not need_data:
        if not p.label_map_path or not base.resolve_path(p.label_map_path).is_file():
            raise UserError(display_path(config), f"train_input_reader.label_map_path: no such file: {p.label_map_path}")
        p = dataclasses.replace(p, train_files=[f for f in p.train_files if base.PLACEHOLDER not in f],
                                eval_files=[f for f in p.eval_files if base.PLACEHOLDER not in f])
        if isinstance(p, DetectorParams):
            p = dataclasses.replace(p, fine_tune_checkpoint=None, fine_tune_checkpoint_type=None)
    common = dict(train_files=[_absolute(f) for f in p.train_files], eval_files=[_absolute(f) for f in p.eval_files],
                  label_map_path=_absolute(p.label_map_path))
    if isinstance(p, SegmenterParams):
        from pipelines.segmentation.runs import check_engine

        weights = p.encoder_weights if p.encoder_weights in (None, "imagenet") else _absolute(p.encoder_weights)
        params = dataclasses.replace(p, encoder_weights=weights, **common)
    else:
        from pipelines.detection.runs import check_engine

        params = dataclasses.replace(p, fine_tune_checkpoint=_absolute(p.fine_tune_checkpoint), **common)
    check_engine(params, display_path(config))
    return params, folder, translation.ignored


def check_memory(params: DetectorParams | SegmenterParams, source: str, log=print) -> None:
    """Refuse a CPU training run that would not fit in memory (the kernel would kill it, perhaps with
    other processes); warn when it takes most of it. No check with a GPU or with
    PIPELINES_SKIP_MEMORY_CHECK=1."""
    if os.environ.get(SKIP_MEMORY_CHECK) == "1":
        return
    advice = memory_advice(params)
    if advice is None:
        return
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    too_much, line = advice
    if too_much:
        raise UserError(source, f"{line}; make config ... BATCH=N, or {SKIP_MEMORY_CHECK}=1 to try anyway")
    log(f"note: {line}")
