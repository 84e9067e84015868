"""Training on several replicas (tf.distribute.MirroredStrategy) or several workers
(MultiWorkerMirroredStrategy) equals training on one device with the same global batch, seed and data
order: `make train REPLICAS=2` on a CPU splits it into two logical devices, which runs the per-replica code
of two GPUs (batch split, losses normalised over the global batch, gradients summed, batch norm
synchronised); `make train WORKERS=2` starts two worker processes on loopback ports that all-reduce
between them, as two machines do, each keeping its part of every global batch of the one data stream.

What "equal" can mean here: the two-replica step uses Keras' synchronised batch norm, which has no fused
kernel, while one device uses the fused one; at random initialisation the early layers' gradients of
these networks are ill-conditioned, and the two kernels' rounding alone moves them by several percent
(measured: the same one-device step with the non-fused kernel differs from the fused one as much as the
two-replica step does). So the updates (the optimizer's momentum after a few steps) are compared by
their relative difference, per part of the network, against bounds that a per-replica normalisation of
the loss (a factor 2: a difference of 1.0) or per-replica batch statistics exceed several times; the
weights themselves must agree to 1e-3 of their size. Two workers of one replica each run the same
per-replica arithmetic as two replicas on one machine (only the all-reduce differs): those two must agree
much more closely (measured: segmenter 0.25 against one device for both, 0.05 between them).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, run_cli

STEPS = 3
LR = "0.001"
# Bound on |momentum(2 replicas) - momentum(1 device)| / |momentum(1 device)| over the variables of each part.
DETECTOR_BOUNDS = {"head": 0.02, "decoder": 0.15, "backbone": 0.2}
SEGMENTER_BOUNDS = {"": 0.35}
# Bound on the same difference between two workers and two replicas (the same per-replica computation).
ALIKE = 0.12


def train_all(workspace, sample_dir, task_args: list[str], data_args: list[str]) -> dict[str, tuple[str, str]]:
    """{'one': one device, 'replicas': two replicas, 'workers': two workers}: (latest checkpoint, output)."""
    run_cli("data", "--dataset", sample_dir, "--workers", "2", *data_args, workspace=workspace, check=True)
    temp = workspace.parent / "tmp"
    temp.mkdir()
    how = {"one": [], "replicas": ["--replicas", "2"], "workers": ["--workers", "2"]}
    for run in how:
        run_cli("config", "--dataset", sample_dir.name, "--run", run, "--batch", "8", "--steps", str(STEPS),
                "--optimizer", "momentum", "--lr", LR, *task_args, workspace=workspace, check=True)

    def train(run):
        proc = run_cli("train", "--run", run, "--eval-every", "0", *how[run], workspace=workspace, check=True,
                       env={"PIPELINES_SYNC_BATCH_NORM": "1", "TMPDIR": str(temp)})
        return tf.train.latest_checkpoint(str(workspace / run / "train")), proc.stdout

    # The workers wait on each other's messages much of the time: the other two train meanwhile.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        workers = pool.submit(train, "workers")
        out = {run: train(run) for run in ("one", "replicas")}
        out["workers"] = workers.result()
    # The second worker's own folder (its checkpoints and summaries) and the launcher's logs are gone.
    assert not list(temp.iterdir()), list(temp.iterdir())
    return out


def relative_differences(one: str, two: str, parts) -> tuple[dict[str, float], float]:
    """({part: |m2 - m1| / |m1| over the momentum slots of its variables}, |w2 - w1| / |w1| over every other
    variable: weights and batch-norm statistics)."""
    a, b = tf.train.load_checkpoint(one), tf.train.load_checkpoint(two)
    sums = {part: [0.0, 0.0] for part in parts}
    weights = [0.0, 0.0]
    names = [name for name, _ in tf.train.list_variables(one)]
    # A multi-worker checkpoint also counts its saves and runs (bookkeeping of TensorFlow's checkpointing).
    extra = {name for name, _ in tf.train.list_variables(two)} - set(names)
    assert extra <= {"save_counter/.ATTRIBUTES/VARIABLE_VALUE", "checkpointed_runs/.ATTRIBUTES/VARIABLE_VALUE"}, extra
    assert set(names) <= {name for name, _ in tf.train.list_variables(two)}
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
    one, out1 = runs["one"]
    assert "on 1 replica(s) (OneDeviceStrategy" in out1
    for how, strategy in (("replicas", "MirroredStrategy"), ("workers", "CollectiveAllReduceStrategy")):
        two, out2 = runs[how]
        assert one.endswith(f"ckpt-{STEPS}") and two.endswith(f"ckpt-{STEPS}")
        assert re.search(rf"batch 8 = 2 x 4 per replica\) on 2 replica\(s\) \({strategy}", out2), out2
        assert re.search(r"batch norm: statistics over the global batch of 8 \(\d+ layers synchronised", out2), out2
        differences, weights = relative_differences(one, two, parts)
        print(how, "relative update differences:", differences, "weights:", weights)
        for part, bound in parts.items():
            assert differences[part] < bound, (how, part, differences)
        assert weights < 1e-3, (how, weights)
        losses = [[float(x) for x in re.findall(r"^step \d+/\d+  loss (\d+\.\d+)", out, re.M)] for out in (out1, out2)]
        assert len(losses[0]) == STEPS and np.allclose(losses[0], losses[1], rtol=5e-4, atol=0), (how, losses)
    alike, _ = relative_differences(runs["replicas"][0], runs["workers"][0], parts)
    print("workers against replicas:", alike)
    assert max(alike.values()) < ALIKE, alike
    workers = runs["workers"][1]
    assert re.search(r"^2 workers on this machine \(127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+\); worker 0 is the chief",
                     workers, re.M), workers
    # Only the chief's progress reaches the output: one line per loop.
    assert len(re.findall(r"^step \d+/\d+  loss", workers, re.M)) == STEPS, workers


@pytest.mark.slow
def test_detector_two_replicas_and_two_workers_equal_one_device(sample_dir, tmp_path):
    workspace = tmp_path / "ws"
    runs = train_all(workspace, sample_dir, ["--size", "128"], [])
    check(runs, DETECTOR_BOUNDS)

    # Started again with one more step, both workers resume from the chief's last checkpoint (the second
    # from a copy of it) and train to the end.
    config = workspace / "workers" / "pipeline.config"
    config.write_text(re.sub(rf"\b(num_steps|total_steps): {STEPS}\b", rf"\1: {STEPS + 1}", config.read_text()))
    temp = workspace.parent / "tmp"
    again = run_cli("train", "--run", "workers", "--eval-every", "0", "--workers", "2", workspace=workspace,
                    check=True, env={"TMPDIR": str(temp)})
    assert f"; resuming from step {STEPS};" in again.stdout, again.stdout
    assert re.search(rf"^trained to step {STEPS + 1} ", again.stdout, re.M), again.stdout
    assert tf.train.latest_checkpoint(str(workspace / "workers" / "train")).endswith(f"ckpt-{STEPS + 1}")
    assert not list(temp.iterdir()), list(temp.iterdir())


@pytest.mark.slow
def test_segmenter_two_replicas_and_two_workers_equal_one_device(sample_dir, tmp_path):
    workspace = tmp_path / "ws"
    runs = train_all(workspace, sample_dir, ["--model", "unet_mobilenetv2_320x320", "--size", "96"],
                     ["--task", "segmentation"])
    check(runs, SEGMENTER_BOUNDS)

    # Started again with more steps to go, the workers resume from the chief's last checkpoint (the second
    # worker from a copy of it: had it started from scratch, the two would disagree on the step and hang).
    # Killed once training runs, the second worker takes the other down with it: one line names it.
    config = workspace / "workers" / "pipeline.config"
    config.write_text(re.sub(rf"\b(num_steps|total_steps): {STEPS}\b", rf"\1: {STEPS + 100}", config.read_text()))
    temp = workspace.parent / "tmp"
    errors = open(workspace.parent / "stderr.txt", "w+")  # a file: read only at the end, it cannot fill up
    launcher = subprocess.Popen([sys.executable, "-m", "pipelines", "train", "--run", "workers", "--eval-every", "0",
                                 "--workers", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=errors,
                                text=True, env={**os.environ, "PIPELINES_WORKSPACE": str(workspace), "TMPDIR": str(temp)})
    try:
        shown = []
        for line in launcher.stdout:
            shown.append(line)
            if line.startswith("step "):
                break
        assert any(f"; resuming from step {STEPS};" in line for line in shown), shown
        assert re.match(rf"step \d+/{STEPS + 100}  loss", shown[-1]), shown
        second = worker_pid(workspace, 1)
        os.kill(second, signal.SIGKILL)
        killed = time.monotonic()
        launcher.communicate(timeout=120)
    finally:
        launcher.kill()
        errors.close()
    stderr = (workspace.parent / "stderr.txt").read_text()
    print(f"stopped {time.monotonic() - killed:.1f} s after the kill:", stderr.strip().splitlines()[-1])
    assert launcher.returncode != 0
    assert re.fullmatch(r"error: training worker 1 \(127\.0\.0\.1:\d+\) killed by signal 9; the other workers were "
                        r"stopped; make train again resumes from the last checkpoint", stderr.strip().splitlines()[-1]), stderr
    assert not list(temp.iterdir()), list(temp.iterdir())
    # What the chief wrote is whole: its checkpoint state names a checkpoint that reads back.
    latest = tf.train.latest_checkpoint(str(workspace / "workers" / "train"))
    assert latest and tf.train.load_checkpoint(latest).get_variable_to_shape_map()


def worker_pid(workspace: Path, index: int) -> int:
    """The pid of worker `index` of the launcher training in `workspace` (by its environment)."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"PIPELINES_WORKSPACE={workspace}".encode() in environ and any(
                item.startswith(b"TF_CONFIG=") and f'"index": {index}}}'.encode() in item for item in environ):
            return int(proc.name)
    raise AssertionError(f"no worker {index} running")


def test_a_worker_that_cannot_reach_the_others_names_the_address(tmp_path):
    """TensorFlow would wait for the other workers for ever: after PIPELINES_CLUSTER_WAIT_S, one line names
    the address that does not answer and the worker stops."""
    from pipelines.common import free_port

    cluster = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    started = time.monotonic()
    proc = run_cli("train", "--run", "nothing", workspace=tmp_path, timeout=120, env={
        "PIPELINES_CLUSTER_WAIT_S": "5",
        "TF_CONFIG": json.dumps({"cluster": {"worker": cluster}, "task": {"type": "worker", "index": 1}})})
    assert proc.returncode != 0 and time.monotonic() - started < 60
    assert f"error: worker 1 ({cluster[1]}): no answer from {cluster[0]} within 5 s" in proc.stderr, proc.stderr


def test_replicas_beyond_the_gpus_is_one_line(tmp_path):
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has GPUs")
    proc = run_cli("train", "--run", "nothing", "--replicas", "0", workspace=tmp_path)
    assert proc.returncode == 2 and "--replicas" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_lost_worker_is_named_from_tensorflows_error(monkeypatch):
    """The messages TensorFlow gave the chief when worker 1 was killed (seen while writing this): its address."""
    from pipelines.engine.distribute import lost_worker

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
                                                "task": {"type": "worker", "index": 0}}))
    reset = ("Graph execution error:\n\nDetected at node CollectiveReduceV2\nAdditional GRPC error information from "
             "remote target /job:worker/replica:0/task:1 while calling /tensorflow.WorkerService/RecvBuf:\n"
             ':UNKNOWN:Error received from peer  {grpc_message:"recvmsg:Connection reset by peer", grpc_status:14}')
    silent = ("Graph execution error:\n\nCollective ops is aborted by: Error reported from /job:worker/task:1: The "
              "following tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\n")
    assert lost_worker(tf.errors.UnavailableError(None, None, reset)) == (
        "worker 0 (10.0.0.1:2222): training stopped: worker 1 (10.0.0.2:2222) is gone (recvmsg:Connection reset by "
        "peer); start every worker again: make train resumes from the last checkpoint")
    assert "worker 1 (10.0.0.2:2222) stopped answering;" in lost_worker(tf.errors.UnavailableError(None, None, silent))
    assert lost_worker(ValueError("not a cluster's error")) is None
    monkeypatch.delenv("TF_CONFIG")
    assert lost_worker(tf.errors.UnavailableError(None, None, reset)) is None
