"""A run's checkpoints, for every task: where training writes them, which one a stage uses, its step.
(TensorFlow is imported only by the functions that read checkpoints.)

RUN_DIR/train/ holds the training checkpoints (`ckpt-STEP`: model, optimizer and global step, kept
by Model Garden's trainer); RUN_DIR/train/best/ the one with the best validation metric so far
(Model Garden's best-checkpoint exporter: `best_ckpt-N` and `info.json`, which names its step).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipelines.workspace import display_path

TRAIN_DIR = "train"
BEST_DIR = "best"  # under TRAIN_DIR
BEST_INFO = "info.json"  # Model Garden's BestCheckpointExporter: the evaluation logs of the best checkpoint
# The names a step counter has in our checkpoints: Model Garden's trainer, then older runs' own loop.
STEP_KEYS = ("global_step/.ATTRIBUTES/VARIABLE_VALUE", "step/.ATTRIBUTES/VARIABLE_VALUE")


def train_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / TRAIN_DIR


def best_dir(run_dir: str | Path) -> Path:
    return train_dir(run_dir) / BEST_DIR


def latest_in(folder: str | Path) -> str | None:
    """The latest checkpoint prefix of a folder: by its `checkpoint` state file, else the highest -N."""
    import tensorflow as tf

    folder = Path(folder)
    latest = tf.train.latest_checkpoint(str(folder))
    if latest:
        return latest
    numbered = [(int(m.group(1)), p) for p in folder.glob("*.index") if (m := re.search(r"-(\d+)\.index$", p.name))]
    return str(max(numbered)[1].with_suffix("")) if numbered else None


def latest(run_dir: str | Path) -> str | None:
    """RUN_DIR/train's latest training checkpoint, or None."""
    return latest_in(train_dir(run_dir))


def best(run_dir: str | Path) -> str | None:
    """RUN_DIR/train/best's checkpoint (the best by the task's validation metric), or None."""
    folder = best_dir(run_dir)
    return latest_in(folder) if folder.is_dir() else None


def best_info(run_dir: str | Path) -> dict | None:
    """The best checkpoint's validation results ({metric: value, ..., "step"}), or None."""
    path = best_dir(run_dir) / BEST_INFO
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if "best_ckpt_global_step" in info:
        info["step"] = int(info["best_ckpt_global_step"])
    return info


def default(run_dir: str | Path, prefer_best: bool = True) -> str:
    """The checkpoint evaluation and export use: the best one when there is one (and `prefer_best`),
    else the latest. FileNotFoundError when the run has none."""
    found = (prefer_best and best(run_dir)) or latest(run_dir)
    if not found:
        raise FileNotFoundError(f"{display_path(train_dir(run_dir))}: no checkpoint; train first")
    return found


def step(prefix: str) -> int | None:
    """The training step saved in the checkpoint, else the N of its -N name, else None."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(prefix)
        for key in STEP_KEYS:
            if reader.has_tensor(key):
                return int(reader.get_tensor(key))
    except (tf.errors.OpError, ValueError):
        pass
    match = re.search(r"-(\d+)$", str(prefix))
    return int(match.group(1)) if match else None


def restore(model, prefix: str):
    """Load the model weights of a training or best checkpoint into `model` (built with the same
    settings; its dtype policy may differ). FileNotFoundError without the checkpoint, ValueError when
    the checkpoint holds another model."""
    import tensorflow as tf

    if not tf.io.gfile.exists(f"{prefix}.index"):
        raise FileNotFoundError(f"no checkpoint at {prefix} (give the prefix, e.g. RUN_DIR/train/ckpt-N)")
    try:
        # read(), not restore(): a checkpoint written with Checkpoint.write() has no save counter to match.
        return tf.train.Checkpoint(model=model).read(prefix).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise ValueError(f"{prefix}: the checkpoint does not fit this model (another architecture, backbone "
                         f"or number of classes?): {str(e).splitlines()[0]}") from None
