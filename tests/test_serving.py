"""The BentoML services for real: tiny exports, a real server on a free port, HTTP requests."""

from __future__ import annotations

import os
from pathlib import Path

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)

LABELS = {1: "circle", 2: "square", 3: "triangle"}


def _label_map(path: Path) -> Path:
    path.write_text("".join(f"item {{\n  id: {i}\n  name: '{n}'\n}}\n" for i, n in LABELS.items()))
    return path


def make_detector(run_dir: Path) -> Path:
    """An untrained tiny detector (random weights) exported by the real export stage; returns the export folder."""
    import tensorflow as tf
    import tf_keras

    from pipelines.engine.export import export
    from pipelines.detection.params import DetectorParams
    from pipelines.detection.model import build_model

    run_dir.mkdir(parents=True, exist_ok=True)
    tf_keras.utils.set_random_seed(3)
    params = DetectorParams(num_classes=3, image_height=64, image_width=64, depth_multiplier=0.35,
                            fpn_num_filters=8, head_num_filters=8, head_num_convs=1,
                            train_files=[str(run_dir / "none-*.tfrecord")], eval_files=[str(run_dir / "none-*.tfrecord")],
                            label_map_path=str(_label_map(run_dir / "label_map.pbtxt")))
    model = build_model(params)
    checkpoint = tf.train.Checkpoint(model=model).write(str(run_dir / "train" / "ckpt-1"))
    export(params, run_dir, params.label_map_path, name="tiny-detector", checkpoint=checkpoint, log=lambda *_: None)
    return run_dir / "export"


def make_segmenter(run_dir: Path) -> Path:
    import tensorflow as tf

    from pipelines.engine.export import export
    from pipelines.segmentation.model import build_model
    from pipelines.segmentation.params import SegmenterParams

    run_dir.mkdir(parents=True, exist_ok=True)
    tf.keras.utils.set_random_seed(4)
    params = SegmenterParams(num_classes=3, architecture="unet", backbone="efficientnetb0", image_height=64,
                             image_width=64, decoder_filters=[8, 8, 8, 8, 8],
                             train_files=[str(run_dir / "none-*.tfrecord")], eval_files=[str(run_dir / "none-*.tfrecord")],
                             label_map_path=str(_label_map(run_dir / "label_map.pbtxt")))
    model = build_model(params, load_encoder_weights=False)
    checkpoint = tf.train.Checkpoint(model=model).write(str(run_dir / "train" / "ckpt-1"))
    export(params, run_dir, params.label_map_path, name="tiny-segmenter", checkpoint=checkpoint, log=lambda *_: None)
    return run_dir / "export"


# ------------------------------------------------------------------------------------------- servers

import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
from pipelines.serving.process import free_port  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MAX_PIXELS = 1_000_000
TOKEN = "t0ken-for-tests"


class Server:
    """A server started as `make serve RUN=...` or `make serve MODEL=tag` does (make=...: its variables), or by
    the module under it (`python -m pipelines.serving.serve`) with PIPELINES_MODEL=model."""

    def __init__(self, model: str | None, bento_home: Path, log: Path, make: dict | None = None, **extra_env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "BENTOML_HOME": str(bento_home),
               "PIPELINES_MAX_PIXELS": str(MAX_PIXELS), "PIPELINES_MAX_BATCH_SIZE": "8",
               "PIPELINES_MAX_LATENCY_MS": "20000", "BENTOML_DO_NOT_TRACK": "True", **extra_env}
        if make is None:
            command = [sys.executable, "-m", "pipelines.serving.serve", "pipelines.serving.service:Service",
                       "--host", "127.0.0.1", "--port", str(self.port)]
            env["PIPELINES_MODEL"] = model
        else:
            command = ["make", "-s", "--no-print-directory", "serve", f"PORT={self.port}",
                       *(f"{k}={v}" for k, v in make.items())]
        self.log = log
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> list[int]:
        """Poll /readyz until 200; returns the statuses seen (connection refused counts as 0)."""
        seen, deadline = [], time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                status = httpx.get(self.url + "/readyz", timeout=5).status_code
            except httpx.HTTPError:
                status = 0
            seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.5)
        raise AssertionError(f"not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self):
        """SIGTERM to the server's process group (make, the server, its workers), as Ctrl-C in a terminal would."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


STORED_THRESHOLD = 0.0105
SLOW_LIMIT_S = 2  # the locked server's header and body time limits


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A detector served from its export folder and a segmenter from its BentoML tag, both ready."""
    root = tmp_path_factory.mktemp("serving")
    bento_home = root / "bentoml"
    previous = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(bento_home)
    try:
        detector_export = make_detector(root / "det")
        # As if `make eval` had chosen a threshold on the val set (an untrained model scores low).
        metadata = json.loads((detector_export / "metadata.json").read_text())
        (detector_export / "metadata.json").write_text(json.dumps({**metadata, "score_threshold": STORED_THRESHOLD}))
        make_segmenter(root / "seg")
    finally:
        if previous is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = previous
    # The way a user starts them: make serve RUN=... (here a run folder) and make serve MODEL=tag.
    det = Server(None, bento_home, root / "detector.log", make={"RUN": detector_export.parent})
    seg = Server(None, bento_home, root / "segmenter.log", make={"MODEL": "tiny-segmenter"},
                 PIPELINES_MAX_MASK_SIDE="100")
    # The same detector behind a bearer token and a 1 MB body limit.
    (root / "locked-tmp").mkdir()
    # Short time limits for slow clients there too.
    locked = Server(str(detector_export), bento_home, root / "locked.log", PIPELINES_API_TOKEN=TOKEN,
                    PIPELINES_MAX_BODY_MB="1", TMPDIR=str(root / "locked-tmp"),
                    PIPELINES_HEADER_TIMEOUT_S=str(SLOW_LIMIT_S), PIPELINES_BODY_TIMEOUT_S=str(SLOW_LIMIT_S))
    try:
        ready = {"detector": det.wait_ready(), "segmenter": seg.wait_ready(), "locked": locked.wait_ready()}
        yield {"detector": det, "segmenter": seg, "locked": locked, "ready": ready, "detector_export": detector_export,
               "bento_home": bento_home}
    finally:
        det.stop()
        seg.stop()
        locked.stop()


@pytest.fixture(scope="module")
def det(servers):
    with httpx.Client(base_url=servers["detector"].url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def seg(servers):
    with httpx.Client(base_url=servers["segmenter"].url, timeout=60) as client:
        yield client


def picture(width=120, height=90, seed=0) -> Image.Image:
    """Shapes on a noisy background (something for random weights to respond to)."""
    rng = np.random.default_rng(seed)
    array = (rng.random((height, width, 3)) * 60).astype(np.uint8)
    array[10:50, 20:70] = (230, 40, 40)
    array[55:85, 80:115] = (40, 40, 230)
    return Image.fromarray(array)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def upload(data: bytes, name="image.jpg", content_type="image/jpeg") -> dict:
    return {"image": (name, data, content_type)}


JPEG = encoded(picture(), "JPEG", quality=95)


# ---------------------------------------------------------------------------------------------- tests


def test_ready_only_after_model_loaded(servers, det, seg):
    for name in ("detector", "segmenter"):
        seen = servers["ready"][name]
        assert seen[-1] == 200 and all(s != 200 for s in seen[:-1])
    assert det.get("/readyz").status_code == 200 and det.get("/livez").status_code == 200
    log = servers["detector"].log.read_text()
    assert "serving detection model det:" in log  # loaded (and warmed up) before the first 200


def test_detect(det):
    r = det.post("/detect", files=upload(JPEG), data={"score_threshold": "0", "max_detections": "5"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (120, 90)
    assert body["model"]["name"] == "det" and len(body["model"]["version"]) == 12
    assert 1 <= len(body["detections"]) <= 5
    for d in body["detections"]:
        assert set(d) == {"label", "class_id", "score", "box"} and d["label"] == LABELS[d["class_id"]]
        b = d["box"]
        assert 0 <= b["xmin"] <= b["xmax"] <= 120 and 0 <= b["ymin"] <= b["ymax"] <= 90
    scores = [d["score"] for d in body["detections"]]
    assert scores == sorted(scores, reverse=True)
    # Without score_threshold: the export's (metadata.json), said in the answer.
    everything = det.post("/detect", files=upload(JPEG), data={"score_threshold": "0"}).json()
    r = det.post("/detect", files=upload(JPEG))
    assert r.status_code == 200 and r.json()["score_threshold"] == STORED_THRESHOLD
    assert everything["score_threshold"] == 0
    assert r.json()["detections"] == [d for d in everything["detections"] if d["score"] >= STORED_THRESHOLD]


@pytest.mark.parametrize("fmt,content_type", [("PNG", "image/png"), ("WEBP", "image/webp"), ("BMP", "image/bmp"),
                                              ("GIF", "image/gif")])
def test_detect_formats(det, fmt, content_type):
    image = picture().convert("RGBA") if fmt == "PNG" else picture()
    extra = {"save_all": True, "append_images": [picture(seed=1)]} if fmt == "GIF" else {}
    r = det.post("/detect", files=upload(encoded(image, fmt, **extra), f"x.{fmt.lower()}", content_type),
                 data={"score_threshold": "0"})
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (120, 90)


def test_exif_orientation_applied(det):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a person sees it 90 wide, 120 high
    data = encoded(picture(), "JPEG", exif=exif)
    r = det.post("/detect", files=upload(data), data={"score_threshold": "0"})
    assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (90, 120)
    assert all(d["box"]["xmax"] <= 90 and d["box"]["ymax"] <= 120 for d in r.json()["detections"])


def test_detect_base64(det):
    reference = det.post("/detect", files=upload(JPEG), data={"score_threshold": "0"}).json()["detections"]
    text = base64.b64encode(JPEG)
    for kwargs in ({"content": text, "headers": {"content-type": "text/plain"}},
                   {"content": b"data:image/jpeg;base64," + text},
                   {"json": {"image": text.decode()}}):
        r = det.post("/detect/base64?score_threshold=0", **kwargs)
        assert r.status_code == 200, r.text
        got = r.json()
        assert isinstance(got, list) and len(got) == len(reference)
        for g, d in zip(got, reference):
            assert set(g) == {"class", "confidence", "xmin", "ymin", "xmax", "ymax"}
            assert g["class"] == d["label"] and g["confidence"] == pytest.approx(d["score"], abs=1e-3)
            assert g["xmin"] == pytest.approx(d["box"]["xmin"], abs=0.5)
    r = det.post("/detect/base64", content=text)  # the export's threshold
    assert r.status_code == 200
    assert len(r.json()) == sum(d["score"] >= STORED_THRESHOLD for d in reference)
    assert all(g["confidence"] >= STORED_THRESHOLD for g in r.json())


def test_render_detection(det):
    r = det.post("/render", files=upload(JPEG), data={"score_threshold": "0", "max_detections": "3"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    drawn = Image.open(io.BytesIO(r.content))
    assert drawn.format == "PNG" and drawn.size == (120, 90)
    plain = np.asarray(Image.open(io.BytesIO(JPEG)).convert("RGB"))
    assert (np.asarray(drawn.convert("RGB")) != plain).any()  # boxes were drawn


def big_png() -> bytes:
    return encoded(Image.new("RGB", (1100, 1000)), "PNG")  # 1.1 MP, over the server's 1 MP limit


def pixel_bomb() -> bytes:
    return encoded(Image.new("1", (20_000, 20_000)), "PNG")  # ~50 KB, 400 million pixels: over Pillow's own guard


@pytest.mark.parametrize("case", ["not_an_image", "truncated", "empty", "too_large", "pixel_bomb", "threshold_high",
                                  "threshold_negative", "threshold_text", "no_file", "json_body", "text_body"])
def test_bad_requests_on_detect(det, case):
    files, data, kwargs = upload(JPEG), {}, {}
    if case == "not_an_image":
        files = upload(b"this is not an image at all", "notes.txt", "text/plain")
    elif case == "truncated":
        files = upload(JPEG[: len(JPEG) // 2])
    elif case == "empty":
        files = upload(b"")
    elif case == "too_large":
        files = upload(big_png(), "big.png", "image/png")
    elif case == "pixel_bomb":
        files = upload(pixel_bomb(), "bomb.png", "image/png")
    elif case == "threshold_high":
        data = {"score_threshold": "1.5"}
    elif case == "threshold_negative":
        data = {"score_threshold": "-0.1"}
    elif case == "threshold_text":
        data = {"score_threshold": "high"}
    if case == "no_file":
        r = det.post("/detect", data={"score_threshold": "0.5"}, files={"other": ("x", b"y", "text/plain")})
    elif case == "json_body":
        r = det.post("/detect", json={"image": "not base64 and not a file"})
    elif case == "text_body":
        r = det.post("/detect", content=b"hello", headers={"content-type": "text/plain"})
    else:
        r = det.post("/detect", files=files, data=data, **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    expected = {"not_an_image": "not an image", "truncated": "truncated", "empty": "empty",
                "too_large": "over the limit", "threshold_high": "between 0 and 1",
                "threshold_negative": "between 0 and 1"}.get(case)
    if expected:
        assert expected in error, error
    if case in ("too_large", "pixel_bomb"):
        assert r.status_code == 413
    if case == "not_an_image":
        assert r.status_code == 415


@pytest.mark.parametrize("body,expected", [(b"", "empty body"), (b"%%%not base64%%%", "not valid base64"),
                                            (b'{"picture": "abc"}', 'no "image" field'),
                                            (b'{"image": ', "not valid JSON"),
                                            (base64.b64encode(b"GIF89a broken"), "not an image"),
                                            (base64.b64encode(JPEG[:500]), "truncated")])
def test_bad_requests_on_base64(det, body, expected):
    r = det.post("/detect/base64", content=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert expected in r.json()["error"], r.json()


def test_worker_keeps_serving_after_bad_requests(det):
    for _ in range(3):
        assert det.post("/detect", files=upload(b"junk")).status_code in (400, 415)
        assert det.post("/detect/base64", content=b"***").status_code == 400
    assert det.post("/detect", files=upload(JPEG)).status_code == 200


def test_concurrent_requests_batched_and_correct(servers, det):
    images = [encoded(picture(seed=i), "JPEG", quality=95) for i in range(4)]
    reference = [det.post("/detect", files=upload(d), data={"score_threshold": "0"}).json()["detections"]
                 for d in images]

    def call(i):
        with httpx.Client(base_url=servers["detector"].url, timeout=120) as client:
            r = client.post("/detect", files=upload(images[i % 4]), data={"score_threshold": "0"})
            return i, r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(64)))
    assert len(results) == 64
    for i, status, body in results:
        assert status == 200, body
        want, got = reference[i % 4], body["detections"]
        assert len(got) == len(want)
        assert sorted(d["class_id"] for d in got) == sorted(d["class_id"] for d in want)
        assert max(d["score"] for d in got) == pytest.approx(max(d["score"] for d in want), abs=1e-3)


def _infer_batches(url: str) -> tuple[float, float]:
    """(batches run, images in them) by the model, from the service's Prometheus histogram."""
    import re

    text = httpx.get(url + "/metrics", timeout=30).text
    found = dict(re.findall(r'^pipelines_inference_batch_size_(sum|count)(?:\{[^}]*\})?\s+(\S+)', text, re.MULTILINE))
    return float(found.get("count", 0)), float(found.get("sum", 0))


def test_concurrent_photos_of_different_sizes_share_forward_passes(servers):
    """16 concurrent requests, photos of 4 sizes (stretched to the input size in the route, so they can
    share a pass): the batcher runs the model on fewer batches than requests, some holding several
    images, and every image is run once."""
    url = servers["detector"].url
    images = [encoded(picture(width=w, height=h, seed=i), "JPEG") for i, (w, h) in
              enumerate([(120, 90), (200, 150), (90, 120), (333, 250)])]
    before = _infer_batches(url)

    def call(i):
        with httpx.Client(base_url=url, timeout=120) as client:
            r = client.post("/detect", files=upload(images[i % 4]), data={"score_threshold": "0"})
            return r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(112)))
    assert all(status == 200 for status, _ in results), [body for status, body in results if status != 200][:3]
    assert {(body["width"], body["height"]) for _, body in results} == {(120, 90), (200, 150), (90, 120), (333, 250)}
    after = _infer_batches(url)
    batches, images_run = after[0] - before[0], after[1] - before[1]
    assert images_run == 112
    assert batches < images_run, f"{batches:g} batches for {images_run:g} images: no batching"


# ------------------------------------------------------------------------------------------- segmenter


def test_segment(servers, seg):
    from pipelines.model_store import export_identity

    r = seg.post("/segment", files=upload(JPEG))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (120, 90)
    # One model id: served by its store tag, it answers the export folder's identity, which is that tag's version.
    export = servers["detector_export"].parent.parent / "seg" / "export"
    assert (body["model"]["name"], body["model"]["version"]) == ("tiny-segmenter", export_identity(export)[1])
    classes = body["classes"]
    assert sum(c["pixels"] for c in classes) == 120 * 90
    assert sum(c["fraction"] for c in classes) == pytest.approx(1.0, abs=1e-4)
    for c in classes:
        assert c["label"] == ("background" if c["class_id"] == 0 else LABELS[c["class_id"]])
        for polygon in c["polygons"]:
            assert len(polygon) >= 3
            assert all(0 <= x < 120 and 0 <= y < 90 for x, y in polygon)
    assert any(c["polygons"] for c in classes if c["class_id"] != 0)


def test_segment_mask_and_render(seg):
    r = seg.post("/segment/mask", files=upload(JPEG))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    mask = Image.open(io.BytesIO(r.content))
    assert mask.mode == "P" and mask.size == (120, 90)
    ids = np.asarray(mask)
    summary = seg.post("/segment", files=upload(JPEG)).json()["classes"]
    assert {c["class_id"]: c["pixels"] for c in summary} == dict(zip(*map(list, np.unique(ids, return_counts=True))))
    r = seg.post("/render", files=upload(JPEG))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (120, 90)


def test_segmenter_bad_input_and_concurrency(servers, seg):
    r = seg.post("/segment", files=upload(b"nope"))
    assert r.status_code == 415 and "not an image" in r.json()["error"]
    r = seg.post("/segment/mask", files=upload(big_png(), "big.png", "image/png"))
    assert r.status_code == 413
    want = seg.post("/segment/mask", files=upload(JPEG)).content

    def call(_):
        with httpx.Client(base_url=servers["segmenter"].url, timeout=120) as client:
            return client.post("/segment/mask", files=upload(JPEG))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(16)))
    assert all(a.status_code == 200 for a in answers)
    assert all((np.asarray(Image.open(io.BytesIO(a.content))) == np.asarray(Image.open(io.BytesIO(want)))).mean()
               > 0.999 for a in answers)


# ------------------------------------------------------------------------------- the request guard


def _raw_http(url: str, head: bytes, body: bytes = b"", chunks: int = 0, chunk: bytes = b"") -> tuple[int, dict]:
    """Send a request by hand (a huge Content-Length, or chunks) and read the answer the server sends
    back before taking the whole body; returns (status, JSON body)."""
    import socket

    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        try:
            for _ in range(chunks):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:  # the server answered and closed while we were still sending
            pass
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"content-length: (\d+)", data.lower()).group(1)):
            more = sock.recv(65536)
            if not more:
                break
            data += more
    head_text, _, payload = data.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(payload)


@pytest.mark.parametrize("case,status,expected", [
    ("wrong_field", 400, 'no file field "image" (file fields sent: "picture")'),
    ("extra_file", 400, 'unexpected file field "other"'),
    ("long_filename", 400, "the file name is 304 bytes long, over 200"),
    ("malformed", 400, 'no file field "image"'),
    ("json_body", 415, "the body is application/json: send it as multipart/form-data"),
    ("bad_form_value", 400, "score_threshold: Input should be a valid number"),
])
def test_client_mistakes_are_4xx_json(det, case, status, expected):
    """Each of these was a 500 with a traceback in the log, or a raw pydantic report."""
    if case == "wrong_field":
        r = det.post("/detect", files={"picture": ("a.jpg", JPEG, "image/jpeg")})
    elif case == "extra_file":
        r = det.post("/detect", files={"image": ("a.jpg", JPEG, "image/jpeg"), "other": ("b.jpg", JPEG, "image/jpeg")})
    elif case == "long_filename":
        r = det.post("/detect", files=upload(JPEG, "x" * 300 + ".jpg"))
    elif case == "malformed":
        r = det.post("/detect", content=b"--B\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=B"})
    elif case == "json_body":
        r = det.post("/detect", json={"image": "abc"})
    else:
        r = det.post("/detect", files=upload(JPEG), data={"score_threshold": "abc"})
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and expected in body["error"], body


def test_deeply_nested_json_is_a_400(det):
    r = det.post("/detect/base64", content=b"[" * 100_000 + b"]" * 100_000,
                 headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deep" in r.json()["error"]
    assert det.post("/detect", files=upload(JPEG)).status_code == 200


def test_bearer_token(servers):
    url = servers["locked"].url
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/detect", files=upload(JPEG))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in r.json()["error"]
        r = client.post("/detect", files=upload(JPEG), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = client.post("/detect/base64", content=base64.b64encode(JPEG))
        assert r.status_code == 401
        r = client.post("/detect", files=upload(JPEG), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and "detections" in r.json()
        for open_path in ("/readyz", "/livez", "/metrics"):
            assert client.get(open_path).status_code == 200, open_path


def test_body_size_limit(servers):
    """1 MB limit on this server: refused from Content-Length before reading, or as a chunked body
    passes it; a body under it is served."""
    url = servers["locked"].url
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    head = (b"POST /detect HTTP/1.1\r\nHost: x\r\n" + auth +
            b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 1000000000\r\n\r\n")
    status, body = _raw_http(url, head, b"x" * 1000)
    assert status == 413 and "over the limit of 1 MB (PIPELINES_MAX_BODY_MB)" in body["error"]
    head = (b"POST /detect HTTP/1.1\r\nHost: x\r\n" + auth +
            b"Content-Type: multipart/form-data; boundary=B\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, body = _raw_http(url, head, chunks=40, chunk=b"y" * 100_000)
    assert status == 413 and "PIPELINES_MAX_BODY_MB" in body["error"]
    half = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8)), "PNG")
    assert 300_000 < len(half) < 1_000_000
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/detect", files=upload(half, "noise.png", "image/png"),
                        headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text


def test_segmenter_bounds_its_full_resolution_work(seg):
    """This server runs at most 100 pixels on a side (PIPELINES_MAX_MASK_SIDE): a 400x300 photo's mask
    is the mask of the photo stretched to 100x75, scaled up nearest-neighbour to 400x300."""
    import cv2

    from pipelines.serving.images import resize_to

    photo = np.asarray(picture(400, 300, seed=3))
    r = seg.post("/segment/mask", files=upload(encoded(Image.fromarray(photo), "PNG"), "p.png", "image/png"))
    assert r.status_code == 200, r.text
    full = np.asarray(Image.open(io.BytesIO(r.content)))
    assert full.shape == (300, 400)
    small = resize_to(photo, (75, 100))
    r = seg.post("/segment/mask", files=upload(encoded(Image.fromarray(small), "PNG"), "s.png", "image/png"))
    expected = cv2.resize(np.asarray(Image.open(io.BytesIO(r.content))), (400, 300), interpolation=cv2.INTER_NEAREST)
    assert (full == expected).all()


def _endpoint_labels(metrics: str) -> set[str]:
    return set(re.findall(r'endpoint="([^"]*)"', metrics))


def test_unknown_paths_share_one_metrics_label(det):
    """20,000 random paths grew /metrics to 99 MB: paths no route serves are counted under one label."""
    for i in range(300):
        assert det.get(f"/no-such-route-{i}").status_code == 404
    assert det.post("/detect", files=upload(JPEG)).status_code == 200
    labels = _endpoint_labels(det.get("/metrics").text)
    assert "/<unknown>" in labels and "/detect" in labels
    assert not any(label.startswith("/no-such-route") for label in labels), sorted(labels)[:10]
    assert len(labels) < 20, sorted(labels)
    assert det.get("/").status_code == 200 and det.get("/docs.json").status_code == 200  # still served


def test_a_second_server_keeps_the_first_ones_metrics(servers, det, tmp_path):
    """A server started with the same BENTOML_HOME used to empty the first one's Prometheus folder."""
    from pipelines.serving.process import ServerProcess

    def detect_count() -> float:
        text = det.get("/metrics").text
        return sum(float(m) for m in re.findall(r'request_total\{[^}]*endpoint="/detect"[^}]*\} ([0-9.e+]+)', text))

    assert det.post("/detect", files=upload(JPEG)).status_code == 200
    before = detect_count()
    assert before > 0
    bento_home = Path(servers["detector"].log).parent / "bentoml"
    with ServerProcess("pipelines.serving.audio:Spectrogram", env={**os.environ, "BENTOML_HOME": str(bento_home)},
                       log=tmp_path / "second.log") as second:
        assert httpx.get(second.url + "/readyz", timeout=30).status_code == 200
        assert detect_count() == before
    assert det.post("/detect", files=upload(JPEG)).status_code == 200
    assert detect_count() == before + 1
    folders = sorted(p.name for p in bento_home.glob("prometheus_multiproc_dir-*"))
    assert len(folders) >= 4, folders  # one per server: detector, segmenter, locked, second


def test_a_killed_worker_is_logged_cleaned_and_not_ready_until_replaced(servers):
    """kill -9 of the worker (runs last: the server restarts its worker). The replacement answers /readyz
    503 while its model loads (no connection left hanging for the load), removes what the killed one left
    in its temporary folder, and says so in the log."""
    import psutil

    locked = servers["locked"]
    tmp = Path(locked.log).parent / "locked-tmp"
    workers = [p for p in psutil.Process(locked.proc.pid).children(recursive=True)
               if "_bentoml_impl.worker" in " ".join(p.cmdline())]
    assert len(workers) == 1, workers
    worker = workers[0]
    folder = tmp / f"pipelines-worker-{worker.pid}"
    assert folder.is_dir()
    (folder / "bentoml-request-x").mkdir()
    (folder / "bentoml-request-x" / "upload.jpg").write_bytes(JPEG)  # an upload in flight
    worker.kill()
    worker.wait(10)
    statuses, deadline = [], time.time() + 180
    while time.time() < deadline:
        try:
            statuses.append(httpx.get(locked.url + "/readyz", timeout=30).status_code)
        except httpx.HTTPError:
            statuses.append(0)  # the killed worker's connection, or none accepting yet
        if statuses[-1] == 200:
            break
        time.sleep(0.2)
    assert statuses[-1] == 200, statuses
    assert 503 in statuses, statuses  # said "not ready" while the new worker loaded its model
    assert not folder.exists()
    log = Path(locked.log).read_text()
    assert f"worker {worker.pid} ended without stopping (killed or crashed)" in log
    assert "removed its 1 temporary upload file(s)" in log
    with httpx.Client(base_url=locked.url, timeout=60) as client:
        r = client.post("/detect", files=upload(JPEG), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200


def test_a_burst_is_refused_only_after_a_real_wait():
    """The 503 storm: BentoML's dispatcher estimates the first queued request's latency as if the whole
    queue ran in one batch, and refused requests that had barely waited. Our Batcher bounds that queue;
    a refusal then comes only after a request really waited PIPELINES_MAX_LATENCY_MS, and says so.
    The model is a stand-in that takes 50 ms per image (named here: the dispatcher is what is tested)."""
    import asyncio

    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    from pipelines.serving import batcher

    class SleepingModel:  # stand-in for the network: 50 ms per image, in the batcher's worker thread
        def run(self, arrays):
            time.sleep(0.05 * len(arrays))
            return [{"i": a} for a in arrays]

    async def burst(call, n=48):
        async def one(i):
            start = time.monotonic()
            try:
                await call(np.full(1, i))
                return ("ok", time.monotonic() - start, "")
            except batcher.Overloaded as e:
                return ("refused", time.monotonic() - start, str(e))
            except asyncio.CancelledError:
                return ("refused", time.monotonic() - start, "cancelled")
        return await asyncio.gather(*(one(i) for i in range(n)))

    async def traffic_then_burst(call):
        for k in range(40):  # ordinary traffic first: the dispatcher fits its latency model on it
            await burst(call, k % 8 + 1)
        return await burst(call)

    async def raw_dispatcher():
        def refuse():
            raise batcher.Overloaded("refused by estimate")
        model = SleepingModel()
        dispatcher = CorkDispatcher(max_latency_in_ms=1000, max_batch_size=8, fallback=refuse,
                                    get_batch_size=lambda _: 1)(lambda arrays: model.run(list(arrays)))
        return await traffic_then_burst(dispatcher)

    async def ours():
        return await traffic_then_burst(batcher.Batcher(SleepingModel(), max_batch_size=8, max_latency_ms=1000))

    before = asyncio.run(raw_dispatcher())
    early = [t for status, t, _ in before if status == "refused" and t < 0.3]
    assert len(early) >= 8, ("the dispatcher alone no longer refuses requests that barely waited", before)

    after = asyncio.run(ours())
    served = [t for status, t, _ in after if status == "ok"]
    refused = [(t, msg) for status, t, msg in after if status == "refused"]
    assert len(served) >= 16, (len(served), refused[:3])
    assert all(t >= 0.95 for t, _ in refused), refused
    assert all("waited" in msg and "PIPELINES_MAX_LATENCY_MS is 1000" in msg for _, msg in refused), refused[:2]


def test_an_idle_model_runs_a_request_at_once_and_a_busy_one_batches_the_rest():
    """Batcher.prepared: a request that finds the model idle reads its input and runs in one worker
    thread (the same thread for both); requests arriving while it runs wait and then run together in
    one batch; a request whose caller is cancelled keeps the model busy until its thread is done (no
    second forward pass beside it). The model is a stand-in that records each call (named here: the
    batcher is what is tested)."""
    import asyncio
    import threading

    from pipelines.serving import batcher

    class RecordingModel:  # stand-in for the network: 50 ms per call, records batch sizes and overlap
        def __init__(self):
            self.batches, self.threads, self.active, self.overlap = [], [], 0, 0

        def run(self, arrays):
            self.active += 1
            self.overlap = max(self.overlap, self.active)
            self.batches.append(len(arrays))
            self.threads.append(threading.get_ident())
            time.sleep(0.05)
            self.active -= 1
            return [{"i": a} for a in arrays]

    async def scenario():
        model = RecordingModel()
        b = batcher.Batcher(model, max_batch_size=8, max_latency_ms=5000)
        prepared_in = []

        def prepare(i):
            def read():
                prepared_in.append(threading.get_ident())
                return f"kept {i}", np.full(1, i)
            return read

        kept, out = await b.prepared(prepare(0))  # idle: one thread, no dispatcher
        assert (kept, int(out["i"][0])) == ("kept 0", 0)
        assert model.batches == [1] and prepared_in == model.threads

        first = asyncio.ensure_future(b.prepared(prepare(1)))
        await asyncio.sleep(0.01)  # the first one is running alone now
        rest = await asyncio.gather(*(b.prepared(prepare(i)) for i in range(2, 8)))
        assert (await first)[0] == "kept 1"
        assert [int(o["i"][0]) for _, o in rest] == list(range(2, 8))
        assert model.batches[1] == 1 and sum(model.batches[2:]) == 6 and max(model.batches[2:]) >= 3, model.batches

        cancelled = asyncio.ensure_future(b.prepared(prepare(9)))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        after = await b.prepared(prepare(10))  # must not start while the cancelled one's thread runs
        assert after[0] == "kept 10"
        assert model.overlap == 1, "two forward passes ran at once"

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ coco-annotator's "Annotate Image"

ANNOTATOR = "http://localhost:5000"  # the annotator's page by default (PIPELINES_CORS_ORIGINS unset)


def browser_upload(png: bytes) -> dict:
    """What AnnotateButton.vue posts: the canvas as a PNG blob in the multipart field `image`."""
    return {"image": ("blob", png, "image/png")}


def test_detector_annotate_answers_coco_annotator(det):
    png = encoded(picture(), "PNG")
    r = det.post("/annotate?score_threshold=0&max_detections=6", files=browser_upload(png),
                 headers={"Origin": ANNOTATOR})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ANNOTATOR
    coco = r.json()["coco"]
    # AnnotateButton.vue's rules: three non-empty lists; each annotation's category among those returned,
    # found by id, used by name.
    assert coco["images"] and coco["categories"] and coco["annotations"]
    assert [(i["width"], i["height"]) for i in coco["images"]] == [(120, 90)]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert all(LABELS[k] == v for k, v in names.items())
    detected = det.post("/detect", files=upload(png, "image.png", "image/png"),
                        data={"score_threshold": "0", "max_detections": "6"}).json()["detections"]
    assert len(coco["annotations"]) == len(detected) <= 6
    for a, d in zip(coco["annotations"], detected):
        assert a["category_id"] in names and names[a["category_id"]] == d["label"]
        b = d["box"]
        (polygon,) = a["segmentation"]  # a box: its 4 corners, with isbbox
        expected = [b["xmin"], b["ymin"], b["xmax"], b["ymin"], b["xmax"], b["ymax"], b["xmin"], b["ymax"]]
        assert np.allclose(polygon, expected, atol=0.01) and a["isbbox"] is True
        assert np.allclose(a["bbox"], [b["xmin"], b["ymin"], b["xmax"] - b["xmin"], b["ymax"] - b["ymin"]], atol=0.02)
        assert a["metadata"]["draft"] is True and abs(a["metadata"]["score"] - d["score"]) < 1e-3
        assert a["metadata"]["model"].startswith("det:") and a["image_id"] == coco["images"][0]["id"]
    # Without score_threshold: the export's default, as /detect.
    default = det.post("/annotate", files=browser_upload(png)).json()["coco"]["annotations"]
    assert all(a["metadata"]["score"] >= STORED_THRESHOLD - 1e-4 for a in default)
    # Nothing found: 200 and a message (the annotator's rule makes an empty answer an error on its side).
    r = det.post("/annotate?score_threshold=1", files=browser_upload(png), headers={"Origin": ANNOTATOR})
    assert r.status_code == 200 and r.json()["coco"]["annotations"] == [] and "nothing" in r.json()["message"]


def test_annotate_cors_preflight_and_refusals(det, servers):
    preflight = {"Origin": ANNOTATOR, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    r = det.options("/annotate", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ANNOTATOR
    assert "POST" in r.headers["access-control-allow-methods"]
    # Another origin is not allowed (not "*"): no allow-origin header, so the browser keeps the answer away.
    r = det.options("/annotate", headers={**preflight, "Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers
    r = det.post("/annotate", files=browser_upload(encoded(picture(), "PNG")), headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers
    # Refusals are JSON 4xx the page can read (CORS headers on them too).
    r = det.post("/annotate", files=browser_upload(b"not an image"), headers={"Origin": ANNOTATOR})
    assert r.status_code == 415 and "error" in r.json() and r.headers["access-control-allow-origin"] == ANNOTATOR
    r = det.post("/annotate?score_threshold=2", files=browser_upload(encoded(picture(), "PNG")))
    assert r.status_code == 400 and "score_threshold" in r.json()["error"]
    r = det.post("/annotate", files={"picture": ("blob", encoded(picture(), "PNG"), "image/png")})
    assert r.status_code == 400 and '"image"' in r.json()["error"]
    # Behind a token, the browser's preflight (which carries no credentials) is still answered.
    locked = servers["locked"].url
    r = httpx.options(locked + "/annotate", headers=preflight, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ANNOTATOR
    r = httpx.post(locked + "/annotate", files=browser_upload(encoded(picture(), "PNG")), timeout=30)
    assert r.status_code == 401


def test_segmenter_annotate_drafts_regions(seg):
    png = encoded(picture(seed=3), "PNG")
    r = seg.post("/annotate?min_area=0", files=browser_upload(png), headers={"Origin": ANNOTATOR})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ANNOTATOR
    coco = r.json()["coco"]
    segmented = seg.post("/segment", files=upload(png, "image.png", "image/png")).json()
    pixels = {c["class_id"]: c["pixels"] for c in segmented["classes"] if c["class_id"]}
    assert pixels, "the test segmenter should find some foreground on this picture"
    names = {c["id"]: c["name"] for c in coco["categories"]}
    areas = {}
    for a in coco["annotations"]:
        assert a["isbbox"] is False and a["metadata"]["draft"] is True and a["category_id"] in names
        assert a["segmentation"] and all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
        xs, ys = np.concatenate([p[0::2] for p in a["segmentation"]]), np.concatenate([p[1::2] for p in a["segmentation"]])
        assert 0 <= xs.min() and xs.max() <= 120 and 0 <= ys.min() and ys.max() <= 90  # inside the image
        areas[a["category_id"]] = areas.get(a["category_id"], 0) + a["area"]
    assert areas == pixels  # every region of every class, min_area 0: all the class's pixels
    largest = max(a["area"] for a in coco["annotations"])
    r = seg.post(f"/annotate?min_area={largest + 1}", files=browser_upload(png))
    assert r.status_code == 200 and r.json()["coco"]["annotations"] == [] and "message" in r.json()
    for bad in ("-1", "many"):
        r = seg.post(f"/annotate?min_area={bad}", files=browser_upload(png))
        assert r.status_code == 400 and "min_area" in r.json()["error"]


def test_region_drafts_keep_holes_and_drop_small_regions():
    from pipelines.annotator.drafts import region_annotations

    mask = np.zeros((40, 50), np.uint8)
    mask[5:25, 5:25] = 2
    mask[10:20, 10:20] = 0  # a hole
    mask[30:32, 40:42] = 2  # 4 pixels: under min_area
    mask[30:38, 2:12] = 1
    drafts = region_annotations(mask, min_area=5, model="m:1")
    assert [(a["category_id"], a["area"]) for a in drafts] == [(2, 300), (1, 80)]
    ring = drafts[0]
    assert len(ring["segmentation"]) == 2 and ring["bbox"] == [5, 5, 20, 20]  # its outline and its hole's
    assert len(region_annotations(mask, min_area=0, model="m:1")) == 3


# ------------------------------------------------------------------- hostile input: bodies, slow clients, SIGTERM

FILE_ROUTES = {"detector": ("/detect", "/render", "/annotate"),
               "segmenter": ("/segment", "/segment/mask", "/render", "/annotate")}


def _fields(count: int, filename: bool) -> bytes:
    part = b'--B\r\nContent-Disposition: form-data; name="%s"%s\r\n\r\nv\r\n'
    return b"".join(part % ((b"image", b'; filename="a%d.jpg"' % i) if filename else (b"f%d" % i, b""))
                    for i in range(count)) + b"--B--\r\n"


def _two_images() -> bytes:
    one = b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    return one + JPEG + b"\r\n" + one + JPEG + b"\r\n--B--\r\n"


HOSTILE_BODIES = {  # name: (content type, body, what the error says)
    "wrong boundary": ("multipart/form-data; boundary=zz", b"--x\r\ngarbage", "malformed multipart body"),
    "no boundary": ("multipart/form-data", b"--x\r\ngarbage", "Missing boundary"),
    "random bytes": ("multipart/form-data; boundary=x", np.random.default_rng(5).bytes(5000), "multipart"),
    "5000 fields": ("multipart/form-data; boundary=B", _fields(5000, False), "Too many fields"),
    "2000 file parts": ("multipart/form-data; boundary=B", _fields(2000, True), "Too many files"),
    "two files in the field": ("multipart/form-data; boundary=B", _two_images(), '2 files in the field "image"'),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("server", ["detector", "segmenter"])
def test_malformed_multipart_is_a_quick_4xx_on_every_file_route(servers, server):
    """Each of these got no answer at all (the client gave up), and kept the server from stopping."""
    with httpx.Client(base_url=servers[server].url, timeout=10) as client:
        for route in FILE_ROUTES[server]:
            for name, (content_type, body, expected) in HOSTILE_BODIES.items():
                started = time.monotonic()
                r = client.post(route, content=body, headers={"content-type": content_type})
                took = time.monotonic() - started
                assert r.status_code == 400, (route, name, r.status_code, r.text[:300])
                assert expected in r.json()["error"], (route, name, r.json())
                assert took < 2, (route, name, took)
            assert client.post(route, files=upload(encoded(picture(), "PNG"), "a.png", "image/png")).status_code == 200


def _slow_socket(url: str):
    import socket

    host, port = url.rsplit("/", 1)[-1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=SLOW_LIMIT_S * 5)
    return sock


def _answer_after_trickle(sock, data: bytes, delay: float = 0.3, limit: float = 15) -> tuple[bytes, float]:
    """Send `data` a byte at a time until the server answers or closes; (what it sent, seconds)."""
    started, answer = time.monotonic(), b""
    try:
        for i in range(len(data)):
            sock.sendall(data[i:i + 1])
            sock.settimeout(delay)
            try:
                answer += sock.recv(65536)
                break  # an answer (or b"": closed)
            except TimeoutError:
                pass
            if time.monotonic() - started > limit:
                break
        sock.settimeout(5)
        while True:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    except OSError:
        pass
    finally:
        sock.close()
    return answer, time.monotonic() - started


@pytest.mark.timeout(120)
def test_slow_clients_are_cut_off(servers):
    """Headers or a body that trickle a byte at a time, and a connection that sends nothing, are answered 408
    and closed after the limits (2 s on this server); an ordinary upload goes on meanwhile."""
    url = servers["locked"].url
    head = (b"POST /detect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
            b"\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: 5000\r\n\r\n")
    answer, took = _answer_after_trickle(_slow_socket(url), head * 3)
    assert answer.startswith(b"HTTP/1.1 408") and b"PIPELINES_HEADER_TIMEOUT_S" in answer, answer
    assert SLOW_LIMIT_S - 0.5 < took < SLOW_LIMIT_S + 4, took

    sock = _slow_socket(url)
    sock.sendall(head)
    answer, took = _answer_after_trickle(sock, b"x" * 5000)
    assert answer.startswith(b"HTTP/1.1 408") and b"the request body came too slowly" in answer, answer
    assert b"connection: close" in answer.lower()
    assert took < SLOW_LIMIT_S + 5, took

    silent = _slow_socket(url)
    started = time.monotonic()
    answer = silent.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert silent.recv(65536) == b"" and time.monotonic() - started < SLOW_LIMIT_S + 4
    silent.close()


@pytest.mark.timeout(120)
def test_many_hung_connections_do_not_exhaust_the_worker(servers):
    url = servers["locked"].url
    hung = []
    try:
        for i in range(150):
            sock = _slow_socket(url)
            sock.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                         b"POST /detect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
                         b"\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: 9000\r\n\r\n--B")
            hung.append(sock)
        started = time.monotonic()
        with httpx.Client(base_url=url, timeout=30) as client:
            r = client.post("/detect", files=upload(JPEG), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and time.monotonic() - started < SLOW_LIMIT_S + 5
        deadline = time.monotonic() + SLOW_LIMIT_S + 10
        closed = 0
        for sock in hung:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                data = sock.recv(65536)
                while data and not data.endswith(b"}"):
                    data += sock.recv(65536)
                closed += data.startswith(b"HTTP/1.1 408")
            except OSError:
                pass
        assert closed == len(hung), f"{closed} of {len(hung)} hung connections answered 408"
    finally:
        for sock in hung:
            sock.close()


@pytest.mark.timeout(180)
def test_sigterm_stops_the_server_after_hostile_requests(servers, tmp_path):
    """After malformed uploads, a client that left mid-body, and connections still trickling headers and a
    body, SIGTERM stops the server as fast as one that served only good requests."""
    import signal
    import socket

    server = Server(str(servers["detector_export"]), servers["bento_home"], tmp_path / "server.log")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for content_type, body, _ in HOSTILE_BODIES.values():
                assert client.post("/detect", content=body, headers={"content-type": content_type}).status_code == 400
        host, port = server.url.rsplit("/", 1)[-1].split(":")
        head = b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
        gone = socket.create_connection((host, int(port)))
        gone.sendall(head + b"Content-Length: 100\r\n\r\n--x\r\ngar")
        gone.close()
        headers_trickling = socket.create_connection((host, int(port)))
        headers_trickling.sendall(b"POST /detect HTTP/1.1\r\nHo")
        body_trickling = socket.create_connection((host, int(port)))
        body_trickling.sendall(head + b"Content-Length: 100000\r\n\r\n--zz")
        time.sleep(1)
        started = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(20)  # raises TimeoutExpired when it does not stop
        assert time.monotonic() - started < 10
        headers_trickling.close()
        body_trickling.close()
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)


def test_an_app_that_fails_before_answering_ends_its_request_at_once():
    """BentoML's TimeoutMiddleware waited out its whole timeout for an app that raised before answering (no
    answer, and a shutdown that waited too). With the fix the error reaches the handler above at once."""
    import asyncio

    from bentoml._internal.server.http import traffic

    from pipelines.serving import hardening

    hardening.finishing_timeouts()

    async def failing(scope, receive, send):
        raise ValueError("before answering")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    sent = []

    async def send(message):
        sent.append(message)

    async def call():
        middleware = traffic.TimeoutMiddleware(failing, timeout=30)
        started = time.monotonic()
        with pytest.raises(ValueError, match="before answering"):
            await asyncio.wait_for(middleware({"type": "http"}, receive, send), timeout=5)
        return time.monotonic() - started

    assert asyncio.run(call()) < 1 and sent == []

    async def slow(scope, receive, send):
        await asyncio.sleep(10)

    async def times_out():
        await traffic.TimeoutMiddleware(slow, timeout=0.2)({"type": "http"}, receive, send)

    asyncio.run(times_out())
    assert sent[0]["status"] == 504


def test_every_route_through_bentomls_own_client(servers):
    """bentoml.SyncHTTPClient builds each call from the service's schema: /detect/base64 declares its JSON
    body there, so the function-style route works from it too, with the same answer as plain HTTP."""
    import bentoml

    path = Path(servers["detector"].log).parent / "client-photo.jpg"
    path.write_bytes(JPEG)
    b64 = base64.b64encode(JPEG).decode()
    with bentoml.SyncHTTPClient(servers["detector"].url, server_ready_timeout=30) as client:
        found = client.detect(image=path, score_threshold=0.0)
        plain = httpx.post(servers["detector"].url + "/detect", files=upload(JPEG), data={"score_threshold": "0"},
                           timeout=60).json()
        assert found == plain and found["detections"]
        listed = client.detect_base64(image=b64, score_threshold=0.0, max_detections=3)
        assert len(listed) == 3
        assert [d["class"] for d in listed] == [d["label"] for d in plain["detections"][:3]]
        assert listed[0]["confidence"] == plain["detections"][0]["score"]
        assert client.render(image=path).size == (120, 90)  # the PNG, decoded by the client
        assert "coco" in client.annotate(image=path)
        with pytest.raises(bentoml.exceptions.BentoMLException, match="not valid base64"):
            client.detect_base64(image="!!!")
    schema = httpx.get(servers["detector"].url + "/docs.json", timeout=30).json()
    body = schema["paths"]["/detect/base64"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["image"] and body["properties"]["image"]["type"] == "string", body
    with bentoml.SyncHTTPClient(servers["segmenter"].url, server_ready_timeout=30) as client:
        segmented = client.segment(image=path)
        assert segmented["width"] == 120 and segmented["classes"]
        assert client.segment_mask(image=path).size == client.render(image=path).size == (120, 90)
        assert "coco" in client.annotate(image=path)
