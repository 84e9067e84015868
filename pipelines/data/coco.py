"""COCO instances JSON: coco-annotator exports and plain COCO (official, labelme2coco, CVAT).

What a coco-annotator export looks like, and what this reader does about it:
- top level has only `images`, `categories`, `annotations`;
- ids are database ids (non-contiguous, unsorted): label ids 1..K are assigned by source id;
- `file_name` is a base name and `path` absolute (`/datasets/NAME/sub/x.jpg`): the longest
  tail of `path` that exists below the dataset folder is used, then `file_name`;
- `iscrowd` is a JSON boolean; extra fields are ignored;
- a bbox-only annotation is a 4-corner polygon with `isbbox: true`;
- keypoint-only annotations (`segmentation: []`, `bbox: [0,0,0,0]`) carry no region: dropped;
- polygons with fewer than 3 points are dropped, polygon points outside the image are clipped and
  the box is recomputed from the region (its stored `bbox` may be stale).
Plain COCO adds RLE crowd annotations (compressed and uncompressed), a `_background_` category
(not a class: dropped) and `file_name`s with subfolders.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from pipelines.common import UserError, display_path
from pipelines.data.items import Category, Report, SourceDataset, SourceImage, SourceObject

BACKGROUND_NAMES = {"_background_", "__background__", "__ignore__"}


def read_json(path: Path):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(display_path(path), f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(display_path(path), f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise UserError(display_path(path), f"cannot read: {e.strerror or e}") from None


def _sort_key(value):
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


def find_file(root: Path, extra_roots: list[Path], names: list[str]) -> Path | None:
    """The first of `names` (relative or absolute-looking paths) found below one of the roots.

    For each name, every tail of its path is tried from the longest, so that an absolute path
    recorded on another machine (`/datasets/NAME/sub/x.jpg`) still finds `sub/x.jpg` here.
    """
    for name in names:
        if not name:
            continue
        parts = [p for p in PurePosixPath(str(name).replace("\\", "/")).parts if p not in ("/", "")]
        for start in range(len(parts)):
            tail = Path(*parts[start:])
            for base in [root, *extra_roots]:
                candidate = base / tail
                if candidate.is_file():
                    return candidate
    return None


def image_key(path: Path, roots: list[Path]) -> str:
    """The image's path relative to the first root it lies below (its identity in the dataset).

    The path is tried as found before it is resolved, so a symlinked image keeps the name it
    has in the dataset folder rather than its target's.
    """
    for candidate in (path, path.resolve()):
        for base in roots:
            for root in (base, base.resolve()):
                try:
                    return candidate.relative_to(root).as_posix()
                except ValueError:
                    continue
    return path.name


def _polygons(segmentation, where, file, repaired, invalid):
    polygons = []
    for i, poly in enumerate(segmentation):
        if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
            invalid.append(Report(file, where, f"polygon {i} is not a list of numbers"))
            return None
        if len(poly) < 6 or len(poly) % 2:
            repaired.append(Report(file, where, f"degenerate polygon with {len(poly) // 2} point(s) dropped"))
            continue
        polygons.append([float(v) for v in poly])
    return polygons


def _bbox(value):
    if isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)
    return None


def load_coco(json_path: Path, root: Path, image_dirs: list[Path], format_name: str) -> SourceDataset:
    data = read_json(json_path)
    file = display_path(json_path)
    if not isinstance(data, dict):
        raise UserError(file, "expected a JSON object with 'images', 'categories' and 'annotations'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(file, f"'{key}' is missing or not a list")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise UserError(file, "'annotations' is not a list")

    dropped: list[Report] = []
    repaired: list[Report] = []
    invalid: list[Report] = []

    # Categories: background pseudo-classes are not classes; duplicates are errors.
    by_source_id: dict = {}
    dropped_category_ids: dict = {}
    names_seen: dict[str, object] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise UserError(file, f"categories[{i}] needs an 'id' and a 'name'")
        cid, name = cat["id"], cat["name"].strip()
        where = f"category id {cid} ('{name}')"
        if name in BACKGROUND_NAMES:
            dropped.append(Report(file, where, "background pseudo-category, not a class"))
            dropped_category_ids[cid] = "its category is the background pseudo-category"
            continue
        if cid in by_source_id:
            invalid.append(Report(file, where, f"duplicate category id (also '{by_source_id[cid]}')"))
            continue
        if name in names_seen:
            invalid.append(Report(file, where, f"duplicate category name (also category id {names_seen[name]})"))
            dropped_category_ids[cid] = f"its category duplicates the name '{name}'"
            continue
        names_seen[name] = cid
        by_source_id[cid] = name
    ordered = sorted(by_source_id, key=_sort_key)
    categories = [Category(label_id=i + 1, name=by_source_id[cid], source_id=cid) for i, cid in enumerate(ordered)]
    label_of = {c.source_id: c.label_id for c in categories}

    # Images: resolve each file below the dataset folder.
    roots = [root, *image_dirs]
    images: dict = {}
    numeric_ids = all(isinstance(im.get("id"), int) and not isinstance(im.get("id"), bool)
                      for im in data["images"] if isinstance(im, dict))
    bad_image_ids = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im:
            raise UserError(file, f"images[{i}] has no 'id'")
        iid = im["id"]
        name = im.get("file_name") or PurePosixPath(str(im.get("path", ""))).name
        where = f"image id {iid} ('{name}')"
        if iid in images or iid in bad_image_ids:
            invalid.append(Report(file, where, "duplicate image id"))
            continue
        found = find_file(root, image_dirs, [im.get("path"), im.get("file_name")])
        if found is None:
            looked = im.get("file_name") or im.get("path")
            invalid.append(Report(file, where, f"image file not found (looked for '{looked}' below "
                                               f"{', '.join(display_path(r) for r in roots)})"))
            bad_image_ids.add(iid)
            continue
        width, height = im.get("width"), im.get("height")
        images[iid] = SourceImage(
            key=image_key(found, roots), path=str(found), source_id=str(iid) if numeric_ids else "",
            width=int(width) if isinstance(width, (int, float)) and width > 0 else None,
            height=int(height) if isinstance(height, (int, float)) and height > 0 else None,
            annotation_file=file, item=where)

    # Annotations.
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            invalid.append(Report(file, f"annotations[{i}]", "not a JSON object"))
            continue
        aid = ann.get("id", f"#{i}")
        where = f"annotation id {aid}"
        iid, cid = ann.get("image_id"), ann.get("category_id")
        if iid in bad_image_ids:
            continue  # reported with its image
        if iid not in images:
            invalid.append(Report(file, where, f"refers to unknown image id {iid}"))
            continue
        if cid in dropped_category_ids:
            dropped.append(Report(file, where, dropped_category_ids[cid]))
            continue
        if cid not in label_of:
            invalid.append(Report(file, where, f"refers to unknown category id {cid}"))
            continue
        segmentation = ann.get("segmentation")
        bbox = _bbox(ann.get("bbox"))
        crowd = bool(ann.get("iscrowd", False))
        obj = SourceObject(item=where, label_id=label_of[cid], bbox=bbox, is_crowd=crowd,
                           box_only=bool(ann.get("isbbox", False)))
        if isinstance(segmentation, dict):
            if "counts" not in segmentation or "size" not in segmentation:
                invalid.append(Report(file, where, "RLE segmentation needs 'counts' and 'size'"))
                continue
            obj.rle = segmentation
        elif isinstance(segmentation, list) and segmentation:
            polygons = _polygons(segmentation, where, file, repaired, invalid)
            if polygons is None:
                continue
            obj.polygons = polygons
        elif segmentation not in (None, []):
            invalid.append(Report(file, where, "'segmentation' is neither polygons nor RLE"))
            continue
        has_box = bbox is not None and bbox[2] > 0 and bbox[3] > 0
        if not obj.polygons and obj.rle is None:
            if not has_box:
                reason = ("keypoint-only annotation (no region, no box)" if ann.get("keypoints")
                          else "no region and no box")
                dropped.append(Report(file, where, reason))
                continue
            if segmentation:  # it had polygons, all degenerate
                repaired.append(Report(file, where, "no valid polygon left: its bbox is used as the box"))
            obj.box_only = True
        images[iid].objects.append(obj)

    image_list = sorted(images.values(), key=lambda im: im.key)
    if not numeric_ids:  # COCO evaluators need integer image ids
        for n, im in enumerate(image_list, start=1):
            im.source_id = str(n)
    return SourceDataset(format=format_name, root=str(root), annotation_files=[file], categories=categories,
                         images=image_list, dropped=dropped, repaired=repaired, invalid=invalid)

