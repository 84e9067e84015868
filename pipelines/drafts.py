"""A model's drafts of annotations, in the COCO shape coco-annotator reads back: what `POST /annotate`
answers to the annotator's "Annotate Image" button.

coco-annotator's button (client/src/components/annotator/tools/AnnotateButton.vue) posts the image shown
and reads `coco.images`, `coco.categories` and `coco.annotations` of the answer, all three non-empty; it
picks each annotation's category by the `name` of the returned category its `category_id` names and adds
its `segmentation` (polygons as flat [x0, y0, x1, y1, ...] lists) and `keypoints`. A box is sent as the
4-corner polygon of its outline with `isbbox: true` (an annotation without a polygon is skipped by the
annotator's importer). Every draft carries `metadata: {"draft": true, "score": ..., "model": ...}`.
"""

from __future__ import annotations

import numpy as np

DRAFT_KEY = "draft"


def box_annotation(box: dict, class_id: int, score: float, model: str) -> dict:
    """A detection ({"xmin", "ymin", "xmax", "ymax"} in pixels) as a box annotation: its outline as a
    4-corner polygon (clockwise from the top left), bbox [x, y, width, height], area in whole pixels (the
    annotator stores areas as integers)."""
    x0, y0, x1, y1 = (round(float(box[k]), 2) for k in ("xmin", "ymin", "xmax", "ymax"))
    return {"category_id": int(class_id), "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)], "area": round((x1 - x0) * (y1 - y0)),
            "iscrowd": 0, "isbbox": True, "metadata": {DRAFT_KEY: True, "score": round(float(score), 4), "model": model}}


def region_annotations(mask: np.ndarray, min_area: int, model: str, tolerance: float = 1.0) -> list[dict]:
    """One annotation per connected region of each class (1..K) of a class mask with at least `min_area`
    pixels: its outline and the outlines of its holes as polygons (the annotator draws them as one
    compound path, so the holes stay open), bbox, area in pixels; largest regions first."""
    import cv2

    found = []
    for class_id in (int(c) for c in np.unique(mask) if c != 0):
        count, regions, stats, _ = cv2.connectedComponentsWithStats((mask == class_id).astype(np.uint8), connectivity=8)
        for region in range(1, count):
            x, y, width, height, area = (int(v) for v in stats[region])
            if area < min_area:
                continue
            binary = (regions == region).astype(np.uint8)
            contours, _ = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            polygons = []
            for contour in contours:
                points = cv2.approxPolyDP(contour, tolerance, True)[:, 0, :]
                if len(points) < 3:  # simplified to a line: keep the outline as traced
                    points = contour[:, 0, :]
                if len(points) >= 3:
                    polygons.append([float(v) for v in points.reshape(-1)])
            if not polygons:  # a region a pixel or two wide has no outline polygon: its box stands for it
                right, bottom = float(x + width - 1), float(y + height - 1)
                polygons = [[float(x), float(y), right, float(y), right, bottom, float(x), bottom]]
            found.append({"category_id": class_id, "segmentation": polygons, "bbox": [x, y, width, height],
                          "area": area, "iscrowd": 0, "isbbox": False, "metadata": {DRAFT_KEY: True, "model": model}})
    return sorted(found, key=lambda a: -a["area"])


def coco_answer(width: int, height: int, annotations: list[dict], labels: dict[int, str], nothing: str,
                file_name: str = "image") -> dict:
    """{"coco": {"images", "categories", "annotations"}} for one image; the categories are those drafted
    (named as the label map). Without any annotation, "message" says `nothing`: the annotator shows an
    answer with an empty list as an error. (The annotator posts its canvas as "blob" and ignores the
    image's file_name.)"""
    image = {"id": 1, "width": int(width), "height": int(height), "file_name": file_name}
    used = sorted({a["category_id"] for a in annotations})
    coco = {"images": [image],
            "categories": [{"id": c, "name": labels.get(c, str(c)), "supercategory": ""} for c in used],
            "annotations": [{"id": n, "image_id": 1, **a} for n, a in enumerate(annotations, start=1)]}
    answer = {"coco": coco}
    if not annotations:
        answer["message"] = nothing
    return answer
