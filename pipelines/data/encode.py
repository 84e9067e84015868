"""Per-image work of the data stage, run in worker processes: no TensorFlow is imported here.

For one SourceImage it reads and checks the file, decides the pixel orientation the annotator saw,
normalises the image to 8-bit RGB JPEG or PNG (copying the bytes when they already are), turns the
annotations into clipped boxes, areas and masks, and returns plain values that the writer turns
into a tf.Example.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from pipelines.data import checks, geometry
from pipelines.data.tfrecords import example_features, serialize_example
from pipelines.data.items import Report, SourceImage, SourceObject
from pipelines.examples import IGNORE_LABEL

# Formats TensorFlow decodes and whose bytes are kept as they are (MPO is a camera JPEG).
COPYABLE = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png"}
# Sources whose pixels already went through lossy compression are re-encoded as JPEG, others as PNG.
LOSSY = {"JPEG", "MPO", "WEBP"}
JPEG_QUALITY = 95
EXIF_ORIENTATION = 0x0112
TRANSPOSING = {5, 6, 7, 8}  # EXIF orientations that swap width and height



def apply_pixel_limit(limit: int) -> None:
    """Pillow's own guard at our limit, for every decode in this process. Images over the limit are
    refused from their header before that (`_open`), so its warning would only repeat it."""
    Image.MAX_IMAGE_PIXELS = limit
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclass
class EncodeOptions:
    names: dict[int, str] = field(default_factory=dict)  # label id -> class name
    instance_masks: bool = False  # image/object/mask, one PNG per object
    class_mask: bool = False  # image/segmentation/class/encoded
    max_pixels: int = checks.DEFAULT_MAX_PIXELS  # width x height above which an image is refused
    parent_pid: int | None = None  # the data stage's process: workers end when it does


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
    invalid: list[Report] = field(default_factory=list)  # objects left out: errors unless --skip-invalid


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


def _over_limit(image: SourceImage, size: str, limit: int) -> ImageError:
    return _fail(image, f"image is {size} pixels, over the limit of {limit} (PIPELINES_MAX_PIXELS or "
                        "--max-pixels raise it)")


def _open(image: SourceImage, limit: int) -> tuple[bytes, Image.Image]:
    """Read the file and parse its headers (no pixels are decoded yet); refuse more than `limit` pixels."""
    try:
        with open(image.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _fail(image, f"cannot read image file: {e.strerror or e}") from None
    if not data:
        raise _fail(image, "image file is empty")
    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # headers only: the size is checked below
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for corrupt data
        raise _fail(image, f"not a readable image ({type(e).__name__}: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = guard
    width, height = img.size
    if width * height > limit:  # from the header, before any pixel is decoded
        raise _over_limit(image, f"{width}x{height} = {width * height}", limit)
    if width < 1 or height < 1:
        raise _fail(image, f"image has no pixels ({width}x{height})")
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
        parts = mask_utils.frPyObjects(obj.polygons, height, width)
        if obj.compound:  # coco-annotator's compound path: nonzero winding, the first polygon against the rest
            masks = mask_utils.decode(parts)
            winding = masks[..., 0].astype(np.int32) - masks[..., 1:].astype(np.int32).sum(axis=-1)
            return mask_utils.encode(np.asfortranarray((winding != 0).astype(np.uint8)))
        return mask_utils.merge(parts)
    return None


def _encode_object(obj: SourceObject, image: SourceImage, width: int, height: int,
                   options: EncodeOptions, repaired: list[Report], dropped: list[Report], invalid: list[Report]):
    where = f"{obj.item} of {image.item}"
    # Numbers pycocotools would choke on (NaN, 1e300, a huge outline, RLE runs past the mask)
    # never reach it: the object is an error, or left out with --skip-invalid.
    problem = checks.object_problem(obj, width, height)
    if problem:
        invalid.append(Report(image.annotation_file, where, problem))
        return None
    try:
        rle = _object_rle(obj, width, height, image)
    except (ValueError, TypeError, OverflowError) as e:
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

    if box is not None and not all(checks.is_finite(v) for v in box):  # cannot happen after the checks
        invalid.append(Report(image.annotation_file, where, "its box is not finite"))
        return None
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

    if (options.instance_masks or options.class_mask) and rle is None:  # a plain box: its mask is the rectangle
        rle = mask_utils.frPyObjects([[box[0], box[1], box[2], box[1], box[2], box[3], box[0], box[3]]],
                                     height, width)[0]
    # The region stays run-length encoded: it is decoded when a mask is written, one at a time.
    return EncodedObject(box=box, label_id=obj.label_id, is_crowd=obj.is_crowd, area=area,
                         mask_png=None), rle


def _decoded(mask) -> np.ndarray:
    return mask_utils.decode(mask) if isinstance(mask, dict) else mask


def class_mask(objects: list[EncodedObject], masks: list, height: int, width: int) -> np.ndarray:
    """One class id per pixel: 0 background, 1..K classes, 255 ignore (masks: arrays or COCO RLEs).

    Overlap rule: crowd regions are painted first as 255 (ignore), then the other objects from
    the largest to the smallest area, so where objects overlap the smaller one wins (the object
    lying on top is usually the smaller one) and a labelled object overrides a crowd region.
    """
    out = np.zeros((height, width), dtype=np.uint8)
    for obj, mask in zip(objects, masks):
        if obj.is_crowd:
            out[_decoded(mask) > 0] = IGNORE_LABEL
    order = sorted((i for i, o in enumerate(objects) if not o.is_crowd), key=lambda i: -objects[i].area)
    for i in order:
        out[_decoded(masks[i]) > 0] = objects[i].label_id
    return out


def encode_image(image: SourceImage, options: EncodeOptions) -> EncodedImage:
    repaired: list[Report] = []
    dropped: list[Report] = []
    invalid: list[Report] = []
    apply_pixel_limit(options.max_pixels)
    data, img = _open(image, options.max_pixels)
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
    masks: list[dict | None] = []  # RLEs: a decoded mask per object would hold objects x pixels bytes
    for obj in image.objects:
        result = _encode_object(obj, image, width, height, options, repaired, dropped, invalid)
        if result is None:
            continue
        encoded_obj, rle = result
        if options.instance_masks:
            encoded_obj.mask_png = encode_png(mask_utils.decode(rle))
        objects.append(encoded_obj)
        masks.append(rle)

    class_png = encode_png(class_mask(objects, masks, height, width)) if options.class_mask else None
    result = EncodedImage(
        key=image.key, source_id=image.source_id, encoded=encoded, format=fmt, width=width,
        height=height, sha256=hashlib.sha256(encoded).hexdigest(), objects=objects,
        class_mask_png=class_png, copied=copied, repaired=repaired, dropped=dropped, invalid=invalid)
    try:
        result.example = serialize_example(example_features(result, options.names))
    except ValueError as e:  # the writer's own guard: no non-finite number goes into a record
        raise _fail(image, str(e)) from None
    return result


_watching_parent = False


def die_with_parent(parent_pid: int | None) -> None:
    """Make this worker process end when the data stage's process does, even by SIGKILL.

    Linux: the kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG). Elsewhere a daemon
    thread polls the parent's pid. Either way, a parent that is already gone ends us at once.
    """
    global _watching_parent
    if _watching_parent or parent_pid is None or parent_pid == os.getpid():
        return
    _watching_parent = True
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        def watch():
            import time

            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def encode_or_report(args) -> EncodedImage | Report:
    """Worker entry point: a user-facing problem with the image comes back as its Report."""
    image, options = args
    die_with_parent(options.parent_pid)
    try:
        return encode_image(image, options)
    except ImageError as e:
        return e.report
