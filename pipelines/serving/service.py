"""The HTTP services of an export: `bentoml serve pipelines.serving.service:Service`.

PIPELINES_MODEL names the model: an export folder (workspace/RUN/export, or its saved_model/) or a
BentoML model tag (`RUN` or `RUN:version`, from the store under $BENTOML_HOME). Its metadata.json
"task" picks the service: `Detector` (/detect, /detect/base64, /render, /annotate) or `Segmenter`
(/segment, /segment/mask, /render, /annotate); `Service` is the one for PIPELINES_MODEL.

/annotate answers coco-annotator's "Annotate Image" button (pipelines/annotator/drafts.py): the annotator's page
posts from another origin, so the services answer CORS requests from the origins PIPELINES_CORS_ORIGINS
lists (comma-separated; default DEFAULT_CORS_ORIGINS, the annotator of docker/compose.annotator.yml).

Each public route decodes and checks its image, then hands it to the worker's batcher: BentoML's adaptive
batching dispatcher (the CORK algorithm its batchable APIs use) run in-process on decoded arrays, so that
concurrent requests share one forward pass without a second HTTP hop per request (PIPELINES_MAX_BATCH_SIZE,
PIPELINES_MAX_LATENCY_MS; batch sizes in /metrics as pipelines_inference_batch_size). The model is loaded
and run once on a blank image when the worker starts; /readyz answers 200 only after that. A bad request
gets a 4xx with {"error": "what was wrong"} and the worker goes on serving.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Optional

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)

import bentoml
import numpy as np
from PIL import Image
from pydantic import Field
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from pipelines.model_store import DETECTION_OUTPUTS, INPUT_NAME, MASK_OUTPUT
from pipelines.segmentation.predict import DEFAULT_MAX_MASK_SIDE, MAX_MASK_SIDE_ENV, nearest, working_size
from pipelines.common import env_int
from pipelines.serving import guard
from pipelines.serving.batcher import MAX_BATCH_SIZE, MAX_LATENCY_MS, Batcher, Overloaded
from pipelines.serving.workers import worker_temp_dir
from pipelines.serving.images import (BadRequest, base64_image, decode_image, error_response, max_detections_of,
                                      png_bytes, resize_to, score_threshold_of)

MODEL_ENV = "PIPELINES_MODEL"


# The segmenter runs at most this many pixels on a side (pipelines/segmentation/predict.py says why).
MAX_MASK_SIDE = env_int(MAX_MASK_SIDE_ENV, DEFAULT_MAX_MASK_SIDE)
TIMEOUT_S = env_int("PIPELINES_TIMEOUT_S", 120)
CORS_ENV = "PIPELINES_CORS_ORIGINS"
DEFAULT_CORS_ORIGINS = ("http://localhost:5000", "http://127.0.0.1:5000")


def cors_origins() -> list[str]:
    """The origins whose pages may call the services (PIPELINES_CORS_ORIGINS, comma-separated)."""
    raw = os.environ.get(CORS_ENV)
    if raw is None:
        return list(DEFAULT_CORS_ORIGINS)
    return [origin.strip().rstrip("/") for origin in raw.split(",") if origin.strip()]


# ---------------------------------------------------------------------------------------------- model


class ModelNotFound(RuntimeError):
    pass


def resolve_model(spec: str | None = None) -> tuple[Path, str, str]:
    """(export folder, model name, version) for PIPELINES_MODEL: a folder path or a BentoML model tag."""
    spec = spec if spec is not None else os.environ.get(MODEL_ENV, "")
    if not spec:
        raise ModelNotFound(f"set {MODEL_ENV} to an export folder (workspace/RUN/export) or a BentoML model tag")
    path = Path(spec).expanduser()
    if path.exists():
        folder = path.parent if (path / "saved_model.pb").is_file() else path
        if not (folder / "saved_model" / "saved_model.pb").is_file():
            raise ModelNotFound(f"{spec}: no saved_model/ here: give workspace/RUN/export (run `make export` first)")
        from pipelines.model_store import export_identity

        return folder, *export_identity(folder)
    from pipelines.model_store import model_store

    try:
        model = model_store().get(spec)
    except Exception as e:  # noqa: BLE001  (NotFound, a malformed tag)
        raise ModelNotFound(f"{spec}: neither a folder nor a model in the BentoML store ({e})") from None
    return Path(model.path), model.tag.name, model.tag.version


def model_task(spec: str | None = None) -> str:
    """The task of PIPELINES_MODEL's metadata ("detection" when unset or unreadable: Detector then
    reports the problem when it starts)."""
    from pipelines.model_store import read_metadata

    try:
        folder, _, _ = resolve_model(spec)
        return (read_metadata(folder) or {}).get("task", "detection")
    except Exception:  # noqa: BLE001
        return "detection"


def _service_of_task(name: str):
    """The registry's service class of task `name` (the detector for a task this version does not know:
    it then refuses the model at start with one clear line)."""
    from pipelines import tasks

    try:
        task = tasks.get(name)
    except ValueError:
        return Detector
    return task.load("service")  # this module, already in sys.modules


def check_model(task: str) -> tuple[Path, str, str, dict]:
    """(folder, name, version, metadata) of PIPELINES_MODEL, which must be a `task` export; fast (no
    TensorFlow), so that a wrong model stops the worker at once with one clear line."""
    from pipelines.model_store import read_metadata

    folder, name, version = resolve_model()
    metadata = read_metadata(folder) or {"task": "detection"}
    if metadata.get("task", "detection") != task:
        raise ModelNotFound(f"{folder}: a {metadata.get('task')} export, not a {task} one "
                            "(serve pipelines.serving.service:Service to pick by the export's task)")
    return folder, name, version, metadata


class LoadedModel:
    """The export's serving signature, label map and identity, loaded once per worker."""

    def __init__(self, task: str, keys: tuple[str, ...]):
        import tensorflow as tf

        folder, self.name, self.version, metadata = check_model(task)
        self.task = task
        self.metadata = metadata
        self.labels = {int(k): v for k, v in (metadata.get("label_map") or {}).items()}
        if not self.labels and (folder / "label_map.pbtxt").is_file():
            from pipelines.data.label_map import read_label_map

            self.labels = read_label_map(folder / "label_map.pbtxt")
        self.serve = tf.saved_model.load(str(folder / "saved_model")).signatures["serving_default"]
        self.keys = keys  # the signature's outputs the service uses
        size = metadata.get("input_size") or [320, 320]
        self.input_size = (int(size[0]), int(size[1]))  # (height, width) the network runs at
        # Warm-up: the first call of a signature builds its graph; no request should pay for it.
        self.run([np.zeros((*self.input_size, 3), np.uint8)])
        print(f"serving {task} model {self.name}:{self.version} from {folder} "
              f"(batches up to {MAX_BATCH_SIZE}, {MAX_LATENCY_MS} ms)", file=sys.stderr, flush=True)

    @property
    def info(self) -> dict:
        return {"name": self.name, "version": self.version}

    def run(self, arrays: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The model on images of any sizes: one call per distinct size, outputs per image in order."""
        import tensorflow as tf

        results: list[dict | None] = [None] * len(arrays)
        groups: dict[tuple, list[int]] = {}
        for i, array in enumerate(arrays):
            groups.setdefault(array.shape, []).append(i)
        for indices in groups.values():
            batch = tf.constant(np.stack([arrays[i] for i in indices]))
            outputs = self.serve(**{INPUT_NAME: batch})
            outputs = {key: outputs[key].numpy() for key in self.keys}
            for j, i in enumerate(indices):
                results[i] = {key: value[j] for key, value in outputs.items()}
        if MASK_OUTPUT in self.keys:  # fewer bytes across the inner API
            for r in results:
                if r[MASK_OUTPUT].max(initial=0) < 256:
                    r[MASK_OUTPUT] = r[MASK_OUTPUT].astype(np.uint8)
        return results



# ------------------------------------------------------------------------------------------- helpers


def json_response(body) -> JSONResponse:
    """A route's JSON answer, serialised directly (BentoML's own path validates the returned dict through
    pydantic first: several ms for a hundred detections)."""
    return JSONResponse(body)


def png_response(image: Image.Image) -> Response:
    return Response(png_bytes(image), media_type="image/png")


def _load(image: Path | bytes, what: str, fit) -> tuple[np.ndarray, np.ndarray]:
    """(the image as a person sees it, the array the model takes: stretched to fit(height, width) unless
    that is None); read, decode and resize in one worker thread, one hop from the event loop."""
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
    array = decode_image(data, what)
    size = fit(*array.shape[:2])
    return array, (array if size is None else resize_to(array, size))


async def load_image(image: Path | bytes | None, fit=lambda height, width: None,
                     what: str = "the uploaded image") -> tuple[np.ndarray, np.ndarray]:
    """An upload (its temporary file) or decoded bytes -> (image, model input); see _load."""
    if image is None:
        raise BadRequest('no image: send it as the multipart file field "image"')
    return await asyncio.to_thread(_load, image, what, fit)


async def model_outputs(service, array: np.ndarray) -> dict[str, np.ndarray]:
    """One image through the worker's batcher (run with whatever other requests are waiting)."""
    service.ready_model()
    try:
        return await service.batcher(array)
    except Overloaded as e:
        raise BadRequest(str(e), status=503) from None


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


# ------------------------------------------------------------------------------------------- workers


class ModelService:
    """What the detector and the segmenter services share: the model checked at once (a wrong one stops
    the worker with one line), then loaded and warmed up in the background while the worker already
    answers: /readyz 503 and the routes 503 until it is ready, not a connection that hangs."""

    task = ""
    outputs: tuple[str, ...] = ()  # the signature's outputs it uses

    def __init__(self) -> None:
        import threading

        self.temp_dir = worker_temp_dir()
        check_model(self.task)
        self.model: LoadedModel | None = None
        self.batcher = Batcher(None)
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            model = LoadedModel(self.task, self.outputs)
        except BaseException:  # noqa: BLE001  (the worker cannot serve without it)
            import traceback

            traceback.print_exc()
            print(f"the {self.task} model could not be loaded: stopping this worker", file=sys.stderr, flush=True)
            os._exit(3)
        self.batcher.model = model
        self.model = model

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.on_shutdown
    def remove_temp_dir(self) -> None:
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def ready_model(self) -> LoadedModel:
        if self.model is None:
            raise BadRequest("the model is still loading: retry when GET /readyz answers 200", status=503)
        return self.model


# ------------------------------------------------------------------------------------------ detection


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
        array, small = await load_image(image, lambda height, width: input_size, what)
        outputs = await model_outputs(self, small)
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


# --------------------------------------------------------------------------------------- segmentation


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
        array, small = await load_image(image, lambda height, width: working_size(height, width, MAX_MASK_SIDE))
        mask = (await model_outputs(self, small))[MASK_OUTPUT]
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


for _service in (Detector, Segmenter):
    # Outside the guard (the first middleware added is the outermost), so that a browser's preflight, which
    # carries no credentials, is answered, and the guard's refusals carry the CORS headers the page needs.
    _service.add_asgi_middleware(CORSMiddleware, allow_origins=cors_origins(), allow_methods=["GET", "POST"],
                                 allow_headers=["authorization", "content-type"], max_age=600)
guard.install(Detector, {"/detect": "image", "/render": "image", "/annotate": "image"})
guard.install(Segmenter, {"/segment": "image", "/segment/mask": "image", "/render": "image", "/annotate": "image"})

# The service for PIPELINES_MODEL's task (its `service` in pipelines/tasks.py):
# `bentoml serve pipelines.serving.service:Service`.
Service = _service_of_task(model_task())
