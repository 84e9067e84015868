"""`python -m pipelines predict`: run an exported detector on image files.

Prints one JSON object per image (label, class id, score, box in the image's pixels) and writes
each image with its boxes drawn. Images are read as a person sees them (EXIF orientation applied).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from pipelines.common import UserError, display_path
from pipelines.data.label_map import read_label_map
from pipelines.data.report import class_color


def find_export(model: Path) -> tuple[Path, Path]:
    """(saved_model folder, label map) for an export folder or a saved_model folder."""
    model = Path(model)
    saved_model = model / "saved_model" if (model / "saved_model").is_dir() else model
    if not (saved_model / "saved_model.pb").is_file():
        raise UserError(display_path(model), "no SavedModel here: give workspace/RUN/export (run `make export` first)")
    for folder in (saved_model.parent, saved_model):
        if (folder / "label_map.pbtxt").is_file():
            return saved_model, folder / "label_map.pbtxt"
    raise UserError(display_path(model), "no label_map.pbtxt beside the SavedModel")


def load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except FileNotFoundError:
        raise UserError(display_path(path), "no such file") from None
    except Exception as e:
        raise UserError(display_path(path), f"not a readable image ({type(e).__name__}: {e})") from None


def detections_of(outputs: dict, width: int, height: int, labels: dict[int, str], score_threshold: float) -> list[dict]:
    n = int(outputs["num_detections"][0])
    found = []
    for (ymin, xmin, ymax, xmax), score, cls in zip(outputs["detection_boxes"][0][:n],
                                                    outputs["detection_scores"][0][:n],
                                                    outputs["detection_classes"][0][:n]):
        if score < score_threshold:
            continue
        class_id = int(cls)
        found.append({"label": labels.get(class_id, str(class_id)), "class_id": class_id, "score": round(float(score), 4),
                      "box": {"xmin": round(float(xmin) * width, 1), "ymin": round(float(ymin) * height, 1),
                              "xmax": round(float(xmax) * width, 1), "ymax": round(float(ymax) * height, 1)}})
    return found


def draw(image: np.ndarray, detections: list[dict]) -> Image.Image:
    out = Image.fromarray(image)
    pen = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 250))
    for d in detections:
        b = d["box"]
        color = class_color(d["class_id"])
        pen.rectangle([b["xmin"], b["ymin"], b["xmax"], b["ymax"]], outline=color, width=width)
        text = f"{d['label']} {d['score']:.2f}"
        box = pen.textbbox((b["xmin"], max(0, b["ymin"] - 14)), text)
        pen.rectangle(box, fill=color)
        pen.text((b["xmin"], max(0, b["ymin"] - 14)), text, fill=(0, 0, 0))
    return out


def predict(model: Path, images: list[Path], out_dir: Path | None = None, score_threshold: float = 0.5,
            log=print) -> list[dict]:
    import tensorflow as tf

    saved_model, label_map = find_export(model)
    labels = read_label_map(label_map)
    arrays = [load_image(Path(p)) for p in images]  # every file checked before the model loads
    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    out_dir = Path(out_dir) if out_dir else saved_model.parent.parent / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path, array in zip(images, arrays):
        outputs = {k: v.numpy() for k, v in serve(input_tensor=tf.constant(array[None])).items()}
        h, w = array.shape[:2]
        found = detections_of(outputs, w, h, labels, score_threshold)
        drawn = out_dir / f"{Path(path).stem}.png"
        draw(array, found).save(drawn)
        results.append({"image": str(path), "width": w, "height": h, "detections": found, "drawn": str(drawn)})
    log(f"wrote {len(results)} image(s) with boxes to {display_path(out_dir)}/")
    return results


def print_json(results: list[dict]) -> None:
    print(json.dumps(results, indent=2))
