"""`make import`: an Object Detection API zoo folder (pipeline.config + checkpoint/) -> a run of ours,
its weights restored into our network (pipelines/detection/zoo.py maps the names) and saved as train/ckpt-0."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import tensorflow as tf

from pipelines import checkpoints
from pipelines.workspace import REPO_ROOT, UserError, atomic_output_dir, display_path, workspace_dir
from pipelines.config.rewrite import portable
from pipelines.config.textproto import TextProto
from pipelines.data.label_map import read_label_map
from pipelines.detection import config as tr
from pipelines.detection.model import build_model
from pipelines.detection.od_names import SUFFIX
from pipelines.detection.zoo import CheckpointError, layout, restore_od_api, variable_report


COCO_LABEL_MAP = "configs/mscoco_label_map.pbtxt"


def _zoo_checkpoint(zoo_dir: Path) -> str:
    """The zoo folder's checkpoint prefix, with its data files present."""
    folder = zoo_dir / "checkpoint"
    if not folder.is_dir():
        raise CheckpointError(f"{zoo_dir}: no checkpoint/ folder (an extracted zoo model has pipeline.config and "
                              "checkpoint/ckpt-0.*)")
    prefix = checkpoints.latest_in(folder) or str(folder / "ckpt-0")
    if not Path(prefix + ".index").is_file():
        raise CheckpointError(f"{folder}: no checkpoint (expected ckpt-0.index and ckpt-0.data-*)")
    data = sorted(Path(prefix).parent.glob(Path(prefix).name + ".data-*"))
    match = re.search(r"of-(\d+)$", data[0].name) if data else None
    if not data or (match and len(data) != int(match.group(1))):
        raise CheckpointError(f"{prefix}.data-00000-of-00001: missing (the index alone holds no weights: extract the "
                              "whole archive)")
    return prefix


def import_zoo(zoo_dir: Path, run: str | None = None, label_map: Path | None = None, force: bool = False,
               log=print) -> Path:
    """An extracted zoo folder -> workspace/RUN/ (pipeline.config, label_map.pbtxt, train/ckpt-0)."""
    zoo_dir = Path(zoo_dir)
    config_path = zoo_dir / "pipeline.config"
    if not config_path.is_file():
        raise UserError(display_path(zoo_dir), "no pipeline.config (give the extracted zoo model's folder)")
    prefix = _zoo_checkpoint(zoo_dir)
    if layout(prefix) != "od_api":
        raise CheckpointError(f"{prefix}: not an Object Detection API checkpoint")
    run = run or zoo_dir.resolve().name
    target = workspace_dir() / run
    if target.exists() and not force:
        raise UserError(display_path(target), "exists already: choose another RUN= or remove it")

    label_map = Path(label_map) if label_map else REPO_ROOT / COCO_LABEL_MAP
    labels = read_label_map(label_map)
    doc = TextProto(config_path.read_text(encoding="utf-8"), display_path(config_path))
    params = tr.translate(doc, check_paths=False).params  # unsupported architectures stop here
    if max(labels) > params.num_classes:
        raise UserError(display_path(label_map), f"ids up to {max(labels)}, but the model has {params.num_classes} "
                                                 "classes (give its own label map with LABEL_MAP=)")

    model = build_model(params)
    summary = restore_od_api(model, prefix, "full")
    report = variable_report(model, prefix)
    extra = [n[:-len(SUFFIX)] for n in report["unmapped_checkpoint"] if not n.startswith("save_counter/")]
    if extra:
        raise CheckpointError(f"{prefix}: {len(extra)} variables this model has no place for, e.g. {extra[0]} "
                              "(the checkpoint does not match its pipeline.config?)")
    log(f"{summary} ({len(report['mapped'])} of the checkpoint's {len(report['mapped']) + 1} entries; the other, "
        "save_counter, counts saves and is not a weight)")

    # The run's config: the zoo's, reading our label map; no fine-tuning source (the weights are in train/).
    for reader in ("train_input_reader", "eval_input_reader"):
        if doc.has(f"{reader}.label_map_path"):
            doc.set(f"{reader}.label_map_path", portable(target / "label_map.pbtxt"))
    for name in ("fine_tune_checkpoint", "fine_tune_checkpoint_type", "fine_tune_checkpoint_version"):
        doc.remove(f"train_config.{name}")
    with atomic_output_dir(target, log=log) as tmp:
        label_path = tmp / "label_map.pbtxt"
        shutil.copyfile(label_map, label_path)
        (tmp / "pipeline.config").write_text(doc.text, encoding="utf-8")
        tf.train.Checkpoint(model=model, **model.checkpoint_items).write(str(tmp / "train" / "ckpt-0"))
        tf.compat.v1.train.update_checkpoint_state(str(tmp / "train"), "ckpt-0", all_model_checkpoint_paths=["ckpt-0"])
        (tmp / "train" / "import.json").write_text(json.dumps({
            "zoo": str(zoo_dir.resolve()), "checkpoint": prefix, "restored": summary.restored,
            "label_map": str(label_map), "num_classes": params.num_classes}, indent=2) + "\n")
    log(f"wrote {display_path(target)}/: pipeline.config, label_map.pbtxt ({len(labels)} classes), train/ckpt-0; "
        f"next: make export RUN={run} && make serve RUN={run}")
    return target
