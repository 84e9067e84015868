"""`make eval` for every task: one loop over the validation records, through the export's own
computation built from the checkpoint (so what is measured is what will be served), into the task's
evaluator.

A task's evaluator (its `evaluator` in pipelines/tasks.py) follows Detectron2's evaluators: `reset`,
`process` (one record and the model's outputs on its image), `evaluate` (the metrics); and it knows
its serving function, how to print its metrics and which pictures to draw. Writes RUN_DIR/eval/
(metrics.json with the task, checkpoint, step and image count, then the task's metrics; the task's
pictures) all at once or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from pipelines import checkpoints, examples
from pipelines.workspace import UserError, atomic_output_dir, display_path
from pipelines.data.label_map import read_label_map


def same_size_batches(records: Iterator[examples.Example], size: int) -> Iterator[list[examples.Example]]:
    """Consecutive records of one image size, up to `size` at a time (images keep their resolution)."""
    batch: list[examples.Example] = []
    for record in records:
        if batch and (len(batch) == size or batch[0].image.shape != record.image.shape):
            yield batch
            batch = []
        batch.append(record)
    if batch:
        yield batch


def score(evaluator, serve, files: list[str], log=print, keep: int = 0) -> tuple[int, list]:
    """Run `serve` over the records of `files` into `evaluator` (reset first); returns (images, the first
    `keep` (record, outputs) pairs)."""
    evaluator.reset()
    images, samples = 0, []
    records = examples.read(files, class_masks=evaluator.needs_class_masks)
    for batch in same_size_batches(records, evaluator.batch_size):
        outputs = serve(np.stack([record.image for record in batch]))
        for j, record in enumerate(batch):
            output = {key: value[j] for key, value in outputs.items()}
            evaluator.process(record, output)
            if len(samples) < keep:
                samples.append((record, output))
        images += len(batch)
        if images // 100 > (images - len(batch)) // 100:
            log(f"  {images} images")
    if not images:
        raise FileNotFoundError(f"no validation examples in {', '.join(files)}")
    return images, samples


def evaluate(params, run_dir: str | Path, checkpoint: str | None = None, model: str | Path | None = None,
             log=print, task=None) -> dict:
    """Evaluate the run's best (else latest) or the given checkpoint on params.eval_files; writes
    RUN_DIR/eval/ and returns what metrics.json holds. With `model` (a .tflite or .onnx file of the run's
    export), that file is measured instead, into RUN_DIR/eval-<its file name>/ (eval-model_int8.tflite/).
    `task`: the run's (runs.load_run gives it); without it, the task whose settings `params` are."""
    from pipelines import tasks

    task = task or tasks.of_params(params)
    run_dir = Path(run_dir)
    if not params.label_map_path:
        raise UserError(None, "the run has no label map (eval_input_reader.label_map_path)")
    evaluator = task.load("evaluator")(params, read_label_map(Path(params.label_map_path)))
    if model is not None:
        serve, checkpoint, step, described, out_dir = _device_file(task, Path(model), run_dir)
    else:
        checkpoint = str(checkpoint or checkpoints.default(run_dir))
        serve, step, described = evaluator.serving_function(checkpoint), checkpoints.step(checkpoint), checkpoint
        out_dir = run_dir / "eval"

    log(f"evaluating {described} on {', '.join(display_path(f) for f in params.eval_files)}")
    images, samples = score(evaluator, serve, params.eval_files, log, keep=evaluator.draw_images)
    metrics = {"task": task.name, "checkpoint": checkpoint, "step": step,
               "images": images, **({"model": display_path(model)} if model is not None else {}),
               **evaluator.evaluate()}
    with atomic_output_dir(out_dir, log=log) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        pictures = evaluator.draw(tmp, samples)
    log(evaluator.format(metrics))
    log(f"wrote {display_path(out_dir)}/: metrics.json, {', '.join(pictures)}")
    return metrics


def _device_file(task, model: Path, run_dir: Path):
    """(serving function, the checkpoint it was converted from and its step, what is measured, output
    folder) of a .tflite or .onnx file of `make export FORMAT=...`."""
    from pipelines.engine import formats
    from pipelines.model_store import read_metadata

    if model.suffix not in (".tflite", ".onnx"):
        raise UserError(display_path(model), "--model takes a .tflite or .onnx file of `make export FORMAT=...` (the "
                                             "SavedModel is what `make eval` measures without it)")
    metadata = read_metadata(model.parent) or {}
    if metadata.get("task", task.name) != task.name:
        raise UserError(display_path(model), f"a {metadata['task']} export, and the run is a {task.name} run")
    serve = formats.serving_function(model, task.load("exporter"))
    described = f"{display_path(model)} ({formats.describe(model.name)}, from {metadata.get('checkpoint', '?')})"
    return serve, metadata.get("checkpoint"), metadata.get("step"), described, run_dir / f"eval-{model.name}"
