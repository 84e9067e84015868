"""Train the detector with Model Garden's train_lib; resumable; progress with steps/s and ETA.

Checkpoints (`ckpt-STEP`) and `params.yaml` go to RUN_DIR/train/, TensorBoard summaries to
RUN_DIR/train/train/ (and RUN_DIR/train/validation/ with mode 'train_and_eval'). Started again on
the same RUN_DIR, training continues from the latest checkpoint there: Orbit's Controller restores
it (or, when there is none, calls RetinaNetTask.initialize, which loads fine_tune_checkpoint).

    python -m pipelines.detection.train PARAMS.json RUN_DIR   # PARAMS.json: DetectorParams' fields
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf
import tf_keras

from pipelines.common import duration
from pipelines.detection.experiment import build_experiment
from pipelines.detection import ssd
from pipelines.detection.params import DetectorParams

from official.common import dataset_fn, distribute_utils  # isort: skip
from official.core import task_factory, train_lib, train_utils  # isort: skip
from official.modeling import performance  # isort: skip
from official.vision.dataloaders import input_reader, input_reader_factory, tf_example_decoder  # isort: skip
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
        decay = self.task_config.losses.l2_weight_decay
        # Divided by 2 as Model Garden does: Keras' l2 has no 1/2, tf.nn.l2_loss has.
        return ssd.build_model(self.task_config, tf_keras.regularizers.l2(decay / 2.0) if decay else None)

    def initialize(self, model):
        if not self.task_config.init_checkpoint:
            return
        from pipelines.detection import zoo

        summary = zoo.restore(model, self.task_config.init_checkpoint, self.task_config.init_checkpoint_modules)
        print(summary, flush=True)

    def build_inputs(self, params, input_context=None):
        model = self.task_config.model
        decoder = tf_example_decoder.TfExampleDecoder(regenerate_source_id=params.decoder.get().regenerate_source_id)
        parser = ssd.SSDParser(
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
        reader = input_reader_factory.input_reader_generator(
            params, dataset_fn=dataset_fn.pick_dataset_fn(params.file_type), decoder_fn=decoder.decode,
            combine_fn=input_reader.create_combine_fn(params), parser_fn=parser.parse_fn(params.is_training))
        dataset = reader.read(input_context=input_context)
        if params.is_training:
            return dataset

        def flat_counts(images, labels):
            truth = labels["groundtruths"]
            truth = dict(truth, num_detections=tf.reshape(truth["num_detections"], [-1]))
            return images, dict(labels, groundtruths=truth)

        return dataset.map(flat_counts)


def build_model(params: DetectorParams) -> tf_keras.Model:
    """The float32 Keras RetinaNet for `params` (weights initialised, not restored).

    Restore a training checkpoint with `tf.train.Checkpoint(model=model).read(prefix)`.
    """
    params = dataclasses.replace(params, fine_tune_checkpoint=None, fine_tune_checkpoint_type=None)
    exp = build_experiment(params, "", gpus=0)
    return DetectionTask(exp.task).build_model()


def latest_step(model_dir: str | Path) -> int:
    """The global step of the latest checkpoint in `model_dir` (0 when there is none)."""
    latest = tf.train.latest_checkpoint(str(model_dir))
    return int(re.search(r"ckpt-(\d+)$", latest).group(1)) if latest else 0



class Progress:
    """An Orbit train action: after each loop, one line with the loss, steps/s and ETA."""

    def __init__(self, global_step: tf.Variable, total_steps: int, batch_size: int, log: Callable[[str], None]):
        self.global_step = global_step
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.log = log
        self.history: list[dict] = []
        self.first_loop_end: tuple[int, float] | None = None  # the first loop includes tracing
        self.last = (int(global_step.numpy()), time.time())

    def __call__(self, output: dict) -> None:
        step, now = int(self.global_step.numpy()), time.time()
        rate = (step - self.last[0]) / max(now - self.last[1], 1e-9)
        if self.first_loop_end is None:
            self.first_loop_end = (step, now)
            steady = rate
        else:
            steady = (step - self.first_loop_end[0]) / max(now - self.first_loop_end[1], 1e-9)
        self.last = (step, now)
        values = {k: float(np.asarray(v)) for k, v in output.items() if np.ndim(np.asarray(v)) == 0}
        record = {"step": step, "steps_per_sec": rate, **values}
        self.history.append(record)
        eta = (self.total_steps - step) / steady if steady > 0 else float("inf")
        self.log(f"step {step}/{self.total_steps}  loss {values.get('total_loss', float('nan')):.4f} "
                 f"(cls {values.get('cls_loss', float('nan')):.4f}, box {values.get('box_loss', float('nan')):.4f})  "
                 f"lr {values.get('learning_rate', float('nan')):.5f}  {rate:.2f} steps/s "
                 f"({rate * self.batch_size:.1f} img/s)  ETA {duration(eta) if eta != float('inf') else '?'}")


def _strategy(exp) -> tf.distribute.Strategy:
    """MultiWorkerMirrored with TF_CONFIG, Mirrored on >1 GPU, else OneDevice (GPU:0 or CPU:0)."""
    return distribute_utils.get_distribution_strategy(
        distribution_strategy=exp.runtime.distribution_strategy, num_gpus=exp.runtime.num_gpus,
        all_reduce_alg=exp.runtime.all_reduce_alg)


def train(params: DetectorParams, run_dir: str | Path, log: Callable[[str], None] = print, mode: str = "train",
          steps_per_loop: int | None = None) -> dict:
    """Train until `params.num_steps`, resuming from RUN_DIR/train's latest checkpoint if any.

    mode: 'train', or 'train_and_eval' (COCO metrics on eval_files every 10 loops and at the end).
    Returns {'global_step', 'start_step', 'checkpoint', 'model_dir', 'history' (one dict per loop:
    step, steps_per_sec, total_loss, cls_loss, box_loss, model_loss, learning_rate, ...),
    'steps_per_sec' (after the first loop, which includes tracing), 'eval' (last eval metrics or {})}.
    """
    if mode not in ("train", "train_and_eval"):
        raise ValueError(f"mode {mode!r}: expected 'train' or 'train_and_eval'")
    if not params.train_files:
        raise ValueError("no training files (train_input_reader.input_path)")
    if mode == "train_and_eval" and not params.eval_files:
        raise ValueError("train_and_eval needs eval_files")
    model_dir = Path(run_dir) / "train"
    exp = build_experiment(params, str(model_dir), steps_per_loop=steps_per_loop)
    start_step = latest_step(model_dir)
    if start_step >= params.num_steps:
        log(f"{model_dir}: already trained to step {start_step} (num_steps {params.num_steps}); nothing to do")
    policy = tf_keras.mixed_precision.global_policy()
    performance.set_mixed_precision_policy(exp.runtime.mixed_precision_dtype)
    try:
        strategy = _strategy(exp)
        if strategy.extended.should_checkpoint:
            train_utils.serialize_config(exp, str(model_dir))
        log(f"training on {strategy.num_replicas_in_sync} replica(s) ({type(strategy).__name__}, "
            f"{exp.runtime.num_gpus} GPU(s), {'mixed_float16' if exp.runtime.num_gpus else 'float32'}); "
            + (f"resuming from step {start_step}" if start_step else
               f"initialising from {params.fine_tune_checkpoint} ({exp.task.init_checkpoint_modules})"
               if params.fine_tune_checkpoint else "from scratch")
            + f"; checkpoints and summaries in {model_dir}")
        with strategy.scope():
            task = DetectionTask(exp.task, logging_dir=str(model_dir))
            trainer = train_utils.create_trainer(exp, task, train=True, evaluate=mode == "train_and_eval")
        frozen = trainer.model.frozen_variables() if hasattr(trainer.model, "frozen_variables") else []
        if frozen:
            total = len(frozen) + len(trainer.model.trainable_weights)
            log(f"froze {len(frozen)} of {total} trainable variables (train_config.freeze_variables / "
                "update_trainable_variables): they get no gradient")
        progress = Progress(trainer.global_step, params.num_steps, params.batch_size, log)
        evals: list[dict] = []

        def keep_eval(output):
            evals.append({k: float(np.asarray(v)) for k, v in output.items() if np.ndim(np.asarray(v)) == 0})
            log(f"eval at step {int(trainer.global_step.numpy())}: COCO AP {evals[-1].get('AP', float('nan')):.4f}, "
                f"AP50 {evals[-1].get('AP50', float('nan')):.4f}, loss {evals[-1].get('total_loss', float('nan')):.4f}")

        started = time.time()
        train_lib.run_experiment(distribution_strategy=strategy, task=task, mode=mode, params=exp,
                                 model_dir=str(model_dir), trainer=trainer, train_actions=[progress],
                                 eval_actions=[keep_eval])
        global_step = int(trainer.global_step.numpy())
    finally:
        tf_keras.mixed_precision.set_global_policy(policy)
    steady = [h["steps_per_sec"] for h in progress.history[1:]]
    result = {
        "global_step": global_step,
        "start_step": start_step,
        "checkpoint": tf.train.latest_checkpoint(str(model_dir)),
        "model_dir": str(model_dir),
        "history": progress.history,
        "steps_per_sec": float(np.mean(steady)) if steady else
        (progress.history[0]["steps_per_sec"] if progress.history else 0.0),
        "elapsed_s": time.time() - started,
        "eval": evals[-1] if evals else {},
    }
    log(f"trained to step {global_step} in {duration(result['elapsed_s'])} "
        f"({result['steps_per_sec']:.2f} steps/s after the first loop); latest checkpoint {result['checkpoint']}")
    return result


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
