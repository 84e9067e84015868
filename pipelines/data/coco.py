"""COCO instances JSON: coco-annotator exports and plain COCO (official, labelme2coco, CVAT).

What a coco-annotator export looks like, and what this reader does about it:
- top level has only `images`, `categories`, `annotations`;
- ids are database ids (non-contiguous, unsorted): label ids 1..K are assigned by source id;
- `file_name` is a base name and `path` absolute (`/datasets/NAME/sub/x.jpg`): the longest
  tail of `path` that exists below the dataset folder is used, then `file_name`;
- `iscrowd` is a JSON boolean; extra fields are ignored;
- a bbox-only annotation is a 4-corner polygon with `isbbox: true`;
- keypoint-only annotations (`segmentation: []`, `bbox: [0,0,0,0]`) carry no region: dropped;
- an annotation's polygons are one compound path there: a polygon inside the first is a hole in it;
- a model's draft that nobody has reviewed (`make prelabel`: the draft colour) is marked as one;
- polygons with fewer than 3 points are dropped, polygon points outside the image are clipped and
  the box is recomputed from the region (its stored `bbox` may be stale).
Plain COCO adds RLE crowd annotations (compressed and uncompressed), a `_background_` category
(not a class: dropped) and `file_name`s with subfolders.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path, PurePosixPath

from pipelines.annotator.drafts import is_draft
from pipelines.workspace import UserError, display_path
from pipelines.data.checks import blank_name, finite_reason, is_finite, is_number, numbers_in, show
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
    except RecursionError:
        raise UserError(display_path(path), "invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise UserError(display_path(path), f"invalid JSON: {str(e).splitlines()[0][:200]}") from None
    except OSError as e:
        raise UserError(display_path(path), f"cannot read: {e.strerror or e}") from None


def _sort_key(value):
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


class OutsideImage(Exception):
    """An image path that leads out of the dataset folder (`..`), refused unless the user allows it."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def find_file(root: Path, extra_roots: list[Path], names: list[str], allow_outside: bool = False) -> Path | None:
    """The first of `names` (relative or absolute-looking paths) found below one of the roots.

    For each name, every tail of its path is tried from the longest, so that an absolute path
    recorded on another machine (`/datasets/NAME/sub/x.jpg`) still finds `sub/x.jpg` here. A name
    is only ever looked up below a root: a tail that climbs out with `..` is skipped unless
    `allow_outside`, and when nothing else is found, OutsideImage says that the file exists out
    there. (Symbolic links inside a root are followed wherever they point: they are the folder's
    own entries, not text from an annotation file.)
    """
    outside = None
    for name in names:
        if not name or not isinstance(name, str):
            continue
        parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", "")]
        for start in range(len(parts)):
            tail = posixpath.normpath("/".join(parts[start:]))  # "a/../b" is "b"; "../b" climbs out
            climbs = tail == ".." or tail.startswith("../")
            for base in [root, *extra_roots]:
                candidate = base / tail
                try:
                    exists = candidate.is_file()
                except (OSError, ValueError):  # a name too long, a NUL byte
                    exists = False
                if not exists:
                    continue
                if climbs and not allow_outside:
                    outside = outside or name
                    continue
                return candidate
    if outside is not None:
        raise OutsideImage(outside)
    return None


def outside_reason(name: str, roots: list[Path]) -> str:
    return (f"image path '{name}' leads outside {', '.join(display_path(r) for r in roots)}: refused "
            "(--allow-outside-images reads it)")


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
        if not isinstance(poly, list) or not all(is_number(v) for v in poly):
            invalid.append(Report(file, where, f"polygon {i} is not a list of numbers"))
            return None
        problem = finite_reason(poly, f"polygon {i}")
        if problem:
            invalid.append(Report(file, where, problem))
            return None
        if len(poly) < 6 or len(poly) % 2:
            repaired.append(Report(file, where, f"degenerate polygon with {len(poly) // 2} point(s) dropped"))
            continue
        polygons.append([float(v) for v in poly])
    return polygons


def _bbox(value):
    if isinstance(value, list) and len(value) == 4 and all(is_finite(v) for v in value):
        return tuple(float(v) for v in value)
    return None


def _number_problem(ann: dict) -> str | None:
    """Why one of the annotation's numbers (bbox, area, keypoints, RLE size) is not finite."""
    bbox = ann.get("bbox")
    if isinstance(bbox, list) and all(is_number(v) for v in bbox):
        problem = finite_reason(bbox, "bbox")
        if problem:
            return problem
    area = ann.get("area")
    if is_number(area) and not is_finite(area):
        return f"area is {show(area)}, not a finite number"
    keypoints = ann.get("keypoints")
    if isinstance(keypoints, list):
        bad = next((v for v in numbers_in(keypoints) if not is_finite(v)), None)
        if bad is not None:
            return f"keypoints hold {show(bad)}, not a finite number"
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict) and isinstance(segmentation.get("size"), list):
        problem = finite_reason([v for v in segmentation["size"] if is_number(v)], "RLE size")
        if problem:
            return problem
    return None


def _id_ok(value) -> bool:
    """Ids are looked up in dicts: an integer, a string or a finite number (not a list, NaN, ...)."""
    return isinstance(value, str) or is_finite(value)


def load_coco(json_path: Path, root: Path, image_dirs: list[Path], format_name: str,
              allow_outside: bool = False) -> SourceDataset:
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
        if not _id_ok(cat["id"]):
            raise UserError(file, f"categories[{i}]: id {show(cat['id']) if is_number(cat['id']) else repr(cat['id'])[:40]} "
                                  "is not an integer or a string")
        cid, name = cat["id"], cat["name"].strip()
        blank = blank_name(cat["name"])
        if blank:  # a class nobody can tell apart: refused (or, with --skip-invalid, dropped with its annotations)
            invalid.append(Report(file, f"category id {cid}", f"{blank}: every class needs a name (name it in "
                                                              "the annotator)"))
            dropped_category_ids[cid] = "its category has no name"
            continue
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON but no text
            raise UserError(file, f"categories[{i}]: name {name!r} is not valid Unicode text") from None
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
        if not _id_ok(iid):
            invalid.append(Report(file, f"images[{i}] ('{name}')",
                                  f"id {show(iid) if is_number(iid) else repr(iid)[:40]} is not an integer or a string"))
            continue
        where = f"image id {iid} ('{name}')"
        if iid in images or iid in bad_image_ids:
            invalid.append(Report(file, where, "duplicate image id"))
            continue
        width, height = im.get("width"), im.get("height")
        size_problem = next((f"{key} is {show(v)}, not a finite number" for key, v in (("width", width), ("height", height))
                             if is_number(v) and not is_finite(v)), None)
        if size_problem:
            invalid.append(Report(file, where, size_problem))
            bad_image_ids.add(iid)
            continue
        try:
            found = find_file(root, image_dirs, [im.get("path"), im.get("file_name")], allow_outside)
        except OutsideImage as e:
            invalid.append(Report(file, where, outside_reason(e.name, roots)))
            bad_image_ids.add(iid)
            continue
        if found is None:
            looked = im.get("file_name") or im.get("path")
            invalid.append(Report(file, where, f"image file not found (looked for '{looked}' below "
                                               f"{', '.join(display_path(r) for r in roots)})"))
            bad_image_ids.add(iid)
            continue
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
        if not (_id_ok(iid) and _id_ok(cid)):
            invalid.append(Report(file, where, "'image_id' and 'category_id' must be integers or strings"))
            continue
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
        problem = _number_problem(ann)
        if problem:
            invalid.append(Report(file, where, problem))
            continue
        segmentation = ann.get("segmentation")
        bbox = _bbox(ann.get("bbox"))
        crowd = bool(ann.get("iscrowd", False))
        obj = SourceObject(item=where, label_id=label_of[cid], bbox=bbox, is_crowd=crowd,
                           box_only=bool(ann.get("isbbox", False)), draft=is_draft(ann))
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
            obj.compound = format_name == "coco-annotator" and len(polygons) > 1
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

