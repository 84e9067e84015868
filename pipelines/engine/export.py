"""`make export` for every task: a checkpoint as a SavedModel with the serving signature of
pipelines/model_store.py, checked against the checkpoint before it replaces the previous export, then
recorded in the BentoML model store.

RUN_DIR/export/ gets saved_model/, label_map.pbtxt, metadata.json (task, label map, sizes, signature,
checkpoint and step, the check's figures, and what the task adds), pipeline.config when the run has
one, and the task's own files; all at once or not at all. The task's exporter (its `exporter` in
pipelines/tasks.py) builds and saves the serving module, compares it with the checkpoint's model
(ExportCheckError on a mismatch) and says what its check found.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from pipelines import checkpoints
from pipelines.common import UserError, atomic_output_dir, display_path
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
           checkpoint: str | None = None, log=print) -> Path:
    """Export the run's best (else latest; or the given) checkpoint to RUN_DIR/export/saved_model; returns
    it. The BentoML model is named `name` (default: RUN_DIR's folder name, as a valid tag)."""
    from pipelines import tasks

    task = tasks.of_params(params)
    run_dir = Path(run_dir)
    checkpoint = str(checkpoint or checkpoints.default(run_dir))
    label_map = read_label_map(Path(label_map_path))
    if max(label_map) > params.num_classes:
        raise UserError(display_path(label_map_path),
                        f"ids up to {max(label_map)} but the model has {params.num_classes} classes")
    exporter = task.load("exporter")(params)
    final = run_dir / "export"
    with float32_policy(), atomic_output_dir(final) as tmp:
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
        write_metadata(tmp, metadata)  # inside the temporary folder: it lands with the rest, or not at all
    tag = save_to_bentoml(final, tag_name(name or run_dir.resolve().name, exporter.default_name), metadata)
    log(f"exported {display_path(final / 'saved_model')}; BentoML model {tag}")
    return final / "saved_model"
