"""The segmentation stages as a user runs them: config -> train -> eval -> export -> predict through
`python -m pipelines`, on a tiny U-Net made from the shipped template (64x64, small decoder)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli

from pipelines.common import gpu_device_files

TEMPLATE = REPO / "configs" / "unet_efficientnetb0_320x320.config"


@pytest.fixture(scope="module")
def workspace(sample_dir, tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    run_cli("data", "--dataset", sample_dir, "--task", "segmentation", "--workers", "1", workspace=ws, check=True)
    tiny = ws / "unet_tiny.config"
    tiny.write_text(TEMPLATE.read_text().replace("height: 320", "height: 64").replace("width: 320", "width: 64")
                    .replace("decoder_filters: [256, 128, 64, 32, 16]", "decoder_filters: [16, 16, 8, 8, 8]"))
    return ws


def test_config_train_eval_export_predict(workspace, sample_dir, tmp_path):
    env = {"BENTOML_HOME": str(tmp_path / "bentoml")}
    config = run_cli("config", "--dataset", "shapes", "--model", workspace / "unet_tiny.config", "--run", "seg",
                     "--batch-size", "4", "--num-steps", "6", "--seed", "7", workspace=workspace, check=True)
    run_dir = workspace / "seg"
    assert json.loads((run_dir / "run.json").read_text()) == {"seed": 7} and "seed 7" in config.stdout
    train = run_cli("train", "--run", "seg", workspace=workspace, check=True, env=env)
    assert "step 6/6" in train.stdout and "from scratch; seed 7 (repeatable on this machine)" in train.stdout
    # Orbit's own prints are left out: the progress line and the evaluation log say the same, once.
    assert "train | step" not in train.stdout and "saved checkpoint to" not in train.stdout, train.stdout
    assert "eval at step 6: val mean IoU" in train.stdout
    assert "next: make eval RUN=seg" in train.stdout
    # Nothing else on stderr (no GPU here): Model Garden's FLOPs count printed grappler and TF1 profiler lines
    assert train.stderr == "" or gpu_device_files(), train.stderr
    assert (run_dir / "train" / "ckpt-6.index").is_file() and (run_dir / "train" / "best" / "info.json").is_file()
    again = run_cli("train", "--run", "seg", workspace=workspace, check=True, env=env)
    assert "already trained to step 6" in again.stdout
    reseeded = run_cli("train", "--run", "seg", "--seed", "8", workspace=workspace, env=env)
    assert reseeded.returncode == 2 and "has trained with seed 7; another seed needs a new run" in reseeded.stderr
    assert reseeded.stderr.count("\n") == 1 and json.loads((run_dir / "run.json").read_text()) == {"seed": 7}

    evaluation = run_cli("eval", "--run", "seg", workspace=workspace, check=True, env=env)
    assert "mean IoU" in evaluation.stdout
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and 0.0 <= metrics["metrics"]["mean_iou"] <= 1.0
    assert set(metrics["per_class"]) == {"background", "circle", "square", "triangle", "star"}
    for png in ("confusion_matrix.png", "predictions.png"):
        assert (run_dir / "eval" / png).stat().st_size > 1000

    run_cli("export", "--run", "seg", workspace=workspace, check=True, env=env)
    meta = json.loads((run_dir / "export" / "metadata.json").read_text())
    assert meta["task"] == "segmentation" and meta["input_size"] == [64, 64]
    assert (tmp_path / "bentoml" / "models" / "seg" / "latest").is_file()

    image = next(sample_dir.rglob("*.jpg"))
    out = tmp_path / "pred"
    proc = run_cli("predict", "--model", run_dir / "export", "--out", out, image, workspace=workspace, check=True)
    (result,) = json.loads(proc.stdout)
    with Image.open(image) as img:
        size = img.size
    assert (result["width"], result["height"]) == size
    assert sum(c["pixels"] for c in result["classes"]) == size[0] * size[1]
    with Image.open(result["mask"]) as mask:
        assert mask.mode == "P" and mask.size == size
        assert set(np.unique(np.asarray(mask)).tolist()) == {c["class_id"] for c in result["classes"]}


def test_train_without_masks_is_a_one_line_error(sample_dir, tmp_path):
    ws = tmp_path / "ws"
    run_cli("data", "--dataset", sample_dir, "--task", "segmentation", "--workers", "1", workspace=ws, check=True)
    run_cli("config", "--dataset", "shapes", "--model", "unet_efficientnetb0_320x320", "--run", "r",
            workspace=ws, check=True)
    # The data is written again, for detection, after the config: training must say so, not crash.
    run_cli("data", "--dataset", sample_dir, "--workers", "1", workspace=ws, check=True)
    proc = run_cli("train", "--run", "r", workspace=ws)
    assert proc.returncode == 2, proc.stdout
    assert "no class masks" in proc.stderr or "no segmentation masks" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_damaged_records_are_a_one_line_error(workspace, tmp_path):
    """Records that exist but are not TFRecords (a copy cut short, a file overwritten): one line naming the
    config and the records, not TensorFlow's traceback."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "train-00000-of-00001.tfrecord").write_bytes(b"not a TFRecord file" * 100)
    run_cli("config", "--dataset", "shapes", "--model", workspace / "unet_tiny.config", "--run", "damaged",
            "--num-steps", "2", workspace=workspace, check=True)
    config = workspace / "damaged" / "pipeline.config"
    config.write_text(config.read_text().replace(str(workspace / "shapes" / "data" / "train-*.tfrecord"),
                                                 str(damaged / "train-*.tfrecord")))
    assert str(damaged) in config.read_text()
    proc = run_cli("train", "--run", "damaged", "--eval-every", "0", workspace=workspace)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: {config}: a record of {damaged / 'train-*.tfrecord'}"), proc.stderr
    assert "cannot be read (corrupted record at 0" in proc.stderr and "make data again" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
