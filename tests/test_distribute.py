"""Training on several replicas (tf.distribute.MirroredStrategy) equals training on one device with the
same global batch, seed and data order: `make train REPLICAS=2` on a CPU splits it into two logical
devices, which runs the per-replica code of two GPUs (batch split, losses normalised over the global
batch, gradients summed, batch norm synchronised).

What "equal" can mean here: the two-replica step uses Keras' synchronised batch norm, which has no fused
kernel, while one device uses the fused one; at random initialisation the early layers' gradients of
these networks are ill-conditioned, and the two kernels' rounding alone moves them by several percent
(measured: the same one-device step with the non-fused kernel differs from the fused one as much as the
two-replica step does). So the updates (the optimizer's momentum after a few steps) are compared by
their relative difference, per part of the network, against bounds that a per-replica normalisation of
the loss or per-replica batch statistics exceed several times (0.2-0.5, measured when this test was
written); the weights themselves must agree to 1e-3 of their size.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli

STEPS = 3
LR = "0.001"
# Bound on |momentum(2 replicas) - momentum(1 device)| / |momentum(1 device)| over the variables of each part.
DETECTOR_BOUNDS = {"head": 0.02, "decoder": 0.15, "backbone": 0.2}
SEGMENTER_BOUNDS = {"": 0.25}


def train_both(workspace, sample_dir, task_args: list[str], data_args: list[str]) -> dict[int, tuple[str, str]]:
    run_cli("data", "--dataset", sample_dir, "--workers", "2", *data_args, workspace=workspace, check=True)
    out = {}
    for replicas in (1, 2):
        run = f"r{replicas}"
        run_cli("config", "--dataset", sample_dir.name, "--run", run, "--batch", "8", "--steps", str(STEPS),
                "--optimizer", "momentum", "--lr", LR, *task_args, workspace=workspace, check=True)
        proc = run_cli("train", "--run", run, "--eval-every", "0", "--replicas", str(replicas), workspace=workspace,
                       check=True, env={"PIPELINES_SYNC_BATCH_NORM": "1"})
        out[replicas] = (tf.train.latest_checkpoint(str(workspace / run / "train")), proc.stdout)
    return out


def relative_differences(one: str, two: str, parts) -> tuple[dict[str, float], float]:
    """({part: |m2 - m1| / |m1| over the momentum slots of its variables}, |w2 - w1| / |w1| over every other
    variable: weights and batch-norm statistics)."""
    a, b = tf.train.load_checkpoint(one), tf.train.load_checkpoint(two)
    sums = {part: [0.0, 0.0] for part in parts}
    weights = [0.0, 0.0]
    names = [name for name, _ in tf.train.list_variables(one)]
    assert sorted(names) == sorted(name for name, _ in tf.train.list_variables(two))
    for name in names:
        va, vb = a.get_tensor(name), b.get_tensor(name)
        if not np.issubdtype(np.asarray(va).dtype, np.floating) or np.size(va) == 0:
            continue
        if "OPTIMIZER_SLOT" in name:
            for part in parts:
                if name.startswith(part):
                    sums[part][0] += float(np.sum((va - vb) ** 2))
                    sums[part][1] += float(np.sum(va ** 2))
        else:
            weights[0] += float(np.sum((va - vb) ** 2))
            weights[1] += float(np.sum(va ** 2))
    return {part: (d / n) ** 0.5 for part, (d, n) in sums.items()}, (weights[0] / weights[1]) ** 0.5


def check(runs, parts: dict[str, float]):
    one, out1 = runs[1]
    two, out2 = runs[2]
    assert one.endswith(f"ckpt-{STEPS}") and two.endswith(f"ckpt-{STEPS}")
    assert "on 1 replica(s) (OneDeviceStrategy" in out1
    assert re.search(r"batch 8 = 2 x 4 per replica\) on 2 replica\(s\) \(MirroredStrategy", out2), out2
    assert re.search(r"batch norm: statistics over the global batch of 8 \(\d+ layers synchronised", out2), out2
    differences, weights = relative_differences(one, two, parts)
    print("relative update differences:", differences, "weights:", weights)
    for part, bound in parts.items():
        assert differences[part] < bound, (part, differences)
    assert weights < 1e-3, weights
    losses = [[float(x) for x in re.findall(r"^step \d+/\d+  loss (\d+\.\d+)", out, re.M)] for out in (out1, out2)]
    assert len(losses[0]) == STEPS and np.allclose(losses[0], losses[1], rtol=5e-4, atol=0), losses


@pytest.mark.slow
def test_detector_two_replicas_equal_one_device(sample_dir, tmp_path):
    runs = train_both(tmp_path / "ws", sample_dir, ["--size", "128"], [])
    check(runs, DETECTOR_BOUNDS)


@pytest.mark.slow
def test_segmenter_two_replicas_equal_one_device(sample_dir, tmp_path):
    runs = train_both(tmp_path / "ws", sample_dir, ["--model", "unet_mobilenetv2_320x320", "--size", "96"],
                      ["--task", "segmentation"])
    check(runs, SEGMENTER_BOUNDS)


def test_replicas_beyond_the_gpus_is_one_line(tmp_path):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has GPUs")
    proc = run_cli("train", "--run", "nothing", "--replicas", "0", workspace=tmp_path)
    assert proc.returncode == 2 and "--replicas" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
