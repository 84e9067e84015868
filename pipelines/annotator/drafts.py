"""A model's drafts of annotations, in the COCO shape coco-annotator reads back: what `POST /annotate`
answers to the annotator's "Annotate Image" button and what `make prelabel` writes for its COCO import; and
the rule that tells a draft nobody has reviewed from an annotation a person made or checked.

coco-annotator's button (client/src/components/annotator/tools/AnnotateButton.vue) posts the image shown
and reads `coco.images`, `coco.categories` and `coco.annotations` of the answer, all three non-empty; it
picks each annotation's category by the `name` of the returned category its `category_id` names and adds
its `segmentation` (polygons as flat [x0, y0, x1, y1, ...] lists) and `keypoints`. A box is sent as the
4-corner polygon of its outline with `isbbox: true` (an annotation without a polygon is skipped by the
annotator's importer). Every draft carries `metadata: {"draft": true, "score": ..., "model": ...}` and the
draft colour.

Which mark survives coco-annotator (backend/database/annotations.py, backend/workers/tasks/data.py): its
COCO import stores an annotation's `color` as given, but `AnnotationModel.save()` replaces the `metadata`
of every new annotation with the dataset's default annotation metadata, so an imported draft keeps its
colour and loses its metadata; the annotator's save sends each annotation's colour back unchanged unless
the person picks another one (the annotation's settings: Color), and the export writes `color` and
`metadata`. The "Annotate Image" button keeps neither (it adds only the polygons), and needs neither: the
person sees those drafts arrive and corrects them there and then. So: an annotation is an unreviewed draft
while it has the draft colour, or its metadata still says `draft: true` (tools that keep metadata); the
person marks a draft reviewed by giving it another colour (or clearing `draft`).
"""

from __future__ import annotations

import numpy as np

from pipelines.common import env_number

DRAFT_KEY = "draft"
# The colour of every draft: magenta, a colour coco-annotator's random annotation colours hit once in 16.7
# million. Compared case-insensitively (the annotator's colour picker writes lower case).
DRAFT_COLOR = "#ff00ff"
# Regions smaller than this many pixels are not drafted from a segmenter (/annotate's min_area and
# make prelabel's MIN_AREA override it).
MIN_AREA_ENV = "PIPELINES_ANNOTATE_MIN_AREA"
DEFAULT_MIN_AREA = 16


def default_min_area() -> int:
    return max(0, int(env_number(MIN_AREA_ENV, DEFAULT_MIN_AREA)))


def is_draft(annotation: dict) -> bool:
    """Whether a COCO annotation (of an export) is a model's draft nobody has reviewed (module docstring)."""
    color = annotation.get("color")
    if isinstance(color, str) and color.strip().lower() == DRAFT_COLOR:
        return True
    metadata = annotation.get("metadata")
    mark = metadata.get(DRAFT_KEY) if isinstance(metadata, dict) else None
    # The annotator's metadata editor writes "true" back as true and "1" as 1.
    return mark is True or (isinstance(mark, int) and not isinstance(mark, bool) and mark == 1) or \
        (isinstance(mark, str) and mark.strip().lower() in ("true", "1", "yes"))


def box_annotation(box: dict, class_id: int, score: float, model: str) -> dict:
    """A detection ({"xmin", "ymin", "xmax", "ymax"} in pixels) as a box annotation: its outline as a
    4-corner polygon (clockwise from the top left), bbox [x, y, width, height], area in whole pixels (the
    annotator stores areas as integers)."""
    x0, y0, x1, y1 = (round(float(box[k]), 2) for k in ("xmin", "ymin", "xmax", "ymax"))
    return {"category_id": int(class_id), "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)], "area": round((x1 - x0) * (y1 - y0)),
            "iscrowd": 0, "isbbox": True, "color": DRAFT_COLOR,
            "metadata": {DRAFT_KEY: True, "score": round(float(score), 4), "model": model}}


def region_annotations(mask: np.ndarray, min_area: int, model: str, tolerance: float = 1.0) -> list[dict]:
    """One annotation per connected region of each class (1..K) of a class mask with at least `min_area`
    pixels: its outline, then the outlines of its holes, as polygons (the annotator draws them as one
    compound path whose later polygons are holes in the first; `make data` reads them back so), bbox, area
    in pixels; largest regions first."""
    import cv2

    found = []
    for class_id in (int(c) for c in np.unique(mask) if c != 0):
        count, regions, stats, _ = cv2.connectedComponentsWithStats((mask == class_id).astype(np.uint8), connectivity=8)
        for region in range(1, count):
            x, y, width, height, area = (int(v) for v in stats[region])
            if area < min_area:
                continue
            binary = (regions == region).astype(np.uint8)
            contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            # The outline first, then the holes: the annotator (paper.js) turns every polygon after the
            # first against it, so those inside it show as holes.
            outer_first = sorted(range(len(contours)), key=lambda i: hierarchy[0][i][3] != -1)
            polygons = []
            for contour in (contours[i] for i in outer_first):
                points = cv2.approxPolyDP(contour, tolerance, True)[:, 0, :]
                if len(points) < 3:  # simplified to a line: keep the outline as traced
                    points = contour[:, 0, :]
                if len(points) >= 3:
                    polygons.append([float(v) for v in points.reshape(-1)])
            if not polygons:  # a region a pixel or two wide has no outline polygon: its pixels' box stands for it
                right, bottom = float(x + width), float(y + height)
                polygons = [[float(x), float(y), right, float(y), right, bottom, float(x), bottom]]
            found.append({"category_id": class_id, "segmentation": polygons, "bbox": [x, y, width, height],
                          "area": area, "iscrowd": 0, "isbbox": False, "color": DRAFT_COLOR,
                          "metadata": {DRAFT_KEY: True, "model": model}})
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
