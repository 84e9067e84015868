"""Training for every task: Model Garden's `train_lib.run_experiment` with our progress line, evaluation
log and result.

A task brings its ExperimentConfig (pipelines/<task>/experiment.py or train.py) and its Model Garden
Task; this module sets what is the same for all of them (hardware: distribution strategy and mixed
precision; the optimizer and its schedule; loop, summary and checkpoint intervals), runs the
experiment and reports. RUN_DIR/train/ gets the checkpoints (`ckpt-STEP`) and params.yaml,
RUN_DIR/train/train/ and RUN_DIR/train/validation/ the TensorBoard summaries, RUN_DIR/train/evals.json
every evaluation, RUN_DIR/train/best/ the best checkpoint by the task's metric (when it names one).
Started again on the same RUN_DIR, training continues from the latest checkpoint there (Orbit's
Controller restores it; without one it calls the task's `initialize`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tf_keras

from pipelines import checkpoints
from pipelines.common import duration
from pipelines.engine import distribute
from pipelines.workspace import output_lock, write_text_atomic

from official.core import train_lib, train_utils  # isort: skip
from official.modeling import performance  # isort: skip

EVALS_JSON = "evals.json"  # under RUN_DIR/train/: one record per evaluation, kept across restarts


# ---------------------------------------------------------------------------------------------- settings


def num_gpus() -> int:
    return len(tf.config.list_physical_devices("GPU"))


def set_runtime(exp, gpus: int | None = None) -> int:
    """Hardware settings of an experiment: with GPUs, mixed precision (float16 compute, dynamic loss
    scale) and MirroredStrategy over them (one_device for one), or over the logical CPU devices
    REPLICAS=N made; MultiWorkerMirrored with TF_CONFIG (engine/distribute.py).
    Returns the number of GPUs used (default: the ones TensorFlow sees)."""
    gpus = num_gpus() if gpus is None else gpus
    exp.runtime.num_gpus = gpus
    exp.runtime.distribution_strategy = distribute.strategy_name(gpus, distribute.multi_worker())
    exp.runtime.mixed_precision_dtype = "float16" if gpus else "float32"  # 'float16' = mixed_float16 policy
    return gpus


def set_optimizer(exp, optimizer: str, learning_rate: float, num_steps: int, schedule: str = "cosine",
                  warmup_steps: int = 0, warmup_learning_rate: float = 0.0, momentum: float = 0.9,
                  adam_epsilon: float | None = None) -> None:
    """The Object Detection API's optimizers and schedules as Model Garden's optimizer config:
    'adam' or 'momentum' (SGD with momentum); a cosine decay that starts when the warmup ends and
    reaches 0 at num_steps, or a constant rate; a linear warmup from warmup_learning_rate."""
    config = exp.trainer.optimizer_config
    if optimizer == "adam":
        config.optimizer.type = "adam"
        if adam_epsilon is not None:
            config.optimizer.adam.epsilon = adam_epsilon
    elif optimizer == "momentum":
        config.optimizer.type = "sgd"
        config.optimizer.sgd.momentum = momentum
    else:
        raise ValueError(f"optimizer {optimizer!r}: expected 'adam' or 'momentum'")
    if schedule == "cosine":
        config.learning_rate.type = "cosine"
        config.learning_rate.cosine.initial_learning_rate = learning_rate
        config.learning_rate.cosine.decay_steps = max(1, num_steps - warmup_steps)
        config.learning_rate.cosine.offset = warmup_steps
    elif schedule == "constant":
        config.learning_rate.type = "constant"
        config.learning_rate.constant.learning_rate = learning_rate
    else:
        raise ValueError(f"learning-rate schedule {schedule!r}: expected 'cosine' or 'constant'")
    config.warmup.type = "linear" if warmup_steps > 0 else None
    config.warmup.linear.warmup_steps = warmup_steps
    config.warmup.linear.warmup_learning_rate = warmup_learning_rate


def set_loops(exp, num_steps: int, steps_per_loop: int, checkpoint_interval: int, validation_interval: int) -> None:
    """Training to num_steps in loops of steps_per_loop (a progress line and summaries each), a
    checkpoint every checkpoint_interval steps and an evaluation on the whole val set every
    validation_interval steps (and at the end). Intervals are rounded up to whole loops."""
    def whole_loops(interval):
        return max(steps_per_loop, -(-interval // steps_per_loop) * steps_per_loop)

    exp.trainer.train_steps = num_steps
    exp.trainer.steps_per_loop = steps_per_loop
    exp.trainer.summary_interval = steps_per_loop
    exp.trainer.checkpoint_interval = whole_loops(checkpoint_interval)
    exp.trainer.validation_interval = min(num_steps, whole_loops(validation_interval))
    exp.trainer.validation_steps = -1  # the whole val set: the readers do not repeat it


@contextlib.contextmanager
def seeded(seed: int | None):
    """Seed Python, NumPy and TensorFlow (initialisation; the tasks' inputs seed their shuffles and
    augmentation from the same number) and, on the CPU, make TensorFlow's ops deterministic (a
    parallel tf.data map with random ops draws in a fixed order), until the block ends. Yields
    whether runs repeat bit for bit: on the CPU; not with GPUs, whose kernels (cuDNN's algorithm
    choice, atomic adds) vary from run to run. seed None: nothing is seeded."""
    from tensorflow.python.framework import config as tf_config  # only enable_op_determinism is public

    if seed is None:
        yield False
        return
    tf_keras.utils.set_random_seed(seed)
    exact = num_gpus() == 0
    switch = exact and not tf_config.is_op_determinism_enabled()
    if switch:
        tf_config.enable_op_determinism()
    try:
        yield exact
    finally:
        if switch:
            tf_config.disable_op_determinism()


def keep_best(exp, task) -> None:
    """Keep the best checkpoint by `task`'s validation metric (a tasks.Task; higher is better) in
    RUN_DIR/train/best/, with Model Garden's best-checkpoint exporter."""
    exp.trainer.best_checkpoint_export_subdir = checkpoints.BEST_DIR
    exp.trainer.best_checkpoint_eval_metric = task.metric
    exp.trainer.best_checkpoint_metric_comp = "higher"


# ---------------------------------------------------------------------------------------------- progress


def scalars(output: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in output.items() if np.ndim(np.asarray(v)) == 0}


class Progress:
    """An Orbit train action: after each loop, one line with the task's losses and metrics, steps/s and
    ETA. Speed counts the time of training loops only: `restart` (after an evaluation, which follows
    the checkpoint) leaves evaluating and saving out. The first loop of a run includes tracing the step
    function, so the steady-state rate leaves it out."""

    def __init__(self, global_step: tf.Variable, total_steps: int, batch_size: int, describe: Callable[[dict], str],
                 log: Callable[[str], None]):
        self.global_step = global_step
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.describe = describe
        self.log = log
        self.history: list[dict] = []
        self.steady_steps = 0
        self.steady_seconds = 0.0
        self.restart()

    def restart(self) -> None:
        self.mark = (int(self.global_step.numpy()), time.perf_counter())

    @property
    def steady(self) -> float | None:
        """Steps/s after the first loop; with a single loop, that loop's rate."""
        if self.steady_seconds:
            return self.steady_steps / self.steady_seconds
        return self.history[0]["steps_per_sec"] if self.history else None

    def __call__(self, output: dict) -> None:
        step, now = int(self.global_step.numpy()), time.perf_counter()
        steps, seconds = step - self.mark[0], max(now - self.mark[1], 1e-9)
        if self.history:
            self.steady_steps += steps
            self.steady_seconds += seconds
        self.mark = (step, now)
        rate = steps / seconds
        values = scalars(output)
        self.history.append({"step": step, "steps_per_sec": rate, "images_per_sec": rate * self.batch_size, **values})
        eta = (self.total_steps - step) / (self.steady or rate) if rate > 0 else None
        self.log(f"step {step}/{self.total_steps}  {self.describe(values)}  "
                 f"lr {values.get('learning_rate', float('nan')):.6f}  {rate:.2f} steps/s "
                 f"({rate * self.batch_size:.1f} img/s)  ETA {duration(eta) if eta is not None else '?'}"
                 + ("  (includes tracing)" if len(self.history) == 1 else ""))


class QuietOrbit(io.TextIOBase):
    """Standard output without Orbit's own progress prints (train | ..., eval | ..., saved checkpoint to
    ..., restoring ...): the progress line and the evaluation log say the same, once. Everything else
    passes through."""

    PREFIXES = ("train | ", " eval | ", "saved checkpoint to ", "restoring model from ", "restoring or initializing",
                "restored model from ", "restored from checkpoint: ",
                # pycocotools' own prints when Model Garden's COCO evaluator runs during training
                "creating index...", "index created!", "Loading and preparing results", "Running per image evaluation",
                "Evaluate annotation type", "Accumulating evaluation results", "DONE (t=", " Average Precision",
                " Average Recall")

    def __init__(self, out):
        self.out = out
        self.dropping = False  # print() writes the message, then its "\n" apart
        self.line_start = True

    def write(self, text: str) -> int:
        if self.line_start and text.startswith(self.PREFIXES):
            self.dropping = True
        elif self.dropping and text == "\n":
            self.dropping = False
        else:
            self.dropping = False
            self.out.write(text)
            self.line_start = text.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def read_evals(model_dir: Path) -> list[dict]:
    path = model_dir / EVALS_JSON
    return json.loads(path.read_text()) if path.is_file() else []


def _write_json(path: Path, value) -> None:
    """Write-then-rename: a killed run never leaves half a JSON file."""
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Job:
    """What a task gives the engine besides its experiment: how to build its Model Garden Task, and how
    its progress and evaluations read."""
    make_task: Callable[[Any, str], Any]  # (task config, logging dir) -> base_task.Task
    describe: Callable[[dict], str]  # a train loop's scalars -> "loss 0.41  iou 0.52"
    describe_eval: Callable[[dict], str]  # an evaluation's scalars -> "val mean IoU 0.61, loss 0.38"
    batch_size: int
    start_note: str = "from scratch"  # how a run without checkpoint starts (initialisation)
    notes: list[str] = field(default_factory=list)


def run(exp, job: Job, model_dir: Path, mode: str, log: Callable[[str], None] = print) -> dict:
    """Run the experiment until exp.trainer.train_steps ('train', or 'train_and_eval': evaluations on
    the validation data every validation_interval steps and at the end).

    Returns {'final_step', 'start_step', 'checkpoint' (latest), 'best_checkpoint' and 'best' (the best
    checkpoint and its evaluation, when the experiment keeps one), 'model_dir', 'history' (one dict per
    loop: step, steps_per_sec, images_per_sec and the loop's scalars), 'steps_per_sec' and
    'images_per_sec' (steady state: training loops after the first, which includes tracing; None when no
    step ran), 'evals' (this call's evaluations: step and scalars), 'eval' (the last of them or {}),
    'elapsed_s'}."""
    if mode not in ("train", "train_and_eval"):
        raise ValueError(f"mode {mode!r}: expected 'train' or 'train_and_eval'")
    if not distribute.is_chief():  # a worker besides the chief: its files go to a folder of its own
        with worker_dir(model_dir) as private:
            return _run(exp, job, private, mode, log)
    # One training per run at a time (RUN_DIR/.train.lock); holding the lock, what killed trainings left in
    # train/ is removed (printed): no other training can be writing there.
    with output_lock(model_dir, what="training", log=log, leftovers=train_leftovers):
        return _run(exp, job, model_dir, mode, log)


class _Runner(train_lib.OrbitExperimentRunner):
    """Model Garden's experiment runner (what `train_lib.run_experiment` runs), except that a worker besides
    the chief keeps its checkpoints in its own folder (`worker_dir`, which holds a copy of the chief's
    latest): in the fresh temporary folder Model Garden gives it, it would initialise the model while the
    chief restores, and the two would run different collectives (TensorFlow stops both: "Collective
    instance N expected ... but got ...").

    Nor does it count the model's FLOPs after training: Model Garden freezes the whole graph for TF1's
    profiler there, only to log the number; for a Keras functional model (the segmenter) that takes seconds
    and prints grappler's INFO lines and the profiler's deprecation warning, twice."""

    def run(self):
        count_flops = train_utils.try_count_flops
        train_utils.try_count_flops = lambda *args, **kwargs: None
        try:
            return super().run()
        finally:
            train_utils.try_count_flops = count_flops

    def _maybe_build_checkpoint_manager(self):
        if not self.trainer.checkpoint or self.strategy.extended.should_checkpoint:
            return super()._maybe_build_checkpoint_manager()
        return tf.train.CheckpointManager(
            self.trainer.checkpoint, directory=self.model_dir, max_to_keep=1, step_counter=self.trainer.global_step,
            checkpoint_interval=self.params.trainer.checkpoint_interval, init_fn=self.trainer.initialize)


@contextlib.contextmanager
def worker_dir(model_dir: Path):
    """For a worker that is not the chief: a temporary RUN_DIR/train/ of its own, holding a copy of the
    chief's latest checkpoint and evals.json (every worker must start from the step the chief restores,
    and agree with it on what is left to do): $TMPDIR/pipelines-train-worker-PID, removed when training
    ends (a killed worker's, by the next worker started on the machine). Every worker writes checkpoints
    (saving reads variables, which all workers must join) and summaries: here they go nowhere the user
    looks."""
    import shutil
    import tempfile

    from pipelines.workspace import dead_process_dirs

    # Named by the process: the folders of workers killed on this machine (nothing else removes them) go here.
    for _, stale in dead_process_dirs(Path(tempfile.gettempdir()), "pipelines-train-worker-"):
        shutil.rmtree(stale, ignore_errors=True)
    root = Path(tempfile.gettempdir()) / f"pipelines-train-worker-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    private = root / "train"
    private.mkdir()
    before = tempfile.tempdir
    tempfile.tempdir = str(root)  # what else a worker puts in temporary folders goes with this one
    try:
        latest = tf.train.latest_checkpoint(str(model_dir)) if Path(model_dir).is_dir() else None
        if latest:
            for path in Path(latest).parent.glob(Path(latest).name + ".*"):
                shutil.copy2(path, private / path.name)
            (private / "checkpoint").write_text(f'model_checkpoint_path: "{Path(latest).name}"\n'
                                                f'all_model_checkpoint_paths: "{Path(latest).name}"\n')
        if (Path(model_dir) / EVALS_JSON).is_file():
            shutil.copy2(Path(model_dir) / EVALS_JSON, private / EVALS_JSON)
        yield private
    finally:
        tempfile.tempdir = before
        shutil.rmtree(root, ignore_errors=True)


# TensorFlow's own temporary names: a sharded checkpoint save writes PREFIX_temp/ and moves its files out
# (functional_saver.py); the `checkpoint` state file is written as checkpoint.tmp<32 hex> and renamed
# (file_io.atomic_write_string_to_file). Ours: write_text_atomic's .NAME.tmp-PID@HOST-XXXX (evals.json),
# and .evals.json.XXXXXXXX of versions before it.
_TF_TEMP_FILE = re.compile(r".+\.tmp[0-9a-f]{32}$")
_OUR_TEMP_FILE = re.compile(r"^\..+\.tmp-.+$|^\." + re.escape(EVALS_JSON) + r"\.[a-z0-9_]{8}$")


def train_leftovers(model_dir: Path) -> list[Path]:
    """The temporary checkpoint folders and files a killed training left in RUN_DIR/train/ and its best/."""
    found = []
    for folder in (Path(model_dir), Path(model_dir) / checkpoints.BEST_DIR):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_symlink():
                continue
            if path.is_dir() and path.name.endswith("_temp"):
                found.append(path)
            elif path.is_file() and (_TF_TEMP_FILE.match(path.name) or _OUR_TEMP_FILE.match(path.name)):
                found.append(path)
    return found


def _run(exp, job: Job, model_dir: Path, mode: str, log: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    total = exp.trainer.train_steps
    run_dir = model_dir.parent
    # What Orbit's CheckpointManager restores: the checkpoint its state file names (a run killed between
    # writing a checkpoint and naming it starts from the one before, or from scratch).
    latest = tf.train.latest_checkpoint(str(model_dir))
    start_step = (checkpoints.step(latest) or 0) if latest else 0
    history_evals = read_evals(model_dir)
    evals: list[dict] = []
    progress: Progress | None = None

    def result(final_step: int) -> dict:
        steady = progress.steady if progress else None
        return {"final_step": final_step, "start_step": start_step, "checkpoint": checkpoints.latest(run_dir),
                "best_checkpoint": checkpoints.best(run_dir), "best": checkpoints.best_info(run_dir),
                "model_dir": str(model_dir), "history": progress.history if progress else [],
                "steps_per_sec": steady, "images_per_sec": steady * job.batch_size if steady else None,
                "evals": evals, "eval": evals[-1] if evals else {}, "elapsed_s": time.perf_counter() - started}

    if start_step >= total:
        if mode == "train" or any(e["step"] == start_step for e in history_evals):
            log(f"{model_dir}: already trained to step {start_step} (num_steps {total}); nothing to do")
            return result(start_step)
        # Stopped between its last checkpoint and that checkpoint's evaluation.
        log(f"{model_dir}: already trained to step {start_step}; evaluating its last checkpoint")
        mode = "eval"

    stack = contextlib.ExitStack()
    policy = tf_keras.mixed_precision.global_policy()
    performance.set_mixed_precision_policy(exp.runtime.mixed_precision_dtype)
    seed = exp.task.train_data.seed
    try:
        exact = stack.enter_context(seeded(seed))
        strategy = distribute.make_strategy(exp.runtime)
        replicas = strategy.num_replicas_in_sync
        global_batch = exp.task.train_data.global_batch_size
        if global_batch % replicas:
            raise ValueError(f"batch_size {global_batch} does not divide over {replicas} replicas")
        if strategy.extended.should_checkpoint:
            model_dir.mkdir(parents=True, exist_ok=True)
            train_utils.serialize_config(exp, str(model_dir))
        with strategy.scope():
            task = job.make_task(exp.task, str(model_dir))
            trainer = train_utils.create_trainer(
                exp, task, train=mode != "eval", evaluate=mode != "train",
                checkpoint_exporter=train_utils.maybe_create_best_ckpt_exporter(exp, str(model_dir)))
        model = trainer.model
        synced = distribute.synchronize_batch_norm(model) if replicas > 1 or distribute.sync_batch_norm_asked() else 0
        frozen = model.frozen_variables() if hasattr(model, "frozen_variables") else []
        log(f"training {model.name} ({model.count_params():,} parameters, batch {global_batch}"
            + (f" = {replicas} x {global_batch // replicas} per replica" if replicas > 1 else "") + ") on "
            f"{replicas} replica(s) ({type(strategy).__name__}, {exp.runtime.num_gpus} GPU(s), "
            f"{'mixed_float16' if exp.runtime.mixed_precision_dtype == 'float16' else 'float32'}); "
            + (f"resuming from step {start_step}" if start_step else job.start_note)
            + (f"; seed {seed}" + (" (repeatable on this machine)" if exact else " (GPU kernels vary between runs)")
               if seed is not None else "")
            + (f"; checkpoints and summaries in {model_dir}" if distribute.is_chief() else
               f"; {distribute.task_address()}: the chief writes the run's checkpoints and summaries")
            + (f", evaluation every {exp.trainer.validation_interval} steps" if mode == "train_and_eval" else ""))
        for note in job.notes:
            log(note)
        if synced:
            log(f"batch norm: statistics over the global batch of {global_batch} ({synced} layers synchronised "
                "across replicas), as on one device")
        if frozen:
            log(f"froze {len(frozen)} of {len(frozen) + len(model.trainable_weights)} trainable variables "
                "(train_config.freeze_variables / update_trainable_variables): they get no gradient")
        progress = Progress(trainer.global_step, total, job.batch_size, job.describe, log)

        def after_eval(output: dict) -> None:
            at = int(trainer.global_step.numpy())
            values = scalars(output)
            best = checkpoints.best_info(run_dir)
            record = {"step": at, **{k: v for k, v in values.items() if not k.startswith("best_")}}
            evals.append(record)
            history_evals.append(record)
            _write_json(model_dir / EVALS_JSON, history_evals)
            metric = exp.trainer.best_checkpoint_eval_metric
            if best and metric:
                note = "; new best" if best.get("step") == at else \
                    f"; best {best.get(metric, float('nan')):.4f} at step {best.get('step')}"
            else:
                note = ""
            log(f"eval at step {at}: {job.describe_eval(values)}{note}")
            progress.restart()  # evaluating (and the checkpoint before it) is not training speed

        with contextlib.redirect_stdout(QuietOrbit(sys.stdout)):
            _Runner(distribution_strategy=strategy, task=task, mode=mode, params=exp, model_dir=str(model_dir),
                    trainer=trainer, train_actions=[progress], eval_actions=[after_eval]).run()
        final_step = int(trainer.global_step.numpy())
    finally:
        stack.close()
        tf_keras.mixed_precision.set_global_policy(policy)
    out = result(final_step)
    steady = out["steps_per_sec"]
    log(f"trained to step {final_step} in {duration(out['elapsed_s'])}"
        + (f" ({steady:.2f} steps/s, {out['images_per_sec']:.1f} img/s)" if steady else "")
        + (f"; latest checkpoint {out['checkpoint']}" if distribute.is_chief() else "; the chief wrote the checkpoints")
        + (f"; best {out['best_checkpoint']} ({exp.trainer.best_checkpoint_eval_metric} "
           f"{out['best'].get(exp.trainer.best_checkpoint_eval_metric, float('nan')):.4f} at step "
           f"{out['best'].get('step')})" if out["best"] and out["best_checkpoint"] else ""))
    return out
