"""Small helpers every stage uses: settings read from the environment, printing to stderr, durations in
progress lines, an ordered process-parallel map, a free local port, and starting TensorFlow quietly."""

from __future__ import annotations

import glob
import math
import os
import re
import socket
import sys
import tempfile


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a server or a training worker then binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_number(name: str, default: float) -> float:
    """A limit or setting from the environment, read at each call; the default when unset or not a finite
    number (nan would pass every comparison with a limit, inf could not be made an integer)."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        return default
    return value if math.isfinite(value) else default


def env_int(name: str, default: int) -> int:
    """A whole-number setting of at least 1 from the environment, read once; the default when unset or not
    a whole number."""
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def ordered_parallel_map(fn, items, workers: int, window_per_worker: int = 4):
    """Yield fn(item) for each item, in order, computed by `workers` spawned processes.

    At most `workers * window_per_worker` items are in flight, so memory stays flat however many
    items there are. Workers are spawned (not forked): they start clean, without the parent's
    TensorFlow threads. With one worker everything runs in this process.
    """
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    iterator = iter(items)
    pending = collections.deque()
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for item in iterator:
            pending.append(executor.submit(fn, item))
            if len(pending) >= workers * window_per_worker:
                break
        while pending:
            result = pending.popleft().result()
            for item in iterator:
                pending.append(executor.submit(fn, item))
                break
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def duration(seconds: float) -> str:
    """1m05s, 2h03m00s: for progress lines and ETAs."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# What TensorFlow's CUDA build prints on every start on a machine without an NVIDIA driver: expected there,
# and said by the stage itself ("0 GPU(s)"). Anything else TensorFlow prints on start passes through.
_NO_DRIVER_NOISE = re.compile(r"failed call to cuInit|Could not find cuda drivers|cuda_(diagnostics|executor)\.cc")
_started = False


def gpu_device_files() -> list[str]:
    """The device files an NVIDIA driver creates (WSL2: /dev/dxg); none on a machine without a GPU."""
    return sorted(glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/dxg"))


def start_tensorflow():
    """Import TensorFlow and find its devices, once per process; returns the module. What TensorFlow writes
    to stderr meanwhile is held back and written after, less its complaints about a missing CUDA driver on
    a machine that has no GPU device at all. Where a GPU device exists but TensorFlow finds no usable GPU
    (driver or CUDA libraries out of step), that is said in one line, with TensorFlow's own reason."""
    global _started
    if _started:
        import tensorflow as tf

        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
        except BaseException:  # TensorFlow failed to start: all it wrote is news, nothing held back
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            sys.stderr.write(held.read().decode("utf-8", "replace"))
            raise
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        held.seek(0)
        lines = held.read().decode("utf-8", "replace").splitlines()
    _started = True
    devices = gpu_device_files()
    reasons = [line for line in lines if _NO_DRIVER_NOISE.search(line)]
    for line in lines:
        if not _NO_DRIVER_NOISE.search(line):
            eprint(line)
    if devices and not gpus:
        reason = next((line.split("] ", 1)[-1] for line in reasons if "cuInit" in line), "no reason given")
        eprint(f"warning: {devices[0]} is present but TensorFlow found no usable GPU ({reason}); running on the CPU")
    return tf


def use_replicas(replicas: int | None) -> None:
    """The devices training replicates its model over (`make train REPLICAS=N`), set before TensorFlow's
    runtime starts: with GPUs, the first N of them (default all); without, the CPU split into N logical
    devices (default 1). N > 1 on a CPU runs the same per-replica code as N GPUs (batch split, gradients
    summed across replicas, synchronised batch norm), for checking that path; it is not faster.
    Raises ValueError for more GPUs than there are."""
    tf = start_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    if replicas is None:
        return
    if gpus:
        if replicas > len(gpus):
            raise ValueError(f"REPLICAS={replicas}: TensorFlow sees {len(gpus)} GPU(s)")
        tf.config.set_visible_devices(gpus[:replicas], "GPU")
    elif replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
