"""Packaging: a Bento of a tiny export (built offline, in a temporary BENTOML_HOME), served for real
from the bento store and from the layout it has inside its container image; the docker/ files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)
import httpx
import pytest
import yaml
from PIL import Image

from test_serving import Server, make_detector

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


def pins(text: str) -> dict[str, str]:
    """name -> version of the `name==version` lines of a requirements file."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z0-9._-]+)==([^\s;#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


class BentoServer(Server):
    """`bentoml serve BENTO` (a tag from the store or a Bento folder) instead of the source service."""

    def __init__(self, bento: str, model: str, bento_home: Path, log: Path, cwd: Path = REPO):
        from pipelines.serving.process import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PIPELINES_MODEL": model, "BENTOML_HOME": str(bento_home),
               "BENTOML_DO_NOT_TRACK": "True"}
        env.pop("PYTHONPATH", None)  # the Bento's own copy of the pipelines package is what runs
        self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", bento,
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)


def bento_cli(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.serving.bento", *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny detector exported into a temporary workspace and store, and `--run tiny` built into a Bento."""
    root = tmp_path_factory.mktemp("packaging")
    env = {"BENTOML_HOME": str(root / "bentoml"), "PIPELINES_WORKSPACE": str(root / "workspace"),
           "BENTOML_DO_NOT_TRACK": "True"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the export stage records the model in $BENTOML_HOME's store
    try:
        make_detector(root / "workspace" / "tiny")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    proc = bento_cli("--run", "tiny", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bento_tag = re.search(r"built Bento (\S+) in (\S+)", proc.stdout)
    model_tag = re.search(r"^model (\S+) ", proc.stdout, re.M)
    assert bento_tag and model_tag, proc.stdout
    return {"root": root, "env": env, "home": root / "bentoml", "bento": bento_tag.group(1),
            "path": Path(bento_tag.group(2)), "model": model_tag.group(1), "stdout": proc.stdout}


def test_bento_in_store_with_model_code_requirements_env(built):
    name, version = built["bento"].split(":")
    path = built["path"]
    assert path == built["home"] / "bentos" / name / version
    info = yaml.safe_load((path / "bento.yaml").read_text())
    assert info["service"] == "pipelines.serving.service:Service"
    assert [m["tag"] for m in info["models"]] == [built["model"]]
    assert built["model"].startswith("tiny-detector:")
    assert {"name": "PIPELINES_MODEL", "value": built["model"]}.items() <= info["envs"][0].items()
    assert info["labels"]["task"] == "detection"

    # the pipelines package, every .py file of it, as it is here
    ours = {p.relative_to(REPO) for p in (REPO / "pipelines").rglob("*.py") if "__pycache__" not in p.parts}
    packed = {p.relative_to(path / "src") for p in (path / "src" / "pipelines").rglob("*.py")}
    assert packed == ours
    assert (path / "src" / "pipelines" / "serving" / "service.py").read_bytes() == \
        (REPO / "pipelines" / "serving" / "service.py").read_bytes()
    assert not list((path / "src").rglob("*.pyc")) and not (path / "src" / "workspace").exists()

    # requirements.lock as it is, unlocked (BentoML adds its own pin, which the lock already has)
    lock = pins((REPO / "requirements.lock").read_text())
    reqs = pins((path / "env" / "python" / "requirements.txt").read_text())
    assert reqs == lock
    assert lock["bentoml"] == "1.4.39" and lock["tensorflow"] == "2.20.0"

    # the image recipe: Python 3.11, PIPELINES_MODEL, the link that makes the Bento's models the store
    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert f"PIPELINES_MODEL={built['model']}" in dockerfile
    scripts = list((path / "env" / "docker").glob("script__*"))
    assert len(scripts) == 1 and scripts[0].read_text() == (DOCKER / "bento-setup.sh").read_text()

    # and BentoML lists it
    listed = subprocess.run([sys.executable, "-m", "bentoml", "list", "-o", "json"], capture_output=True, text=True,
                            env={**os.environ, **built["env"]}, timeout=120)
    assert built["bento"] in listed.stdout, listed.stdout + listed.stderr


def test_base_image_is_a_setting_of_the_bento(built):
    """`make bento BASE_IMAGE=...` (--base-image): the Bento's docker.base_image, its Dockerfile's FROM."""
    proc = bento_cli("--run", "tiny", "--base-image", "registry.example.com/py:3.11", env=built["env"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "option is ignored" not in proc.stderr, proc.stderr
    path = Path(re.search(r"built Bento (\S+) in (\S+)", proc.stdout).group(2))
    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM registry.example.com/py:3.11 AS base-container" in dockerfile and "python:3.11-slim" not in dockerfile
    assert "uv venv --python 3.11 " in dockerfile
    assert yaml.safe_load((path / "bento.yaml").read_text())["image"]["base_image"] == "registry.example.com/py:3.11"


def test_one_line_errors(built, tmp_path):
    proc = bento_cli("--run", "nothing-here", env=built["env"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "make export RUN=nothing-here" in proc.stderr

    proc = bento_cli("--model", "nosuch:abc", env=built["env"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no such model" in proc.stderr

    # an export that is not in this store (another BENTOML_HOME)
    proc = bento_cli("--run", "tiny", env={**built["env"], "BENTOML_HOME": str(tmp_path / "empty")})
    assert proc.returncode == 2 and "not in the BentoML model store" in proc.stderr, proc.stderr


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (96, 72), (200, 30, 30)).save(path)
    return path


def _check(server, image: Path, model_tag: str):
    server.wait_ready(180)
    with image.open("rb") as f:
        r = httpx.post(server.url + "/detect", files={"image": ("red.png", f, "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (96, 72) and isinstance(body["detections"], list)
    assert f"{body['model']['name']}:{body['model']['version']}" == model_tag


def test_serve_the_bento_from_the_store(built, tmp_path):
    server = BentoServer(built["bento"], built["model"], built["home"], tmp_path / "serve.log", cwd=tmp_path)
    try:
        _check(server, _image(tmp_path), built["model"])
    finally:
        server.stop()


def test_serve_the_bento_as_laid_out_in_its_image(built, tmp_path):
    """What `bentoml containerize` puts in the image, without Docker: the exported Bento (with its models/)
    as $BENTO_PATH, an empty $BENTOML_HOME prepared by docker/bento-setup.sh, PIPELINES_MODEL from the Bento."""
    archive = tmp_path / "tiny.bento"
    env = {**os.environ, **built["env"]}
    subprocess.run([sys.executable, "-m", "bentoml", "export", built["bento"], str(archive)], env=env, check=True,
                   capture_output=True, timeout=120)
    bento_path, home = tmp_path / "home" / "bento", tmp_path / "home"
    bento_path.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(bento_path, filter="data")
    assert (bento_path / "models" / built["model"].replace(":", "/") / "saved_model" / "saved_model.pb").is_file()
    subprocess.run(["sh", str(DOCKER / "bento-setup.sh")], env={**os.environ, "BENTOML_HOME": f"{home}/",
                   "BENTO_PATH": str(bento_path)}, check=True, timeout=30)
    info = yaml.safe_load((bento_path / "bento.yaml").read_text())
    model = next(e["value"] for e in info["envs"] if e["name"] == "PIPELINES_MODEL")
    server = BentoServer(str(bento_path), model, home, tmp_path / "serve.log", cwd=bento_path)
    try:
        _check(server, _image(tmp_path), built["model"])
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- docker/


def test_training_dockerfile():
    text = (DOCKER / "Dockerfile.train").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    froms = [rest for word, *rest in instructions if word == "FROM"]
    assert froms == [["${BASE_IMAGE}"]] and ["ARG", "BASE_IMAGE=python:3.11-slim-bookworm"] in instructions
    assert re.search(r"COPY requirements\.lock docker/requirements-cuda\.txt", text)
    assert re.search(r"pip install --no-deps -r requirements\.lock -r requirements-cuda\.txt", text)
    # tensorflow[and-cuda]'s CUDA libraries, pinned
    cuda = pins((DOCKER / "requirements-cuda.txt").read_text())
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12"} <= set(cuda) and not set(cuda) & set(pins((REPO / "requirements.lock").read_text()))
    assert 'ENTRYPOINT ["make"]' in text and "VOLUME" in text


def test_annotator_compose():
    compose = yaml.safe_load((DOCKER / "compose.annotator.yml").read_text())
    services = compose["services"]
    assert {"webserver", "workers", "database", "messageq"} <= set(services)
    assert services["webserver"]["image"].startswith("jsbroks/coco-annotator:webserver")
    assert services["workers"]["image"].startswith("jsbroks/coco-annotator:workers")
    # the annotator's datasets folder is the project's datasets/ (paths are relative to docker/)
    for name in ("webserver", "workers"):
        assert "../datasets:/datasets" in services[name]["volumes"]
    assert (DOCKER / ".." / "datasets").resolve() == REPO / "datasets"
    for service in services.values():
        assert set(service.get("depends_on", [])) <= set(services)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(("../", "./", "/")) or source in compose["volumes"], volume
        assert set(service.get("networks", [])) <= set(compose.get("networks", {}))
