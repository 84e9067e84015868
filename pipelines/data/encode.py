"""Per-image work of the data stage, run in worker processes: no TensorFlow is imported here.

For one SourceImage it reads and checks the file, decides the pixel orientation the annotator saw,
normalises the image to 8-bit RGB JPEG or PNG (copying the bytes when they already are), turns the
annotations into clipped boxes, areas and masks, and returns plain values that the writer turns
into a tf.Example.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from pipelines.data import geometry
from pipelines.data.tfrecords import example_features, serialize_example
from pipelines.data.items import Report, SourceImage, SourceObject

# Formats TensorFlow decodes and whose bytes are kept as they are (MPO is a camera JPEG).
COPYABLE = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png"}
# Sources whose pixels already went through lossy compression are re-encoded as JPEG, others as PNG.
LOSSY = {"JPEG", "MPO", "WEBP"}
JPEG_QUALITY = 95
IGNORE_LABEL = 255  # class-mask value for crowd regions: losses and metrics skip it
EXIF_ORIENTATION = 0x0112
TRANSPOSING = {5, 6, 7, 8}  # EXIF orientations that swap width and height

Image.MAX_IMAGE_PIXELS = None  # annotated datasets hold large photos; the server has its own limit


@dataclass
class EncodeOptions:
    names: dict[int, str] = field(default_factory=dict)  # label id -> class name
    instance_masks: bool = False  # image/object/mask, one PNG per object
    class_mask: bool = False  # image/segmentation/class/encoded


@dataclass
class EncodedObject:
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in pixels
    label_id: int
    is_crowd: bool
    area: float
    mask_png: bytes | None = None


@dataclass
class EncodedImage:
    key: str
    source_id: str
    encoded: bytes
    format: str  # "jpeg" or "png"
    width: int
    height: int
    sha256: str
    objects: list[EncodedObject]
    class_mask_png: bytes | None = None
    example: bytes = b""  # the serialized tf.Example
    copied: bool = True
    repaired: list[Report] = field(default_factory=list)
    dropped: list[Report] = field(default_factory=list)


class ImageError(Exception):
    """The image cannot be used; carries the Report that says why."""

    def __init__(self, report: Report):
        super().__init__(report.line())
        self.report = report


def encode_png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16- and 32-bit grey levels are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def _fail(image: SourceImage, reason: str) -> ImageError:
    return ImageError(Report(image.key, image.item, reason))


def _open(image: SourceImage) -> tuple[bytes, Image.Image]:
    """Read the file and parse its headers (no pixels are decoded yet)."""
    try:
        with open(image.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _fail(image, f"cannot read image file: {e.strerror or e}") from None
    if not data:
        raise _fail(image, "image file is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for corrupt data
        raise _fail(image, f"not a readable image ({type(e).__name__}: {e})") from None
    return data, img


def _check_copy(image: SourceImage, data: bytes, source_format: str) -> None:
    """Make sure bytes that are copied as they are will decode, without paying for a full decode.

    PNG: every chunk's CRC is verified. JPEG: a file ending in the end-of-image marker is
    complete; one that does not (truncated, or with trailing data) is decoded in full to decide.
    """
    try:
        if source_format == "PNG":
            Image.open(io.BytesIO(data)).verify()
        elif not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
            Image.open(io.BytesIO(data)).load()
    except Exception as e:
        raise _fail(image, f"not a readable image ({type(e).__name__}: {e})") from None


def _orient(image: SourceImage, img: Image.Image, repaired: list[Report]) -> tuple[Image.Image, bool]:
    """Return the pixels in the frame the annotations were drawn in, and whether they changed.

    The annotation tool recorded the width and height of the image it showed. When the file
    carries an EXIF orientation that swaps the axes, those numbers tell whether the tool showed
    the rotated picture (then we rotate the pixels too) or the stored one (then we keep them).
    """
    raw_w, raw_h = img.size
    orientation = img.getexif().get(EXIF_ORIENTATION, 1) or 1
    want = (image.width, image.height) if image.width and image.height else None
    if want is None or want == (raw_w, raw_h):
        if orientation != 1 and want is not None:
            repaired.append(Report(image.key, image.item,
                                   f"EXIF orientation {orientation} not applied: the annotations "
                                   f"were made on the stored {raw_w}x{raw_h} pixels"))
        return img, False
    if orientation in TRANSPOSING and want == (raw_h, raw_w):
        repaired.append(Report(image.key, image.item,
                               f"EXIF orientation {orientation} applied to the pixels to match the "
                               f"annotated {want[0]}x{want[1]} frame"))
        try:
            return ImageOps.exif_transpose(img), True
        except Exception as e:  # the pixels are decoded here
            raise _fail(image, f"not a readable image ({type(e).__name__}: {e})") from None
    raise _fail(image, f"image is {raw_w}x{raw_h} pixels (EXIF orientation {orientation}) but "
                       f"the annotations say {want[0]}x{want[1]}")


def _object_rle(obj: SourceObject, width: int, height: int, image: SourceImage):
    """The object's region as one COCO RLE, or None when it has no usable polygon or RLE."""
    if obj.rle is not None:
        size = obj.rle.get("size")
        counts = obj.rle.get("counts")
        if list(size or []) != [height, width]:
            raise ValueError(f"RLE size {size} does not match the image's {height}x{width} (h x w)")
        if isinstance(counts, list):
            return mask_utils.frPyObjects(obj.rle, height, width)
        return {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    if obj.polygons:
        return mask_utils.merge(mask_utils.frPyObjects(obj.polygons, height, width))
    return None


def _encode_object(obj: SourceObject, image: SourceImage, width: int, height: int,
                   options: EncodeOptions, repaired: list[Report], dropped: list[Report]):
    where = f"{obj.item} of {image.item}"
    try:
        rle = _object_rle(obj, width, height, image)
    except (ValueError, TypeError) as e:
        dropped.append(Report(image.annotation_file, where, f"unusable mask: {e}"))
        return None
    source_box = None
    if obj.bbox is not None:
        x, y, w, h = obj.bbox
        source_box = (x, y, x + w, y + h)

    unclipped = None
    if obj.polygons:
        clipped = [geometry.clip_polygon(geometry.polygon_points(p), width, height) for p in obj.polygons]
        box = geometry.union(geometry.extent(c) for c in clipped)
        unclipped = geometry.union(geometry.extent(geometry.polygon_points(p)) for p in obj.polygons)
        if box is not None and unclipped is not None and geometry.differs(box, unclipped, 1e-6):
            repaired.append(Report(image.annotation_file, where, "polygon clipped to the image"))
    elif rle is not None:
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        box = (x, y, x + w, y + h)
    elif source_box is not None:
        box = geometry.clip_box(source_box, width, height)
        if geometry.differs(box, source_box, 1e-6):
            repaired.append(Report(image.annotation_file, where, "box clipped to the image"))
    else:
        box = None

    if box is None or box[2] - box[0] < 1.0 or box[3] - box[1] < 1.0:
        dropped.append(Report(image.annotation_file, where,
                              "object lies outside the image or is smaller than one pixel"))
        return None
    # A stale bbox (the region was edited after it was stored): compare before any clipping.
    region_extent = unclipped if obj.polygons else box
    if (obj.polygons or rle is not None) and source_box is not None and any(source_box) \
            and geometry.differs(region_extent, source_box):
        repaired.append(Report(image.annotation_file, where,
                               "stored bbox differs from the region's extent, which is used (bbox "
                               + ", ".join(f"{v:g}" for v in obj.bbox) + ")"))

    if rle is not None:
        area = float(mask_utils.area(rle))
        if area <= 0:
            dropped.append(Report(image.annotation_file, where, "region covers no pixel of the image"))
            return None
    else:
        area = (box[2] - box[0]) * (box[3] - box[1])

    mask = None
    if (options.instance_masks or options.class_mask):
        if rle is None:  # a plain box: its mask is the rectangle
            rle = mask_utils.frPyObjects([[box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]],
                                         height, width)[0]
        mask = mask_utils.decode(rle)
    return EncodedObject(box=box, label_id=obj.label_id, is_crowd=obj.is_crowd, area=area,
                         mask_png=None), mask


def class_mask(objects: list[EncodedObject], masks: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """One class id per pixel: 0 background, 1..K classes, 255 ignore.

    Overlap rule: crowd regions are painted first as 255 (ignore), then the other objects from
    the largest to the smallest area, so where objects overlap the smaller one wins (the object
    lying on top is usually the smaller one) and a labelled object overrides a crowd region.
    """
    out = np.zeros((height, width), dtype=np.uint8)
    for obj, mask in zip(objects, masks):
        if obj.is_crowd:
            out[mask > 0] = IGNORE_LABEL
    order = sorted((i for i, o in enumerate(objects) if not o.is_crowd), key=lambda i: -objects[i].area)
    for i in order:
        out[masks[i] > 0] = objects[i].label_id
    return out


def encode_image(image: SourceImage, options: EncodeOptions) -> EncodedImage:
    repaired: list[Report] = []
    dropped: list[Report] = []
    data, img = _open(image)
    source_format = img.format
    img, transformed = _orient(image, img, repaired)
    width, height = img.size

    if not transformed and source_format in COPYABLE and img.mode == "RGB":
        _check_copy(image, data, source_format)
        encoded, fmt, copied = data, COPYABLE[source_format], True
    else:
        try:
            rgb = to_rgb(img)
        except Exception as e:  # decoding happens here: corrupt pixel data
            raise _fail(image, f"not a readable image ({type(e).__name__}: {e})") from None
        out = io.BytesIO()
        if source_format in LOSSY:
            rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
            fmt = "jpeg"
        else:
            rgb.save(out, format="PNG")
            fmt = "png"
        encoded, copied = out.getvalue(), False

    objects: list[EncodedObject] = []
    masks: list[np.ndarray] = []
    for obj in image.objects:
        result = _encode_object(obj, image, width, height, options, repaired, dropped)
        if result is None:
            continue
        encoded_obj, mask = result
        if options.instance_masks:
            encoded_obj.mask_png = encode_png(mask)
        objects.append(encoded_obj)
        masks.append(mask)

    class_png = encode_png(class_mask(objects, masks, height, width)) if options.class_mask else None
    result = EncodedImage(
        key=image.key, source_id=image.source_id, encoded=encoded, format=fmt, width=width,
        height=height, sha256=hashlib.sha256(encoded).hexdigest(), objects=objects,
        class_mask_png=class_png, copied=copied, repaired=repaired, dropped=dropped)
    result.example = serialize_example(example_features(result, options.names))
    return result


def encode_or_report(args) -> EncodedImage | Report:
    """Worker entry point: a user-facing problem with the image comes back as its Report."""
    image, options = args
    try:
        return encode_image(image, options)
    except ImageError as e:
        return e.report
