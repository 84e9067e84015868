"""What every task's BentoML service shares (each task's own class is in its package: service.py).

PIPELINES_MODEL names the model: an export folder (workspace/RUN/export, or its saved_model/) or a
BentoML model tag (`RUN` or `RUN:version`, from the store under $BENTOML_HOME); pipelines/serving/service.py
serves the class of its task. A task's service is a `ModelService`: the model checked when the worker
starts (a wrong one stops it with one line), then loaded and warmed up in the background while /readyz
answers 503; each route decodes and checks its image (`image_outputs`), then hands it to the worker's
batcher (pipelines/serving/batcher.py: BentoML's adaptive batching run in-process on decoded arrays, so
that concurrent requests share one forward pass; PIPELINES_MAX_BATCH_SIZE, PIPELINES_MAX_LATENCY_MS; batch
sizes in /metrics as pipelines_inference_batch_size). `expose` puts CORS and the request guard in front of
it. A bad request gets a 4xx with {"error": "what was wrong"} and the worker goes on serving.

/annotate answers coco-annotator's "Annotate Image" button (pipelines/annotator/drafts.py): the annotator's page
posts from another origin, so the services answer CORS requests from the origins PIPELINES_CORS_ORIGINS
lists (comma-separated; default DEFAULT_CORS_ORIGINS, the annotator of docker/compose.annotator.yml).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)

import bentoml
import numpy as np
from PIL import Image
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from pipelines.model_store import INPUT_NAME, MASK_OUTPUT
from pipelines.common import env_int, start_tensorflow
from pipelines.serving import guard
from pipelines.serving.hardening import upload_bytes
from pipelines.serving.batcher import MAX_BATCH_SIZE, MAX_LATENCY_MS, Batcher, Overloaded
from pipelines.serving.workers import worker_temp_dir
from pipelines.serving.images import BadRequest, decode_image, png_bytes, resize_to

MODEL_ENV = "PIPELINES_MODEL"
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


def model_task(spec: str | None = None) -> str | None:
    """The task of PIPELINES_MODEL's metadata; None when it is unset or unreadable (the service then
    reports the problem when its worker starts)."""
    from pipelines import tasks
    from pipelines.model_store import read_metadata

    try:
        folder, _, _ = resolve_model(spec)
        return tasks.name_in(read_metadata(folder))
    except Exception:  # noqa: BLE001
        return None

def check_model(task: str) -> tuple[Path, str, str, dict]:
    """(folder, name, version, metadata) of PIPELINES_MODEL, which must be a `task` export; fast (no
    TensorFlow), so that a wrong model stops the worker at once with one clear line."""
    from pipelines.model_store import read_metadata

    from pipelines import tasks

    folder, name, version = resolve_model()
    metadata = read_metadata(folder) or {}
    if tasks.name_in(metadata) != task:
        raise ModelNotFound(f"{folder}: a {tasks.name_in(metadata)} export, not a {task} one "
                            "(serve pipelines.serving.service:Service to pick by the export's task)")
    return folder, name, version, metadata


class LoadedModel:
    """The export's serving signature, label map and identity, loaded once per worker."""

    def __init__(self, task: str, keys: tuple[str, ...]):
        tf = start_tensorflow()

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
    data = upload_bytes(image)
    array = decode_image(data, what)
    size = fit(*array.shape[:2])
    return array, (array if size is None else resize_to(array, size))


async def image_outputs(service, image: Path | bytes | None, fit=lambda height, width: None,
                        what: str = "the uploaded image") -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """An upload (its bytes or temporary file) -> (the image, the model input: see _load, the model's outputs
    for it), through the worker's batcher (run with whatever other requests are waiting)."""
    if image is None:
        raise BadRequest('no image: send it as the multipart file field "image"')
    service.ready_model()

    def prepare():
        array, small = _load(image, what, fit)
        return (array, small), small

    try:
        (array, small), outputs = await service.batcher.prepared(prepare)
    except Overloaded as e:
        raise BadRequest(str(e), status=503) from None
    return array, small, outputs

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


def expose(service, file_fields: dict[str, str]) -> None:
    """CORS and the request guard (pipelines/serving/guard.py) in front of a task's service class;
    `file_fields`: route -> its multipart file field."""
    # CORS outside the guard (the first middleware added is the outermost), so that a browser's preflight,
    # which carries no credentials, is answered, and the guard's refusals carry the CORS headers the page needs.
    service.add_asgi_middleware(CORSMiddleware, allow_origins=cors_origins(), allow_methods=["GET", "POST"],
                                allow_headers=["authorization", "content-type"], max_age=600)
    guard.install(service, file_fields)
