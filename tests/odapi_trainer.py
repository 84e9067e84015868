"""The Object Detection API's own TF2 trainer and evaluator, run in a subprocess.

tests/odapi_oracle.py runs the OD API *model* (build, predict, loss); this file runs its *training and
evaluation loops*, `object_detection.model_lib_v2.train_loop` and `eval_continuously`, exactly as its
`model_main_tf2.py` calls them, on a pipeline.config of ours. That gives two references:

* a benchmark can train the same pipeline.config with the OD API's trainer and with `make train`;
* a test can check that `make eval`'s COCO AP equals the OD API's evaluation of the same checkpoint
  (our weights written in its layout by `pipelines.detection.zoo.save_od_api`).

Importable helpers (no TensorFlow or OD API import at module import time):

* `train_odapi(config, model_dir, num_steps, ...)`: train_loop in a child; returns the per-step losses
  (from the TensorBoard event files train_loop writes), the timing and the final checkpoint prefix;
* `evaluate_odapi(config, checkpoint_dir, ...)`: eval_continuously on the latest checkpoint of a folder,
  once; returns its metrics (DetectionBoxes_Precision/mAP, ..., the eval losses).

The child process: `python tests/odapi_trainer.py train --config C --model-dir D --num-steps N` and
`python tests/odapi_trainer.py eval --config C --checkpoint-dir D --out O` (re-executes itself with the
shims below when run by hand; `--result FILE` writes the returned dict as JSON).

The OD API code is the sdist that tests/odapi_oracle.py fetches, with its environment (`oracle_env`:
PYTHONPATH, the python protobuf backend, Keras 2, the tensorflow_io stub, no GPU). model_lib_v2 needs a
few more stand-ins on TensorFlow 2.20, none of them on the path of an SSD's training or COCO evaluation:

* a stub `lvis` package (in <cache>/trainer-stubs, put first on the child's PYTHONPATH): eval_util imports
  the LVIS evaluator, which imports the `lvis` package at import time; COCO metrics never use it;
* `tf.compat.v1.estimator` holding only `ModeKeys`: TF 2.16 removed the Estimator API, and inputs.py /
  model_lib.py import it at module level; the TF2 loops only compare the mode keys (TRAIN, EVAL, PREDICT);
* `case`, `cond` and `while_loop` in tensorflow.python.ops.control_flow_ops: tf_slim (the OD API's
  preprocessing and MobileNet code import it) calls them there; TF 2.20 moved them to other modules and
  they are the same functions as tf.compat.v1.case / cond / while_loop;
* `getsize` on Pillow's fonts: eager_eval_loop draws the first `eval_config.num_visualizations` (default
  10) images with their detections into TensorBoard, and visualization_utils measures label text with
  `ImageFont.getsize`, which Pillow 10 removed; it is rebuilt from `getbbox`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # odapi_oracle, when run as a script

from odapi_oracle import _child_env, _pythonpath_entries, _pythonpath_entries_or_skip, _tail, cache_root  # noqa: E402

_STUB_LVIS_CLASS = '''"""Stub: see lvis/__init__.py."""


class {name}:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("lvis is a stub here (tests/odapi_trainer.py): no LVIS metrics")
'''

_STUB_LVIS = {
    "__init__.py": '''"""Stub for the OD API trainer (tests/odapi_trainer.py).

object_detection.eval_util imports metrics.lvis_evaluation, which imports `lvis` (the LVIS API) at import
time, and lvis_tools subclasses lvis.LVIS and eval.LVISEval there. Only the LVIS metrics sets use them;
COCO detection metrics never do, so classes that refuse to be used are enough.
"""
''',
    "eval.py": _STUB_LVIS_CLASS.format(name="LVISEval"),
    "lvis.py": _STUB_LVIS_CLASS.format(name="LVIS"),
    "results.py": _STUB_LVIS_CLASS.format(name="LVISResults"),
}

# The loss scalars train_loop writes every step (model_lib_v2._compute_losses_and_predictions_dicts).
LOSS_KEYS = ("Loss/classification_loss", "Loss/localization_loss", "Loss/regularization_loss", "Loss/total_loss")


# ----------------------------------------------------------------------------------------------
# Parent side (no TensorFlow here)
# ----------------------------------------------------------------------------------------------

def _trainer_stubs_dir() -> Path:
    """<cache>/trainer-stubs with the `lvis` stub package, written once (and again when its text changes)."""
    folder = cache_root() / "trainer-stubs"
    for name, text in _STUB_LVIS.items():
        path = folder / "lvis" / name
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return folder


def trainer_env(skip: bool = True) -> dict[str, str]:
    """The oracle's child environment (see tests/odapi_oracle.py) with the trainer's stub folder first on
    PYTHONPATH. `skip`: skip the calling test when the OD API code cannot be fetched (else raise)."""
    paths = _pythonpath_entries_or_skip() if skip else _pythonpath_entries()
    return _child_env([_trainer_stubs_dir(), *paths])


def _run_child(args: list[str], log: Path, result: Path, timeout: float, what: str) -> dict:
    """Run this file as the child with `args`; its stdout and stderr go to `log`. Returns its result JSON."""
    env = trainer_env()
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--result", str(result)]
    with open(log, "w") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"OD API {what} timed out after {timeout}s (log {log}):\n"
                               f"{_tail(log.read_text(errors='replace'))}") from None
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"OD API {what} failed (exit {proc.returncode}, log {log}):\n"
                           f"{_tail(log.read_text(errors='replace'))}")
    return {**json.loads(result.read_text()), "log": str(log)}


def train_odapi(config: Path, model_dir: Path, num_steps: int, checkpoint_every: int | None = None,
                steps_per_iteration: int = 1, record_summaries: bool = True, timeout: float = 1800) -> dict:
    """Train `config` with the OD API's `model_lib_v2.train_loop` for `num_steps` steps into `model_dir`.

    As `model_main_tf2.py --pipeline_config_path=config --model_dir=model_dir --num_train_steps=num_steps
    --checkpoint_every_n=checkpoint_every` does, except for `steps_per_iteration`: train_loop runs that
    many steps per tf.function call (model_main_tf2 leaves it at the default, 100, and then trains whole
    hundreds of steps whatever num_steps says); 1 gives a loss and a time per step. A `fine_tune_checkpoint`
    in the config is restored by train_loop itself; a checkpoint already in model_dir is resumed from.

    train_loop saves a checkpoint at step 0 and whenever `checkpoint_every` steps have passed since the last
    one, not at the end: the default, num_steps, saves the last step (so does any divisor of it). Step 0's
    checkpoint holds no weights unless the model was built before the first step (a fine_tune_checkpoint or
    use_moving_average does that): only the step counter. The loop runs whole iterations, so num_steps
    must be a multiple of steps_per_iteration (ValueError otherwise; train_loop would train past it).

    Returns {"steps": [1..N], "losses": {"Loss/total_loss": [...], ...} (each step's value, from the
    TensorBoard event files in model_dir/train), "learning_rate": [...], "steps_per_sec": [...] (as
    train_loop measured each iteration), "first_iteration_s" (tracing included), "images_per_sec" (the
    iterations after the first; None with a single one), "batch_size", "train_loop_s" (the call's wall
    time), "wall_s" (the child's, imports included), "checkpoint" (the latest prefix), "checkpoint_step"
    (the global step stored in it), "log"}. The child's output is model_dir/odapi_train.log.
    """
    if num_steps % steps_per_iteration:
        raise ValueError(f"num_steps {num_steps} is not a multiple of steps_per_iteration {steps_per_iteration}")
    model_dir = Path(model_dir)
    args = ["train", "--config", str(config), "--model-dir", str(model_dir), "--num-steps", str(num_steps),
            "--checkpoint-every", str(checkpoint_every or num_steps), "--steps-per-iteration", str(steps_per_iteration)]
    if not record_summaries:
        args.append("--no-summaries")
    return _run_child(args, model_dir / "odapi_train.log", model_dir / "odapi_train.json", timeout, "train_loop")


def evaluate_odapi(config: Path, checkpoint_dir: Path, out_dir: Path | None = None, timeout: float = 1200) -> dict:
    """The OD API's evaluation of the latest checkpoint in `checkpoint_dir`: `model_lib_v2.eval_continuously`
    as `model_main_tf2.py --checkpoint_dir=...` runs it (one pass over the config's eval_input_reader, the
    config's eval_config metrics: coco_detection_metrics for ours), stopped after the first checkpoint.

    Returns {"metrics": {"DetectionBoxes_Precision/mAP": ..., "DetectionBoxes_Precision/mAP@.50IOU": ...,
    "Loss/total_loss": ..., ...} (floats), "checkpoint" (the prefix evaluated), "evaluations" (1 unless a newer
    checkpoint appeared during the evaluation; metrics are the first's), "wall_s", "log"}. The child's
    output is out_dir/odapi_eval.log, its TensorBoard summaries go under out_dir/eval/ (default out_dir:
    checkpoint_dir/odapi-eval).
    """
    out_dir = Path(out_dir) if out_dir is not None else Path(checkpoint_dir) / "odapi-eval"
    args = ["eval", "--config", str(config), "--checkpoint-dir", str(checkpoint_dir), "--out", str(out_dir)]
    return _run_child(args, out_dir / "odapi_eval.log", out_dir / "odapi_eval.json", timeout, "evaluation")


# ----------------------------------------------------------------------------------------------
# The child process
# ----------------------------------------------------------------------------------------------

def _apply_shims() -> None:
    """The in-process stand-ins (see the module docstring); before anything imports object_detection."""
    import types

    import tensorflow as tf
    from PIL import ImageFont
    from tensorflow.python.ops import control_flow_ops

    if not hasattr(tf.compat.v1, "estimator"):
        class ModeKeys:  # the values of tf.estimator.ModeKeys
            TRAIN = "train"
            EVAL = "eval"
            PREDICT = "infer"

        estimator = types.ModuleType("tensorflow.compat.v1.estimator",
                                     "Stand-in for the removed Estimator API: ModeKeys only.")
        estimator.ModeKeys = ModeKeys
        tf.compat.v1.estimator = estimator
        sys.modules[estimator.__name__] = estimator

    for name in ("case", "cond", "while_loop"):
        if not hasattr(control_flow_ops, name):
            setattr(control_flow_ops, name, getattr(tf.compat.v1, name))

    def getsize(font, text, *args, **kwargs):
        """(width, height) of `text` as Pillow < 10 measured it: the far corner of its bounding box."""
        _, _, right, bottom = font.getbbox(text, *args, **kwargs)
        return right, bottom

    for cls in (ImageFont.ImageFont, ImageFont.FreeTypeFont, ImageFont.TransposedFont):
        if not hasattr(cls, "getsize"):
            cls.getsize = getsize


def _scalar_events(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalar summaries in a folder's event files (the last write of a step wins)."""
    import tensorflow as tf

    values: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.HasField("tensor") and value.metadata.plugin_data.plugin_name == "scalars":
                    number = float(tf.make_ndarray(value.tensor))
                elif value.HasField("simple_value"):
                    number = float(value.simple_value)
                else:
                    continue  # images
                values.setdefault(value.tag, {})[int(event.step)] = number
    return values


def _train(config: Path, model_dir: Path, num_steps: int, checkpoint_every: int, steps_per_iteration: int,
           record_summaries: bool) -> dict:
    import tensorflow as tf
    from object_detection import model_lib_v2
    from object_detection.utils import config_util

    batch_size = config_util.get_configs_from_pipeline_file(str(config))["train_config"].batch_size
    start = time.time()
    model_lib_v2.train_loop(pipeline_config_path=str(config), model_dir=str(model_dir), train_steps=num_steps,
                            checkpoint_every_n=checkpoint_every, record_summaries=record_summaries,
                            num_steps_per_iteration=steps_per_iteration)
    train_loop_s = time.time() - start

    scalars = _scalar_events(model_dir / "train")
    steps = sorted(scalars.get("Loss/total_loss", {}))
    rates = [scalars["steps_per_sec"][s] for s in sorted(scalars.get("steps_per_sec", {}))]
    # Each iteration's time is steps_per_iteration / steps_per_sec; the first one traces the step function.
    seconds = [steps_per_iteration / r for r in rates]
    images_per_sec = (batch_size * steps_per_iteration * (len(seconds) - 1) / sum(seconds[1:])
                      if len(seconds) > 1 else None)
    checkpoint = tf.train.latest_checkpoint(str(model_dir))
    checkpoint_step = (int(tf.train.load_checkpoint(checkpoint).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
                       if checkpoint else None)
    return {"steps": steps, "losses": {k: [scalars.get(k, {}).get(s, math.nan) for s in steps] for k in LOSS_KEYS},
            "learning_rate": [scalars.get("learning_rate", {}).get(s, math.nan) for s in steps],
            "steps_per_sec": rates, "first_iteration_s": seconds[0] if seconds else None,
            "images_per_sec": images_per_sec, "batch_size": batch_size, "steps_per_iteration": steps_per_iteration,
            "train_loop_s": train_loop_s, "checkpoint": checkpoint, "checkpoint_step": checkpoint_step}


def _evaluate(config: Path, checkpoint_dir: Path, out_dir: Path) -> dict:
    import tensorflow as tf
    from object_detection import model_lib_v2

    checkpoint = tf.train.latest_checkpoint(str(checkpoint_dir))
    if checkpoint is None:
        raise SystemExit(f"{checkpoint_dir}: no checkpoint (no `checkpoint` state file naming one)")
    # eval_continuously logs eager_eval_loop's metrics but returns nothing: keep what the loop returns.
    results: list[dict] = []
    eager_eval_loop = model_lib_v2.eager_eval_loop

    def recorded_eval_loop(*args, **kwargs):
        metrics = eager_eval_loop(*args, **kwargs)
        results.append(metrics)
        return metrics

    model_lib_v2.eager_eval_loop = recorded_eval_loop
    # It evaluates the latest checkpoint at once, then waits up to `timeout` seconds for a newer one; it
    # stops at once only for a checkpoint of train_config.num_steps, which ours (weights only) is not.
    model_lib_v2.eval_continuously(pipeline_config_path=str(config), model_dir=str(out_dir),
                                   checkpoint_dir=str(checkpoint_dir), wait_interval=0, timeout=1)
    if not results:
        raise SystemExit("eval_continuously evaluated no checkpoint")
    return {"metrics": {key: float(value) for key, value in results[0].items()}, "checkpoint": checkpoint,
            "evaluations": len(results)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="model_lib_v2.train_loop")
    train.add_argument("--config", type=Path, required=True)
    train.add_argument("--model-dir", type=Path, required=True)
    train.add_argument("--num-steps", type=int, required=True)
    train.add_argument("--checkpoint-every", type=int, default=None, help="default: --num-steps")
    train.add_argument("--steps-per-iteration", type=int, default=1)
    train.add_argument("--no-summaries", action="store_true", help="record_summaries=False (losses still are)")
    train.add_argument("--result", type=Path, help="write the result JSON here")
    evaluate = sub.add_parser("eval", help="model_lib_v2.eval_continuously, on the latest checkpoint once")
    evaluate.add_argument("--config", type=Path, required=True)
    evaluate.add_argument("--checkpoint-dir", type=Path, required=True)
    evaluate.add_argument("--out", type=Path, required=True, help="summaries folder (model_dir of eval)")
    evaluate.add_argument("--result", type=Path, help="write the result JSON here")
    args = parser.parse_args(argv)
    # Run by hand: re-exec once with the shims that must be in place before Python starts (PYTHONPATH) or
    # before protobuf / TensorFlow are imported.
    if os.environ.get("_ODAPI_ORACLE_CHILD") != "1":
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])],
                  trainer_env(skip=False))

    start = time.time()
    _apply_shims()
    import tensorflow as tf

    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.INFO)  # train_loop's "Step N per-step time" lines
    if args.command == "train":
        args.model_dir.mkdir(parents=True, exist_ok=True)
        result = _train(args.config, args.model_dir, args.num_steps, args.checkpoint_every or args.num_steps,
                        args.steps_per_iteration, not args.no_summaries)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        result = _evaluate(args.config, args.checkpoint_dir, args.out)
    result["wall_s"] = time.time() - start
    text = json.dumps(result, indent=1)
    print(text if args.result is None else f"result: {args.result}")
    if args.result is not None:
        args.result.write_text(text + "\n")


if __name__ == "__main__":
    main()
