"""Object Detection API checkpoints <-> our SSD network: fine-tuning restores of every layout, the check
and `make config` runs; `make import` (a zoo model folder as a run) is zoo_import.py. The variable names are od_names.py's.

`restore` initialises a model from any supported fine-tuning source, as the OD API's
`SSDMetaArch.restore_from_objects` selects for each `fine_tune_checkpoint_type`:
- `classification`: the backbone only;
- `detection`: the feature extractor (backbone and FPN); the box predictor starts fresh;
- `full`: everything (the checkpoint's classes and anchors must be the model's).
Sources: an OD API checkpoint, one of ours (Model Garden's layout: `backbone`, `decoder`, `head`
at its root), a Model Garden classification checkpoint (`backbone`), or a Keras-application
MobileNetV2 weights file (`..._no_top.h5`, classification only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow as tf
import tf_keras

from pipelines import checkpoints
from pipelines.detection.od_names import SUFFIX, backbone_layers, od_api_table, part_of, short_name

KINDS = ("classification", "detection", "full")
RESTORED_PARTS = {"classification": {"backbone"}, "detection": {"backbone", "FPN"},
                  "full": {"backbone", "FPN", "box predictor tower", "box predictor", "class predictor"}}


class CheckpointError(ValueError):
    """A checkpoint that cannot initialise this model (message names the file and the reason)."""


# ---------------------------------------------------------------------------------------------
# Reading checkpoints

def checkpoint_prefix(path: str | Path) -> str:
    """A checkpoint prefix from a prefix or a folder (its latest checkpoint)."""
    path = str(path)
    if tf.io.gfile.isdir(path):
        latest = checkpoints.latest_in(path)
        if latest is None:
            raise CheckpointError(f"{path}: no checkpoint in this folder")
        return latest
    if not tf.io.gfile.exists(path + ".index"):
        raise CheckpointError(f"{path}: no such checkpoint (expected {path}.index)")
    return path


def layout(path: str | Path) -> str:
    """'od_api', 'ours' (Model Garden layout, detection or classification) or 'keras_h5'."""
    if str(path).endswith((".h5", ".hdf5")):
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: no such weights file")
        return "keras_h5"
    names = [name for name, _ in tf.train.list_variables(checkpoint_prefix(path))]
    if any(name.startswith("model/_feature_extractor/") for name in names):
        return "od_api"
    if any(name.startswith("backbone/") for name in names):
        return "ours"
    raise CheckpointError(f"{path}: neither an Object Detection API checkpoint (model/_feature_extractor/...) nor "
                          "one of this pipeline's (backbone/...)")


@dataclasses.dataclass
class RestoreSummary:
    source: str
    kind: str
    source_layout: str
    restored: int
    fresh: list[str]  # parts of the model initialised fresh
    unused: dict[str, int]  # checkpoint part -> variables not used
    num_classes: int

    def __str__(self) -> str:
        what = {"od_api": "Object Detection API checkpoint", "ours": "checkpoint",
                "keras_h5": "Keras MobileNetV2 weights"}[self.source_layout]
        line = f"restored {self.restored} variables from {self.source} ({what}, '{self.kind}')"
        if self.fresh:
            fresh = ", ".join(f"{p} ({self.num_classes} classes)" if p == "class predictor" else p for p in self.fresh)
            line += f"; initialised fresh: {fresh}"
        if self.unused:
            line += "; not used from the checkpoint: " + ", ".join(f"{p} ({n})" for p, n in self.unused.items())
        return line


def _fresh_parts(kind: str) -> list[str]:
    order = ["backbone", "FPN", "box predictor tower", "box predictor", "class predictor"]
    return [p for p in order if p not in RESTORED_PARTS[kind]]


def _num_classes(model) -> int:
    """Label-map classes K (the network predicts K + 1 columns, background first)."""
    return model.head.get_config()["num_classes"] - 1


def restore_od_api(model, path: str | Path, kind: str = "full") -> RestoreSummary:
    """Assign the OD API checkpoint's values to `model` for `kind`; every variable checked by shape."""
    prefix = checkpoint_prefix(path)
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    table = od_api_table(model)
    wanted = {name: var for name, var in table.items() if part_of(name) in RESTORED_PARTS[kind]}
    missing = sorted(name for name in wanted if name not in shapes)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} variables of this model are not in the checkpoint, e.g. "
                              f"{missing[0][:-len(SUFFIX)]} (another architecture or configuration?)")
    for name, var in wanted.items():
        if tuple(shapes[name]) != tuple(var.shape):
            hint = (" (the checkpoint was trained for other classes: use fine_tune_checkpoint_type 'detection')"
                    if part_of(name) == "class predictor" else "")
            raise CheckpointError(f"{path}: {name[:-len(SUFFIX)]} has shape {list(shapes[name])}, this model "
                                  f"{var.shape.as_list()}{hint}")
    for name, var in wanted.items():
        var.assign(reader.get_tensor(name).astype(var.dtype.as_numpy_dtype))
    unused: dict[str, int] = {}
    for name in shapes:
        if name.endswith(SUFFIX) and name not in wanted and name.startswith("model/"):
            part = part_of(name)
            unused[part] = unused.get(part, 0) + 1
    order = ["backbone", "FPN", "box predictor tower", "box predictor", "class predictor", "other"]
    unused = {part: unused[part] for part in order if part in unused}
    return RestoreSummary(str(path), kind, "od_api", len(wanted), _fresh_parts(kind), unused, _num_classes(model))


def save_od_api(model, template: str | Path, out: str | Path) -> str:
    """Write `model`'s weights as an OD API checkpoint: `template` (an OD API checkpoint of the same
    configuration, e.g. the zoo's) gives the layout, its object graph and every entry this network has no
    twin for (optimizer slots, counters); each variable of ours replaces its namesake. Writes
    OUT.index/.data-* and the folder's `checkpoint` state file; returns the prefix."""
    prefix = checkpoint_prefix(template)
    reader = tf.train.load_checkpoint(prefix)
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    table = od_api_table(model)
    missing = sorted(name for name in table if name not in dtypes)
    if missing:
        raise CheckpointError(f"{template}: {len(missing)} variables of this model are not in the checkpoint, e.g. "
                              f"{missing[0][:-len(SUFFIX)]} (another architecture or configuration?)")
    names, values = [], []
    for name in sorted(dtypes):
        value = table[name] if name in table else reader.get_tensor(name)
        if name in table and tuple(shapes[name]) != tuple(value.shape):
            raise CheckpointError(f"{template}: {name[:-len(SUFFIX)]} has shape {list(shapes[name])}, "
                                  f"this model {value.shape.as_list()}")
        names.append(name)
        values.append(tf.convert_to_tensor(value, dtype=dtypes[name]) if name in table else tf.constant(value))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tf.raw_ops.SaveV2(prefix=str(out), tensor_names=names, shape_and_slices=[""] * len(names), tensors=values)
    tf.compat.v1.train.update_checkpoint_state(str(out.parent), str(out), all_model_checkpoint_paths=[str(out)])
    return str(out)


def restore_ours(model, path: str | Path, kind: str) -> RestoreSummary:
    """Restore a checkpoint of this pipeline (or Model Garden's classification task) for `kind`."""
    prefix = checkpoint_prefix(path)
    roots = {name.split("/")[0] for name, _ in tf.train.list_variables(prefix)}
    items = {"classification": ["backbone"], "detection": ["backbone", "decoder"],
             "full": ["backbone", "decoder", "head"]}[kind]
    absent = [item for item in items if item not in roots]
    if absent:
        raise CheckpointError(f"{path}: has no {', '.join(absent)} (a classification checkpoint holds the backbone "
                              f"only: use fine_tune_checkpoint_type 'classification')")
    objects = {item: getattr(model, item) for item in items}
    try:
        tf.train.Checkpoint(**objects).read(prefix).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(f"{path}: does not fit this model's {', '.join(items)} ({first})") from None
    restored = sum(len(obj.weights) for obj in objects.values())
    return RestoreSummary(str(path), kind, "ours", restored, _fresh_parts(kind), {}, _num_classes(model))


def keras_mobilenet_v2(alpha: float = 1.0):
    return tf_keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(None, None, 3), alpha=alpha)


def restore_keras_h5(model, path: str | Path, alpha: float = 1.0) -> RestoreSummary:
    """The backbone from a Keras-application MobileNetV2 weights file (no top), layer by layer."""
    keras_model = keras_mobilenet_v2(alpha)
    try:
        keras_model.load_weights(str(path))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a Keras MobileNetV2 (alpha {alpha}) weights file without top: "
                              f"{str(e).splitlines()[0][:200]}") from None
    source = [layer for layer in keras_model.layers if layer.weights]
    target = backbone_layers(model)
    if len(source) != len(target):
        raise CheckpointError(f"{path}: {len(source)} weighted layers, the backbone has {len(target)}")
    pairs = []
    for src, dst in zip(source, target):
        src_vars = {short_name(v): v for v in src.weights}
        for var in dst.weights:
            value = src_vars.get(short_name(var))
            if value is None or tuple(value.shape) != tuple(var.shape):
                raise CheckpointError(f"{path}: layer {src.name} does not match the backbone's {dst.name}")
            pairs.append((var, value))
    for var, value in pairs:
        var.assign(value)
    return RestoreSummary(str(path), "classification", "keras_h5", len(pairs), _fresh_parts("classification"), {},
                          _num_classes(model))


def default_kind(path: str | Path) -> str:
    """The fine_tune_checkpoint_type a checkpoint calls for when none is given: 'detection' for a
    detector's checkpoint (it has an FPN), 'classification' for a backbone-only one."""
    if layout(path) == "keras_h5":
        return "classification"
    names = [name for name, _ in tf.train.list_variables(checkpoint_prefix(path))]
    detector = any(name.startswith(("model/_feature_extractor/_fpn_features_generator/", "decoder/")) for name in names)
    return "detection" if detector else "classification"


def restore(model, path: str | Path, kind: str = "detection") -> RestoreSummary:
    """Initialise `model` from `path` as fine_tune_checkpoint_type `kind` says (see the module doc)."""
    kind = (kind or "detection").lower()
    if kind not in KINDS:
        raise CheckpointError(f"fine_tune_checkpoint_type '{kind}': expected one of {', '.join(KINDS)}")
    source = layout(path)
    if source == "keras_h5":
        if kind != "classification":
            raise CheckpointError(f"{path}: a Keras weights file holds a backbone only: use "
                                  "fine_tune_checkpoint_type 'classification'")
        return restore_keras_h5(model, path)
    if source == "od_api":
        return restore_od_api(model, path, kind)
    return restore_ours(model, path, kind)


def check(params, kind: str | None = None) -> RestoreSummary:
    """Whether params.fine_tune_checkpoint can initialise the params' model: builds the model and
    restores into it (nothing is written). Raises CheckpointError naming the problem."""
    from pipelines.detection.model import build_model

    return restore(build_model(params), params.fine_tune_checkpoint, kind or params.fine_tune_checkpoint_type)


def variable_report(model, path: str | Path) -> dict[str, list[str]]:
    """For an OD API checkpoint: {'mapped': [...], 'unmapped_checkpoint': [...], 'unmapped_model': [...]}."""
    shapes = tf.train.load_checkpoint(checkpoint_prefix(path)).get_variable_to_shape_map()
    table = od_api_table(model)
    ckpt = {n for n in shapes if n.endswith(SUFFIX)}
    return {"mapped": sorted(ckpt & set(table)), "unmapped_checkpoint": sorted(ckpt - set(table)),
            "unmapped_model": sorted(set(table) - ckpt)}
