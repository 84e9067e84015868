"""The detector's network as training, export and the zoo import build it: Model Garden's task config
(pipelines/detection/experiment.py) -> our SSD MobileNet V2 FPNLite (pipelines/detection/ssd.py)."""

from __future__ import annotations

import dataclasses

import tf_keras

from pipelines.detection import ssd
from pipelines.detection.experiment import build_experiment
from pipelines.detection.params import DetectorParams


def network(task_config) -> tf_keras.Model:
    """The network of a Model Garden task config, with its L2 weight decay as a Keras regularizer."""
    decay = task_config.losses.l2_weight_decay
    # Divided by 2 as Model Garden does: Keras' l2 has no 1/2, tf.nn.l2_loss has.
    return ssd.build_model(task_config, tf_keras.regularizers.l2(decay / 2.0) if decay else None)


def inference_experiment(params: DetectorParams):
    """The experiment of `params` for building the network alone: no fine-tuning source, no GPU."""
    params = dataclasses.replace(params, fine_tune_checkpoint=None, fine_tune_checkpoint_type=None)
    return build_experiment(params, gpus=0)


def build_model(params: DetectorParams) -> tf_keras.Model:
    """The float32 Keras network for `params` (weights initialised, not restored).

    Restore a training checkpoint with `tf.train.Checkpoint(model=model).read(prefix)`.
    """
    return network(inference_experiment(params).task)
