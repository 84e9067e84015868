"""Shared test helpers: run the real CLI, decode the TFRecords it wrote with TensorFlow's own ops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EXTERNAL = REPO.parent / "shared" / "external"


def run_cli(*args, workspace: Path | None = None, check: bool = False, timeout: int = 600, env: dict | None = None):
    """Run `python -m pipelines ARGS` as a user would; returns the CompletedProcess."""
    env = {**os.environ, **(env or {})}
    if workspace is not None:
        env["PIPELINES_WORKSPACE"] = str(workspace)
    proc = subprocess.run([sys.executable, "-m", "pipelines", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def read_records(folder: Path, split: str) -> list[dict]:
    """Every example of a split, decoded: image array, boxes in pixels, labels, masks."""
    import tensorflow as tf

    files = sorted(str(p) for p in Path(folder).glob(f"{split}-*.tfrecord"))
    out = []
    for raw in tf.data.TFRecordDataset(files).as_numpy_iterator():
        feats = tf.train.Example.FromString(raw).features.feature

        def b(key):
            return list(feats[key].bytes_list.value) if key in feats else []

        def f(key):
            return list(feats[key].float_list.value) if key in feats else []

        def i(key):
            return list(feats[key].int64_list.value) if key in feats else []

        image = tf.io.decode_image(b("image/encoded")[0], channels=3).numpy()
        h, w = i("image/height")[0], i("image/width")[0]
        rec = {
            "image": image, "height": h, "width": w,
            "format": b("image/format")[0].decode(),
            "filename": b("image/filename")[0].decode(),
            "source_id": b("image/source_id")[0].decode(),
            "sha256": b("image/key/sha256")[0].decode(),
            "encoded": b("image/encoded")[0],
            "boxes": np.array([[x0 * w, y0 * h, x1 * w, y1 * h] for x0, y0, x1, y1 in zip(
                f("image/object/bbox/xmin"), f("image/object/bbox/ymin"),
                f("image/object/bbox/xmax"), f("image/object/bbox/ymax"))]).reshape(-1, 4),
            "labels": i("image/object/class/label"),
            "texts": [t.decode() for t in b("image/object/class/text")],
            "crowd": i("image/object/is_crowd"),
            "area": f("image/object/area"),
            "masks": [tf.io.decode_png(m, channels=1).numpy()[..., 0] for m in b("image/object/mask")],
            "class_mask": (tf.io.decode_png(b("image/segmentation/class/encoded")[0], channels=1).numpy()[..., 0]
                           if b("image/segmentation/class/encoded") else None),
        }
        out.append(rec)
    return out


def all_records(folder: Path) -> list[dict]:
    return read_records(folder, "train") + read_records(folder, "val")


def load_summary(folder: Path) -> dict:
    return json.loads((Path(folder) / "summary.json").read_text())


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """A small generated coco-annotator sample (40 images), shared by the session."""
    from pipelines.data.sample import generate

    out = tmp_path_factory.mktemp("datasets") / "shapes"
    generate(out, num_images=40, seed=0)
    return out


@pytest.fixture
def external():
    if not EXTERNAL.is_dir():
        pytest.skip(f"third-party samples not present at {EXTERNAL}")
    return EXTERNAL


@pytest.fixture(scope="session")
def demo(sample_dir, tmp_path_factory):
    """`make demo` on the small sample, shared by the session: (workspace, stdout). Its runs demo-detector and
    demo-segmenter are trained and exported."""
    root = tmp_path_factory.mktemp("demo")
    workspace = root / "ws"
    env = {"BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    # The detector trains enough to find shapes (150 steps at 128x128: AP50 about 0.26 on these 40 images,
    # its threshold chosen on their val images); the segmenter only a few steps.
    proc = run_cli("demo", "--dataset", sample_dir, "--detector-steps", "150", "--detector-size", "128",
                   "--segmenter-steps", "6", "--batch-size", "8", workspace=workspace, env=env, timeout=1500)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    (root / "stderr.txt").write_text(proc.stderr)  # for the tests of what the terminal shows
    return workspace, proc.stdout
