"""Pascal VOC XML folders (labelImg, labelme, CVAT, the VOC devkit), parsed with lxml.

Tolerated: float coordinates, empty `<truncated/>`/`<difficult/>` tags, any element order,
missing or zero `<size>`. Class ids follow `class_names.txt` when the folder has one (labelme
writes it), otherwise the sorted class names. Coordinates are used as written, as the Object
Detection API's VOC converter does.
"""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from pipelines.workspace import UserError, display_path
from pipelines.data.checks import blank_name, is_finite
from pipelines.data.coco import BACKGROUND_NAMES, OutsideImage, find_file, image_key, outside_reason
from pipelines.data.items import Category, Report, SourceDataset, SourceImage, SourceObject

IMAGE_DIRS = ("JPEGImages", "images", "Images", "img")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def _text(element, path: str) -> str:
    """The element's whole text (`.text` alone stops at the first comment or child element)."""
    found = element.find(path)
    return str(found.xpath("string()")).strip() if found is not None else ""


def _number(element, path: str):
    text = _text(element, path)
    if not text:
        return None
    value = float(text)  # ValueError for garbage: reported by the caller
    if not is_finite(value):  # "nan", "inf", "1e400"
        raise ValueError(f"{text!r} is not a finite number")
    return value


def annotation_files(folder: Path) -> list[Path]:
    for sub in ("Annotations", "annotations", "."):
        files = sorted((folder / sub).glob("*.xml"))
        if files:
            return files
    return []


def class_names_file(root: Path) -> list[str] | None:
    path = root / "class_names.txt"
    if not path.is_file():
        return None
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise UserError(display_path(path), f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    return [n for n in names if not blank_name(n) and n not in BACKGROUND_NAMES]


def load_voc(root: Path, xml_files: list[Path], image_dirs: list[Path], allow_outside: bool = False) -> SourceDataset:
    dropped: list[Report] = []
    invalid: list[Report] = []
    # Entities declared in the file itself are expanded (`<name>cat &amp; dog</name>`, a DTD's own
    # entities); external ones (files, URLs) are never loaded, and libxml2 refuses entity bombs.
    parser = etree.XMLParser(resolve_entities="internal", no_network=True, huge_tree=False, load_dtd=False)
    search_roots = [*image_dirs, *(root / d for d in IMAGE_DIRS if (root / d).is_dir())]
    parsed = []
    names_found: set[str] = set()
    for xml in xml_files:
        file = display_path(xml)
        try:
            tree = etree.parse(str(xml), parser).getroot()
        except etree.XMLSyntaxError as e:
            raise UserError(file, f"invalid XML: {e}") from None
        if tree.tag != "annotation":
            raise UserError(file, f"expected an <annotation> root element, found <{tree.tag}>")
        filename = _text(tree, "filename")
        names = [filename, _text(tree, "path")]
        if filename and not Path(filename).suffix:  # some tools write the stem only
            names += [filename + s for s in IMAGE_SUFFIXES]
        names += [xml.stem + s for s in IMAGE_SUFFIXES]
        where = f"image '{filename or xml.stem}'"
        try:
            found = find_file(root, [xml.parent, *search_roots], names, allow_outside)
        except OutsideImage as e:
            invalid.append(Report(file, where, outside_reason(e.name, [root, *search_roots])))
            continue
        if found is None:
            invalid.append(Report(file, where, "image file not found (looked for "
                                  f"'{filename or xml.stem}' in {', '.join(display_path(r) for r in [root, *search_roots])})"))
            continue
        try:
            width, height = _number(tree, "size/width"), _number(tree, "size/height")
        except ValueError as e:
            if "finite" in str(e):  # Infinity or NaN: a broken file, not a missing size
                invalid.append(Report(file, where, f"<size> holds {str(e).split(' is ')[0]}, not a finite number"))
                continue
            width = height = None
        objects = []
        for n, obj in enumerate(tree.iterfind("object"), start=1):
            name = _text(obj, "name")
            item = f"object {n} ('{name}') of {where}"
            blank = blank_name(name)  # (the text is stripped: spaces alone read as no name)
            if blank:
                invalid.append(Report(file, item, "object has no <name>" if not name else
                                      f"<name> is a {blank}: every class needs a name"))
                continue
            try:
                box = [_number(obj, f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
            except ValueError:
                invalid.append(Report(file, item, "bndbox coordinates are not finite numbers"))
                continue
            if any(v is None for v in box):
                invalid.append(Report(file, item, "bndbox needs xmin, ymin, xmax and ymax"))
                continue
            if box[2] <= box[0] or box[3] <= box[1]:
                dropped.append(Report(file, item, f"empty box (xmin {box[0]:g}, ymin {box[1]:g}, "
                                                  f"xmax {box[2]:g}, ymax {box[3]:g})"))
                continue
            names_found.add(name)
            objects.append((name, item, box))
        parsed.append((file, where, found, width, height, objects))

    listed = class_names_file(root)
    class_order = listed if listed is not None else sorted(names_found)
    categories = [Category(label_id=i + 1, name=n, source_id=n) for i, n in enumerate(class_order)]
    label_of = {c.name: c.label_id for c in categories}

    roots = [root, *search_roots]
    images = []
    for file, where, found, width, height, objects in parsed:
        image = SourceImage(key=image_key(found, roots), path=str(found), source_id="",
                            width=int(width) if width else None, height=int(height) if height else None,
                            annotation_file=file, item=where)
        for name, item, (x0, y0, x1, y1) in objects:
            if name not in label_of:
                invalid.append(Report(file, item, f"class '{name}' is not in class_names.txt"))
                continue
            image.objects.append(SourceObject(item=item, label_id=label_of[name], bbox=(x0, y0, x1 - x0, y1 - y0),
                                              box_only=True))
        images.append(image)
    images.sort(key=lambda im: im.key)
    for n, im in enumerate(images, start=1):
        im.source_id = str(n)
    return SourceDataset(format="voc", root=str(root), annotation_files=sorted({display_path(f.parent) for f in xml_files}),
                         categories=categories, images=images, dropped=dropped, invalid=invalid)
