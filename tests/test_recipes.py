"""The own-data recipes of README.md and docs/, run as written on a copy of the bundled sample, must give
a model that finds the objects (`make test-recipes`; `make test` skips them: tens of minutes on 2 cores).

Each command block a user is told to run for their own data carries a `<!-- recipe: KEY -->` line above
it: detection from random weights and segmentation (README.md), detection from a zoo checkpoint
(docs/training.md), label faster (docs/prelabel.md). The test reads the block from the page and runs its
commands with bash from a folder laid out like a checkout (the Makefile, .venv and the package linked in,
`datasets/NAME` a copy of the bundled sample in coco-annotator's layout, `checkpoints/` for the zoo block).
`NAME` is the dataset's name; the one setting changed is the step count, given as `STEPS=N` in the
environment (docs/layout.md, `make test-recipes`). Each command of a block is recognised below, or the test fails:
what cannot run here is named with the reason (coco-annotator itself: docker compose), `make serve` is
started on a free port and `curl` asks it, as written but for that port and a val photo of the sample.

Stand-ins, named as such: the zoo's checkpoint cannot be downloaded here, so the zoo block fine-tunes
from a checkpoint in the zoo's layout (the Object Detection API's own model writes it; tests/odapi_oracle.py)
holding the backbone and FPN of the detection block's trained model; coco-annotator's upload goes to
tests/annotator_standin.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import EXTERNAL, REPO

pytestmark = [pytest.mark.recipes, pytest.mark.timeout(3600)]
if os.environ.get("PIPELINES_RECIPES") != "1":
    pytestmark.append(pytest.mark.skip(reason="the recipes train real models (about an hour on 2 cores): make test-recipes"))

# The step count each block runs with (STEPS= in the environment): enough for the sample's shapes.
STEPS = {"detection": 600, "segmentation": 1000, "zoo": 300}
if os.environ.get("PIPELINES_RECIPES_STEPS"):  # a quick look at the plumbing only: the models then find little
    STEPS = dict.fromkeys(STEPS, int(os.environ["PIPELINES_RECIPES_STEPS"]))
NAME = "shapes"
LINKED = ("Makefile", ".venv", "pipelines", "configs", "requirements.lock", "pyproject.toml")
PAGES = {"detection": "README.md", "segmentation": "README.md", "zoo": "docs/training.md",
         "label-faster": "docs/prelabel.md"}
ZOO_CHECKPOINT = "checkpoints/ssd_mobilenet_v2_fpnlite_320x320_coco17_tpu-8/checkpoint/ckpt-0"


def recipe(key: str) -> list[str]:
    """The commands of the block marked `<!-- recipe: KEY -->` on its page: continuation lines joined,
    comments and blank lines dropped, `a && b` split."""
    text = (REPO / PAGES[key]).read_text(encoding="utf-8")
    found = re.search(rf"<!-- recipe: {re.escape(key)} -->\s*```bash\n(.*?)```", text, re.S)
    assert found, f"{PAGES[key]}: no ```bash block after <!-- recipe: {key} -->"
    commands = []
    for line in found.group(1).replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        commands += [part.strip() for part in line.split("&&") if part.strip()]
    return [re.sub(r"\bNAME\b", NAME, command) for command in commands]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Checkout:
    """A folder laid out like the checkout, where the blocks run; its own datasets/, workspace/, BentoML home."""

    def __init__(self, root: Path, sample: Path):
        self.root = root
        root.mkdir(parents=True)
        for name in LINKED:
            (root / name).symlink_to(REPO / name)
        shutil.copytree(sample, root / "datasets" / NAME, symlinks=True)
        self.env = {**os.environ, "PIPELINES_DATASETS": str(root / "datasets"),
                    "PIPELINES_WORKSPACE": str(root / "workspace"), "BENTOML_HOME": str(root / "bentoml"),
                    "BENTOML_DO_NOT_TRACK": "True"}
        self.env.pop("MAKEFLAGS", None)
        self.log = root / "commands.log"
        self.photo: Path | None = None
        self.objects: list = []
        self.answers: list[dict] = []
        self.server: subprocess.Popen | None = None
        self.port = 0

    def sh(self, command: str, env: dict | None = None, timeout: int = 3000) -> str:
        started = time.monotonic()
        proc = subprocess.run(["bash", "-c", command], cwd=self.root, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
        with self.log.open("a") as log:
            log.write(f"$ {command}   # {time.monotonic() - started:.0f}s, exit {proc.returncode}\n"
                      f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}\n")
        assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def run_block(self, key: str, steps: int | None, annotator=None, before_prelabel=None) -> list[str]:
        """Runs every command of the block; returns the commands it ran as written (the others are named).
        `before_prelabel()` runs before the first `make prelabel` (the user puts the next images in place)."""
        env = {"STEPS": str(steps)} if steps else {}
        ran = []
        for command in recipe(key):
            if command.startswith("make prelabel") and before_prelabel:
                before_prelabel()
                before_prelabel = None
            if command.startswith("docker compose -f docker/compose.annotator.yml up"):
                continue  # coco-annotator itself (MongoDB, Celery) cannot run here; the sample is its export
            if re.match(r"make serve RUN=\S+$", command):
                self.start_server(command, env)
            elif command.startswith("curl "):
                assert self.server, command
                self.val_photo(NAME)
                written = command.replace("localhost:3000", f"localhost:{self.port}").replace(
                    "image=@photo.jpg", f"image=@{self.photo}")
                self.answers.append(json.loads(self.sh(f"{written} --silent --show-error --fail-with-body")))
                self.stop_server()
            elif "ANNOTATOR_URL=" in command:
                assert annotator is not None, command
                written = re.sub(r"ANNOTATOR_URL=\S+", f"ANNOTATOR_URL={annotator.url}", command)
                self.sh(written.replace("ANNOTATOR_PASSWORD=...", f"ANNOTATOR_PASSWORD={PASSWORD}"), env)
            elif re.match(r"make (data|config|train|eval|export|bento|prelabel|predict) ", command):
                self.sh(command, env)
            else:
                raise AssertionError(f"{PAGES[key]}: recipe {key}: a command this test does not know: {command}")
            ran.append(command)
        return ran

    def start_server(self, command: str, env: dict):
        self.port = free_port()
        self.server = subprocess.Popen(["bash", "-c", command], cwd=self.root,
                                       env={**self.env, **env, "PORT": str(self.port)},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.server.poll() is None, f"{command}: exited {self.server.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(2)
        raise AssertionError(f"{command}: not ready in 300 s")

    def stop_server(self):
        if self.server and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            self.server.wait(timeout=60)
        self.server = None

    def val_photo(self, run: str):
        from pipelines.demo import val_example

        name, encoded, _, self.objects = val_example(self.root / "workspace" / run / "data")
        self.photo = self.root / "photo" / Path(name).name
        self.photo.parent.mkdir(exist_ok=True)
        self.photo.write_bytes(encoded)

    def metrics(self, run: str) -> dict:
        return json.loads((self.root / "workspace" / run / "eval" / "metrics.json").read_text())["metrics"]


PASSWORD = "recipe-password"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from pipelines.data.sample import generate

    out = tmp_path_factory.mktemp("sample") / NAME
    generate(out, num_images=300, seed=0)
    return out


@pytest.fixture(scope="module")
def detection(tmp_path_factory, sample) -> Checkout:
    checkout = Checkout(tmp_path_factory.mktemp("recipes") / "detection", sample)
    checkout.run_block("detection", STEPS["detection"])
    return checkout


def found_line(checkout: Checkout) -> str:
    from pipelines.demo import compare_line

    return compare_line(checkout.objects, checkout.answers[-1]["detections"])


def assert_finds_objects(checkout: Checkout, run: str, min_ap50: float):
    """COCO AP50 on the val images at least `min_ap50`, and the served answer on one val photo right at least once."""
    metrics = checkout.metrics(run)
    line = found_line(checkout)
    print(run, {k: round(v, 3) for k, v in metrics.items() if isinstance(v, float)}, line)
    assert metrics["AP50"] >= min_ap50, metrics
    assert int(re.match(r"matched (\d+) of", line).group(1)) >= 1, line


def test_detection_from_random_weights(detection):
    config = (detection.root / "workspace" / NAME / "pipeline.config").read_text()
    assert f"num_steps: {STEPS['detection']}" in config and "adam_optimizer" in config  # the defaults, STEPS aside
    assert_finds_objects(detection, NAME, 0.5)
    assert list((detection.root / "bentoml" / "bentos").glob("*/*/bento.yaml")), "make bento wrote no Bento"


def boxes_by_image(coco: dict) -> dict[str, list[tuple[str, tuple]]]:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: Path(im["file_name"]).name for im in coco["images"]}
    out: dict[str, list] = {name: [] for name in files.values()}
    for a in coco["annotations"]:
        if a.get("bbox") and a["image_id"] in files:
            x, y, w, h = a["bbox"]
            out[files[a["image_id"]]].append((names[a["category_id"]], (x, y, x + w, y + h)))
    return out


def test_label_faster(detection, tmp_path_factory):
    """docs/prelabel.md's loop after the first training: the same train commands (the run is finished, so
    make train has nothing left to do), then the next images put in datasets/NAME/ (24 new shapes images,
    not in the export), drafted, uploaded to the stand-in, and the model retrained on the corrected export.
    The drafts must find the new images' objects (their true boxes are known: the generator wrote them)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from annotator_standin import StandIn
    from pipelines.annotator.prelabel import dataset_images
    from pipelines.data.sample import generate
    from pipelines.demo import compare_line

    folder = detection.root / "datasets" / NAME
    following = tmp_path_factory.mktemp("next") / "next"
    truth = boxes_by_image(json.loads(generate(following, num_images=24, seed=1).read_text()))

    def put_next_images():
        (folder / "next").mkdir()
        for image in dataset_images(following):
            shutil.copy(image, folder / "next" / f"next_{image.name}")

    standin = StandIn(users={"me": PASSWORD},
                      datasets=[{"id": 3, "name": NAME, "categories": [], "default_annotation_metadata": {}}],
                      categories=[], images={3: [p.name for p in dataset_images(folder)] + [
                          f"next_{p.name}" for p in dataset_images(following)]})
    with standin:
        detection.run_block("label-faster", STEPS["detection"], annotator=standin, before_prelabel=put_next_images)
        posted = [r for r in standin.received if r["method"] == "POST" and r["path"] == "/api/dataset/3/coco"]
    drafts = sorted((detection.root / "workspace" / NAME / "prelabel").glob(f"{NAME}-*.json"))
    assert len(drafts) == 2 and len(posted) == 1, (drafts, posted)
    drafted = boxes_by_image(json.loads(drafts[-1].read_text()))
    assert set(drafted) <= {f"next_{name}" for name in truth}, sorted(drafted)  # only the new images
    matched = labelled = 0
    for name, objects in truth.items():
        line = compare_line(objects, [{"label": label, "score": 1.0, "box": dict(zip(("xmin", "ymin", "xmax", "ymax"),
                                                                                      box))}
                                      for label, box in drafted.get(f"next_{name}", [])])
        found, total = map(int, re.match(r"matched (\d+) of (\d+)", line).groups())
        matched, labelled = matched + found, labelled + total
    print(f"label faster: drafts on {len(drafted)} of {len(truth)} new images; {matched} of {labelled} true objects "
          "drafted with the right class and IoU >= 0.5")
    assert matched >= 0.5 * labelled, (matched, labelled)
    assert standin.annotations, "the stand-in imported no drafts"


def test_detection_from_a_zoo_checkpoint(detection, tmp_path_factory, sample):
    zoo = EXTERNAL / "od_zoo" / "ssd_mobilenet_v2_fpnlite_320x320_coco17_tpu-8"
    if not zoo.is_dir():
        pytest.skip(f"the zoo sample is not present at {zoo}")
    import numpy as np
    import tensorflow as tf

    from odapi_oracle import run_oracle
    from pipelines import runs
    from pipelines.detection import config as detection_config
    from pipelines.config.textproto import TextProto
    from pipelines.detection import zoo as zoo_io
    from pipelines.detection.model import build_model

    checkout = Checkout(tmp_path_factory.mktemp("recipes") / "zoo", sample)
    # The stand-in for the zoo's file: the OD API's own model writes the zoo layout (COCO's 90 classes); the
    # detection block's trained backbone and FPN go into it, the heads keep the OD API's random weights.
    layout = tmp_path_factory.mktemp("zoo-layout")
    template = run_oracle(zoo / "pipeline.config", [np.zeros((64, 64, 3), np.uint8)], layout)["checkpoint"]
    params = detection_config.translate(TextProto((layout / "pipeline.config").read_text(), "zoo"),
                                        check_paths=False).params
    model = build_model(params)
    trained = tf.train.latest_checkpoint(str(detection.root / "workspace" / NAME / "train"))
    assert runs.load_run(str(detection.root / "workspace" / NAME)).params.num_classes < params.num_classes
    zoo_io.restore(model, trained, "detection")
    zoo_io.save_od_api(model, template, checkout.root / ZOO_CHECKPOINT)
    shutil.copy(layout / "pipeline.config", (checkout.root / ZOO_CHECKPOINT).parent.parent / "pipeline.config")

    checkout.sh(f"make data DATASET={NAME}")  # the block starts from the user's data
    checkout.run_block("zoo", STEPS["zoo"])
    config = (checkout.root / "workspace" / NAME / "pipeline.config").read_text()
    assert "momentum_optimizer" in config and re.search(rf'fine_tune_checkpoint: ".*/{ZOO_CHECKPOINT}"', config)
    assert_finds_objects(checkout, NAME, 0.5)


def test_segmentation(tmp_path_factory, sample):
    checkout = Checkout(tmp_path_factory.mktemp("recipes") / "segmentation", sample)
    ran = checkout.run_block("segmentation", STEPS["segmentation"])
    run = re.search(r"make train RUN=(\S+)", " ".join(ran)).group(1)
    metrics = checkout.metrics(run)
    answer = checkout.answers[-1]
    print(run, metrics, [(c["label"], c["pixels"]) for c in answer["classes"]], "labelled:", checkout.objects)
    assert metrics["mean_iou_foreground"] >= 0.5, metrics
    labelled = {label for label, _ in checkout.objects}
    served = {c["label"]: c["pixels"] for c in answer["classes"] if c["class_id"] > 0}
    assert labelled and all(served.get(label, 0) > 0 for label in labelled), (labelled, served)
