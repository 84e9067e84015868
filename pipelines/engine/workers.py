"""`make train RUN=NAME WORKERS=N`: N training processes on this machine, one MultiWorkerMirroredStrategy
cluster on loopback ports, as a cluster's nodes would run it with TF_CONFIG each.

Every worker runs `python -m pipelines train --run NAME` with its own TF_CONFIG (worker i of N, the
addresses 127.0.0.1:PORT). Worker 0 is the chief: its output is this command's output, and it alone
writes the run's files (engine/train.py). The others' output goes to a temporary log, shown when one
of them fails. When any worker fails, the others are stopped (they would wait for it in the next
collective): the command ends with one line naming the worker, its address and its last words, and the
exit status of that worker. Started again, the chief resumes from the run's last checkpoint and the
others from a copy of it.

With GPUs, each worker gets its own share of them (CUDA_VISIBLE_DEVICES); on a CPU, the cores are
shared, so N workers are a check of the multi-worker path, not faster.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from pipelines.common import eprint, free_port
from pipelines.workspace import REPO_ROOT, UserError

STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL


def gpu_shares(workers: int, visible: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker: the GPUs split evenly (None each without GPUs).
    ValueError when they do not split."""
    if not visible:
        return [None] * workers
    if len(visible) % workers:
        raise ValueError(f"WORKERS={workers}: the {len(visible)} GPU(s) here do not split evenly between them")
    each = len(visible) // workers
    return [",".join(visible[i * each:(i + 1) * each]) for i in range(workers)]


def visible_gpus() -> list[str]:
    """The GPUs TensorFlow sees here, as CUDA_VISIBLE_DEVICES entries."""
    import tensorflow as tf

    count = len(tf.config.list_physical_devices("GPU"))
    given = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return given[:count] if given else [str(i) for i in range(count)]


def _last_words(log: Path, lines: int = 1) -> str:
    """The last non-empty lines of a worker's output ('' when it wrote nothing)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _stop(procs: list[subprocess.Popen], settle: float = 0.0) -> None:
    """Stop the workers still running: after `settle` seconds for them to end by themselves (a worker whose
    peer died fails its next collective within seconds, and ends cleanly), SIGTERM, then SIGKILL after
    STOP_GRACE_S (TensorFlow's cluster runtime catches SIGTERM to note a preemption, and goes on)."""
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and any(proc.poll() is None for proc in procs):
        time.sleep(0.1)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def launch(workers: int, train_args: list[str], log: Callable[[str], None] = print) -> int:
    """Run `python -m pipelines train TRAIN_ARGS` as `workers` processes of one cluster; the exit status
    (0 when every worker finished). Raises UserError for what stops it before any worker starts."""
    if os.environ.get("TF_CONFIG"):
        raise UserError(None, "WORKERS=N starts its own cluster on this machine: unset TF_CONFIG, or run "
                              "make train without WORKERS on each node of your cluster (docs/training.md)")
    try:
        shares = gpu_shares(workers, visible_gpus())
    except ValueError as e:
        raise UserError(None, str(e)) from None
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(workers)]
    cluster = {"worker": addresses}
    log(f"{workers} workers on this machine ({', '.join(addresses)}); worker 0 is the chief and writes the run, "
        "its output follows" + (f"; GPUs {' / '.join(shares)}" if shares[0] else ""))
    sys.stdout.flush()  # before the chief's own output
    folder = Path(tempfile.mkdtemp(prefix="pipelines-workers-"))
    logs = [None] + [folder / f"worker-{i}.log" for i in range(1, workers)]
    procs: list[subprocess.Popen] = []
    try:
        for index in range(workers):
            # TMPDIR: what a worker leaves in its temporary folder when killed goes with the launcher's.
            env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(folder),
                       TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
            if shares[index] is not None:
                env["CUDA_VISIBLE_DEVICES"] = shares[index]
            out = open(logs[index], "w") if logs[index] else None  # noqa: SIM115 (closed below)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pipelines", "train", *train_args], cwd=REPO_ROOT, env=env,
                stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True))
            if out:
                out.close()
        while True:
            failed = [(i, p) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                index, proc = failed[0]
                status = proc.returncode
                _stop(procs, settle=STOP_GRACE_S)
                # Its last words, when it ended itself (killed, a worker's last line is only its progress).
                words = _last_words(logs[index]) if logs[index] and status > 0 else ""
                reason = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
                eprint(f"error: training worker {index} ({addresses[index]}) {reason}"
                       + (f": {words}" if words else " (its output is above)" if index == 0 else "")
                       + "; the other workers were stopped; make train again resumes from the last checkpoint")
                return status if status > 0 else 1
            if all(p.poll() == 0 for p in procs):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        _stop(procs)
        shutil.rmtree(folder, ignore_errors=True)


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            return True
    except (OSError, ValueError):
        return False


def watch(pid: int, wait: float, who: str, peers: list[str]) -> None:
    """A worker's watchdog while its strategy waits for the cluster (engine/distribute.py start_cluster):
    after `wait` seconds (unless stopped first), the peers that refuse a connection are named on stderr and
    the worker is stopped (SIGTERM, then SIGKILL)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            os.kill(pid, 0)
        except OSError:
            return
    silent = [address for address in peers if not _answers(address)]
    eprint(f"error: {who}: no answer from " + (", ".join(silent) if silent else "the other workers (" + ", ".join(peers)
                                                + ")")
           + f" within {wait:g} s (PIPELINES_CLUSTER_WAIT_S): is every worker started with the same TF_CONFIG "
           "cluster, and can this machine reach those addresses?")
    os.kill(pid, signal.SIGTERM)
    time.sleep(2)  # waiting in TensorFlow, it may not act on SIGTERM
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    watch(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5:])


def launch_ray(workers: int, train_args: list[str], log: Callable[[str], None] = print) -> int:
    """Run `python -m pipelines train TRAIN_ARGS` as `workers` workers of Ray Train's TensorflowTrainer: Ray
    starts the workers (on the Ray cluster RAY_ADDRESS names, else on a local one it starts here) and sets
    their TF_CONFIG; each runs the training command with it. The exit status (0 when training finished).
    Needs the Ray extra (make ray-setup)."""
    if os.environ.get("TF_CONFIG"):
        raise UserError(None, "LAUNCHER=ray makes its own cluster: unset TF_CONFIG")
    try:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.tensorflow import TensorflowTrainer
    except ImportError:
        raise UserError(None, "LAUNCHER=ray needs Ray Train, an optional extra: make ray-setup "
                              "(installs requirements-ray.lock into .venv)") from None
    import logging

    # What a worker needs from here: this checkout and the settings of the pipelines (workspace, limits).
    settings = {k: v for k, v in os.environ.items() if k.startswith("PIPELINES_")}
    address = os.environ.get("RAY_ADDRESS")
    storage = Path(tempfile.mkdtemp(prefix="pipelines-ray-"))
    log(f"{workers} workers of Ray Train's TensorflowTrainer on "
        + (f"the Ray cluster at {address}" if address else "a local Ray cluster")
        + "; worker 0 is the chief and writes the run, its output follows")
    sys.stdout.flush()

    def train_loop_per_worker(config):
        import json
        import os
        import subprocess
        import sys
        import tempfile

        # Ray has set TF_CONFIG (this worker's index and every worker's address); the training command reads it.
        # The chief's output is shown (Ray forwards it); the others' goes to a file, its end told on failure.
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        with tempfile.TemporaryFile("w+") as out:
            status = subprocess.run([sys.executable, "-m", "pipelines", "train", *config["args"]], cwd=config["repo"],
                                    env={**os.environ, **config["settings"], "PYTHONUNBUFFERED": "1"},
                                    stdout=out if index else None, stderr=subprocess.STDOUT if index else None).returncode
            out.seek(0)
            last = [line.strip() for line in out.read().splitlines() if line.strip()][-1:]
        if status:
            raise RuntimeError(f"training worker {index} exited with status {status}" + "".join(f": {w}" for w in last))

    try:
        if not ray.is_initialized():
            ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True, configure_logging=True,
                     # A local cluster offers a CPU per worker and one for Ray Train's controller, however
                     # many cores there are (the workers share them, as with WORKERS=N).
                     **({} if address else {"num_cpus": max(os.cpu_count() or 1, workers + 1)}))
        gpus = ray.cluster_resources().get("GPU", 0)  # with GPUs, Ray gives each worker one
        trainer = TensorflowTrainer(
            train_loop_per_worker, train_loop_config={"args": train_args, "repo": str(REPO_ROOT), "settings": settings},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0),
            run_config=RunConfig(name="pipelines-train", storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=0)))
        trainer.fit()
        failed = None
    except Exception as e:  # noqa: BLE001  Ray Train's error when a worker failed (its output is above)
        text = str(e)
        told = re.search(r"training worker \d+ exited with status \d+[^\n]*", text)  # ours, from a worker
        failed = told.group(0) if told else next((line.strip() for line in text.splitlines() if line.strip()),
                                                 type(e).__name__)
    finally:
        if not address:
            ray.shutdown()  # before the last line: Ray forwards its workers' output until then
        shutil.rmtree(storage, ignore_errors=True)
    if failed:
        eprint(f"error: Ray Train stopped the training: {failed[:300]}; make train again resumes from the last "
               "checkpoint")
        return 1
    return 0
