"""Find what a dataset folder holds and load it: coco-annotator, plain COCO or Pascal VOC."""

from __future__ import annotations

import re
from pathlib import Path

from pipelines.workspace import UserError, display_path
from pipelines.data.coco import load_coco
from pipelines.data.items import Report, SourceDataset
from pipelines.data.voc import annotation_files, load_voc

EXPORT_NAME = re.compile(r"^coco-(\d+(?:\.\d+)?)\.json$")


def newest_export(dataset: Path) -> Path | None:
    """coco-annotator writes `.exports/coco-<unix time>.json`; the largest time is the newest."""
    exports = []
    for path in (dataset / ".exports").glob("coco-*.json"):
        match = EXPORT_NAME.match(path.name)
        stamp = float(match.group(1)) if match else path.stat().st_mtime
        exports.append((stamp, path.name, path))
    return max(exports)[2] if exports else None


def _coco_split_files(dataset: Path) -> tuple[Path, Path] | None:
    """Official-COCO layout: annotations/instances_train*.json beside instances_val*.json."""
    folder = dataset / "annotations"
    train = sorted(folder.glob("instances_train*.json"))
    val = sorted(folder.glob("instances_val*.json"))
    return (train[0], val[0]) if len(train) == 1 and len(val) == 1 else None


def load_annotations(path: Path, root: Path, image_dirs: list[Path], allow_outside: bool = False) -> SourceDataset:
    """Load one annotation file or folder, guessing its format."""
    if path.is_dir():
        xml = annotation_files(path)
        if xml:
            return load_voc(root, xml, image_dirs, allow_outside)
        raise UserError(display_path(path), "no Pascal VOC XML files in this folder")
    if path.suffix.lower() == ".xml":
        return load_voc(root, [path], image_dirs, allow_outside)
    fmt = "coco-annotator" if path.parent.name == ".exports" else "coco"
    if path.stem.startswith("instances_"):  # official COCO: instances_val2017.json -> val2017/
        split_dir = root / path.stem[len("instances_"):]
        if split_dir.is_dir():
            image_dirs = [*image_dirs, split_dir]
    return load_coco(path, root, image_dirs, fmt, allow_outside)


def discover(dataset: Path, annotations: Path | None = None, val_annotations: Path | None = None,
             images: Path | None = None, allow_outside: bool = False) -> tuple[SourceDataset, SourceDataset | None]:
    """Return the training source and, when the dataset brings its own, the validation source.

    Images are looked up below the dataset folder and the `images` folder only, unless
    `allow_outside` (a `file_name` such as `../../x.jpg` is otherwise refused).
    """
    image_dirs = [images] if images else []
    if dataset.is_file():
        annotations = annotations or dataset
        dataset = dataset.parent
    root = dataset
    if annotations is None:
        export = newest_export(dataset)
        split = _coco_split_files(dataset)
        if export is not None:
            annotations = export
        elif split is not None and val_annotations is None:
            annotations, val_annotations = split
        elif (dataset / "annotations.json").is_file():
            annotations = dataset / "annotations.json"
        elif annotation_files(dataset):
            annotations = dataset
        else:
            single = sorted(dataset.glob("*.json"))
            if len(single) != 1:
                raise UserError(display_path(dataset),
                                "no annotations found: expected a coco-annotator export (.exports/coco-*.json), "
                                "a COCO file (annotations.json, or give ANNOTATIONS=file.json) "
                                "or Pascal VOC XML (Annotations/*.xml)")
            annotations = single[0]
    for path in (annotations, val_annotations):
        if path is not None and not path.exists():
            raise UserError(display_path(path), "annotation file not found")
    train = load_annotations(annotations, root, image_dirs, allow_outside)
    val = load_annotations(val_annotations, root, image_dirs, allow_outside) if val_annotations else None
    if val is not None:
        merge_categories(train, val)
    return train, val


def merge_categories(train: SourceDataset, val: SourceDataset) -> None:
    """Give the validation source the training source's label ids, matching classes by name."""
    train_ids = {c.name: c.label_id for c in train.categories}
    remap = {}
    for cat in val.categories:
        if cat.name in train_ids:
            remap[cat.label_id] = train_ids[cat.name]
        else:
            new_id = len(train.categories) + 1
            train.categories.append(type(cat)(label_id=new_id, name=cat.name, source_id=cat.source_id))
            train_ids[cat.name] = new_id
            remap[cat.label_id] = new_id
            train.repaired.append(Report(val.annotation_files[0], f"category '{cat.name}'",
                                         "only in the validation annotations: appended to the label map"))
    for image in val.images:
        for obj in image.objects:
            obj.label_id = remap[obj.label_id]
    val.categories = train.categories
