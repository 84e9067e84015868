"""The segmenter's BentoML service: /segment (JSON), /segment/mask (palette PNG), /render (PNG), /annotate
(coco-annotator's "Annotate Image"). Shared parts: pipelines/serving/app.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import bentoml
import numpy as np
from PIL import Image

from pipelines.common import env_int
from pipelines.model_store import MASK_OUTPUT
from pipelines.segmentation.predict import DEFAULT_MAX_MASK_SIDE, MAX_MASK_SIDE_ENV, nearest, working_size
from pipelines.serving.app import TIMEOUT_S, ModelService, expose, image_outputs, json_response, png_response
from pipelines.serving.images import BadRequest, error_response

# The segmenter runs at most this many pixels on a side (pipelines/segmentation/predict.py says why).
MAX_MASK_SIDE = env_int(MAX_MASK_SIDE_ENV, DEFAULT_MAX_MASK_SIDE)


def outlines(mask: np.ndarray, class_id: int, tolerance: float = 1.0) -> list[list[list[int]]]:
    """Outer outlines of a class's regions as polygons [[x, y], ...] in pixels (OpenCV's border following,
    simplified within `tolerance` pixels); holes are not listed."""
    import cv2

    binary = (mask == class_id).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        points = cv2.approxPolyDP(contour, tolerance, True)[:, 0, :]
        if len(points) >= 3:
            polygons.append(points.tolist())
    return polygons


def segments(mask: np.ndarray, labels: dict[int, str]) -> list[dict]:
    from pipelines.segmentation.predict import class_pixels

    classes = class_pixels(mask, labels)
    for c in classes:
        c["polygons"] = outlines(mask, c["class_id"]) if c["class_id"] != 0 else []
    return classes


@bentoml.service(name="segmenter", traffic={"timeout": TIMEOUT_S})
class Segmenter(ModelService):
    """Class masks of an exported segmenter: /segment (JSON), /segment/mask (palette PNG), /render (PNG)."""

    task = "segmentation"
    outputs = (MASK_OUTPUT,)

    async def _mask(self, image: Path) -> tuple[np.ndarray, np.ndarray]:
        fit = lambda height, width: working_size(height, width, MAX_MASK_SIDE)  # noqa: E731
        array, small, outputs = await image_outputs(self, image, fit)
        mask = outputs[MASK_OUTPUT]
        if small is array:
            return array, mask
        return array, await asyncio.to_thread(nearest, mask, array.shape[:2])

    @bentoml.api(route="/segment")
    async def segment(self, image: Path) -> dict:
        """Multipart `image` file -> {"width", "height", "classes": [{"label", "class_id", "pixels", "fraction",
        "polygons": [[[x, y], ...], ...]}], "model": {"name", "version"}}."""
        try:
            array, mask = await self._mask(image)
        except BadRequest as e:
            return error_response(e)
        classes = await asyncio.to_thread(segments, mask, self.model.labels)
        return json_response({"width": int(array.shape[1]), "height": int(array.shape[0]), "classes": classes,
                              "model": self.model.info})

    @bentoml.api(route="/annotate")
    async def annotate(self, image: Path, ctx: bentoml.Context) -> dict:
        """coco-annotator's "Annotate Image": multipart `image` (query: min_area, pixels) -> {"coco": {"images",
        "categories", "annotations"}}: each connected region of a class of at least min_area pixels (default
        PIPELINES_ANNOTATE_MIN_AREA) drafted as its outline and its holes' polygons; "message" when none is."""
        from pipelines.annotator.drafts import coco_answer, default_min_area, region_annotations

        try:
            min_area = ctx.request.query_params.get("min_area")
            try:
                min_area = default_min_area() if min_area is None else int(min_area)
            except ValueError:
                raise BadRequest(f"min_area: expected a whole number of pixels, got {min_area[:40]!r}") from None
            if min_area < 0:
                raise BadRequest(f"min_area: expected 0 or more pixels, got {min_area}")
            array, mask = await self._mask(image)
        except BadRequest as e:
            ctx.response.status_code = e.status
            return error_response(e)
        model = f"{self.model.info['name']}:{self.model.info['version']}"
        drafts = await asyncio.to_thread(region_annotations, mask, min_area, model)
        return json_response(coco_answer(array.shape[1], array.shape[0], drafts, self.model.labels,
                                         f"the model found no region of {min_area} pixels or more"))

    @bentoml.api(route="/segment/mask")
    async def segment_mask(self, image: Path) -> Image.Image:
        """Multipart `image` file -> palette PNG at the image's size whose pixel values are class ids."""
        from pipelines.viz import mask_image

        try:
            _, mask = await self._mask(image)
        except BadRequest as e:
            return error_response(e)
        return png_response(mask_image(mask))

    @bentoml.api(route="/render")
    async def render(self, image: Path) -> Image.Image:
        """Multipart `image` file -> PNG of the image with its classes tinted and outlined."""
        from pipelines.viz import overlay

        try:
            array, mask = await self._mask(image)
        except BadRequest as e:
            return error_response(e)
        return png_response(Image.fromarray(await asyncio.to_thread(overlay, array, mask)))


expose(Segmenter, {"/segment": "image", "/segment/mask": "image", "/render": "image", "/annotate": "image"})
Service = Segmenter
