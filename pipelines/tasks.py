"""The task registry: what differs between tasks, in one place. Every other module asks it instead of
testing which task it has.

A task is a folder of its own (pipelines/detection/, pipelines/segmentation/) with the same parts: the
settings (params.py), the pipeline.config reader (in pipelines/config/), training on the shared engine
(train.py), evaluation, export, predict and the serving class. The registry names each part as
"module:attribute", imported only when asked for, so that reading it costs no TensorFlow. Adding a
task is its folder plus one `register(Task(...))` line below.

Every part takes the same arguments in every task:

    translate(doc, check_paths)                    pipeline.config -> config.base.Translation
    config_rules(doc, opts)                        make config's edits of this task's fields -> notes
    check_engine(params, source, restore=False)    what only the model builder can refuse (UserError);
                                                   with restore, loads the initial weights (-> a note)
    train(params, run_dir, log=, mode=)            engine.train.run's result; mode None = the task's default
    evaluator(params, labels)                      reset / process(record, outputs) / evaluate -> metrics,
                                                   serving_function(checkpoint), draw, format (engine/evaluate.py)
    exporter(params)                               save(checkpoint, saved_model_dir, folder) -> model, check,
                                                   describe_check, metadata, signature_notes (engine/export.py)
    predict(labels, metadata, **options)           per image: (image, outputs, out stem) -> its JSON, pictures;
                                                   run(serve, image) -> outputs, drafts(image, outputs, model)
                                                   -> coco-annotator annotations (make prelabel)
    service                                        the BentoML service class serving its exports
    report(metrics, eval_dir)                      `make report`'s evaluation section
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Task:
    name: str  # as in metadata.json's "task", the data stage's --task and metrics.json's "task"
    config_block: str  # the message in pipeline.config's `model { }` that selects it
    params: str  # its settings dataclass
    translate: str
    config_rules: str  # make config's rules of this task, after the shared ones
    check_engine: str
    train: str
    evaluator: str
    exporter: str
    predict: str
    service: str
    report: str  # (metrics.json content, eval folder) -> (HTML of its metrics, the plot beside them)
    metric: str  # the validation metric that picks the best checkpoint (higher is better)
    # Fields of the settings that name initial weights: not needed to evaluate or export a trained run.
    init_fields: tuple[str, ...] = ()
    # Fields that hold a file path (made absolute when a run is loaded), and values of them that are not paths.
    path_fields: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    # Host memory of training on a CPU: (fixed bytes, bytes per input pixel of each training image).
    train_memory: tuple[float, float] = (1.2e9, 2000.0)
    predict_options: tuple[str, ...] = field(default=())  # the predict command's options it takes
    draft_options: tuple[str, ...] = field(default=())  # make prelabel's options it takes (its predict part's)

    def load(self, part: str) -> Any:
        """The named part ("train", "evaluate", ...), imported now."""
        module, _, attribute = getattr(self, part).partition(":")
        return getattr(importlib.import_module(module), attribute)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


# Host memory figures: bench/RESULTS.md, "Training memory" (the templates' networks on a CPU).
register(Task(
    name="detection", config_block="ssd", params="pipelines.detection.params:DetectorParams",
    translate="pipelines.config.translate:translate", config_rules="pipelines.config.rewrite:detection_rules",
    check_engine="pipelines.detection.runs:check_engine",
    train="pipelines.detection.train:train", evaluator="pipelines.detection.evaluate:Evaluator",
    exporter="pipelines.detection.export:Exporter", predict="pipelines.detection.predict:Predictions",
    service="pipelines.serving.service:Detector", report="pipelines.report:detection_metrics_html", metric="AP",
    init_fields=("fine_tune_checkpoint", "fine_tune_checkpoint_type"), path_fields=("fine_tune_checkpoint",),
    train_memory=(1.2e9, 1600.0), predict_options=("score_threshold",),
    draft_options=("score_threshold", "max_detections")))
register(Task(
    name="segmentation", config_block="segmentation", params="pipelines.segmentation.params:SegmenterParams",
    translate="pipelines.config.segmentation:translate",
    config_rules="pipelines.config.rewrite:segmentation_rules", check_engine="pipelines.segmentation.runs:check_engine",
    train="pipelines.segmentation.train:train", evaluator="pipelines.segmentation.evaluate:Evaluator",
    exporter="pipelines.segmentation.export:Exporter", predict="pipelines.segmentation.predict:Predictions",
    service="pipelines.serving.service:Segmenter", report="pipelines.report:segmentation_metrics_html",
    metric="mean_iou",
    path_fields=("encoder_weights",), not_paths=("imagenet",), train_memory=(1.2e9, 3700.0),
    draft_options=("min_area",)))


def get(name: str) -> Task:
    """The task called `name`; ValueError naming the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    return TASKS[name]


def of_params(params) -> Task:
    """The task whose settings dataclass `params` is."""
    for task in TASKS.values():
        module, _, name = task.params.partition(":")
        if type(params).__module__ == module and type(params).__name__ == name:
            return task
    raise ValueError(f"{type(params).__name__}: the settings of no registered task")


def of_config_block(block: str) -> Task | None:
    return next((task for task in TASKS.values() if task.config_block == block), None)


def config_blocks() -> list[str]:
    return [task.config_block for task in TASKS.values()]


def of_export(folder: Path) -> Task:
    """The task of an export folder (or its saved_model/, or a file in it), from its metadata.json; exports without one
    predate it and are detection exports. UserError for a task this version does not know."""
    from pipelines.common import UserError, display_path
    from pipelines.model_store import read_metadata

    folder = Path(folder)
    metadata = read_metadata(folder.parent if folder.is_file() else folder)  # a .tflite file: its export folder
    name = "detection" if metadata is None else metadata.get("task", "detection")
    try:
        return get(name)
    except ValueError as e:
        raise UserError(display_path(folder), f"export of {e}") from None
