"""Request bodies to RGB arrays, and the 4xx errors the services answer when a body is not a usable image.

Every check gives a `BadRequest` naming what was wrong; the services turn it into a JSON error body
({"error": "..."}) with its status, and the worker goes on serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.common import env_number

# Pillow's own format names; MPO is the multi-picture JPEG many cameras write.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 40_000_000
ORIENTATION = 0x0112  # the EXIF orientation tag


class BadRequest(Exception):
    """A request the service cannot use: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def error_response(e: BadRequest):
    """The 4xx answer to a bad request: {"error": what was wrong}."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": e.message}, status_code=e.status)


def max_pixels() -> int:
    """PIPELINES_MAX_PIXELS (width x height) read at each call; default 40 million."""
    return int(env_number("PIPELINES_MAX_PIXELS", DEFAULT_MAX_PIXELS))


def decode_image(data: bytes, what: str = "the uploaded image") -> np.ndarray:
    """uint8 RGB [h, w, 3] of an encoded image, as a person sees it (EXIF orientation applied; the first
    frame of an animation). Raises BadRequest for an empty, unknown, truncated or too large image."""
    if not data:
        raise BadRequest(f"{what} is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadRequest(f"{what} is not an image (supported: JPEG, PNG, WebP, BMP, GIF)", 415) from None
    except Image.DecompressionBombError as e:  # Pillow's own guard, at twice its pixel limit
        raise BadRequest(f"{what}: {e}", 413) from None
    except Exception as e:  # noqa: BLE001  (Pillow raises many kinds for broken headers)
        raise BadRequest(f"{what} is truncated or not a readable image ({e})") from None
    with img:
        if img.format not in FORMATS:
            raise BadRequest(f"{what} is a {img.format} image; supported: JPEG, PNG, WebP, BMP, GIF", 415)
        width, height = img.size
        limit = max_pixels()
        if width * height > limit:  # checked from the header, before any pixel is decoded
            raise BadRequest(f"{what} is {width}x{height} = {width * height} pixels, over the limit of "
                             f"{limit} (PIPELINES_MAX_PIXELS)", 413)
        if width == 0 or height == 0:
            raise BadRequest(f"{what} has no pixels ({width}x{height})")
        try:
            img.seek(0)  # the first frame of an animated GIF/WebP
            img.load()
            if img.getexif().get(ORIENTATION, 1) != 1:  # (exif_transpose copies even when upright)
                img = ImageOps.exif_transpose(img)
            rgb = img if img.mode == "RGB" else img.convert("RGB")
        except Image.DecompressionBombError as e:
            raise BadRequest(f"{what}: {e}", 413) from None
        except Exception as e:  # noqa: BLE001  (truncated data: OSError; bad chunks: SyntaxError, ValueError)
            raise BadRequest(f"{what} is truncated or corrupt ({img.format}: {e})") from None
        return np.asarray(rgb)


_DATA_URL = re.compile(r"^data:[^,]*?;base64,", re.IGNORECASE)


def base64_image(body: bytes, content_type: str = "") -> tuple[bytes, dict]:
    """The image bytes of a /detect/base64 body, and the other fields of a JSON body: base64 text (a data:
    URL too), or JSON {"image": "<base64>", ...} (what BentoML's client sends from the route's schema)."""
    if not body or not body.strip():
        raise BadRequest("empty body: send the image as base64 text, or JSON {\"image\": \"<base64>\"}")
    text, fields = body.strip(), {}
    if content_type.startswith("application/json") or text.startswith(b"{") or text.startswith(b'"'):
        try:
            payload = json.loads(text)
        except ValueError as e:
            raise BadRequest(f"body is not valid JSON ({e})") from None
        except RecursionError:
            raise BadRequest("body is JSON nested too deep (expected {\"image\": \"<base64>\"})") from None
        if isinstance(payload, dict):
            if "image" not in payload:
                raise BadRequest('JSON body has no "image" field (expected {"image": "<base64>"})')
            fields = {k: v for k, v in payload.items() if k != "image"}
            payload = payload["image"]
        if not isinstance(payload, str):
            raise BadRequest('"image" must be a base64 string')
        text = payload.strip().encode("ascii", "replace")
    text = _DATA_URL.sub("", text.decode("ascii", "replace"))
    text = re.sub(r"\s+", "", text)
    if not text:
        raise BadRequest("image is empty")
    try:
        if "-" in text or "_" in text:  # the URL-safe alphabet
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), fields
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True), fields
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"image is not valid base64 ({e})") from None


def score_threshold_of(value) -> float:
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"score_threshold must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= threshold <= 1.0:  # also false for NaN
        raise BadRequest(f"score_threshold must be between 0 and 1, got {value!r}")
    return threshold


def max_detections_of(value) -> int | None:
    if value is None or value == "":
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"max_detections must be a positive integer, got {value!r}") from None
    if count < 1:
        raise BadRequest(f"max_detections must be a positive integer, got {value!r}")
    return count


def resize_to(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB `array` stretched to size = (height, width), bilinear with half-pixel centres and no
    anti-aliasing, as the detector's serving signature resizes (tf.image.resize); unchanged when already
    that size."""
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    import cv2

    return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

