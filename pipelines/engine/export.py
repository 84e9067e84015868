"""`make export` for every task: a checkpoint as a SavedModel with the serving signature of
pipelines/model_store.py, checked against the checkpoint before it replaces the previous export, then
recorded in the BentoML model store.

RUN_DIR/export/ gets saved_model/, label_map.pbtxt, metadata.json (task, label map, sizes, signature,
checkpoint and step, the check's figures, and what the task adds), pipeline.config when the run has
one, and the task's own files; all at once or not at all. With device files (FORMAT=tflite|onnx|all,
pipelines/engine/formats.py) it also gets those .tflite/.onnx files and labels.txt, and every format written
is measured in the same run: size, latency per image on this machine, and the task's metric on the
val records by the task's evaluator (metadata.json "formats"; printed as a table). The task's exporter (its `exporter` in
pipelines/tasks.py) builds and saves the serving module, compares it with the checkpoint's model
(ExportCheckError on a mismatch) and says what its check found.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from pipelines import checkpoints
from pipelines.workspace import UserError, atomic_output_dir, display_path
from pipelines.data.label_map import read_label_map
from pipelines.model_store import INPUT_NAME, save_to_bentoml, tag_name, write_metadata


class ExportCheckError(RuntimeError):
    """The SavedModel does not reproduce the checkpoint model's outputs."""


@contextlib.contextmanager
def float32_policy():
    """A mixed_float16 training (GPU) still exports and evaluates a float32 model: the checkpoint's
    variables are float32 either way, and float16 compute would only lose precision on a CPU."""
    import tf_keras

    policy = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        tf_keras.mixed_precision.set_global_policy(policy)


def export(params, run_dir: str | Path, label_map_path: str | Path, name: str | None = None,
           checkpoint: str | None = None, device_files: tuple[str, ...] = (), log=print, task=None) -> Path:
    """Export the run's best (else latest; or the given) checkpoint to RUN_DIR/export/saved_model; returns
    it. The BentoML model is named `name` (default: RUN_DIR's folder name, as a valid tag).
    `device_files`: TFLite/ONNX files to write beside it (names of pipelines/engine/formats.py). `task`:
    the run's (runs.load_run gives it); without it, the task whose settings `params` are."""
    from pipelines import tasks
    from pipelines.engine import formats

    task = task or tasks.of_params(params)
    run_dir = Path(run_dir)
    checkpoint = str(checkpoint or checkpoints.default(run_dir))
    label_map = read_label_map(Path(label_map_path))
    if max(label_map) > params.num_classes:
        raise UserError(display_path(label_map_path),
                        f"ids up to {max(label_map)} but the model has {params.num_classes} classes")
    exporter = task.load("exporter")(params)
    calibration = (formats.calibration_images(params, exporter) if formats.QUANTIZATIONS["int8"] in device_files
                   else None)
    final = run_dir / "export"
    with float32_policy(), atomic_output_dir(final, log=log) as tmp:
        model = exporter.save(checkpoint, tmp / "saved_model", tmp)
        shutil.copyfile(label_map_path, tmp / "label_map.pbtxt")
        if (run_dir / "pipeline.config").is_file():
            shutil.copyfile(run_dir / "pipeline.config", tmp / "pipeline.config")
        check = exporter.check(tmp / "saved_model", checkpoint, model)
        log(f"export check: the SavedModel matches {checkpoint} on {check['images']} images "
            f"({exporter.describe_check(check)})")
        metadata = {
            "task": task.name,
            "label_map": {int(k): v for k, v in sorted(label_map.items())},
            "num_classes": params.num_classes,
            "input_size": [params.image_height, params.image_width],
            **exporter.metadata(run_dir, checkpoint, log),
            "signature": {"input": f"{INPUT_NAME}: uint8 [batch, height, width, 3]",
                          "outputs": list(exporter.outputs), **exporter.signature_notes()},
            "checkpoint": checkpoint,
            "step": checkpoints.step(checkpoint),
            "export_check": check,
        }
        if device_files:
            formats.write_labels(tmp / formats.LABELS_FILE, {0: "background", **label_map},
                                 exporter.tflite_first_label, params.num_classes)
            for file in device_files:
                log(f"converting to {formats.describe(file)} ({file}"
                    + (f", calibrated on {len(calibration)} training images)" if file.endswith("int8.tflite") else ")"))
                formats.write(file, exporter, model, tmp, calibration)
            metadata["formats"] = measure_formats(params, task, tmp, device_files, label_map, log)
            log(format_formats(metadata["formats"], task.metric))
        write_metadata(tmp, metadata)  # inside the temporary folder: it lands with the rest, or not at all
    tag = save_to_bentoml(final, tag_name(name or run_dir.resolve().name, exporter.default_name), metadata)
    log(f"exported {display_path(final / 'saved_model')}; BentoML model {tag}")
    return final / "saved_model"


# ------------------------------------------------------------------------------------------ formats


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def measure_formats(params, task, folder: Path, device_files, label_map: dict[int, str], log=print) -> dict:
    """Every format in `folder` measured in this run: bytes, median latency of one image of the model's
    input size (batch 1, this machine's threads), and the task's metric on the val records by its
    evaluator (the SavedModel's first, as the reference). The metric is left out (None) when the run's
    val TFRecords are not there."""
    import tensorflow as tf

    from pipelines.engine import formats
    from pipelines.engine.evaluate import score
    from pipelines.model_store import INPUT_NAME, check_images

    evaluator = task.load("evaluator")(params, label_map)
    exporter_class = task.load("exporter")
    example = exporter_class.device_input(check_images(params, 1)[0], (params.image_height, params.image_width))
    saved = tf.saved_model.load(str(folder / "saved_model")).signatures["serving_default"]

    def serve_saved(images):
        return {k: v.numpy() for k, v in saved(**{INPUT_NAME: tf.constant(images)}).items()}

    entries = [("saved_model", "SavedModel", serve_saved, _folder_bytes(folder / "saved_model"))]
    for file in device_files:
        path = folder / file
        entries.append((file, formats.describe(file), formats.serving_function(path, exporter_class),
                        path.stat().st_size))
    has_val = bool(params.eval_files) and _has_files(params.eval_files)
    if not has_val:
        log("no val TFRecords for this run: the formats' accuracy is not measured (make data for its dataset)")
    measured = {}
    for key, label, serve, size in entries:
        run = serve_saved if key == "saved_model" else serve.model.run
        entry = {"format": label, "bytes": size, "latency_ms": round(formats.latency_ms(run, example), 2),
                 "metric": task.metric, "value": None}
        if has_val:
            log(f"measuring {label} ({key}) on the val records")
            score(evaluator, serve, params.eval_files, log=lambda line: None)
            entry["value"] = evaluator.evaluate()["metrics"][task.metric]
        measured[key] = entry
    return measured


def _has_files(patterns) -> bool:
    import tensorflow as tf

    return any(tf.io.gfile.glob(pattern) for pattern in patterns)


def format_formats(formats: dict, metric: str) -> str:
    """The formats table make export prints: size, latency, metric and its difference from the SavedModel's."""
    reference = formats.get("saved_model", {}).get("value")
    lines = [f"  {'format':<16} {'file':<20} {'size':>9} {'ms/image':>9} {metric:>9} {'vs SavedModel':>14}"]
    for key, entry in formats.items():
        value = entry["value"]
        shown = "n/a" if value is None else f"{value:.4f}"
        delta = ("" if value is None or reference is None or key == "saved_model"
                 else f"{100 * (value - reference):+.2f} pt")
        lines.append(f"  {entry['format']:<16} {key:<20} {entry['bytes'] / 2**20:>7.1f}MB {entry['latency_ms']:>9.1f} "
                     f"{shown:>9} {delta:>14}")
    return "formats (latency: one image of the model's input size, batch 1, on this machine):\n" + "\n".join(lines)
