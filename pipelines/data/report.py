"""What the data stage tells the user: summary.json, the printed table, preview.png."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

from pipelines.data.encode import EncodedImage
from pipelines.data.items import Category, Report
from pipelines import viz
from pipelines.viz import IGNORE_COLOR, class_color, edges

PREVIEW_IMAGES = 12
TILE = 280


class Tally:
    """Counts per split and class, fed one written image at a time (memory stays flat)."""

    def __init__(self, categories: list[Category]):
        self.categories = categories
        self.objects = {s: Counter() for s in ("train", "val")}
        self.images_with = {s: Counter() for s in ("train", "val")}
        self.crowd = Counter()
        self.images = Counter()
        self.empty = Counter()
        self.copied = 0
        self.reencoded = 0

    def add(self, split: str, image: EncodedImage) -> None:
        self.images[split] += 1
        if not image.objects:
            self.empty[split] += 1
        for label_id in {o.label_id for o in image.objects}:
            self.images_with[split][label_id] += 1
        for obj in image.objects:
            self.objects[split][obj.label_id] += 1
            self.crowd[obj.label_id] += int(obj.is_crowd)
        if image.copied:
            self.copied += 1
        else:
            self.reencoded += 1

    def classes(self) -> list[dict]:
        return [{"id": c.label_id, "name": c.name, "source_id": c.source_id,
                 "objects": {s: self.objects[s][c.label_id] for s in ("train", "val")},
                 "images": {s: self.images_with[s][c.label_id] for s in ("train", "val")},
                 "crowd": self.crowd[c.label_id]} for c in self.categories]


def reports_json(reports: list[Report]) -> list[dict]:
    return [{"file": r.file, "item": r.item, "reason": r.reason} for r in reports]


def _reason_kind(reason: str) -> str:
    """Group similar reasons for the printed table ("polygon clipped to the image", ...)."""
    for sep in (" (", ": "):
        if sep in reason:
            reason = reason.split(sep)[0]
    return reason


def format_table(summary: dict) -> str:
    classes = summary["classes"]
    width = max([len("class")] + [len(c["name"]) for c in classes])
    lines = [f"  {'id':>3}  {'class':<{width}}  {'source id':>10}  {'train obj':>9}  {'val obj':>7}  "
             f"{'train img':>9}  {'val img':>7}  {'crowd':>5}"]
    for c in classes:
        lines.append(f"  {c['id']:>3}  {c['name']:<{width}}  {str(c['source_id']):>10}  {c['objects']['train']:>9}  "
                     f"{c['objects']['val']:>7}  {c['images']['train']:>9}  {c['images']['val']:>7}  {c['crowd']:>5}")
    im = summary["images"]
    lines.append(f"  images: {im['train']} train, {im['val']} val; without objects: "
                 f"{im['without_objects']['train']} train, {im['without_objects']['val']} val; "
                 f"{im['copied']} copied as they were, {im['reencoded']} re-encoded")
    for title, key in (("dropped", "dropped"), ("repaired", "repaired"), ("skipped (invalid)", "skipped_invalid")):
        items = summary[key]
        if not items:
            continue
        lines.append(f"  {title}: {len(items)}")
        for reason, n in Counter(_reason_kind(r["reason"]) for r in items).most_common():
            lines.append(f"    {n:>5} x {reason}")
    return "\n".join(lines)


def _small(png: bytes, size: tuple[int, int]) -> np.ndarray:
    """A mask PNG (ids or 0/1) at the tile's size: nearest neighbour keeps the values."""
    return np.asarray(Image.open(io.BytesIO(png)).resize(size, Image.NEAREST))


def preview_tile(image: EncodedImage, size: int = TILE - 6) -> Image.Image:
    """The image decoded small: a JPEG at 1/2..1/8 scale straight from the decoder (draft), then
    reduced to fit `size`. Memory stays that of the tile, not of the photo."""
    img = Image.open(io.BytesIO(image.encoded))
    img.draft("RGB", (size, size))
    img = img.convert("RGB")
    img.thumbnail((size, size), reducing_gap=2.0)
    return img


def draw_labels(rgb: Image.Image, image: EncodedImage, names: dict[int, str]) -> Image.Image:
    """`rgb` (the image at any scale) with its masks (class mask or instance masks) tinted and
    outlined, boxes drawn; masks and boxes are scaled to `rgb`'s size."""
    size = rgb.size
    sx, sy = size[0] / image.width, size[1] / image.height
    base = np.asarray(rgb, dtype=np.float32)
    overlay = base.copy()
    outlines = []
    if image.class_mask_png is not None:
        cmask = _small(image.class_mask_png, size)
        regions = [(cmask == v, IGNORE_COLOR if v == 255 else class_color(int(v))) for v in np.unique(cmask) if v]
        outlines.append((edges(cmask), cmask))
    else:
        regions = [(_small(o.mask_png, size) > 0, class_color(o.label_id))
                   for o in image.objects if o.mask_png is not None]
    for region, color in regions:
        overlay[region] = color
    out = np.float32(base * 0.5 + overlay * 0.5)
    if image.class_mask_png is None:
        for region, color in regions:
            out[edges(region.astype(np.uint8)) & region] = color
    for edge, cmask in outlines:
        for v in np.unique(cmask[edge]):
            if v:
                out[edge & (cmask == v)] = IGNORE_COLOR if v == 255 else class_color(int(v))
    out = Image.fromarray(np.uint8(out))
    draw = ImageDraw.Draw(out)
    font = viz.font()
    thickness = max(1, round(max(out.size) / 150))
    for obj in image.objects:
        color = class_color(obj.label_id)
        box = (obj.box[0] * sx, obj.box[1] * sy, obj.box[2] * sx, obj.box[3] * sy)
        draw.rectangle(box, outline=color, width=thickness)
        text = names.get(obj.label_id, str(obj.label_id)) + (" (crowd)" if obj.is_crowd else "")
        x, y = box[0], max(0, box[1] - 15)
        draw.rectangle(draw.textbbox((x, y), text, font=font), fill=color)
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return out


def contact_sheet(images: list[tuple[str, EncodedImage]], names: dict[int, str], columns: int = 4) -> Image.Image:
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + 18)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = viz.font()
    for n, (split, image) in enumerate(images):
        tile = draw_labels(preview_tile(image), image, names)
        x, y = (n % columns) * TILE, (n // columns) * (TILE + 18)
        sheet.paste(tile, (x + (TILE - tile.width) // 2, y + 3 + (TILE - 6 - tile.height) // 2))
        caption = f"[{split}] {image.key}"
        if len(caption) > 40:
            caption = caption[:18] + "..." + caption[-19:]
        draw.text((x + 4, y + TILE), caption, fill=(230, 230, 230), font=font)
    return sheet
