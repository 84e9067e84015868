"""`make prelabel`: a trained model drafts the labels of a dataset folder's images as one COCO file that
coco-annotator's COCO import (`POST /api/dataset/<id>/coco`, pipelines/annotator/client.py) accepts, so the
person corrects drafts instead of drawing every label.

What coco-annotator's importer (backend/workers/tasks/data.py, `import_annotations`) does with the file, and
what is written for it:
- a category is matched by name, case-insensitive, else created: categories carry the label map's names;
- an image is matched by its exact `file_name` among the dataset's images, the base name coco-annotator
  records when it scans the folder: two files of one base name in different subfolders cannot be told
  apart there (the importer refuses both), so neither is drafted and both are listed;
- an annotation without polygons (and keypoints) is skipped: a box is its 4-corner polygon with isbbox;
- `area` and `bbox` are stored as given; the area is whole pixels (an integer field there) and above 0
  (the image's annotation count only counts those);
- an annotation identical to one already there is not added again but undeleted: importing a file twice
  brings back drafts the person deleted. So by default only images without any annotation in the newest
  export are drafted, and a prelabel file newer than that export is pointed out.
Coordinates are those of each file's stored pixels (no EXIF rotation): the frame coco-annotator records an
image's width and height in, and the one `make data` reads its exports in.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.workspace import UserError, dataset_name, display_path, resolve_dataset, write_text_atomic
from pipelines.data.coco import read_json
from pipelines.data.sources import newest_export

# The extensions coco-annotator's folder scan takes as images (backend/config/config.py
# ALLOWED_FILE_TYPES), compared in lower case.
IMAGE_SUFFIXES = (".gif", ".png", ".bmp", ".jpg", ".jpeg", ".jpe", ".tif", ".tiff", ".webp")
PRELABEL_DIR = "prelabel"


@dataclass
class Prelabel:
    """What one `make prelabel` drafted: the file written and its counts."""

    path: Path | None  # None when nothing was drafted
    images: int = 0  # images the model ran on
    drafted_images: int = 0  # of them, those with at least one draft
    per_class: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (images, annotations)
    notes: list[str] = field(default_factory=list)  # what was skipped and why

    @property
    def annotations(self) -> int:
        return sum(n for _, n in self.per_class.values())


def dataset_images(folder: Path) -> list[Path]:
    """The image files below a dataset folder, as coco-annotator's scan finds them: hidden folders and
    files (.exports, ...) left out; sorted by relative path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def annotated_names(export: Path) -> set[str]:
    """Base names of the images that have at least one annotation in a COCO file (an export of
    coco-annotator lists only annotations that are not deleted)."""
    data = read_json(export)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(display_path(export), "not a COCO file: no 'images' list")
    annotated = {a.get("image_id") for a in data.get("annotations") or [] if isinstance(a, dict)}
    names = set()
    for image in data["images"]:
        if isinstance(image, dict) and image.get("id") in annotated:
            name = image.get("file_name") or image.get("path") or ""
            names.add(Path(str(name).replace("\\", "/")).name)
    return names


def _earlier_prelabels(run_folder: Path, name: str, after: float) -> list[Path]:
    """Prelabel files of this dataset (any run) written after time `after`."""
    return sorted(p for p in run_folder.parent.glob(f"*/{PRELABEL_DIR}/{name}-*.json") if p.stat().st_mtime > after)


def select_images(folder: Path, only_unlabelled: bool, annotations: Path | None,
                  drafting: bool = True) -> tuple[list[Path], list[str]]:
    """The dataset's images to draft, and notes on those left out (shared base names, already annotated;
    `drafting` False: no note on the annotated ones)."""
    images = dataset_images(folder)
    if not images:
        raise UserError(display_path(folder), f"no images here (looked for {', '.join(IMAGE_SUFFIXES)}, "
                                              "hidden folders left out)")
    notes = []
    by_name = Counter(p.name for p in images)
    shared = [p for p in images if by_name[p.name] > 1]
    if shared:
        notes.append(f"{len(shared)} image(s) share a base name with another one in a subfolder "
                     f"(coco-annotator's import cannot tell them apart): not drafted: "
                     f"{', '.join(p.relative_to(folder).as_posix() for p in shared[:5])}"
                     f"{' ...' if len(shared) > 5 else ''}")
        images = [p for p in images if by_name[p.name] == 1]
    export = annotations or newest_export(folder)
    if export is None:
        notes.append("no export of this dataset (.exports/coco-*.json): every image is drafted")
        return images, notes
    annotated = annotated_names(export)
    already = [p for p in images if p.name in annotated]
    if only_unlabelled:
        if already and drafting:
            notes.append(f"{len(already)} image(s) already have annotations in {display_path(export)}: "
                         "not drafted (ONLY_UNLABELLED=0, --only-unlabelled 0, drafts them too)")
        images = [p for p in images if p.name not in annotated]
    elif already and drafting:
        notes.append(f"{len(already)} image(s) already have annotations in {display_path(export)}: their drafts "
                     "are added beside them (and importing the file again brings back drafts deleted there)")
    return images, notes


def read_pixels(path: Path) -> np.ndarray:
    """An image file's stored pixels as RGB uint8 (EXIF orientation not applied: module docstring)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _usable(annotation: dict) -> bool:
    """What coco-annotator's import keeps and counts: a polygon, and an area of a pixel or more."""
    return bool(annotation["segmentation"]) and annotation["area"] >= 1


def open_export(run: str):
    """(run folder, its export folder, the export's task); UserError when the run has no export."""
    from pipelines import tasks
    from pipelines.runs import run_dir

    folder = run_dir(run)
    export_dir = folder / "export"
    if not (export_dir / "saved_model" / "saved_model.pb").is_file():
        raise UserError(display_path(export_dir), f"no export here: run `make export RUN={run}` first")
    return folder, export_dir, tasks.of_export(export_dir)


def open_dataset(dataset: str, annotations: str | None) -> tuple[Path, Path | None]:
    """(the dataset folder, the annotation file given instead of its newest export or None); UserError for a
    missing one."""
    source = resolve_dataset(dataset)
    if not source.is_dir():
        raise UserError(display_path(source), "a dataset folder is needed (the folder coco-annotator scans)")
    if annotations is not None and not Path(annotations).is_file():
        raise UserError(annotations, "annotation file not found")
    return source, Path(annotations) if annotations else None


def suggested_images(path: Path, source: Path) -> list[Path]:
    """The images a `make suggest` file lists, best first, as files of the dataset folder `source`;
    UserError when the file is not one, is of another dataset, or names a file that is not there."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "strategy" not in data:
        raise UserError(display_path(path), "not a make suggest file (workspace/RUN/suggest/*.json)")
    if data.get("dataset") != dataset_name(source):
        raise UserError(display_path(path), f"suggests images of dataset '{data.get('dataset')}', not of "
                                            f"'{dataset_name(source)}'")
    found = []
    for n, item in enumerate(data["images"]):
        relative = item.get("path") if isinstance(item, dict) else None
        image = (source / relative).resolve() if isinstance(relative, str) else None
        if image is None or not image.is_relative_to(source.resolve()) or not image.is_file():
            raise UserError(display_path(path), f"images[{n}]: {relative!r} is not an image of {display_path(source)}")
        found.append(source / relative)
    return found


def prelabel(run: str, dataset: str, only_unlabelled: bool = True, annotations: str | None = None,
             suggested: str | None = None, log=print, **options) -> Prelabel:
    """Draft the labels of DATASET's images with RUN's export; write workspace/RUN/prelabel/<dataset>-<time>.json.
    `suggested`: a `make suggest` file: only its images are drafted, in its order. `options`: the task's
    (detection: score_threshold, max_detections; segmentation: min_area)."""
    from tqdm import tqdm

    from pipelines.engine.predict import load_serving, predict_part
    from pipelines.model_store import export_identity

    folder, export_dir, task = open_export(run)
    given = {k: v for k, v in options.items() if v is not None}
    other = [k for k in given if k not in task.draft_options]
    if other:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in task.draft_options)
        raise UserError(display_path(export_dir), f"a {task.name} model: --{', --'.join(other).replace('_', '-')} does "
                                                  f"not apply to it (its options: {flags})")
    task, saved_model, part = predict_part(export_dir, **given)
    source, annotations_file = open_dataset(dataset, annotations)
    if suggested is not None and not Path(suggested).is_file():
        raise UserError(suggested, "suggest file not found (make suggest writes workspace/RUN/suggest/*.json)")
    name = dataset_name(source)
    images, notes = select_images(source, only_unlabelled, annotations_file, drafting=suggested is None)
    if suggested is not None:
        listed = suggested_images(Path(suggested), source)
        eligible = set(images)
        left = [p for p in listed if p not in eligible]
        if left:
            notes.append(f"{len(left)} suggested image(s) not drafted (labelled since, or sharing a base name): "
                         f"{', '.join(p.relative_to(source).as_posix() for p in left[:5])}{' ...' if len(left) > 5 else ''}")
        images = [p for p in listed if p in eligible]
        notes.append(f"drafting the {len(images)} image(s) suggested in {display_path(Path(suggested))}")
    export = annotations_file or newest_export(source)
    later = _earlier_prelabels(folder, name, export.stat().st_mtime if export else 0.0)
    if later:
        notes.append(f"{display_path(later[-1])} is newer than the dataset's newest export: if it was imported, "
                     "export the dataset in coco-annotator first, or its images are drafted twice")
    result = Prelabel(path=None, notes=notes)
    if not images:
        return result
    model = ":".join(export_identity(export_dir))
    labels = part.labels
    log(f"drafting {len(images)} image(s) of {display_path(source)} with {task.name} model {model}")
    serve = load_serving(saved_model, task, part)
    coco_images, coco_annotations, unreadable, dropped = [], [], [], 0
    for path in tqdm(images, desc="prelabel", unit="image", mininterval=2.0):
        try:
            pixels = read_pixels(path)
        except Exception as e:  # noqa: BLE001  (any decoder error: the file is listed, the others go on)
            unreadable.append(f"{path.relative_to(source).as_posix()} ({type(e).__name__})")
            continue
        height, width = pixels.shape[:2]
        image_id = len(coco_images) + 1
        coco_images.append({"id": image_id, "file_name": path.name, "path": path.relative_to(source).as_posix(),
                            "width": int(width), "height": int(height)})
        drafts = part.drafts(pixels, part.run(serve, pixels), model)
        kept = [d for d in drafts if _usable(d)]
        dropped += len(drafts) - len(kept)
        for draft in kept:
            coco_annotations.append({"id": len(coco_annotations) + 1, "image_id": image_id, **draft})
    if unreadable:
        notes.append(f"{len(unreadable)} file(s) not readable as images: not drafted: {', '.join(unreadable[:5])}"
                     f"{' ...' if len(unreadable) > 5 else ''}")
    if dropped:
        notes.append(f"{dropped} draft(s) smaller than a pixel left out")
    result.images = len(coco_images)
    result.drafted_images = len({a["image_id"] for a in coco_annotations})
    if not coco_annotations:
        return result
    used = sorted({a["category_id"] for a in coco_annotations})
    drafted = {a["image_id"] for a in coco_annotations}
    coco = {"info": {"description": f"drafts of {model} ({task.name}) for {name}: review them in coco-annotator",
                     "date_created": time.strftime("%Y-%m-%dT%H:%M:%S")},
            # Only images with drafts: the importer marks every image it matches as annotated.
            "images": [im for im in coco_images if im["id"] in drafted],
            "categories": [{"id": c, "name": labels.get(c, str(c)), "supercategory": ""} for c in used],
            "annotations": coco_annotations}
    target = folder / PRELABEL_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_text_atomic(target, json.dumps(coco) + "\n")
    per_image = Counter((a["category_id"], a["image_id"]) for a in coco_annotations)
    for c in used:
        counts = [n for (cid, _), n in per_image.items() if cid == c]
        result.per_class[labels.get(c, str(c))] = (len(counts), sum(counts))
    result.path = target
    return result


def summary_lines(result: Prelabel) -> list[str]:
    """What `make prelabel` prints: the notes, then per class how many images and drafts."""
    lines = [f"note: {n}" for n in result.notes]
    if not result.images:
        return [*lines, "no image left to draft: nothing written"]
    if result.path is None:
        return [*lines, f"the model found nothing to draft on {result.images} image(s): nothing written"]
    lines.append(f"drafted {result.annotations} annotation(s) on {result.drafted_images} of {result.images} image(s)"
                 + (f" ({result.images - result.drafted_images} with nothing found)"
                    if result.drafted_images < result.images else ""))
    if result.per_class:
        width = max(len(n) for n in result.per_class)
        lines.append(f"  {'class':<{width}}  images  annotations")
        lines += [f"  {n:<{width}}  {i:>6}  {a:>11}" for n, (i, a) in result.per_class.items()]
    lines.append(f"wrote {display_path(result.path)}")
    return lines
