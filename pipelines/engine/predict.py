"""`python -m pipelines predict`, for every task: an export run on image files, JSON out and pictures
written. The export's metadata.json names its task (pipelines/tasks.py); the task's `predict` part
turns the serving signature's outputs on one image into its JSON and pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipelines.workspace import UserError, display_path
from pipelines.data.label_map import read_label_map


def find_export(model: Path) -> tuple[Path, Path]:
    """(saved_model folder or device file, label map) for an export folder, a saved_model folder or a
    .tflite/.onnx file of an export."""
    model = Path(model)
    if model.suffix in (".tflite", ".onnx"):
        if not model.is_file():
            raise UserError(display_path(model), "no such file: make export RUN=... FORMAT=tflite|onnx writes it")
        if not (model.parent / "label_map.pbtxt").is_file():
            raise UserError(display_path(model), "no label_map.pbtxt beside it (a .tflite file of make export's folder)")
        return model, model.parent / "label_map.pbtxt"
    saved_model = model / "saved_model" if (model / "saved_model").is_dir() else model
    if not (saved_model / "saved_model.pb").is_file():
        raise UserError(display_path(model), "no SavedModel here: give workspace/RUN/export (run `make export` first)")
    for folder in (saved_model.parent, saved_model):
        if (folder / "label_map.pbtxt").is_file():
            return saved_model, folder / "label_map.pbtxt"
    raise UserError(display_path(model), "no label_map.pbtxt beside the SavedModel")


def load_image(path: Path) -> np.ndarray:
    """An image file as a person sees it (EXIF orientation applied), RGB uint8; UserError naming it."""
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except FileNotFoundError:
        raise UserError(display_path(path), "no such file") from None
    except Exception as e:
        raise UserError(display_path(path), f"not a readable image ({type(e).__name__}: {e})") from None


def predict_part(model: Path, **options):
    """(the export's task, its saved_model folder or device file, the task's predict part built with
    `options`); UserError for a missing export or a bad option, before TensorFlow loads anything."""
    from pipelines import tasks
    from pipelines.model_store import read_metadata

    task = tasks.of_export(Path(model))
    saved_model, label_map = find_export(Path(model))
    metadata = read_metadata(saved_model.parent if saved_model.is_file() else saved_model) or {}
    return task, saved_model, task.load("predict")(read_label_map(label_map), metadata, **options)


def load_serving(model: Path, task, part):
    """serve(uint8 batch [1, H, W, 3]) -> {output: array} of a SavedModel or a .tflite/.onnx file of an
    export; UserError when its outputs are not those the task's predict part reads."""
    import tensorflow as tf

    from pipelines.model_store import INPUT_NAME

    if model.suffix in (".tflite", ".onnx"):
        from pipelines.engine.formats import serving_function

        serve = serving_function(model, task.load("exporter"))
        produced = list(task.load("exporter").outputs)
    else:
        signature = tf.saved_model.load(str(model)).signatures["serving_default"]
        produced = list(signature.structured_outputs)

        def serve(batch):
            return {k: v.numpy() for k, v in signature(**{INPUT_NAME: tf.constant(batch)}).items()}
    missing = [key for key in part.outputs if key not in produced]
    if missing:
        raise UserError(display_path(model), f"not a {task.name} export: its signature has no {', '.join(missing)} "
                                             "output")
    return serve


def predict(model: Path, images: list[Path], out_dir: Path | None = None, log=print, **options) -> list[dict]:
    """Run an export (folder or its saved_model/) on image files. Pictures go to `out_dir` (default:
    RUN_DIR/predictions). Returns, per image, {"image", "width", "height"} and what the task's part adds.
    `options`: the task's own (detection: score_threshold)."""
    task, saved_model, part = predict_part(model, **options)
    arrays = [load_image(Path(p)) for p in images]  # every file checked before the model loads
    serve = load_serving(saved_model, task, part)
    out_dir = Path(out_dir) if out_dir else saved_model.parent.parent / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path, array in zip(images, arrays):
        outputs = part.run(serve, array)
        h, w = array.shape[:2]
        results.append({"image": str(path), "width": w, "height": h,
                        **part(array, outputs, out_dir / Path(path).stem)})
    log(f"wrote {len(results)} {part.pictures} to {display_path(out_dir)}/")
    return results


def print_json(results: list[dict]) -> None:
    print(json.dumps(results, indent=2))
