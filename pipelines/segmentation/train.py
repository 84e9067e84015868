"""Train a segmenter with Model Garden: a `base_task.Task` for the segmentation_models networks, run by
the engine every task shares (pipelines/engine/train.py: `train_lib.run_experiment`).

The task reads our TFRecords (pipelines/segmentation/data.py), builds the network and its loss
(pipelines/segmentation/model.py: Dice, focal and cross-entropy terms over the pixels not labelled
255) and measures mean IoU (`MeanIoU`, a confusion matrix). Model Garden's trainer does the rest: the
warmup + cosine schedule, mixed precision with loss scaling on GPUs, the distribution strategy,
checkpoints, resuming, summaries, and the best checkpoint by validation mean IoU (its
best-checkpoint exporter, in RUN_DIR/train/best/).

    python -m pipelines.segmentation.train PARAMS.json RUN_DIR   # PARAMS.json: SegmenterParams' fields
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import tensorflow as tf
import tf_keras

from pipelines import checkpoints
from pipelines.engine import train as engine
from pipelines.segmentation.data import check_inputs, train_dataset, val_dataset
from pipelines.segmentation import TASK, metric
from pipelines.segmentation.model import build_model, loss_fn
from pipelines.segmentation.params import SegmenterParams

from official.core import base_task, task_factory  # isort: skip
from official.core import config_definitions as cfg  # isort: skip

METRIC = metric.METRIC

# ---------------------------------------------------------------------------------------------- task


@dataclasses.dataclass
class SegmenterTaskConfig(cfg.TaskConfig):
    """Model Garden's task config carrying the segmenter's settings (SegmenterParams as JSON: the one
    description of a segmenter, translated from pipeline.config in pipelines/segmentation/config.py)."""
    segmenter: str = "{}"


@task_factory.register_task_cls(SegmenterTaskConfig)
class SegmentationTask(base_task.Task):
    """Model Garden's Task for the segmentation_models networks: inputs from our TFRecords, the 255-ignore
    loss, mean IoU. Model Garden's default train_step and validation_step run them."""

    def __init__(self, params: SegmenterTaskConfig, logging_dir: str | None = None, name: str | None = None):
        super().__init__(params, logging_dir=logging_dir, name=name)
        self.segmenter = SegmenterParams(**json.loads(params.segmenter))
        self._loss = loss_fn(self.segmenter)

    def build_model(self) -> tf_keras.Model:
        return build_model(self.segmenter)

    def build_inputs(self, params: cfg.DataConfig, input_context: tf.distribute.InputContext | None = None):
        if params.is_training:
            return train_dataset(self.segmenter, input_context)
        return val_dataset(self.segmenter, input_context)

    def build_losses(self, labels, model_outputs, aux_losses=None) -> tf.Tensor:
        loss = self._loss(labels, model_outputs)
        if aux_losses:
            loss += tf.add_n(aux_losses)
        return loss

    def build_metrics(self, training: bool = True) -> list[tf_keras.metrics.Metric]:
        return [metric.MeanIoU(self.segmenter.output_classes)]


def default_eval_every(params: SegmenterParams) -> int:
    return min(500, max(1, params.num_steps // 10))


def build_experiment(params: SegmenterParams, eval_every: int | None = None,
                     gpus: int | None = None) -> cfg.ExperimentConfig:
    """The Model Garden experiment of a segmenter: a progress line about five times per evaluation
    interval (default num_steps // 10, at least 1, at most 500), a checkpoint and an evaluation every
    interval and at the end; the best checkpoint by validation mean IoU in RUN_DIR/train/best/."""
    eval_every = eval_every or default_eval_every(params)
    task = SegmenterTaskConfig(
        segmenter=json.dumps(dataclasses.asdict(params)),
        train_data=cfg.DataConfig(is_training=True, global_batch_size=params.batch_size, seed=params.seed,
                                  deterministic=True),
        validation_data=cfg.DataConfig(is_training=False, global_batch_size=params.eval_batch_size,
                                       drop_remainder=False))
    exp = cfg.ExperimentConfig(task=task)
    engine.set_runtime(exp, gpus)
    engine.set_optimizer(exp, params.optimizer, params.learning_rate, params.num_steps, params.schedule,
                         params.warmup_steps, params.warmup_learning_rate, params.momentum)
    engine.set_loops(exp, params.num_steps, steps_per_loop=max(1, eval_every // 5), checkpoint_interval=eval_every,
                     validation_interval=eval_every)
    exp.trainer.max_to_keep = 3
    if params.eval_files:
        engine.keep_best(exp, TASK)
    exp.validate()
    exp.lock()
    return exp


def train(params: SegmenterParams, run_dir: str | Path, log: Callable[[str], None] = print,
          eval_every: int | None = None, mode: str | None = None) -> dict:
    """Train until `params.num_steps`, resuming from RUN_DIR/train's latest checkpoint if any; evaluate
    on the eval_files every `eval_every` steps and at the end (mode 'train_and_eval', the default when
    there are eval_files; 'train' without). Returns what `engine.run` returns. Raises ValueError (no matching files, records without masks, bad settings)
    and EncoderWeightsError (encoder weights missing) before training starts."""
    check_inputs(params)  # the user's errors first: cheaper to find than building the model
    exp = build_experiment(params, eval_every)
    job = engine.Job(
        make_task=lambda config, logging_dir: SegmentationTask(config, logging_dir=logging_dir),
        describe=lambda v: f"loss {v.get('training_loss', float('nan')):.4f}  iou {v.get(METRIC, float('nan')):.4f}",
        describe_eval=lambda v: f"val mean IoU {v.get(METRIC, float('nan')):.4f}, "
                                f"loss {v.get('validation_loss', float('nan')):.4f}",
        batch_size=params.batch_size,
        start_note=f"encoder weights {params.encoder_weights}" if params.encoder_weights else "from scratch",
        notes=[] if params.eval_files else ["no eval_files: no validation, no best checkpoint"])
    mode = mode or ("train_and_eval" if params.eval_files else "train")
    if mode == "train_and_eval" and not params.eval_files:
        raise ValueError("evaluating during training needs eval_files (eval_input_reader.input_path)")
    return engine.run(exp, job, checkpoints.train_dir(run_dir), mode, log)


# ---------------------------------------------------------------------------------------------- CLI


def load_params(path: str | Path) -> SegmenterParams:
    return SegmenterParams(**json.loads(Path(path).read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.segmentation.train", description=__doc__.split("\n")[0])
    parser.add_argument("params", help="JSON file of SegmenterParams fields")
    parser.add_argument("run_dir")
    parser.add_argument("--eval-every", type=int, help="steps between checkpoints and evaluations")
    args = parser.parse_args(argv)
    result = train(load_params(args.params), args.run_dir, eval_every=args.eval_every,
                   log=lambda line: print(line, flush=True))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
