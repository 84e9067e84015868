"""Train the detector with Model Garden's train_lib; resumable; progress with steps/s and ETA.

Checkpoints (`ckpt-STEP`) and `params.yaml` go to RUN_DIR/train/, TensorBoard summaries to
RUN_DIR/train/train/ (and RUN_DIR/train/validation/ with mode 'train_and_eval'). Started again on
the same RUN_DIR, training continues from the latest checkpoint there: Orbit's Controller restores
it (or, when there is none, calls RetinaNetTask.initialize, which loads fine_tune_checkpoint).

    python -m pipelines.detection.train PARAMS.json RUN_DIR   # PARAMS.json: DetectorParams' fields
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import tensorflow as tf
import tf_keras

from pipelines import checkpoints
from pipelines.detection.experiment import build_experiment
from pipelines.engine import distribute
from pipelines.engine import train as engine
from pipelines.detection import ssd
from pipelines.detection.model import network
from pipelines.detection.params import DetectorParams

from official.common import dataset_fn  # isort: skip
from official.core import task_factory  # isort: skip
from official.vision.dataloaders import input_reader, input_reader_factory, tf_example_decoder  # isort: skip
from official.vision.losses import focal_loss, loss_utils  # isort: skip
from official.vision.tasks import retinanet as retinanet_task  # isort: skip


@task_factory.register_task_cls(ssd.SSDTask)
class DetectionTask(retinanet_task.RetinaNetTask):
    """Model Garden's RetinaNetTask building the Object Detection API's SSD network (pipelines/
    detection/ssd.py) and reading our TFRecords with its parser; restores fine-tuning checkpoints
    of either layout (ours, or the OD API's zoo: pipelines/detection/zoo.py).

    Also fixes COCO evaluation from the TFRecords' own ground truth: Model Garden's eval parser
    gives `groundtruths['num_detections']` as [batch, 1], which coco_utils.convert_groundtruths_to_
    coco_dataset passes to int(), a TypeError under NumPy 2."""

    def build_model(self):
        return network(self.task_config)

    def initialize(self, model):
        if not self.task_config.init_checkpoint:
            return
        from pipelines.detection import zoo

        summary = zoo.restore(model, self.task_config.init_checkpoint, self.task_config.init_checkpoint_modules)
        print(summary, flush=True)

    def build_losses(self, outputs, labels, aux_losses=None):
        """The OD API's SSD loss: Model Garden's (sigmoid focal loss on every anchor and class, Huber
        on the matched anchors' encoded boxes, averaged over the 4 coordinates, plus the L2 losses),
        normalised as the OD API's `normalize_loss_by_num_matches` does: by the number of matched
        anchors in the batch, at least 1 (Model Garden divides by that number plus one). With several
        replicas, the matches of the global batch, the replica's part times the replicas (engine/distribute.py).
        Returns (total, classification, box, model loss), as RetinaNetTask.build_losses does."""
        params = self.task_config.losses
        matches = tf.maximum(distribute.replica_sum(tf.reduce_sum(labels["box_weights"])), 1.0)
        matches /= distribute.num_replicas()
        focal = focal_loss.FocalLoss(alpha=params.focal_loss_alpha, gamma=params.focal_loss_gamma,
                                     reduction=tf_keras.losses.Reduction.SUM)
        huber = tf_keras.losses.Huber(params.huber_loss_delta, reduction=tf_keras.losses.Reduction.SUM)
        num_classes = self.task_config.model.num_classes
        cls_loss = focal(y_true=tf.one_hot(loss_utils.multi_level_flatten(labels["cls_targets"], last_dim=None),
                                           num_classes),
                         y_pred=loss_utils.multi_level_flatten(outputs["cls_outputs"], last_dim=num_classes),
                         sample_weight=labels["cls_weights"] / matches)
        box_loss = huber(y_true=loss_utils.multi_level_flatten(labels["box_targets"], last_dim=4),
                         y_pred=loss_utils.multi_level_flatten(outputs["box_outputs"], last_dim=4),
                         sample_weight=labels["box_weights"] / matches)
        model_loss = cls_loss + params.box_loss_weight * box_loss
        total = model_loss + tf.reduce_sum(aux_losses) if aux_losses else model_loss
        return params.loss_weight * total, cls_loss, box_loss, model_loss

    def parser(self, params) -> ssd.SSDParser:
        """The parser of a DataConfig of this task (train_data or validation_data): images and anchor labels."""
        model = self.task_config.model
        return ssd.SSDParser(
            task=self.task_config, output_size=model.input_size[:2], min_level=model.min_level,
            max_level=model.max_level, num_scales=model.anchor.num_scales, aspect_ratios=model.anchor.aspect_ratios,
            anchor_size=model.anchor.anchor_size, dtype=params.dtype, match_threshold=params.parser.match_threshold,
            unmatched_threshold=params.parser.unmatched_threshold,
            box_coder_weights=model.detection_generator.box_coder_weights, aug_type=params.parser.aug_type,
            aug_rand_hflip=params.parser.aug_rand_hflip, aug_scale_min=params.parser.aug_scale_min,
            aug_scale_max=params.parser.aug_scale_max,
            skip_crowd_during_training=params.parser.skip_crowd_during_training,
            max_num_instances=params.parser.max_num_instances, pad=params.parser.pad,
            keep_aspect_ratio=params.parser.keep_aspect_ratio)

    def build_inputs(self, params, input_context=None):
        decoder = tf_example_decoder.TfExampleDecoder(regenerate_source_id=params.decoder.get().regenerate_source_id)
        parser = self.parser(params)
        reader = input_reader_factory.input_reader_generator(
            params, dataset_fn=dataset_fn.pick_dataset_fn(params.file_type), decoder_fn=decoder.decode,
            combine_fn=input_reader.create_combine_fn(params), parser_fn=parser.parse_fn(params.is_training))
        # With several workers, each reads the whole stream (Model Garden's reader would give each its own
        # files and shuffle) and keeps its replicas' part of every global batch (engine/distribute.py): the
        # batches, augmentation included, of a single machine. Validation is the whole set on every worker.
        dataset = reader.read(input_context=distribute.one_pipeline(input_context))
        if params.is_training:
            return distribute.keep_worker_batches(dataset, input_context)

        def flat_counts(images, labels):
            truth = labels["groundtruths"]
            truth = dict(truth, num_detections=tf.reshape(truth["num_detections"], [-1]))
            return images, dict(labels, groundtruths=truth)

        return dataset.map(flat_counts)


def latest_step(model_dir: str | Path) -> int:
    """The global step of the latest checkpoint in `model_dir` (0 when there is none)."""
    latest = checkpoints.latest_in(model_dir) if Path(model_dir).is_dir() else None
    return (checkpoints.step(latest) or 0) if latest else 0


def describe(values: dict) -> str:
    return (f"loss {values.get('total_loss', float('nan')):.4f} (cls {values.get('cls_loss', float('nan')):.4f}, "
            f"box {values.get('box_loss', float('nan')):.4f})")


def describe_eval(values: dict) -> str:
    return (f"COCO AP {values.get('AP', float('nan')):.4f}, AP50 {values.get('AP50', float('nan')):.4f}, "
            f"loss {values.get('total_loss', values.get('validation_loss', float('nan'))):.4f}")


def train(params: DetectorParams, run_dir: str | Path, log: Callable[[str], None] = print,
          mode: str | None = "train", steps_per_loop: int | None = None, eval_every: int | None = None) -> dict:
    """Train until `params.num_steps`, resuming from RUN_DIR/train's latest checkpoint if any.

    mode: 'train', or 'train_and_eval' (COCO metrics on eval_files every `eval_every` steps, default a fifth
    of the run, in whole loops, and at the end; the best checkpoint by AP kept in RUN_DIR/train/best/;
    `make train`'s default). Returns what `engine.run` returns; its history
    has one dict per loop (step, steps_per_sec, total_loss, cls_loss, box_loss, model_loss,
    learning_rate, ...).
    """
    mode = mode or "train"
    if mode not in ("train", "train_and_eval"):
        raise ValueError(f"mode {mode!r}: expected 'train' or 'train_and_eval'")
    if not params.train_files:
        raise ValueError("no training files (train_input_reader.input_path)")
    if mode == "train_and_eval" and not params.eval_files:
        raise ValueError("train_and_eval needs eval_files")
    exp = build_experiment(params, steps_per_loop=steps_per_loop, eval_every=eval_every)
    job = engine.Job(
        make_task=lambda config, logging_dir: DetectionTask(config, logging_dir=logging_dir),
        describe=describe, describe_eval=describe_eval, batch_size=params.batch_size,
        start_note=(f"initialising from {params.fine_tune_checkpoint} ({exp.task.init_checkpoint_modules})"
                    if params.fine_tune_checkpoint else "from scratch"))
    return engine.run(exp, job, checkpoints.train_dir(run_dir), mode, log)


def load_params(path: str | Path) -> DetectorParams:
    return DetectorParams(**json.loads(Path(path).read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.detection.train", description=__doc__.split("\n")[0])
    parser.add_argument("params", help="JSON file of DetectorParams fields")
    parser.add_argument("run_dir")
    parser.add_argument("--mode", default="train", choices=("train", "train_and_eval"))
    parser.add_argument("--steps-per-loop", type=int)
    args = parser.parse_args(argv)
    result = train(load_params(args.params), args.run_dir, mode=args.mode, steps_per_loop=args.steps_per_loop,
                   log=lambda line: print(line, flush=True))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
