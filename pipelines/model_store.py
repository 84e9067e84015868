"""What every export shares: its metadata.json, its entry in the BentoML model store, the images it is checked on.

An export folder (RUN_DIR/export) holds saved_model/, label_map.pbtxt and metadata.json, whose
"task" (a name of pipelines/tasks.py's registry) tells any consumer (predict, the services) which kind of
model it is. The same metadata is recorded with the export's copy in the BentoML store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from pipelines.workspace import UserError, display_path

METADATA_FILE = "metadata.json"

# The serving signature every export has: `serving_default` takes INPUT_NAME, uint8 [batch, height,
# width, 3] of any size (the Object Detection API's input name); its outputs are the task's.
INPUT_NAME = "input_tensor"
DETECTION_OUTPUTS = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")
MASK_OUTPUT = "segmentation_mask"  # int32 [batch, height, width]: 0 = background, 1..K = label-map ids
PROBABILITIES_OUTPUT = "probabilities"  # float32 [batch, height, width, K + 1]
SEGMENTATION_OUTPUTS = (MASK_OUTPUT, PROBABILITIES_OUTPUT)
# A second signature, for `make suggest` (pipelines/annotator/suggest.py): the same input, one image at a time;
# out, from one forward pass, what the task's uncertainty reads and FEATURES_OUTPUT, float32 [batch, D]: the
# network's deepest features averaged over the image, for telling near-duplicates apart.
SUGGEST_SIGNATURE = "suggest"
FEATURES_OUTPUT = "image_features"


def tag_name(text: str, fallback: str) -> str:
    """`text` as a valid BentoML model name (lower case, [a-z0-9._-], at most 63 characters)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:63]
    return name or fallback


def export_identity(folder: Path) -> tuple[str, str]:
    """(name, version) of an export folder: its run's name and the first 12 hex digits of the SHA-256 of
    what it serves (saved_model.pb, the weights under saved_model/variables/, metadata.json with the label
    map and score threshold). The one id of a model: /detect answers it as "model", drafts carry it, and
    `make export` stores the export in BentoML's model store under NAME:VERSION with it."""
    import hashlib

    folder = Path(folder)
    digest = hashlib.sha256()
    parts = [folder / "saved_model" / "saved_model.pb",
             *sorted((folder / "saved_model" / "variables").glob("*")), folder / METADATA_FILE]
    for part in parts:
        if part.is_file():
            digest.update(part.name.encode() + b"\0")
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    name = folder.resolve().parent.name if folder.name == "export" else folder.resolve().name
    return name, digest.hexdigest()[:12]


def model_store():
    """BentoML's model store under $BENTOML_HOME (read at each call, so tests can point it elsewhere)."""
    from bentoml._internal.models import ModelStore

    home = Path(os.path.expanduser(os.environ.get("BENTOML_HOME", "~/bentoml")))
    (home / "models").mkdir(parents=True, exist_ok=True)
    return ModelStore(str(home / "models"))


def save_to_bentoml(export_dir: Path, name: str, metadata: dict):
    """Copy `export_dir` into BentoML's store as model NAME:VERSION, VERSION its export_identity (the same
    export again is the version already there); returns its Tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = f"{name}:{export_identity(export_dir)[1]}"
    try:
        return model_store().get(tag).tag
    except NotFound:
        pass
    with bentoml.models.create(tag, metadata=metadata, _model_store=model_store()) as bento_model:
        shutil.copytree(export_dir, bento_model.path, dirs_exist_ok=True)
    return bento_model.tag


def write_metadata(export_dir: Path, metadata: dict) -> None:
    """metadata.json beside saved_model/ (JSON turns the label map's integer keys into strings)."""
    (Path(export_dir) / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def read_metadata(model_dir: Path) -> dict | None:
    """The metadata.json of an export folder or of the saved_model folder inside one; None when there
    is none (exports written before metadata.json existed)."""
    model_dir = Path(model_dir)
    folders = [model_dir]
    if (model_dir / "saved_model.pb").is_file():  # the saved_model folder: its export folder is the parent
        folders.append(model_dir.parent)
    for folder in folders:
        path = folder / METADATA_FILE
        if path.is_file():
            try:
                metadata = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UserError(display_path(path), f"cannot read export metadata: {e}") from None
            if not isinstance(metadata, dict):
                raise UserError(display_path(path), "export metadata is not a JSON object")
            return metadata
    return None


def check_images(params, count: int = 3) -> list:
    """Images for checking an export against its checkpoint (params: detector's or segmenter's)."""
    import numpy as np
    import tensorflow as tf

    # A few val (else train) images, plus one of an odd, non-square size made from the first.
    files = []
    for pattern in list(params.eval_files) + list(params.train_files):
        files.extend(sorted(tf.io.gfile.glob(pattern)))
        if files:
            break
    images = []
    if files:
        for raw in tf.data.TFRecordDataset(files).take(count):
            example = tf.train.Example.FromString(raw.numpy())
            encoded = example.features.feature["image/encoded"].bytes_list.value[0]
            images.append(tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy())
    if not images:
        images = [np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)]
    images.append(tf.cast(tf.image.resize(images[0], (203, 317)), tf.uint8).numpy())
    return images
