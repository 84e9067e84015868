"""Train a segmenter with a plain TensorFlow loop; resumable; validation mean IoU keeps the best checkpoint.

RUN_DIR/train/ holds the checkpoints (`ckpt-STEP`: model, optimizer state and step) and the
TensorBoard summaries of training (loss, mean_iou, learning_rate); RUN_DIR/train/validation/ the
validation summaries (loss, mean_iou); RUN_DIR/train/best/ the checkpoint with the best validation
mean IoU so far (model and step) and its `best.json`; RUN_DIR/train/evals.json every evaluation.
Started again on the same RUN_DIR, training continues from the latest checkpoint there.

    python -m pipelines.segmentation.train PARAMS.json RUN_DIR   # PARAMS.json: SegmenterParams' fields
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf
import tf_keras

from pipelines.common import duration
from pipelines.segmentation.data import train_dataset, val_dataset
from pipelines.segmentation.model import build_model, loss_fn
from pipelines.segmentation.params import SegmenterParams


# ---------------------------------------------------------------------------------------------- checkpoints


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The prefix of RUN_DIR's latest training checkpoint (RUN_DIR/train/ckpt-N), or None."""
    return tf.train.latest_checkpoint(str(Path(run_dir) / "train"))


def best_checkpoint(run_dir: str | Path) -> str | None:
    """The prefix of RUN_DIR's best checkpoint by validation mean IoU (RUN_DIR/train/best/ckpt-N), or None."""
    return tf.train.latest_checkpoint(str(Path(run_dir) / "train" / "best"))


def restore(model: tf_keras.Model, prefix: str):
    """Load the model weights of a training or best checkpoint into `model` (built with the same params;
    its dtype policy may differ). Raises FileNotFoundError without the checkpoint, ValueError when the
    checkpoint holds another model."""
    if not tf.io.gfile.exists(f"{prefix}.index"):
        raise FileNotFoundError(f"no checkpoint at {prefix} (give the prefix, e.g. RUN_DIR/train/ckpt-N)")
    try:
        # read(), not restore(): a checkpoint written with Checkpoint.write() has no save counter to match.
        return tf.train.Checkpoint(model=model).read(prefix).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise ValueError(f"{prefix}: the checkpoint does not fit this model (another architecture, backbone "
                         f"or number of classes?): {str(e).splitlines()[0]}") from None


def _checkpoint_step(prefix: str | None) -> int:
    return int(prefix.rsplit("-", 1)[1]) if prefix else 0


def _write_json(path: Path, value) -> None:
    """Write-then-rename: a killed run never leaves half a JSON file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


# ---------------------------------------------------------------------------------------------- metrics


def confusion_matrix(labels: tf.Tensor, logits: tf.Tensor, num_classes: int) -> tf.Tensor:
    """float32 [C, C] pixel counts, rows truth, columns prediction (argmax of the logits).

    Pixels labelled 255 are left out, and so is any id >= C (a mask from another label map), which the
    loss cannot learn either. float32 counts are exact while a call sees fewer than 2**24 pixels
    (64 images of 512x512); the callers add them up in float64."""
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    predictions = tf.reshape(tf.argmax(logits, axis=-1, output_type=tf.int32), [-1])
    valid = labels < num_classes  # also excludes IGNORE_LABEL (255): masks are uint8, so C <= 255
    index = tf.where(valid, labels * num_classes + predictions, 0)
    counts = tf.math.bincount(index, weights=tf.cast(valid, tf.float32), minlength=num_classes * num_classes,
                              maxlength=num_classes * num_classes)
    return tf.reshape(counts, [num_classes, num_classes])


def mean_iou(confusion) -> float:
    """Mean intersection over union of the classes present in the truth or the predictions (0 if none)."""
    confusion = np.asarray(confusion, np.float64)
    hits = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - hits
    present = union > 0
    return float(np.mean(hits[present] / union[present])) if present.any() else 0.0


def evaluator(model: tf_keras.Model, params: SegmenterParams,
              strategy: tf.distribute.Strategy | None = None) -> Callable[[tf.data.Dataset], dict]:
    """A function dataset -> {"mean_iou", "loss" (mean per image), "images", "confusion"} that runs one
    pass over (images, masks) batches. Keep it for repeated evaluations: it traces its step once."""
    strategy = strategy or tf.distribute.get_strategy()
    compute_loss = loss_fn(params)
    classes = params.output_classes

    def replica_step(images, masks):
        logits = model(images, training=False)
        count = tf.shape(images)[0]
        # An empty replica batch (the last, small batch split over GPUs) adds nothing.
        loss = tf.cond(count > 0, lambda: compute_loss(masks, logits), lambda: 0.0)
        return loss * tf.cast(count, tf.float32), confusion_matrix(masks, logits, classes), count

    @tf.function(reduce_retracing=True)  # the last batch is smaller: one more trace, not one per shape
    def eval_step(images, masks):
        outputs = strategy.run(replica_step, args=(images, masks))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in outputs]

    def run(dataset: tf.data.Dataset) -> dict:
        loss_sum, images_seen = 0.0, 0
        confusion = np.zeros((classes, classes), np.float64)
        for images, masks in strategy.experimental_distribute_dataset(dataset):
            batch_loss, batch_confusion, count = eval_step(images, masks)
            loss_sum += float(batch_loss)
            confusion += batch_confusion.numpy()
            images_seen += int(count)
        return {"mean_iou": mean_iou(confusion), "loss": loss_sum / max(images_seen, 1), "images": images_seen,
                "confusion": confusion}

    return run


def evaluate(model: tf_keras.Model, params: SegmenterParams, dataset: tf.data.Dataset) -> dict:
    """One evaluation of `model` on (images, masks) batches, e.g. `val_dataset(params)`: see `evaluator`."""
    return evaluator(model, params)(dataset)


# ---------------------------------------------------------------------------------------------- optimisation


class LearningRate(tf_keras.optimizers.schedules.LearningRateSchedule):
    """The Object Detection API's schedules: linear warmup from warmup_learning_rate over
    warmup_steps, then cosine decay from learning_rate to 0 at num_steps, or constant."""

    def __init__(self, params: SegmenterParams):
        if params.schedule not in ("cosine", "constant"):
            raise ValueError(f"learning-rate schedule {params.schedule!r}: expected 'cosine' or 'constant'")
        self.base = float(params.learning_rate)
        self.warmup_rate = float(params.warmup_learning_rate)
        self.warmup_steps = int(params.warmup_steps)
        self.total_steps = int(params.num_steps)
        self.cosine = params.schedule == "cosine"

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        rate = tf.constant(self.base)
        if self.cosine:
            progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
            rate = 0.5 * self.base * (1.0 + tf.cos(math.pi * tf.clip_by_value(progress, 0.0, 1.0)))
        if self.warmup_steps > 0:
            warm = self.warmup_rate + (self.base - self.warmup_rate) * step / self.warmup_steps
            rate = tf.where(step < self.warmup_steps, warm, rate)
        return rate

    def get_config(self):
        return {"base": self.base, "warmup_rate": self.warmup_rate, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "cosine": self.cosine}


def build_optimizer(params: SegmenterParams, mixed_precision: bool):
    schedule = LearningRate(params)
    if params.optimizer == "adam":
        optimizer = tf_keras.optimizers.Adam(learning_rate=schedule)
    elif params.optimizer == "momentum":
        optimizer = tf_keras.optimizers.SGD(learning_rate=schedule, momentum=params.momentum)
    else:
        raise ValueError(f"optimizer {params.optimizer!r}: expected 'adam' or 'momentum'")
    # float16 gradients underflow without loss scaling.
    return (tf_keras.mixed_precision.LossScaleOptimizer(optimizer) if mixed_precision else optimizer), schedule


def _strategy() -> tf.distribute.Strategy:
    """All GPUs of this machine with MirroredStrategy when there are several, else the default
    (the one GPU, or the CPU)."""
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


# ---------------------------------------------------------------------------------------------- progress



class Throughput:
    """Training speed from the time spent in training steps only: the clock is restarted after each
    evaluation and checkpoint. The first interval of a run includes tracing the step function, so the
    steady-state rate leaves it out."""

    def __init__(self, step: int):
        self.mark = (step, time.perf_counter())
        self.intervals = 0
        self.steady_steps = 0
        self.steady_seconds = 0.0

    def lap(self, step: int) -> float:
        """Steps/s since the last lap or restart."""
        now = time.perf_counter()
        steps, seconds = step - self.mark[0], max(now - self.mark[1], 1e-9)
        if self.intervals:
            self.steady_steps += steps
            self.steady_seconds += seconds
        self.intervals += 1
        self.mark = (step, now)
        return steps / seconds

    def restart(self, step: int) -> None:
        self.mark = (step, time.perf_counter())

    @property
    def steady(self) -> float | None:
        return self.steady_steps / self.steady_seconds if self.steady_seconds else None


# ---------------------------------------------------------------------------------------------- training


class Validation:
    """Evaluations during training: summaries under train/validation/, every result in train/evals.json
    (kept across restarts), and the best checkpoint by mean IoU in train/best/ with its best.json."""

    def __init__(self, model, params: SegmenterParams, dataset: tf.data.Dataset, strategy, model_dir: Path,
                 step: tf.Variable, log: Callable[[str], None]):
        self.dataset = dataset
        self.log = log
        self.model_dir = model_dir
        self.run = evaluator(model, params, strategy)
        self.writer = tf.summary.create_file_writer(str(model_dir / "validation"))
        # Only the weights: the optimizer's slots would double or triple the file.
        self.best_manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, step=step),
                                                       str(model_dir / "best"), max_to_keep=1, checkpoint_name="ckpt")
        self.best = _read_json(model_dir / "best" / "best.json", None)
        self.history = _read_json(model_dir / "evals.json", [])
        self.evals: list[dict] = []  # this call's

    def __call__(self, at_step: int) -> None:
        began = time.perf_counter()
        result = self.run(self.dataset)
        with self.writer.as_default():
            tf.summary.scalar("mean_iou", result["mean_iou"], step=at_step)
            tf.summary.scalar("loss", result["loss"], step=at_step)
        self.writer.flush()
        improved = self.best is None or result["mean_iou"] > self.best["mean_iou"]
        if improved:
            self.best_manager.save(checkpoint_number=at_step)
            self.best = {"step": at_step, "mean_iou": result["mean_iou"]}
            _write_json(self.model_dir / "best" / "best.json", self.best)
        record = {"step": at_step, "mean_iou": result["mean_iou"], "loss": result["loss"]}
        self.evals.append(record)
        self.history.append(record)
        _write_json(self.model_dir / "evals.json", self.history)
        self.log(f"eval at step {at_step}: val mean IoU {result['mean_iou']:.4f}, loss {result['loss']:.4f} "
                 f"({result['images']} images, {time.perf_counter() - began:.1f}s)"
                 + ("; new best" if improved else f"; best {self.best['mean_iou']:.4f} at step {self.best['step']}"))


def _train_step(model, optimizer, params: SegmenterParams, strategy, step: tf.Variable, mixed: bool):
    """A tf.function running one step on the next batch of a distributed iterator, and the interval
    accumulators it adds to: (train_step, loss_sum, confusion)."""
    compute_loss = loss_fn(params)
    classes = params.output_classes
    replicas = strategy.num_replicas_in_sync
    # Plain variables, updated in cross-replica context after the reduce.
    loss_sum = tf.Variable(0.0, trainable=False)
    confusion = tf.Variable(tf.zeros([classes, classes], tf.float64), trainable=False)

    def replica_step(images, masks):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = compute_loss(masks, logits)
            if model.losses:
                loss += tf.add_n(model.losses)
            # apply_gradients sums the replicas' gradients: each contributes its share of the mean.
            scaled = loss / replicas
            if mixed:  # float16 gradients underflow without loss scaling
                scaled = optimizer.get_scaled_loss(scaled)
        grads = tape.gradient(scaled, model.trainable_variables)
        if mixed:
            grads = optimizer.get_unscaled_gradients(grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss / replicas, confusion_matrix(masks, logits, classes)

    @tf.function
    def train_step(iterator):
        # next() inside the function: the batch never goes through Python.
        loss, batch_confusion = strategy.run(replica_step, args=next(iterator))
        loss_sum.assign_add(strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None))
        batch_confusion = strategy.reduce(tf.distribute.ReduceOp.SUM, batch_confusion, axis=None)
        confusion.assign_add(tf.cast(batch_confusion, tf.float64))
        step.assign_add(1)

    return train_step, loss_sum, confusion


def train(params: SegmenterParams, run_dir: str | Path, log: Callable[[str], None] = print,
          eval_every: int | None = None) -> dict:
    """Train until `params.num_steps`, resuming from RUN_DIR/train's latest checkpoint if any.

    Every `eval_every` steps (default num_steps // 10, at least 1, at most 500) and at the end: a
    checkpoint, the validation mean IoU and loss (when eval_files are given), and the best checkpoint
    so far in RUN_DIR/train/best/. A progress line about five times per evaluation interval.

    Returns {"final_step", "start_step", "history" (one dict per progress line: step, loss, iou,
    learning_rate, steps_per_sec, images_per_sec), "steps_per_sec" and "images_per_sec" (steady
    state: the time of training steps only, after the first interval, which includes tracing; None
    when no step ran), "best" ({"step", "mean_iou"} or None), "evals" (this call's evaluations:
    step, mean_iou, loss), "checkpoint", "best_checkpoint", "model_dir", "elapsed_s"}.
    Raises ValueError (no matching files, records without masks, bad settings) and
    EncoderWeightsError (encoder weights missing) before training starts.
    """
    started = time.perf_counter()
    model_dir = Path(run_dir) / "train"
    eval_every = eval_every or min(500, max(1, params.num_steps // 10))
    log_every = max(1, eval_every // 5)

    def result(final_step, start_step, history=(), steady=None, validation=None) -> dict:
        best = validation.best if validation else _read_json(model_dir / "best" / "best.json", None)
        return {"final_step": final_step, "start_step": start_step, "history": list(history),
                "steps_per_sec": steady, "images_per_sec": steady * params.batch_size if steady else None,
                "best": best, "evals": validation.evals if validation else [],
                "checkpoint": latest_checkpoint(run_dir), "best_checkpoint": best_checkpoint(run_dir),
                "model_dir": str(model_dir), "elapsed_s": time.perf_counter() - started}

    # Input errors first: they are the user's, and cheaper to find than building the model.
    data = train_dataset(params)
    val_data = val_dataset(params) if params.eval_files else None
    LearningRate(params)  # validates the schedule name

    done = _checkpoint_step(latest_checkpoint(run_dir))
    evaluated = {e["step"] for e in _read_json(model_dir / "evals.json", [])}
    if done >= params.num_steps and (val_data is None or done in evaluated):
        log(f"{model_dir}: already trained to step {done} (num_steps {params.num_steps}); nothing to do")
        return result(done, done)

    gpus = tf.config.list_logical_devices("GPU")
    mixed = bool(gpus)
    previous_policy = tf_keras.mixed_precision.global_policy()
    if mixed:  # before building: the layers take the policy they are created under
        tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        strategy = _strategy()
        if params.batch_size % strategy.num_replicas_in_sync:
            raise ValueError(f"batch_size {params.batch_size} does not divide over "
                             f"{strategy.num_replicas_in_sync} GPUs")
        with strategy.scope():
            model = build_model(params)
            optimizer, schedule = build_optimizer(params, mixed_precision=mixed)
            # Slot variables now, so that a restore fills them at once instead of at the first step.
            optimizer.build(model.trainable_variables)
            step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
        manager = tf.train.CheckpointManager(checkpoint, str(model_dir), max_to_keep=3, checkpoint_name="ckpt")
        if manager.latest_checkpoint:
            try:
                checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            except (AssertionError, ValueError) as e:
                raise ValueError(f"{manager.latest_checkpoint}: the run's checkpoint does not fit these settings "
                                 f"(use a new run folder, or delete {model_dir}): {str(e).splitlines()[0]}") from None
        start_step = int(step.numpy())
        validation = (Validation(model, params, val_data, strategy, model_dir, step, log)
                      if val_data is not None else None)

        if start_step >= params.num_steps:  # a run stopped between its last checkpoint and that evaluation
            log(f"{model_dir}: already trained to step {start_step}; evaluating its last checkpoint")
            validation(start_step)
            return result(start_step, start_step, validation=validation)

        log(f"training {model.name} ({model.count_params():,} parameters, {params.image_height}x{params.image_width}, "
            f"batch {params.batch_size}) on {strategy.num_replicas_in_sync} replica(s) ({type(strategy).__name__}, "
            f"{len(gpus)} GPU(s), {'mixed_float16' if mixed else 'float32'}); "
            + (f"resuming from step {start_step} ({manager.latest_checkpoint})" if start_step else
               f"encoder weights {params.encoder_weights}" if params.encoder_weights else "from scratch")
            + f"; checkpoints and summaries in {model_dir}, evaluation every {eval_every} steps"
            + ("" if validation else " (no eval_files: no validation, no best checkpoint)"))

        train_step, loss_sum, confusion = _train_step(model, optimizer, params, strategy, step, mixed)
        iterator = iter(strategy.experimental_distribute_dataset(data))
        writer = tf.summary.create_file_writer(str(model_dir))
        history: list[dict] = []
        throughput = Throughput(start_step)
        current = interval_start = start_step
        while current < params.num_steps:
            train_step(iterator)
            current += 1
            at_eval = current % eval_every == 0 or current == params.num_steps
            if current % log_every and not at_eval:
                continue
            rate = throughput.lap(current)
            record = {"step": current, "loss": float(loss_sum.numpy()) / (current - interval_start),
                      "iou": mean_iou(confusion.numpy()),
                      "learning_rate": float(schedule(current - 1)),  # what the last step used
                      "steps_per_sec": rate, "images_per_sec": rate * params.batch_size}
            history.append(record)
            loss_sum.assign(0.0)
            confusion.assign(tf.zeros_like(confusion))
            interval_start = current
            with writer.as_default():
                tf.summary.scalar("loss", record["loss"], step=current)
                tf.summary.scalar("mean_iou", record["iou"], step=current)
                tf.summary.scalar("learning_rate", record["learning_rate"], step=current)
            log(f"step {current}/{params.num_steps}  loss {record['loss']:.4f}  iou {record['iou']:.4f}  "
                f"lr {record['learning_rate']:.6f}  {rate:.2f} steps/s ({record['images_per_sec']:.1f} img/s)  "
                f"ETA {duration((params.num_steps - current) / (throughput.steady or rate))}"
                + ("  (includes tracing)" if len(history) == 1 else ""))
            if at_eval:
                writer.flush()
                manager.save(checkpoint_number=current)
                if validation:
                    validation(current)
                throughput.restart(current)  # evaluating and saving are not training speed
        writer.close()
        # With a single interval (which includes tracing), its rate is the only figure there is.
        steady = throughput.steady or (history[-1]["steps_per_sec"] if history else None)
        out = result(current, start_step, history, steady, validation)
        log(f"trained to step {current} in {duration(out['elapsed_s'])}"
            + (f" ({steady:.2f} steps/s, {out['images_per_sec']:.1f} img/s)" if steady else "")
            + f"; latest checkpoint {out['checkpoint']}"
            + (f"; best {out['best_checkpoint']} (val mean IoU {out['best']['mean_iou']:.4f} at step "
               f"{out['best']['step']})" if out["best"] else ""))
        return out
    finally:
        tf_keras.mixed_precision.set_global_policy(previous_policy)


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
