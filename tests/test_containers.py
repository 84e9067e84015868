"""The serving image and the training image built and run for real with podman (`make test-containers`).

- Serving: a fresh Bento of a tiny export, `make containerize` from the base image made here (`make
  base-image`: public container registries are out of reach), run with its port published on 127.0.0.1;
  /detect on a photo answers what `make serve` answers for the same export; /readyz, the bearer token and
  the body limit set through the container's environment; a non-root user; `podman stop` ends it in 10 s;
  a tiny segmenter's image answers /segment as `make serve` does.
- Training: `make train-image`, then make data/config/train/export inside it on this CPU with datasets/ and
  workspace/ mounted, run as the host user, whose files the outputs are.

These take minutes (the first image build installs TensorFlow into the image), so they run only under
`make test-containers` (PIPELINES_CONTAINER_TESTS=1), and only where podman and the base image are there
(`make podman-setup base-image`); `make test` skips them with the reason. Nothing is pulled from a public
container registry: every image starts FROM the local base image.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)
import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
EXTERNAL = REPO.parent / "shared" / "external"
BASE_IMAGE = os.environ.get("PIPELINES_TEST_BASE_IMAGE", "localhost/annotator-pipelines-base:bookworm")
TRAIN_IMAGE = os.environ.get("PIPELINES_TEST_TRAIN_IMAGE", "localhost/annotator-pipelines-train:test")
TOKEN = "container-t0ken"
HOST_UID = 4321  # "the host user" of the training run: not root, and not the image's bentoml (1034)


def _why_skip() -> str | None:
    if os.environ.get("PIPELINES_CONTAINER_TESTS") != "1":
        return "the container tests take minutes: `make test-containers` runs them (needs podman and the base image)"
    if shutil.which("podman") is None:
        return "podman not found: `make podman-setup` installs and configures it (as root, on Debian)"
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], capture_output=True, timeout=60).returncode != 0:
        return f"the base image {BASE_IMAGE} is not in podman's store: `make base-image` makes it"
    return None


_REASON = _why_skip()
# an image built from scratch takes minutes, inside the first test that needs it
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=_REASON or ""), pytest.mark.timeout(3600)]


def podman(*args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def make(*args, env: dict, timeout: float, log: Path) -> float:
    """`make ARGS` in the repository, its output in `log`; returns the seconds it took."""
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env={**os.environ, **env},
                              stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"make {' '.join(args)}: exit {proc.returncode}\n{log.read_text()[-5000:]}")
    return time.monotonic() - started


def image_size_mb(image: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip()) / 1e6


def photo() -> tuple[str, bytes, str]:
    """A real photo (the OD API's test image, where shared/ has it), else the generated sample's first image."""
    real = EXTERNAL / "images" / "tf_od_image1_1024x636.jpg"
    if real.is_file():
        return real.name, real.read_bytes(), "image/jpeg"
    from pipelines.data.sample import generate
    import tempfile

    out = Path(tempfile.mkdtemp()) / "shapes"
    generate(out, num_images=1, seed=0)
    first = sorted(p for p in out.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[0]
    return first.name, first.read_bytes(), "image/jpeg" if first.suffix.lower() != ".png" else "image/png"


class Container:
    """`podman run -d` of an image with its port 3000 published on 127.0.0.1:PORT."""

    def __init__(self, image: str, env: dict[str, str]):
        from pipelines.serving.process import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["run", "-d", "-p", f"127.0.0.1:{self.port}:3000"]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        self.id = podman(*args, image).stdout.strip()

    def running(self) -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", self.id).stdout.strip() == "true"

    def logs(self) -> str:
        proc = podman("logs", self.id, check=False)
        return (proc.stdout + proc.stderr)[-4000:]

    def wait_ready(self, timeout: float = 240) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.running():
                raise AssertionError(f"the container exited:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready after {timeout} s:\n{self.logs()}")

    def remove(self):
        podman("rm", "-f", "-t", "0", self.id, check=False)


def _latencies(url: str, name: str, data: bytes, content_type: str, headers: dict, n: int = 10) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        for _ in range(n):
            started = time.perf_counter()
            r = client.post("/detect", files={"image": (name, data, content_type)})
            out.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
    return out


# ------------------------------------------------------------------------------------------- serving


def bento_image(root: Path, maker) -> dict:
    """A tiny model exported by `maker` into a temporary workspace and store, a fresh Bento of it, and its
    image built by `make containerize` FROM the local base image."""
    env = {"BENTOML_HOME": str(root / "bentoml"), "PIPELINES_WORKSPACE": str(root / "workspace"),
           "BENTOML_DO_NOT_TRACK": "True"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the export stage records the model in $BENTOML_HOME's store
    try:
        maker(root / "workspace" / "tiny")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    # the Bento's docker.base_image: the local base image instead of python:3.11-slim
    make("bento", "RUN=tiny", f"BASE_IMAGE={BASE_IMAGE}", env=env, timeout=600, log=root / "bento.log")
    out = (root / "bento.log").read_text()
    bento = re.search(r"built Bento (\S+) in ", out).group(1)
    model = re.search(r"^model (\S+) ", out, re.M).group(1)
    image = f"localhost/{bento}"
    seconds = make("containerize", f"BENTO={bento}", f"IMAGE={image}", "ENGINE=podman",
                   env=env, timeout=3000, log=root / "containerize.log")
    cached = (root / "containerize.log").read_text().count("Using cache")
    size = image_size_mb(image)
    print(f"\n[containers] make bento BASE_IMAGE={BASE_IMAGE}, make containerize BENTO={bento}: {seconds:.0f} s "
          f"({cached} steps from cache), image {image} {size:.0f} MB", flush=True)
    return {"root": root, "env": env, "bento": bento, "model": model, "image": image, "build_s": seconds,
            "size_mb": size}


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """The image of a tiny detector's Bento."""
    from test_serving import make_detector

    built = bento_image(tmp_path_factory.mktemp("containers"), make_detector)
    yield built
    podman("rmi", "-f", built["image"], check=False)


@pytest.fixture(scope="module")
def container(serving):
    """The serving image running with a bearer token and a 1 MB body limit in its environment."""
    box = Container(serving["image"], {"PIPELINES_API_TOKEN": TOKEN, "PIPELINES_MAX_BODY_MB": "1",
                                       "PIPELINES_MAX_BATCH_SIZE": "8", "PIPELINES_MAX_LATENCY_MS": "20000"})
    try:
        box.ready_s = box.wait_ready()
        print(f"[containers] ready in {box.ready_s:.1f} s", flush=True)
        yield box
    finally:
        box.remove()


def test_image_is_the_bentos_from_the_base_image(serving):
    info = podman("image", "inspect", "--format", "{{.Config.User}} {{json .Config.Env}}", serving["image"]).stdout
    assert info.startswith("bentoml ")
    assert f"PIPELINES_MODEL={serving['model']}" in info and "BENTOML_CONTAINERIZED=true" in info
    # FROM the base image given to make containerize: its layers are the image's first ones
    base_layers = podman("image", "inspect", "--format", "{{json .RootFS.Layers}}", BASE_IMAGE).stdout.strip()
    layers = podman("image", "inspect", "--format", "{{json .RootFS.Layers}}", serving["image"]).stdout.strip()
    assert layers.startswith(base_layers[:-1]), (base_layers, layers)


def test_detect_answers_as_make_serve_does(serving, container, tmp_path):
    from test_serving import Server

    name, data, content_type = photo()
    fields = {"score_threshold": "0.0", "max_detections": "25"}
    local = Server(None, serving["root"] / "bentoml", tmp_path / "serve.log", make={"MODEL": serving["model"]})
    try:
        local.wait_ready(240)
        answers = []
        for url, headers in ((container.url, {"Authorization": f"Bearer {TOKEN}"}), (local.url, {})):
            r = httpx.post(url + "/detect", files={"image": (name, data, content_type)}, data=fields,
                           headers=headers, timeout=120)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        boxed, served = answers
        assert (boxed["width"], boxed["height"]) == (served["width"], served["height"])
        assert boxed["model"] == served["model"] and f"{boxed['model']['name']}:{boxed['model']['version']}" == \
            serving["model"]
        assert boxed["score_threshold"] == served["score_threshold"] == 0.0
        assert len(boxed["detections"]) == len(served["detections"]) > 0
        # the same detections, best first (the answer rounds scores to 0.01 and boxes to 0.1 px: one unit of
        # tolerance; two whose rounded scores tie may swap places)
        left = list(served["detections"])
        for a in boxed["detections"]:
            same = [b for b in left if (a["label"], a["class_id"]) == (b["label"], b["class_id"])
                    and abs(a["score"] - b["score"]) <= 0.01 + 1e-9
                    and all(abs(a["box"][k] - b["box"][k]) <= 0.1 + 1e-9 for k in ("xmin", "ymin", "xmax", "ymax"))]
            assert same, (a, left)
            left.remove(same[0])
        assert [d["score"] for d in boxed["detections"]] == pytest.approx([d["score"] for d in served["detections"]],
                                                                          abs=0.01 + 1e-9)

        # latency of one photo at a time, after the warm-up above: the container's against make serve's
        lat_box = _latencies(container.url, name, data, content_type, {"Authorization": f"Bearer {TOKEN}"})
        lat_local = _latencies(local.url, name, data, content_type, {})
        print(f"[containers] /detect {name} ({len(data) / 1e3:.0f} kB), median of 10: container "
              f"{statistics.median(lat_box) * 1e3:.0f} ms, make serve {statistics.median(lat_local) * 1e3:.0f} ms",
              flush=True)
    finally:
        local.stop()


def test_token_body_limit_and_user_from_the_environment(container):
    name, data, content_type = photo()
    with httpx.Client(base_url=container.url, timeout=60) as client:
        for open_path in ("/readyz", "/livez", "/metrics"):
            assert client.get(open_path).status_code == 200, open_path
        r = client.post("/detect", files={"image": (name, data, content_type)})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        r = client.post("/detect", files={"image": (name, data, content_type)}, headers={"Authorization": "Bearer no"})
        assert r.status_code == 401
        big = os.urandom(1_500_000)  # over PIPELINES_MAX_BODY_MB=1
        r = client.post("/detect", files={"image": ("big.jpg", big, "image/jpeg")},
                        headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 413 and "PIPELINES_MAX_BODY_MB" in r.json()["error"], r.text
        r = client.post("/detect", files={"image": (name, data, content_type)},
                        headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and "detections" in r.json()
    # the server runs as the image's user, not root
    ids = podman("exec", container.id, "id", "-u").stdout.strip()
    assert ids.isdigit() and int(ids) != 0, ids
    top = podman("top", container.id, "user", "args").stdout
    assert "bentoml" in top and not re.search(r"^root\s", top, re.M), top


def test_podman_stop_ends_it_within_10_s(serving):
    box = Container(serving["image"], {})
    try:
        box.wait_ready()
        started = time.monotonic()
        podman("stop", "-t", "10", box.id, timeout=60)
        took = time.monotonic() - started
        code = podman("inspect", "--format", "{{.State.ExitCode}}", box.id).stdout.strip()
        print(f"[containers] podman stop: {took:.1f} s, exit code {code}", flush=True)
        assert took < 10 and code != "137", (took, code, box.logs())  # 137: killed after the 10 s grace
    finally:
        box.remove()


def test_segmenter_image_answers_as_make_serve_does(tmp_path_factory, tmp_path):
    """The same for a segmenter: its Bento's image and `make serve` give the same /segment answer."""
    from test_serving import Server, make_segmenter

    built = bento_image(tmp_path_factory.mktemp("segmenter"), make_segmenter)
    name, data, content_type = photo()
    box = Container(built["image"], {})
    local = Server(None, built["root"] / "bentoml", tmp_path / "serve.log", make={"MODEL": built["model"]})
    try:
        box.wait_ready()
        local.wait_ready(240)
        answers = []
        for url in (box.url, local.url):
            r = httpx.post(url + "/segment", files={"image": (name, data, content_type)}, timeout=120)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        boxed, served = answers
        assert boxed["classes"] and boxed["model"]["name"] == "tiny-segmenter"
        assert boxed == served  # same classes, pixel counts, fractions and polygons
        latencies = {}
        for label, url in (("container", box.url), ("make serve", local.url)):
            times = []
            for _ in range(5):
                started = time.perf_counter()
                assert httpx.post(url + "/segment", files={"image": (name, data, content_type)},
                                  timeout=120).status_code == 200
                times.append(time.perf_counter() - started)
            latencies[label] = statistics.median(times) * 1e3
        print(f"[containers] /segment {name}, median of 5: container {latencies['container']:.0f} ms, "
              f"make serve {latencies['make serve']:.0f} ms", flush=True)
    finally:
        local.stop()
        box.remove()
        podman("rmi", "-f", built["image"], check=False)


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def train_image(tmp_path_factory):
    log = tmp_path_factory.mktemp("train-image") / "build.log"
    seconds = make("train-image", f"BASE_IMAGE={BASE_IMAGE}", f"TRAIN_IMAGE={TRAIN_IMAGE}", "ENGINE=podman",
                   env={}, timeout=3000, log=log)
    cached = log.read_text().count("Using cache")
    size = image_size_mb(TRAIN_IMAGE)
    print(f"\n[containers] make train-image BASE_IMAGE={BASE_IMAGE}: {seconds:.0f} s ({cached} steps from cache), "
          f"image {TRAIN_IMAGE} {size:.0f} MB", flush=True)
    return TRAIN_IMAGE


def test_training_image_runs_the_stages_as_the_host_user(train_image, tmp_path):
    from pipelines.data.sample import generate

    datasets, workspace = tmp_path / "datasets", tmp_path / "workspace"
    generate(datasets / "shapes", num_images=24, seed=0)
    workspace.mkdir()
    for path in (tmp_path, datasets, workspace, *datasets.rglob("*")):
        os.chown(path, HOST_UID, HOST_UID)
    # the image's Python has TensorFlow's CUDA libraries; on this CPU it runs without them
    probe = podman("run", "--rm", "--entrypoint", "python", train_image, "-c",
                   "import importlib.metadata as m, tensorflow as tf; "
                   "print(tf.__version__, m.version('nvidia-cudnn-cu12'), len(tf.config.list_physical_devices('GPU')))",
                   timeout=300).stdout.split()
    assert probe[:3] == ["2.20.0", "9.28.0.42", "0"], probe
    started = time.monotonic()
    proc = podman("run", "--rm", "--user", f"{HOST_UID}:{HOST_UID}", "-v", f"{datasets}:/app/datasets",
                  "-v", f"{workspace}:/app/workspace", train_image,
                  "data", "config", "train", "export", "DATASET=shapes", "BATCH=2", "STEPS=4", "SIZE=128",
                  "EVAL_EVERY=0", check=False, timeout=1800)
    took = time.monotonic() - started
    print(f"[containers] make data config train export (4 steps) in {train_image}: {took:.0f} s", flush=True)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    run = workspace / "shapes"
    for path in ("data/label_map.pbtxt", "pipeline.config", "export/saved_model/saved_model.pb"):
        assert (run / path).is_file(), path
    assert list((run / "train").rglob("ckpt-*.index")), sorted(p.name for p in (run / "train").iterdir())
    # everything the stages wrote in the volumes is the host user's
    foreign = [p for p in workspace.rglob("*") if (p.lstat().st_uid, p.lstat().st_gid) != (HOST_UID, HOST_UID)]
    assert not foreign, foreign[:10]
    # the export was recorded in the BentoML store kept in the workspace volume
    assert list((workspace / ".bentoml" / "models").glob("*/*/saved_model/saved_model.pb"))
