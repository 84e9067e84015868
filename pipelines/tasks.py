"""The task registry: what differs between tasks, in one place. Every other module asks it instead of
testing which task it has.

A task is one package of pipelines/ that owns every part of it, and registers itself in its
`__init__.py` (`TASK = register(Task(...))`). A folder of pipelines/ with a `params.py` is a task
package: the registry imports each one the first time it is asked, so adding a task is its folder.
The parts have the same module and name in every task package, imported only when asked for
(`task.load("train")`), so that reading the registry costs no TensorFlow:

    config.translate(doc, check_paths)             pipeline.config -> config.base.Translation
    config.defaults(doc, opts)                     make config's settings for options not given, with one of our
                                                   templates -> (opts, notes)
    config.rules(doc, opts)                        make config's edits of this task's fields -> notes
    check.check_engine(params, source, restore=False)  what only the model builder can refuse (UserError);
                                                   with restore, loads the initial weights (-> a note)
    train.train(params, run_dir, log=, mode=)      engine.train.run's result; mode None = the task's default
    evaluate.Evaluator(params, labels)             reset / process(record, outputs) / evaluate -> metrics,
                                                   serving_function(checkpoint), draw, format (engine/evaluate.py)
    export.Exporter(params)                        save(checkpoint, saved_model_dir, folder) -> model, check,
                                                   describe_check, metadata, signature_notes (engine/export.py)
    predict.Predictions(labels, metadata, **options)  per image: (image, outputs, out stem) -> its JSON, pictures;
                                                   run(serve, image) -> outputs, drafts(image, outputs, model)
                                                   -> coco-annotator annotations (make prelabel)
    suggest.Uncertainty(metadata)                  make suggest: (suggest signature's outputs on one image)
                                                   -> (uncertainty, reason); .outputs: what it reads
    service.Service                                the BentoML service class serving its exports
    report.metrics_html(metrics, eval_dir)         `make report`'s evaluation section: (HTML, its plot)
    report.metrics_line(metrics)                   metrics.json in one line (`make demo` prints it)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# part -> (module of the task package, attribute): the same in every task
PARTS = {"translate": ("config", "translate"), "config_rules": ("config", "rules"),
         "config_defaults": ("config", "defaults"),
         "check_engine": ("check", "check_engine"), "train": ("train", "train"),
         "evaluator": ("evaluate", "Evaluator"), "exporter": ("export", "Exporter"),
         "predict": ("predict", "Predictions"), "service": ("service", "Service"),
         "uncertainty": ("suggest", "Uncertainty"),
         "report": ("report", "metrics_html"), "summary": ("report", "metrics_line")}


@dataclass(frozen=True)
class Task:
    name: str  # as in metadata.json's "task", the data stage's --task and metrics.json's "task"
    package: str  # the package that owns every part of it (its __name__)
    params: type  # its settings dataclass
    config_block: str  # the message in pipeline.config's `model { }` that selects it
    metric: str  # the validation metric that picks the best checkpoint (higher is better)
    # Fields of the settings that name initial weights: not needed to evaluate or export a trained run.
    init_fields: tuple[str, ...] = ()
    # Fields that hold a file path (made absolute when a run is loaded), and values of them that are not paths.
    path_fields: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    # Host memory of training on a CPU: (fixed bytes, bytes per input pixel of each training image).
    train_memory: tuple[float, float] = (1.2e9, 2000.0)
    class_masks: bool = False  # the data stage writes each image's class-id PNG for it (--task)
    predict_options: tuple[str, ...] = field(default=())  # the predict command's options it takes
    draft_options: tuple[str, ...] = field(default=())  # make prelabel's options it takes (its predict part's)

    def load(self, part: str) -> Any:
        """The named part ("train", "evaluator", ...: PARTS), imported now."""
        module, attribute = PARTS[part]
        return getattr(importlib.import_module(f"{self.package}.{module}"), attribute)


_TASKS: dict[str, Task] = {}
_DISCOVERED: list[bool] = []  # [True] once every task package was imported


def register(task: Task) -> Task:
    """Called by a task package's __init__.py."""
    _TASKS[task.name] = task
    return task


def _registered() -> dict[str, Task]:
    """Every task, its package imported the first time (a package of pipelines/ with a params.py)."""
    if not _DISCOVERED:
        root = Path(__file__).resolve().parent
        for folder in sorted(root.iterdir()):
            if (folder / "__init__.py").is_file() and (folder / "params.py").is_file():
                importlib.import_module(f"{__package__}.{folder.name}")
        _DISCOVERED.append(True)
    return dict(sorted(_TASKS.items()))  # by name, whichever task package was imported first


def names() -> list[str]:
    return list(_registered())


# metadata.json, metrics.json and the data summary written before they named their task were all
# detection ones: the one place that reads that older layout.
BEFORE_TASK_FIELD = "detection"


def name_in(record: dict | None) -> str:
    """The task a metadata.json / metrics.json / summary.json names (see BEFORE_TASK_FIELD)."""
    return str((record or {}).get("task", BEFORE_TASK_FIELD))


def get(name: str) -> Task:
    """The task called `name`; ValueError naming the known ones."""
    tasks = _registered()
    if name not in tasks:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(tasks)})")
    return tasks[name]


def of_params(params) -> Task:
    """The task whose settings dataclass `params` is."""
    for task in _registered().values():
        if type(params) is task.params:
            return task
    raise ValueError(f"{type(params).__name__}: the settings of no registered task")


def of_config_block(block: str) -> Task | None:
    return next((task for task in _registered().values() if task.config_block == block), None)


def config_blocks() -> list[str]:
    return [task.config_block for task in _registered().values()]


def of_export(folder: Path) -> Task:
    """The task of an export folder (or its saved_model/, or a file in it), from its metadata.json; exports without one
    predate it and are detection exports. UserError for a task this version does not know."""
    from pipelines.workspace import UserError, display_path
    from pipelines.model_store import read_metadata

    folder = Path(folder)
    metadata = read_metadata(folder.parent if folder.is_file() else folder)  # a .tflite file: its export folder
    name = name_in(metadata)
    try:
        return get(name)
    except ValueError as e:
        raise UserError(display_path(folder), f"export of {e}") from None
