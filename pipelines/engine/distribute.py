"""Training on several replicas with TensorFlow's own strategies, for every task: which strategy, and
what makes N replicas train like one device with the same global batch.

- MirroredStrategy over the GPUs, or over N logical CPU devices (`make train REPLICAS=N`: the same
  per-replica code, to check the path on a machine without GPUs); MultiWorkerMirroredStrategy when
  TF_CONFIG names several workers.
- A loss normalised by a count over the batch (the detector's matched anchors, the segmenter's valid
  pixels, Dice's sums) takes that count over the whole global batch (`replica_sum`), and is multiplied
  by the number of replicas, because Model Garden's train_step divides each replica's loss by it before
  the gradients are summed.
- Batch norm computes its batch statistics over the global batch (`synchronize_batch_norm`), as one
  device with the whole batch does.
- With several workers, every worker reads the one shuffled stream a single machine reads and keeps its
  part of each global batch (`worker_part`, `keep_worker_batches`): worker w's replicas get the places
  w*r*b .. (w+1)*r*b - 1 of every global batch (r replicas of b examples each), so the global batch is the
  one a single machine trains on. Validation is not split: every worker evaluates the whole val set, so
  the chief's metrics (COCO's, computed on its own replicas' results) cover every val image.
- Only the chief (worker 0) writes the run's files; `is_chief`, `multi_worker` read TF_CONFIG.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import tensorflow as tf
import tf_keras


def num_replicas() -> int:
    """Replicas of the step being traced (1 outside a strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_sum(value: tf.Tensor) -> tf.Tensor:
    """`value` summed over the replicas of the step (itself with one replica). Differentiable: the
    gradient that reaches each replica's part is the sum of every replica's."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def synchronize_batch_norm(model: tf_keras.Model) -> int:
    """Make every batch-norm layer of `model` compute its training statistics over all replicas (Keras'
    `synchronized=True`, which has no fused kernel); before the train step is traced. Returns how many."""
    layers = [layer for layer in model.submodules if isinstance(layer, tf_keras.layers.BatchNormalization)]
    for layer in layers:
        layer.synchronized = True
        layer.fused = False
    return len(layers)


def sync_batch_norm_asked() -> bool:
    """PIPELINES_SYNC_BATCH_NORM=1: the synchronised (non-fused) batch-norm kernel on one device too, so that
    a one-device run can be compared with a several-replica one kernel for kernel (tests/test_distribute.py)."""
    return os.environ.get("PIPELINES_SYNC_BATCH_NORM") == "1"


def cpu_replicas() -> list[str]:
    """The logical CPU devices training may replicate over (more than one only with REPLICAS=N)."""
    return [device.name for device in tf.config.list_logical_devices("CPU")]


def strategy_name(gpus: int, multi_worker: bool) -> str:
    if multi_worker:
        return "multi_worker_mirrored"
    return "mirrored" if gpus > 1 or (gpus == 0 and len(cpu_replicas()) > 1) else "one_device"


_CLUSTER: list[tf.distribute.Strategy] = []  # the process's MultiWorkerMirroredStrategy, once made


def start_cluster() -> tf.distribute.Strategy:
    """The MultiWorkerMirroredStrategy of TF_CONFIG's cluster, made once per process. TensorFlow configures
    its collective ops when the strategy is made, which must come before its runtime runs anything: the
    train command calls this first thing."""
    if not _CLUSTER:
        from tensorflow.python.distribute import collective_all_reduce_strategy as collective

        # TensorFlow waits for every worker before the first step, forever when one never answers, inside a
        # call that holds the interpreter: a watchdog process (engine/workers.py) names the addresses that
        # do not answer and stops this one. After the start, TensorFlow's
        # health checks abort the collectives when a worker stops answering (UnavailableError in the others).
        wait = cluster_wait_s()
        collective.CollectiveAllReduceExtended._check_health_initial_timeout = wait
        watchdog = subprocess.Popen([sys.executable, "-m", "pipelines.engine.workers", "--watch", str(os.getpid()),
                                     str(wait), task_address(), *peers()])
        try:
            _CLUSTER.append(tf.distribute.MultiWorkerMirroredStrategy())
        finally:
            watchdog.terminate()
            watchdog.wait()
    return _CLUSTER[0]


def cluster_wait_s() -> int:
    """How long a worker waits for the others to start (PIPELINES_CLUSTER_WAIT_S, default 600 s)."""
    from pipelines.common import env_int

    return env_int("PIPELINES_CLUSTER_WAIT_S", 600)


def peers() -> list[str]:
    """The addresses of the other tasks in TF_CONFIG."""
    config = tf_config()
    task = config.get("task", {})
    return [address for kind, addresses in config.get("cluster", {}).items() for i, address in enumerate(addresses)
            if (kind, i) != (task.get("type"), int(task.get("index", 0)))]


def make_strategy(runtime) -> tf.distribute.Strategy:
    """The strategy of an experiment's runtime settings (Model Garden's, but mirrored also over logical CPUs,
    and the process's own cluster strategy with several workers)."""
    from official.common import distribute_utils

    if runtime.distribution_strategy == "multi_worker_mirrored":
        return start_cluster()
    if runtime.distribution_strategy == "mirrored" and runtime.num_gpus == 0:
        return tf.distribute.MirroredStrategy(cpu_replicas())
    return distribute_utils.get_distribution_strategy(
        distribution_strategy=runtime.distribution_strategy, num_gpus=runtime.num_gpus,
        all_reduce_alg=runtime.all_reduce_alg)


# ---------------------------------------------------------------------------------------------- workers


def tf_config() -> dict:
    """TF_CONFIG as a dict ({} when unset); ValueError naming the variable when it is not JSON."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ValueError('TF_CONFIG needs a "cluster" ({"worker": ["host:port", ...]}) and a "task" '
                         '({"type": "worker", "index": N})')
    return config


def multi_worker() -> bool:
    """TF_CONFIG names more than one task: MultiWorkerMirroredStrategy."""
    cluster = tf_config().get("cluster", {})
    return sum(len(tasks) for tasks in cluster.values() if isinstance(tasks, list)) > 1


def is_chief() -> bool:
    """This process writes the run's files: no TF_CONFIG, the task of type 'chief', or worker 0 of a
    cluster without one (TensorFlow's rule)."""
    config = tf_config()
    task = config.get("task", {})
    if not config or task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in config["cluster"]


def task_address() -> str:
    """'worker 1 (10.0.0.2:2222)': this process's task in TF_CONFIG, for messages."""
    config = tf_config()
    task = config.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    try:
        return f"{kind} {index} ({config['cluster'][kind][index]})"
    except (KeyError, IndexError, TypeError):
        return f"{kind} {index}"


def worker_part(global_batch: int, input_context: tf.distribute.InputContext | None) -> tuple[int, int]:
    """(start, stop): the places of every global batch this worker's replicas train on ((0, global_batch)
    without an input context or with a single input pipeline)."""
    if input_context is None or input_context.num_input_pipelines == 1:
        return 0, global_batch
    per_worker = global_batch // input_context.num_input_pipelines
    start = input_context.input_pipeline_id * per_worker
    return start, start + per_worker


def one_pipeline(input_context: tf.distribute.InputContext | None) -> tf.distribute.InputContext | None:
    """The input context of the whole stream (one input pipeline, the same replicas): a reader given it
    neither shards its files nor its records, and batches at the per-replica size."""
    if input_context is None or input_context.num_input_pipelines == 1:
        return input_context
    return tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                      num_replicas_in_sync=input_context.num_replicas_in_sync)


def keep_worker_batches(dataset: tf.data.Dataset, input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    """From the whole stream batched per replica (`one_pipeline`), the batches of this worker's replicas:
    of every num_replicas_in_sync consecutive batches (one global batch), those of places
    [w * r, (w + 1) * r) for worker w with r replicas."""
    if input_context is None or input_context.num_input_pipelines == 1:
        return dataset
    replicas = input_context.num_replicas_in_sync
    per_worker = replicas // input_context.num_input_pipelines
    worker = input_context.input_pipeline_id
    kept = dataset.enumerate().filter(lambda k, _: (k % replicas) // per_worker == worker)
    return kept.map(lambda _, batch: batch)


def lost_worker(error: BaseException) -> str | None:
    """The one-line message for a multi-worker training stopped because a worker is gone (TensorFlow's
    health check aborted the collectives, or a collective failed); None for any other error."""
    if not multi_worker() or not isinstance(error, (tf.errors.UnavailableError, tf.errors.CancelledError,
                                                     tf.errors.DeadlineExceededError, tf.errors.InternalError)):
        return None
    text = str(error.message)
    # TensorFlow names the lost task: "task:N is down" (a collective's peer), "The following tasks are
    # unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:N" (the coordination service), or
    # "remote target /job:worker/replica:0/task:N" (a connection to it failed).
    for pattern, why in ((r"/job:(\w+)/replica:0/task:(\d+) is down", "is down"),
                         (r"tasks are unhealthy[^/]*/job:(\w+)/replica:0/task:(\d+)", "stopped answering"),
                         (r"remote target /job:(\w+)/replica:0/task:(\d+)", "is gone")):
        found = re.search(pattern, text)
        if found:
            kind, index = found.group(1), int(found.group(2))
            try:
                who = f"{kind} {index} ({tf_config()['cluster'][kind][index]})"
            except (KeyError, IndexError):
                who = f"{kind} {index}"
            detail = re.search(r'grpc_message:"([^"]+)"', text)
            reason = f"{who} {why}" + (f" ({detail.group(1)})" if detail else "")
            break
    else:
        first = next((line.strip() for line in text.splitlines() if line.strip()
                      and not line.strip().endswith(":") and not line.strip().startswith("File ")), "")
        reason = f"another worker is gone ({first[:200]})"
    return f"{task_address()}: training stopped: {reason}; start every worker again: make train resumes from the " \
           "last checkpoint"
