"""The detector's BentoML service: /detect (JSON), /detect/base64 (function-style JSON), /render (PNG),
/annotate (coco-annotator's "Annotate Image"). Shared parts: pipelines/serving/app.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import bentoml
import numpy as np
from PIL import Image
from pydantic import Field

from pipelines.model_store import DETECTION_OUTPUTS
from pipelines.serving.app import (TIMEOUT_S, LoadedModel, ModelService, expose, image_outputs, json_response,
                                   png_response)
from pipelines.serving.images import (BadRequest, base64_image, error_response, max_detections_of,
                                      score_threshold_of)


class Base64Body(bentoml.IODescriptor):
    """/detect/base64's body as its schema declares it (JSON; what BentoML's client and generated clients
    send). The route itself reads the raw body (ctx.request), so that it also takes plain base64 text, and
    answers a body it cannot use with our own error messages instead of BentoML's validation report."""

    image: str = Field(description="the image file's bytes as base64 (standard or URL-safe; a data: URL too)")
    score_threshold: Optional[float] = Field(None, description="the export's threshold when not given")
    max_detections: Optional[int] = Field(None, description="at most this many detections, best first")

    @classmethod
    async def from_http_request(cls, request, serde):  # noqa: ARG003
        return cls.model_construct(image="", score_threshold=None, max_detections=None)


def _detections(model: LoadedModel, outputs: dict, width: int, height: int, score_threshold: float,
                max_detections: int | None) -> list[dict]:
    from pipelines.detection.predict import detections_of

    batched = {key: value[None] for key, value in outputs.items()}
    found = detections_of(batched, width, height, model.labels, score_threshold)
    return found[:max_detections] if max_detections else found


@bentoml.service(name="detector", traffic={"timeout": TIMEOUT_S})
class Detector(ModelService):
    """Boxes of an exported detector: /detect (JSON), /detect/base64 (JSON list), /render (PNG)."""

    task = "detection"
    outputs = DETECTION_OUTPUTS

    def threshold(self, score_threshold) -> float:
        """The request's score_threshold, checked; without one the export's default (chosen on the val set)."""
        from pipelines.detection.predict import default_score_threshold

        if score_threshold is None:
            return default_score_threshold(self.ready_model().metadata)
        return score_threshold_of(score_threshold)

    async def _find(self, image: Path | bytes | None, threshold: float, max_detections,
                    what: str = "the uploaded image") -> tuple[np.ndarray, list[dict]]:
        """(the decoded image, its detections)."""
        count = max_detections_of(max_detections)
        # The detector's signature stretches any image to its input size (bilinear) and answers boxes in
        # [0, 1] of the image: stretching it here the same way first gives the same boxes, while every
        # request then has the same shape (one forward pass per batch, not per distinct photo size) and
        # crosses the inner API as input-size pixels instead of the full photo.
        input_size = self.ready_model().input_size
        array, _, outputs = await image_outputs(self, image, lambda height, width: input_size, what)
        return array, _detections(self.model, outputs, array.shape[1], array.shape[0], threshold, count)

    @bentoml.api(route="/detect")
    async def detect(self, image: Path, score_threshold: float | None = None,
                     max_detections: int | None = None) -> dict:
        """Multipart `image` file -> {"detections": [{"label", "class_id", "score", "box": {"xmin", "ymin",
        "xmax", "ymax"}}], "width", "height", "score_threshold", "model": {"name", "version"}}; boxes in the
        image's pixels. score_threshold: the export's (chosen on the val set) unless the request gives one."""
        try:
            threshold = self.threshold(score_threshold)
            array, found = await self._find(image, threshold, max_detections)
        except BadRequest as e:
            return error_response(e)
        return json_response({"detections": found, "width": int(array.shape[1]), "height": int(array.shape[0]),
                              "score_threshold": threshold, "model": self.model.info})

    @bentoml.api(route="/detect/base64", input_spec=Base64Body)
    async def detect_base64(self, ctx: bentoml.Context, **_declared) -> list:
        """Body: the image as base64 text, or JSON {"image": "<base64>", "score_threshold", "max_detections"}
        (or those two in the query) -> [{"class", "confidence", "xmin", "ymin", "xmax", "ymax"}] in pixels."""
        request = ctx.request
        try:
            body = await request.body()
            data, fields = base64_image(body, request.headers.get("content-type", ""))
            options = {**request.query_params, **{k: v for k, v in fields.items() if v is not None}}
            _, found = await self._find(data, self.threshold(options.get("score_threshold")),
                                        options.get("max_detections"), "the decoded base64 image")
        except BadRequest as e:
            ctx.response.status_code = e.status  # BentoML gives a ctx route's response the ctx's status
            return error_response(e)
        return json_response([{"class": d["label"], "confidence": d["score"], **d["box"]} for d in found])

    @bentoml.api(route="/annotate")
    async def annotate(self, image: Path, ctx: bentoml.Context) -> dict:
        """coco-annotator's "Annotate Image": multipart `image` (query: score_threshold, max_detections) ->
        {"coco": {"images", "categories", "annotations"}}: each detection a box drafted as its 4-corner polygon
        with isbbox, its score in the annotation's metadata; "message" when nothing is found."""
        from pipelines.annotator.drafts import box_annotation, coco_answer

        try:
            query = ctx.request.query_params
            threshold = self.threshold(query.get("score_threshold"))
            array, found = await self._find(image, threshold, query.get("max_detections"))
        except BadRequest as e:
            ctx.response.status_code = e.status
            return error_response(e)
        model = f"{self.model.info['name']}:{self.model.info['version']}"
        drafts = [box_annotation(d["box"], d["class_id"], d["score"], model) for d in found]
        return json_response(coco_answer(array.shape[1], array.shape[0], drafts, self.model.labels,
                                         f"the model found nothing at score >= {threshold:.3g}"))

    @bentoml.api(route="/render")
    async def render(self, image: Path, score_threshold: float | None = None,
                     max_detections: int | None = None) -> Image.Image:
        """Multipart `image` file -> PNG of the image with its boxes drawn."""
        from pipelines.viz import draw_detections as draw

        try:
            threshold = self.threshold(score_threshold)
            array, found = await self._find(image, threshold, max_detections)
        except BadRequest as e:
            return error_response(e)
        return png_response(await asyncio.to_thread(draw, array, found))


expose(Detector, {"/detect": "image", "/render": "image", "/annotate": "image"})
Service = Detector
