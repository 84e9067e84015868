"""What the readers of both kinds of pipeline.config share (a leaf: no model code, no TensorFlow).

pipelines/detection/config.py reads a detection config, pipelines/segmentation/config.py a
segmentation one, pipelines/config/read.py picks between them; all three use what is here: the
translation result, paths, the checks of the files a run needs, the learning-rate schedule's place,
and what training a config will cost in memory.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import tasks
from pipelines.workspace import REPO_ROOT, UserError
from pipelines.config.textproto import TextProto

PLACEHOLDER = "PATH_TO_BE_CONFIGURED"
# Settings for synchronous training across TPU replicas: they do not apply here.
IGNORED = ["train_config.sync_replicas", "train_config.replicas_to_aggregate", "train_config.startup_delay_steps"]


@dataclass
class Translation:
    params: object  # the settings dataclass of the config's task (pipelines/tasks.py)
    ignored: list[str] = field(default_factory=list)  # "field: why", printed as notes
    task: object = None  # the tasks.Task whose reader made it (set by config/read.py)


def fail(source: str, field_path: str, message: str) -> UserError:
    return UserError(source, f"{field_path}: {message}")


def resolve_path(value: str, relative_to: Path = REPO_ROOT) -> Path:
    path = Path(value)
    return path if path.is_absolute() else relative_to / path


def check_files(source: str, params) -> None:
    """Every path the run needs exists: an error before any training starts."""
    if params.label_map_path is None:
        raise fail(source, "train_input_reader.label_map_path", "missing")
    if PLACEHOLDER in params.label_map_path or not resolve_path(params.label_map_path).is_file():
        raise fail(source, "train_input_reader.label_map_path", f"no such file: {params.label_map_path}")
    for name, files in (("train_input_reader", params.train_files), ("eval_input_reader", params.eval_files)):
        if not files:
            raise fail(source, f"{name}.tf_record_input_reader.input_path", "missing")
        for pattern in files:
            if not glob.glob(str(resolve_path(pattern))):
                raise fail(source, f"{name}.tf_record_input_reader.input_path", f"no file matches {pattern}")
    ckpt = getattr(params, "fine_tune_checkpoint", None)
    if ckpt:
        if PLACEHOLDER in ckpt:
            raise fail(source, "train_config.fine_tune_checkpoint",
                       f"still '{ckpt}': give CHECKPOINT=path/to/ckpt-N (see docs/training.md: pretrained "
                       "checkpoints) or remove the field to train from scratch")
        if not checkpoint_exists(resolve_path(ckpt)):
            raise fail(source, "train_config.fine_tune_checkpoint",
                       f"no checkpoint at {ckpt} (expected {ckpt}.index, or a folder with a 'checkpoint' file)")


def checkpoint_exists(path: Path) -> bool:
    if path.suffix in (".h5", ".hdf5"):  # a Keras weights file (classification)
        return path.is_file()
    if path.is_dir():
        return (path / "checkpoint").is_file()
    return Path(str(path) + ".index").is_file()


def learning_rate_path(doc: TextProto) -> tuple[str | None, str | None]:
    """(path of the learning_rate message's schedule, schedule name) of whichever optimizer is set."""
    optimizers = [n for n in doc.message_names("train_config.optimizer") if n != "use_moving_average"]
    if not optimizers:
        return None, None
    schedules = doc.message_names(f"train_config.optimizer.{optimizers[0]}.learning_rate")
    if not schedules:
        return None, None
    return f"train_config.optimizer.{optimizers[0]}.learning_rate.{schedules[0]}", schedules[0]


def model_kind(doc: TextProto) -> str:
    """'ssd' (detection) or 'segmentation': the message set in the config's `model` block."""
    kinds = doc.message_names("model")
    if len(kinds) != 1 or tasks.of_config_block(kinds[0]) is None:
        raise fail(doc.source, "model", f"expected one of {', '.join(tasks.config_blocks())}; "
                                        f"found {', '.join(kinds) or 'nothing'}")
    return kinds[0]


# Host memory `make train` takes on a CPU: each task's `train_memory` in pipelines/tasks.py, a fixed part
# (TensorFlow, the model, the input pipeline) and a part per pixel of each training image (the
# activations the backward pass keeps), measured with the templates' networks. A rough guide for others.
SKIP_MEMORY_CHECK = "PIPELINES_SKIP_MEMORY_CHECK"  # make train tries anyway


def training_memory(task, params, batch_size: int | None = None) -> float:
    """Estimated peak bytes of training `task` (a tasks.Task) with `params` on a CPU."""
    base, per_pixel = task.train_memory
    batch = params.batch_size if batch_size is None else batch_size
    return base + per_pixel * batch * params.image_height * params.image_width


def available_memory() -> float | None:
    """Bytes this process can still take: MemAvailable, or less under a cgroup (container) limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = float(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = float(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = float(limit) - used
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def memory_advice(task, params) -> tuple[bool, str] | None:
    """(too much?, one line) when training on a CPU would take most of the memory left, else None."""
    available = available_memory()
    if available is None:
        return None
    need = training_memory(task, params)
    if need < 0.7 * available:
        return None
    base, per_pixel = task.train_memory
    fits = int((0.7 * available - base) // (per_pixel * params.image_height * params.image_width))
    advice = (f"BATCH={fits} fits" if fits >= 1 else
              "not even BATCH=1 fits at this input size: lower SIZE=")
    return need > 0.9 * available, (
        f"training batch {params.batch_size} at {params.image_height}x{params.image_width} on a CPU takes about "
        f"{need / 1e9:.1f} GB; {available / 1e9:.1f} GB of memory is available here ({advice})")


def absolute_paths(task, params):
    """`params` with every path field (TFRecord globs, label map, `task`'s weight files) absolute,
    relative ones read from the repository root as the config means them."""
    import dataclasses

    def absolute(value):
        return str(resolve_path(value).resolve()) if value else value

    paths = {name: absolute(getattr(params, name)) for name in task.path_fields
             if getattr(params, name) not in task.not_paths}
    return dataclasses.replace(params, train_files=[absolute(f) for f in params.train_files],
                               eval_files=[absolute(f) for f in params.eval_files],
                               label_map_path=absolute(params.label_map_path), **paths)
