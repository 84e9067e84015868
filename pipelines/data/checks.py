"""Checks of the numbers in an annotation file, before anything rasterises, draws or writes them.

Python's json accepts NaN, Infinity and 1e400 (read as infinity), so any export can carry them, and
pycocotools, which rasterises polygons in C, exhausts memory or crashes on them: it walks every
edge in 1/5-pixel steps (about 40 bytes per pixel of outline) and casts coordinates to C ints.
So every number is checked here first:

- in the readers: every number must be finite (`finite_reason`);
- per image, once its real size is known: coordinates within a sane multiple of the image size,
  an outline short enough to rasterise, RLE counts that cover exactly the pixels of the RLE's
  size (`object_problem`).

Also here: the pixel limit on images (`max_pixels`), shared in name and default with the server.
"""

from __future__ import annotations

import math
import os

from pipelines.workspace import UserError

# A coordinate may lie this many image widths (heights) outside the image: annotators let people
# drag a point past the border, never by more than an image size or so.
COORDINATE_MULTIPLE = 10
# pycocotools upsamples coordinates 5x into C ints: stay far below 2**31 / 5.
COORDINATE_LIMIT = 100_000_000
# The total outline (sum of max(|dx|, |dy|) over the edges) of one object's polygons, in pixels:
# about 200 MB of pycocotools' working memory. A real polygon stays far below it.
OUTLINE_LIMIT = 5_000_000
# Same name and default as the server (pipelines/serving/images.py).
MAX_PIXELS_ENV = "PIPELINES_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 40_000_000


def max_pixels(value: int | None = None) -> int:
    """The pixel limit (width x height) for images: `value`, else PIPELINES_MAX_PIXELS, else 40 million."""
    if value is not None:
        if value < 1:
            raise UserError(None, f"--max-pixels {value} must be at least 1")
        return int(value)
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(float(raw))
    except (ValueError, OverflowError):
        limit = 0
    if limit < 1:
        raise UserError(None, f"{MAX_PIXELS_ENV}={raw!r} is not a positive number of pixels")
    return limit


# What shows nothing besides whitespace (str.isspace): the zero-width characters str.strip() keeps.
_INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad")


def blank_name(name: str) -> str | None:
    """Why a class name is no name (empty, or only spaces and invisible characters), else None."""
    if name == "":
        return "empty name"
    if all(c.isspace() or c in _INVISIBLE for c in name):
        return f"blank name {name!r} (only spaces or invisible characters)"
    return None


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """A JSON number that is finite as a float (a 400-digit integer is not)."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def show(value) -> str:
    """A number as a message shows it: NaN, Infinity, 1e+300, a long integer cut short."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return f"{value:g}"
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


def finite_reason(values, what: str) -> str | None:
    """None when every value is a finite number, else why not (naming the first bad one)."""
    for i, v in enumerate(values):
        if not is_finite(v):
            return f"{what} value {i} is {show(v)}, not a finite number"
    return None


def numbers_in(value, limit: int = 1_000_000):
    """Every number in a nested list (keypoints, polygons), at most `limit` of them."""
    stack = [value]
    seen = 0
    while stack and seen < limit:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))
        elif is_number(v):
            seen += 1
            yield v


def _coordinate_problem(values, width: int, height: int, what: str) -> str | None:
    """x, y pairs within COORDINATE_MULTIPLE image sizes of the image (and finite)."""
    for i, v in enumerate(values):
        size = width if i % 2 == 0 else height
        reach = min(COORDINATE_MULTIPLE * size, COORDINATE_LIMIT)
        if not is_finite(v):
            return f"{what} value {i} is {show(v)}, not a finite number"
        if not -reach <= v <= size + reach:
            return (f"{what} value {i} is {show(v)}, more than {COORDINATE_MULTIPLE} image "
                    f"{'widths' if i % 2 == 0 else 'heights'} outside the {width}x{height} image")
    return None


def outline_length(polygon: list[float]) -> float:
    """Sum of max(|dx|, |dy|) over the closed polygon's edges: what pycocotools walks."""
    total = 0.0
    n = len(polygon) // 2
    for i in range(n):
        j = (i + 1) % n
        total += max(abs(polygon[2 * j] - polygon[2 * i]), abs(polygon[2 * j + 1] - polygon[2 * i + 1]))
    return total


def rle_string_counts(text: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string, decoded as pycocotools does (None: malformed).

    Each count is a little-endian sequence of 5-bit groups (characters '0'..'o', bit 0x20 =
    more follows, bit 0x10 of the last group = negative); from the third count on it is a
    difference to the count two places before.
    """
    counts: list[int] = []
    p, n = 0, len(text)
    while p < n:
        x = k = 0
        more = True
        while more:
            if p >= n or k >= 7:
                return None
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x -= 1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x & 0xFFFFFFFF)  # pycocotools stores them as uint32
    return counts


def rle_problem(rle: dict) -> str | None:
    """Why an RLE's size or counts are malformed: its runs must cover exactly size[0] x size[1] pixels.

    (pycocotools decodes runs into an h x w buffer without checking their sum.) Whether that size
    is the image's is the caller's business.
    """
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
        shown = ", ".join(show(v) if is_number(v) else repr(v)[:20] for v in size) if isinstance(size, list) else ""
        return f"RLE size [{shown}] is not [height, width] in pixels"
    height, width = size
    if isinstance(counts, list):
        bad = next((v for v in counts if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0)), None)
        if bad is not None:
            return f"RLE counts hold {show(bad) if is_number(bad) else repr(bad)[:20]}, not a number of pixels"
        runs = counts
    elif isinstance(counts, str):
        runs = rle_string_counts(counts)
        if runs is None:
            return "RLE counts is not a valid compressed COCO RLE string"
    else:
        return "RLE counts must be a list of integers or a compressed string"
    total = sum(runs)
    if total != height * width:
        return f"RLE counts cover {show(total)} pixels, not the {height}x{width} = {height * width} of its size"
    return None


def object_problem(obj, width: int, height: int) -> str | None:
    """Why a SourceObject cannot be rasterised or written for a width x height image (None: it can)."""
    if obj.bbox is not None:
        x, y, w, h = obj.bbox
        problem = _coordinate_problem([x, y, x + w, y + h], width, height, "bbox corner")
        if problem:
            return problem
        if not all(is_finite(v) for v in (w, h)):
            return "bbox size is not finite"
    if obj.rle is not None:
        return rle_problem(obj.rle)
    outline = 0.0
    for n, polygon in enumerate(obj.polygons):
        problem = _coordinate_problem(polygon, width, height, f"polygon {n}")
        if problem:
            return problem
        outline += outline_length(polygon)
    if outline > OUTLINE_LIMIT:
        return (f"its polygons' outline is {outline:.0f} pixels long, over the limit of {OUTLINE_LIMIT} "
                f"for a {width}x{height} image")
    return None
