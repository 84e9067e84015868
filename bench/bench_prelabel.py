"""How much drawing `make prelabel`'s drafts save, against the dataset's own labels, in one run.

    .venv/bin/python bench/bench_prelabel.py [--run demo-detector --run demo-segmenter] [--dataset sample]
                                             [--min-area 16 --min-area 200]

For each run (`make demo` leaves demo-detector and demo-segmenter, trained on the bundled sample), the
model drafts every image of the dataset through `make prelabel`'s own code (pipelines/annotator/prelabel.py,
all images, the export's default score threshold). On the run's validation images (the data stage's split:
images the model did not train on) each draft is matched to the dataset's labels of its image: same class,
IoU >= 0.5 (boxes for a detector, masks for a segmenter, pycocotools' IoU), best match first, each label at
most once. Printed per run: drafts, labels, precision, recall, mean IoU of the matches, and the person's
work: deleting the wrong drafts and drawing the missed objects, against drawing every object from scratch
(the peer), as a ratio; and the drafting speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def labels_by_image(export: Path) -> tuple[dict, dict]:
    """{file_name: [(class name, polygons)]} of the export's labels with a usable polygon, and {file_name: (h, w)}."""
    coco = json.loads(export.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    found, sizes = {}, {}
    for im in coco["images"]:
        sizes[im["file_name"]] = (im["height"], im["width"])
    for a in coco["annotations"]:
        polygons = [p for p in a.get("segmentation") or [] if isinstance(p, list) and len(p) >= 6]
        if polygons and a["category_id"] in names:
            found.setdefault(images[a["image_id"]]["file_name"], []).append((names[a["category_id"]], polygons))
    return found, sizes


def match(drafts: list[tuple[str, list, float]], labels: list[tuple[str, list]], size: tuple[int, int],
          boxes: bool) -> list[float]:
    """IoUs of the matched drafts (greedy: drafts in the given order, each to its best free label of its class)."""
    from pycocotools import mask as mask_utils

    height, width = size

    def region(polygons):
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        return [list(mask_utils.toBbox(rle))] if boxes else [rle]

    free = list(range(len(labels)))
    regions = [region(p) for _, p in labels]
    matched = []
    for name, polygons, _ in drafts:
        mine = region(polygons)
        best, index = 0.0, None
        for i in free:
            if labels[i][0] != name:
                continue
            iou = float(mask_utils.iou(mine, regions[i], [0])[0][0])
            if iou > best:
                best, index = iou, i
        if index is not None and best >= 0.5:
            free.remove(index)
            matched.append(best)
    return matched


def measure(run: str, dataset: str, min_area: int | None) -> dict:
    import numpy as np

    from pipelines import tasks
    from pipelines.annotator.prelabel import prelabel
    from pipelines.workspace import resolve_dataset, workspace_dir
    from pipelines.data.sources import newest_export
    from pipelines.data.split import assign_splits

    folder = resolve_dataset(dataset)
    task = tasks.of_export(workspace_dir() / run / "export")
    options = {"min_area": min_area} if task.name == "segmentation" else {}
    started = time.perf_counter()
    result = prelabel(run, dataset, only_unlabelled=False, log=lambda line: None, **options)
    seconds = time.perf_counter() - started
    coco = json.loads(result.path.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im for im in coco["images"]}
    drafts = {}
    for a in coco["annotations"]:
        score = a["metadata"].get("score", a["area"])
        drafts.setdefault(files[a["image_id"]]["file_name"], []).append((names[a["category_id"]], a["segmentation"], score))
    labels, sizes = labels_by_image(newest_export(folder))
    summary = json.loads((workspace_dir() / Path(dataset).name / "data" / "summary.json").read_text())
    split = summary["split"]
    keys = {p.name: p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name in sizes}
    sides = assign_splits(sorted(keys.values()), split["val_ratio"], split["seed"])
    val = [name for name, key in keys.items() if sides[key] == "val"]
    ious, n_drafts, n_labels = [], 0, 0
    for name in val:
        mine = sorted(drafts.get(name, []), key=lambda d: -d[2])
        n_drafts += len(mine)
        n_labels += len(labels.get(name, []))
        ious += match(mine, labels.get(name, []), sizes[name], boxes=task.name == "detection")
    hits = len(ious)
    edits = (n_drafts - hits) + (n_labels - hits)
    return {"run": run, "task": task.name, "min_area": min_area, "val_images": len(val), "drafts": n_drafts,
            "labels": n_labels, "matched": hits, "precision": hits / max(n_drafts, 1),
            "recall": hits / max(n_labels, 1), "mean_iou": float(np.mean(ious)) if ious else 0.0,
            "edits": edits, "edit_ratio": edits / max(n_labels, 1), "images": result.images,
            "seconds_per_image": seconds / max(result.images, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", help="runs with an export (default: demo-detector, demo-segmenter)")
    parser.add_argument("--dataset", default="sample", help="the dataset the runs trained on (default: sample)")
    parser.add_argument("--min-area", type=int, action="append", help="segmenter: region sizes to try (default 16)")
    args = parser.parse_args()
    import pipelines  # noqa: F401

    rows = []
    for run in args.run or ["demo-detector", "demo-segmenter"]:
        from pipelines import tasks
        from pipelines.workspace import workspace_dir

        segmenter = tasks.of_export(workspace_dir() / run / "export").name == "segmentation"
        for min_area in (args.min_area or [16]) if segmenter else [None]:
            rows.append(measure(run, args.dataset, min_area))
    print(f"{'run':<16} {'min_area':>8} {'val img':>7} {'drafts':>6} {'labels':>6} {'matched':>7} {'precision':>9} "
          f"{'recall':>6} {'mIoU':>5} {'edits':>5} {'vs scratch':>10} {'s/img':>6}")
    for r in rows:
        print(f"{r['run']:<16} {r['min_area'] if r['min_area'] is not None else '-':>8} {r['val_images']:>7} "
              f"{r['drafts']:>6} {r['labels']:>6} {r['matched']:>7} {r['precision']:>9.3f} {r['recall']:>6.3f} "
              f"{r['mean_iou']:>5.3f} {r['edits']:>5} {r['edit_ratio']:>9.2f}x {r['seconds_per_image']:>6.3f}")
    print("edits: wrong drafts deleted + missed objects drawn; vs scratch: edits / objects drawn without drafts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
