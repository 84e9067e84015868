"""`make train RUN=NAME WORKERS=2 LAUNCHER=ray`: Ray Train's TensorflowTrainer starts the workers (here on a
local Ray cluster) and sets their TF_CONFIG, each runs the training command, and the run equals one
device's with the same global batch, as `WORKERS=2` does (tests/test_distribute.py). Started again with
more steps, it resumes. Ray is an optional extra: `make test-ray` installs it (requirements-ray.lock) and
runs this file; without it, these tests are skipped."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli
from test_distribute import LR, SEGMENTER_BOUNDS, STEPS, relative_differences

pytest.importorskip("ray.train.tensorflow", reason="the Ray extra is not installed (make test-ray installs it)")


@pytest.mark.slow
def test_ray_train_runs_the_workers_and_equals_one_device(sample_dir, tmp_path):
    workspace = tmp_path / "ws"
    run_cli("data", "--dataset", sample_dir, "--task", "segmentation", workspace=workspace, check=True)
    for run in ("one", "ray"):
        run_cli("config", "--dataset", sample_dir.name, "--run", run, "--batch", "8", "--steps", str(STEPS),
                "--optimizer", "momentum", "--lr", LR, "--model", "unet_mobilenetv2_320x320", "--size", "96",
                workspace=workspace, check=True)
    env = {"PIPELINES_SYNC_BATCH_NORM": "1"}
    one = run_cli("train", "--run", "one", "--eval-every", "0", workspace=workspace, check=True, env=env)
    ray = run_cli("train", "--run", "ray", "--eval-every", "0", "--workers", "2", "--launcher", "ray",
                  workspace=workspace, check=True, env=env, timeout=600)
    assert "2 workers of Ray Train's TensorflowTrainer on a local Ray cluster" in ray.stdout, ray.stdout
    assert re.search(r"batch 8 = 2 x 4 per replica\) on 2 replica\(s\) \(CollectiveAllReduceStrategy", ray.stdout)
    # Only the chief's progress is shown: one line per step.
    assert len(re.findall(r"step \d+/\d+  loss", ray.stdout)) == STEPS, ray.stdout
    first, second = (tf.train.latest_checkpoint(str(workspace / run / "train")) for run in ("one", "ray"))
    assert first.endswith(f"ckpt-{STEPS}") and second.endswith(f"ckpt-{STEPS}")
    differences, weights = relative_differences(first, second, SEGMENTER_BOUNDS)
    print("ray: relative update differences", differences, "weights", weights)
    assert all(differences[part] < bound for part, bound in SEGMENTER_BOUNDS.items()), differences
    assert weights < 1e-3, weights
    losses = [[float(x) for x in re.findall(r"step \d+/\d+  loss (\d+\.\d+)", out)] for out in (one.stdout, ray.stdout)]
    assert np.allclose(losses[0], losses[1], rtol=5e-4, atol=0), losses

    # Started again with two more steps to go, both workers resume from the chief's last checkpoint.
    config = workspace / "ray" / "pipeline.config"
    config.write_text(re.sub(rf"\b(num_steps|total_steps): {STEPS}\b", rf"\1: {STEPS + 2}", config.read_text()))
    again = run_cli("train", "--run", "ray", "--eval-every", "0", "--workers", "2", "--launcher", "ray",
                    workspace=workspace, check=True, env=env, timeout=600)
    assert f"; resuming from step {STEPS};" in again.stdout, again.stdout
    assert tf.train.latest_checkpoint(str(workspace / "ray" / "train")).endswith(f"ckpt-{STEPS + 2}")


def test_the_run_is_checked_before_ray_starts(tmp_path):
    proc = run_cli("train", "--run", "nothing", "--workers", "2", "--launcher", "ray", workspace=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "nothing" in proc.stderr, proc.stderr


def test_workers_that_fail_end_in_one_line(sample_dir, tmp_path):
    """The records the config names are not TFRecords (the run's checks before Ray starts see only that they
    exist): every worker fails reading them, and the command ends with one line naming a failed worker."""
    workspace = tmp_path / "ws"
    run_cli("data", "--dataset", sample_dir, "--task", "segmentation", workspace=workspace, check=True)
    run_cli("config", "--dataset", sample_dir.name, "--run", "ray", "--steps", "3", "--model",
            "unet_mobilenetv2_320x320", "--size", "96", workspace=workspace, check=True)
    for record in (workspace / sample_dir.name / "data").glob("train-*"):
        record.write_bytes(b"not a TFRecord file" * 100)
    proc = run_cli("train", "--run", "ray", "--workers", "2", "--launcher", "ray", workspace=workspace, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr
    assert re.fullmatch(r"error: Ray Train stopped the training: training worker [01] exited with status [12]\b.*; "
                        r"make train again resumes from the last checkpoint", last), proc.stderr
    assert not (workspace / "ray" / "train").is_dir() or not tf.train.latest_checkpoint(str(workspace / "ray" / "train"))
