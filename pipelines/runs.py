"""A run: workspace/RUN/ with its pipeline.config, train/, eval/ and export/ folders.

The config's model block says which task the run trains (pipelines/tasks.py: `ssd` is detection,
`segmentation` segmentation); the run's settings are that task's params dataclass.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pipelines import tasks
from pipelines.common import UserError, display_path, workspace_dir
from pipelines.config import base, read
from pipelines.config.base import SKIP_MEMORY_CHECK, memory_advice


def run_dir(run: str) -> Path:
    """RUN is a name under workspace/, or a path to a run folder."""
    named = workspace_dir() / run
    if named.is_dir() or not Path(run).is_dir():
        return named
    return Path(run)


def load_run(run: str, need_data: bool = True) -> tuple[object, Path, list[str]]:
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
    task = tasks.of_params(p)
    if not need_data:
        p = dataclasses.replace(p, **{name: None for name in task.init_fields})
    params = base.absolute_paths(p)
    task.load("check_engine")(params, display_path(config))
    return params, folder, translation.ignored


def check_memory(params, source: str, log=print) -> None:
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
