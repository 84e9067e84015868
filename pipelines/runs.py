"""A run: workspace/RUN/ with its pipeline.config, run.json (the seed), train/, eval/ and export/ folders.

The config's model block says which task the run trains (pipelines/tasks.py: `ssd` is detection,
`segmentation` segmentation); the run's settings are that task's params dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import NamedTuple

from pipelines import tasks
from pipelines.workspace import UserError, display_path, workspace_dir, write_text_atomic
from pipelines.config import base, read
from pipelines.config.base import SKIP_MEMORY_CHECK, memory_advice


def run_dir(run: str) -> Path:
    """RUN is a name under workspace/, or a path to a run folder."""
    named = workspace_dir() / run
    if named.is_dir() or not Path(run).is_dir():
        return named
    return Path(run)


RUN_JSON = "run.json"  # workspace/RUN/run.json: what the run is besides its pipeline.config (the seed)


def read_seed(folder: Path) -> int:
    """The run's seed: run.json's, or 0 for a run without one (made by `make import`, or before seeds)."""
    path = folder / RUN_JSON
    if not path.is_file():
        return 0
    try:
        seed = json.loads(path.read_text(encoding="utf-8")).get("seed", 0)
    except (ValueError, AttributeError):
        raise UserError(display_path(path), "not a JSON object; rerun `make config` to rewrite it") from None
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(display_path(path), f"seed: expected a non-negative integer, found {seed!r}")
    return seed


def record_seed(folder: Path, seed: int) -> None:
    """Write the seed into the run's run.json (write-then-rename, other keys kept)."""
    path = folder / RUN_JSON
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    record["seed"] = seed
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")


class Run(NamedTuple):
    params: object  # the settings of its task, paths absolute, its seed set
    folder: Path
    notes: list[str]  # the config's fields read but not applied ("field: why")
    task: tasks.Task  # from the config's model block: every stage of the run uses it


def load_run(run: str, need_data: bool = True) -> Run:
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
    task = translation.task
    if not need_data:
        p = dataclasses.replace(p, **{name: None for name in task.init_fields})
    params = base.absolute_paths(task, dataclasses.replace(p, seed=read_seed(folder)))
    task.load("check_engine")(params, display_path(config))
    return Run(params, folder, translation.ignored, task)


def check_memory(task, params, source: str, log=print) -> None:
    """Refuse a CPU training run that would not fit in memory (the kernel would kill it, perhaps with
    other processes); warn when it takes most of it. No check with a GPU or with
    PIPELINES_SKIP_MEMORY_CHECK=1."""
    if os.environ.get(SKIP_MEMORY_CHECK) == "1":
        return
    advice = memory_advice(task, params)
    if advice is None:
        return
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    too_much, line = advice
    if too_much:
        raise UserError(source, f"{line}; make config ... BATCH=N, or {SKIP_MEMORY_CHECK}=1 to try anyway")
    log(f"note: {line}")
