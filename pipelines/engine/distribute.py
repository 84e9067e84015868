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
"""

from __future__ import annotations

import os

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


def make_strategy(runtime) -> tf.distribute.Strategy:
    """The strategy of an experiment's runtime settings (Model Garden's, but mirrored also over logical CPUs)."""
    from official.common import distribute_utils

    if runtime.distribution_strategy == "mirrored" and runtime.num_gpus == 0:
        return tf.distribute.MirroredStrategy(cpu_replicas())
    return distribute_utils.get_distribution_strategy(
        distribution_strategy=runtime.distribution_strategy, num_gpus=runtime.num_gpus,
        all_reduce_alg=runtime.all_reduce_alg)
