"""The bundled sample: a deterministic generator of a coco-annotator dataset folder.

Shapes of four classes (circle, square, triangle, star), each in a random colour, size and
rotation, on varied backgrounds (gradients, stripes, checks, noise), with their exact polygons.
Some images have no objects. The folder is laid out as coco-annotator lays out a dataset: images
in subfolders, `.exports/coco-<unix time>.json` exports (an older one and the newest), and the
export carries the tool's quirks so that every run of the pipeline exercises them:

- database ids (non-contiguous, unsorted), absolute `path`s, base-name `file_name`s, boolean
  `iscrowd`, extra fields (`isbbox`, `color`, `metadata`, `events`, ...);
- bbox-only annotations (`isbbox: true`, a 4-corner polygon), polygons running outside the
  image, a few stale `bbox`es, keypoint-only annotations, stray 2-point polygons;
- a WebP file named `.jpeg`, a PNG, a grayscale JPEG, and a JPEG stored rotated with an EXIF
  orientation tag (annotated as displayed).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from pipelines.workspace import atomic_output_dir
from pipelines.data.geometry import box_iou

CATEGORIES = [(19, "triangle", "#e6194b"), (7, "circle", "#3cb44b"), (23, "star", "#4363d8"), (12, "square", "#f58231")]
SIZES = [(320, 240), (384, 288), (400, 300), (352, 352), (448, 336), (300, 400)]
OLD_EXPORT_TIME = "999999999.5"  # sorts after the newest by name: only a numeric comparison gets it right
NEW_EXPORT_TIME = "1700000000.25"


def _shape(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "circle":
        n, radii = 28, [r]
    elif kind == "square":
        n, radii = 4, [r]
    elif kind == "triangle":
        n, radii = 3, [r * 1.1]
    else:  # star
        n, radii = 10, [r * 1.1, r * 0.45]
    points = []
    for i in range(n):
        a = angle + 2 * math.pi * i / n
        rad = radii[i % len(radii)]
        points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return points


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    c1, c2 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # linear gradient
        t = (xx * math.cos(rng.uniform(0, math.pi)) + yy * math.sin(rng.uniform(0, math.pi)))
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    elif kind == 1:  # stripes
        period = rng.uniform(12, 48)
        t = (np.sin((xx + yy * rng.uniform(-1, 1)) * 2 * math.pi / period) > 0).astype(np.float32) * 0.35
    elif kind == 2:  # checks
        cell = int(rng.integers(16, 48))
        t = (((xx // cell) + (yy // cell)) % 2) * 0.3
    else:  # smooth blobs
        t = (np.sin(xx / rng.uniform(20, 60)) * np.cos(yy / rng.uniform(20, 60)) + 1) / 2
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    img += rng.normal(0, rng.uniform(2, 12), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _object_color(rng: np.random.Generator, background_mean: np.ndarray) -> tuple[int, int, int]:
    for _ in range(50):
        color = rng.uniform(0, 255, 3)
        if np.abs(color - background_mean).sum() > 180:
            break
    return tuple(int(v) for v in color)


def _draw_image(rng: np.random.Generator, w: int, h: int, empty: bool):
    pixels = _background(rng, w, h)
    mean = pixels.reshape(-1, 3).mean(axis=0)
    objects = []
    if not empty:
        for _ in range(int(rng.integers(1, 5))):
            kind_index = int(rng.integers(len(CATEGORIES)))
            r = float(rng.uniform(18, min(w, h) * 0.22))
            outside = rng.random() < 0.08  # let it run over the border
            margin = -r * 0.5 if outside else r * 1.1
            cx = float(rng.uniform(margin, w - margin))
            cy = float(rng.uniform(margin, h - margin))
            boxes = [o["extent"] for o in objects]
            extent = (cx - r, cy - r, cx + r, cy + r)
            if any(box_iou(extent, b) > 0.25 for b in boxes):
                continue
            points = _shape(CATEGORIES[kind_index][1], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
            objects.append({"kind": kind_index, "points": points, "extent": extent, "r": r,
                            "color": _object_color(rng, mean)})
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for obj in sorted(objects, key=lambda o: -o["r"]):  # larger first: smaller ones lie on top
        draw.polygon(obj["points"], fill=obj["color"])
    return image, objects


def _annotation(rng, ann_id, image_id, category_id, color, polygon, w, h, isbbox=False):
    flat = [round(v, 2) for p in polygon for v in p]
    rle = mask_utils.merge(mask_utils.frPyObjects([flat], h, w))
    xs, ys = flat[0::2], flat[1::2]
    return {
        "id": ann_id, "image_id": image_id, "category_id": category_id, "dataset_id": 3,
        "segmentation": [flat], "area": int(mask_utils.area(rle)),
        "bbox": [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
        "iscrowd": False, "isbbox": isbbox, "color": color, "metadata": {}, "creator": "annotator",
        "width": w, "height": h, "keypoints": [], "events": [], "milliseconds": int(rng.integers(2000, 60000)),
    }


def generate(out: Path, num_images: int = 300, seed: int = 0) -> Path:
    """Write the sample dataset to `out` (replacing it); returns the newest export's path."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    name = out.name
    with atomic_output_dir(out) as tmp:
        images, annotations = [], []
        image_id, ann_id = 1000, 50000
        special = {1: "webp", 2: "png", 3: "gray", 4: "exif", 5: "png"}
        for n in range(num_images):
            image_id += int(rng.integers(1, 4))
            w, h = SIZES[int(rng.integers(len(SIZES)))]
            empty = n % 17 == 9
            kind = special.get(n, "jpeg")
            if kind == "exif":
                w, h = 300, 400  # portrait as displayed; stored landscape with orientation 6
            image, objects = _draw_image(rng, w, h, empty)
            folder = f"batch_{n % 3 + 1}"
            stem = f"img_{n:04d}"
            filename = f"{stem}.png" if kind == "png" else f"{stem}.jpeg" if kind == "webp" else f"{stem}.jpg"
            (tmp / folder).mkdir(exist_ok=True)
            target = tmp / folder / filename
            if kind == "webp":
                image.save(target, format="WEBP", quality=90)
            elif kind == "png":
                image.save(target, format="PNG")
            elif kind == "gray":
                image.convert("L").save(target, format="JPEG", quality=92)
            elif kind == "exif":
                exif = Image.Exif()
                exif[0x0112] = 6  # viewers rotate 90 degrees clockwise to display
                image.transpose(Image.Transpose.ROTATE_90).save(target, format="JPEG", quality=92, exif=exif)
            else:
                image.save(target, format="JPEG", quality=92)
            images.append({
                "id": image_id, "dataset_id": 3, "category_ids": [], "path": f"/datasets/{name}/{folder}/{filename}",
                "width": w, "height": h, "file_name": filename, "annotated": bool(objects), "annotating": [],
                "num_annotations": len(objects), "metadata": {}, "deleted": False, "milliseconds": 0, "events": [],
                "regenerate_thumbnail": False,
            })
            for k, obj in enumerate(objects):
                ann_id += int(rng.integers(1, 6))
                cid, _, color = CATEGORIES[obj["kind"]]
                polygon = obj["points"]
                isbbox = rng.random() < 0.03
                if isbbox:  # a box drawn with the bbox tool: 4 corners
                    x0, y0 = min(p[0] for p in polygon), min(p[1] for p in polygon)
                    x1, y1 = max(p[0] for p in polygon), max(p[1] for p in polygon)
                    polygon = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
                ann = _annotation(rng, ann_id, image_id, cid, color, polygon, w, h, isbbox)
                if rng.random() < 0.03:  # the polygon was edited after the bbox was stored
                    ann["bbox"] = [round(v + float(rng.uniform(3, 9)), 2) for v in ann["bbox"]]
                if n in (7, 40) and k == 0:  # a stray click left a 2-point polygon
                    ann["segmentation"].append([10.0, 10.0, 12.0, 14.0])
                annotations.append(ann)
                images[-1]["category_ids"] = sorted({*images[-1]["category_ids"], cid})
            if n in (11, 23) and objects:  # a keypoint-only annotation
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": CATEGORIES[0][0],
                                    "dataset_id": 3, "segmentation": [], "area": 0, "bbox": [0, 0, 0, 0],
                                    "iscrowd": False, "isbbox": False, "color": CATEGORIES[0][2],
                                    "keypoints": [float(w // 2), float(h // 2), 2], "metadata": {}, "events": []})
        order = rng.permutation(len(annotations))
        annotations = [annotations[i] for i in order]
        categories = [{"id": cid, "name": cname, "supercategory": "shape", "color": color, "metadata": {},
                       "creator": "annotator", "keypoint_colors": []} for cid, cname, color in CATEGORIES]
        exports = tmp / ".exports"
        exports.mkdir()
        half = {im["id"] for im in images[: max(1, num_images // 2)]}
        old = {"images": [im for im in images if im["id"] in half], "categories": categories[:2],
               "annotations": [a for a in annotations if a["image_id"] in half and a["category_id"] in
                               {c["id"] for c in categories[:2]}]}
        (exports / f"coco-{OLD_EXPORT_TIME}.json").write_text(json.dumps(old))
        newest = exports / f"coco-{NEW_EXPORT_TIME}.json"
        newest.write_text(json.dumps({"images": images, "categories": categories, "annotations": annotations}))
    return out / ".exports" / newest.name


def ensure_sample(out: Path, num_images: int = 300) -> bool:
    """Generate the sample at `out` unless it is already there; True when it was generated."""
    if (Path(out) / ".exports").is_dir():
        return False
    if Path(out).exists():
        shutil.rmtree(out)
    generate(out, num_images)
    return True
