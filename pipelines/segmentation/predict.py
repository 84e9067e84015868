"""`python -m pipelines predict` for a segmentation export: class masks of image files.

Each image (EXIF orientation applied, as a person sees it) gets a class-mask PNG in palette mode
(pixel value = class id: 0 background, 1..K the label map's ids; colours as in the data stage's
preview) and an overlay PNG of the image with its classes tinted and outlined. Returns, per image,
the pixels and share of each class found. `export_task` tells a segmentation export from a
detection one by its metadata.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.common import UserError, display_path
from pipelines.data.label_map import read_label_map
from pipelines.data.report import _edges, class_color
from pipelines.detection.predict import find_export, load_image
from pipelines.model_store import TASKS, read_metadata

BACKGROUND = "background"
IGNORE_COLOR = (128, 128, 128)  # as the data stage's preview draws ignored (crowd) regions


def export_task(model_dir: Path) -> str:
    """"detection" or "segmentation": the task in the export's metadata.json (for an export folder or
    its saved_model folder). Exports without metadata.json predate it and are detection exports."""
    metadata = read_metadata(Path(model_dir))
    task = "detection" if metadata is None else metadata.get("task", "detection")
    if task not in TASKS:
        raise UserError(display_path(model_dir), f"export of unknown task '{task}' (known: {', '.join(TASKS)})")
    return task


def mask_palette() -> list[int]:
    """The PNG palette: index 0 (background) black, index i the data stage's colour of class i."""
    colors = [(0, 0, 0)] + [class_color(i) for i in range(1, 256)]
    return [channel for color in colors for channel in color]


def mask_image(mask: np.ndarray) -> Image.Image:
    """A class-id mask as a palette PNG whose pixel values are the class ids (16-bit grayscale in the
    unlikely case of more than 255 classes, which a palette cannot index)."""
    if mask.max(initial=0) > 255:
        return Image.fromarray(mask.astype(np.uint16))
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(mask_palette())
    return image


def overlay(image: np.ndarray, mask: np.ndarray, ignore_label: int | None = None, alpha: float = 0.5) -> np.ndarray:
    """The image with each class's pixels tinted in its colour and its outlines drawn solid;
    background (0) is left as it is, `ignore_label` pixels are tinted grey."""
    out = image.astype(np.float32)
    edges = _edges(mask)
    for value in np.unique(mask):
        if value == 0:
            continue
        color = np.float32(IGNORE_COLOR if value == ignore_label else class_color(int(value)))
        region = mask == value
        out[region] = out[region] * (1 - alpha) + color * alpha
        out[region & edges] = color
    return out.astype(np.uint8)


def class_pixels(mask: np.ndarray, labels: dict[int, str]) -> list[dict]:
    """The classes present in a mask, by id: label, pixels, share of the image."""
    ids, counts = np.unique(mask, return_counts=True)
    return [{"label": BACKGROUND if i == 0 else labels.get(int(i), str(int(i))), "class_id": int(i),
             "pixels": int(n), "fraction": round(float(n) / mask.size, 6)} for i, n in zip(ids, counts)]


def predict(model_dir: Path, images: list[Path], out_dir: Path | None = None, log=print) -> list[dict]:
    """Segment image files with an export (or its saved_model folder). Writes NAME_mask.png and
    NAME_overlay.png per image into `out_dir` (default: RUN_DIR/predictions) and returns, per image,
    {"image", "width", "height", "classes": [{"label", "class_id", "pixels", "fraction"}], "mask", "overlay"}."""
    import tensorflow as tf

    from pipelines.segmentation.export import INPUT_NAME, MASK_KEY

    saved_model, label_map = find_export(Path(model_dir))
    labels = read_label_map(label_map)
    arrays = [load_image(Path(p)) for p in images]  # every file checked before the model loads
    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    if MASK_KEY not in serve.structured_outputs:
        raise UserError(display_path(model_dir), f"not a segmentation export: its signature has no {MASK_KEY} output")
    out_dir = Path(out_dir) if out_dir else saved_model.parent.parent / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path, array in zip(images, arrays):
        mask = serve(**{INPUT_NAME: tf.constant(array[None])})[MASK_KEY].numpy()[0]
        h, w = array.shape[:2]
        mask_path, overlay_path = out_dir / f"{Path(path).stem}_mask.png", out_dir / f"{Path(path).stem}_overlay.png"
        mask_image(mask).save(mask_path)
        Image.fromarray(overlay(array, mask)).save(overlay_path)
        results.append({"image": str(path), "width": w, "height": h, "classes": class_pixels(mask, labels),
                        "mask": str(mask_path), "overlay": str(overlay_path)})
    log(f"wrote {len(results)} class mask(s) and overlay(s) to {display_path(out_dir)}/")
    return results
