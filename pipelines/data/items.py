"""The format-neutral description of a dataset that every reader produces and the writer consumes.

Readers (coco.py, voc.py) only parse and cross-check the annotation files; everything that needs
the pixels (orientation, clipping, masks) happens per image in encode.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Category:
    label_id: int  # 1..K, the id written to the label map and the TFRecords
    name: str
    source_id: int | str  # the id the annotation tool used (a VOC class has only its name)


@dataclass
class SourceObject:
    item: str  # how a user finds it: "annotation id 4711" or "object 3"
    label_id: int
    polygons: list[list[float]] = field(default_factory=list)  # COCO polygons, pixel coords
    # coco-annotator draws an annotation's polygons as one paper.js compound path: every polygon after the
    # first is turned against it (nonzero fill), so where it lies inside the first it is a hole. Plain COCO
    # (pycocotools) takes the union of the polygons.
    compound: bool = False
    rle: dict | None = None  # COCO RLE ({"size": [h, w], "counts": str|list})
    bbox: tuple[float, float, float, float] | None = None  # x, y, w, h as given by the source
    is_crowd: bool = False
    box_only: bool = False  # a rectangle: coco-annotator's isbbox, or a VOC box
    draft: bool = False  # a model's draft nobody has reviewed yet (pipelines/annotator/drafts.py)


@dataclass
class SourceImage:
    key: str  # path relative to the dataset folder: the image's identity (split, reports)
    path: str  # absolute path of the file
    source_id: str  # written as image/source_id: an integer, as COCO evaluators expect
    width: int | None  # the size the annotation tool recorded (None: unknown)
    height: int | None
    annotation_file: str  # for error messages
    item: str  # "image id 17" / "Annotations/x.xml"
    objects: list[SourceObject] = field(default_factory=list)


@dataclass
class Report:
    """One dropped or repaired item, as listed in summary.json."""

    file: str
    item: str
    reason: str

    def line(self) -> str:
        return f"{self.file}: {self.item}: {self.reason}"


@dataclass
class SourceDataset:
    format: str  # "coco-annotator", "coco" or "voc"
    root: str  # the dataset folder
    annotation_files: list[str]
    categories: list[Category]
    images: list[SourceImage]
    dropped: list[Report] = field(default_factory=list)  # expected quirks, dropped in any mode
    repaired: list[Report] = field(default_factory=list)
    invalid: list[Report] = field(default_factory=list)  # errors; dropped only with --skip-invalid
