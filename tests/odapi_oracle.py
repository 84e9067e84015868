"""Test oracle: the TensorFlow Object Detection API's own SSD, run in a subprocess.

Our SSD MobileNet V2 FPNLite is a re-implementation of the OD API model; the only trustworthy
reference for "same checkpoint layout, same numbers" is the OD API code itself. It cannot live in
our virtualenv (it pins old Keras/protobuf stacks and drags in apache-beam, lvis, tensorflow-io,
...), so this file fetches the research code as an sdist, unpacks it into a cache folder and runs
it in a child process with the unpacked folder on PYTHONPATH. Nothing gets installed.

The file has two roles:

* importable helpers for tests (no TensorFlow or OD API import at module import time):
  `oracle_dir()`, `oracle_env()` and `run_oracle(...)`;
* `field_schema()` and `text_format_verdicts(...)`: the OD API's pipeline.config schema from its
  own protos (`python tests/odapi_oracle.py --schema pipelines/config/odapi_fields.json` regenerates
  the file `make config` checks configs against), and protobuf's own verdict on config files;
* the child process itself: `python tests/odapi_oracle.py --config PIPELINE_CONFIG
  --images IMAGES.npz --out DIR [--seed N] [--num-classes K]`. It builds the model from the
  pipeline.config, gives every variable a distinct seeded random value, writes DIR as an
  extracted zoo model folder (pipeline.config + checkpoint/ckpt-0.* + checkpoint/checkpoint), and
  saves the OD API's preprocess / predict / postprocess outputs for each image to
  DIR/outputs.npz and the checkpoint's variable list to DIR/variables.json;
* `run_augment_oracle(...)` / `--augment CASES.pkl --out DIR`: the OD API's data augmentation
  (preprocessor_builder + preprocessor.preprocess) on given images and boxes, with the random values
  that our augmentation drew (pipelines/detection/augment.py) instead of its own.

Shims the OD API research code needs on our TensorFlow 2.20 stack (see `oracle_env`):

* PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python: its generated *_pb2.py files predate protobuf 4
  and are refused by the upb backend ("Descriptors cannot be created directly");
* a stub `tensorflow_io` package: only the DeepMAC meta-architecture imports it, but
  model_builder imports every meta-architecture;
* TF_USE_LEGACY_KERAS=1 so that `tf.keras` is Keras 2 (tf-keras), which the OD API is written for;
* CUDA_VISIBLE_DEVICES="" so the oracle's numbers come from the same CPU kernels on every machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# The unofficial PyPI repackaging of tensorflow/models research/object_detection (TF2 code, 2022).
# Pinned by version and by the sdist's digest: the oracle is only as good as the code it runs.
ODAPI_REQUIREMENT = "tf-models-research-object-detection==2.8.0.post1"
ODAPI_SDIST = "tf_models_research_object_detection-2.8.0.post1.tar.gz"
ODAPI_SHA256 = "c701ea455646553a64c5f161641e8d5a94054b162b81961dcfff3dd619870004"
ODAPI_FOLDER = "tf_models_research_object_detection-2.8.0.post1"

_STUB_TENSORFLOW_IO = '''"""Stub for the OD API oracle (tests/odapi_oracle.py).

object_detection.meta_architectures.deepmac_meta_arch does `import tensorflow_io as tfio` at
import time, and model_builder imports every meta-architecture. SSD never touches tfio, so an
empty module is enough and spares installing tensorflow-io (which pins its own TensorFlow).
"""
'''


class OracleUnavailable(RuntimeError):
    """The OD API code cannot be fetched here (no package registry): tests skip, not fail."""


# ----------------------------------------------------------------------------------------------
# Fetching the OD API code (helpers; no TensorFlow here)
# ----------------------------------------------------------------------------------------------

def cache_root() -> Path:
    """Where the unpacked sdist and the stubs live: $PIPELINES_ODAPI_DIR or <repo>/.venv/odapi-oracle."""
    return Path(os.environ.get("PIPELINES_ODAPI_DIR") or REPO / ".venv" / "odapi-oracle")


def _stubs_dir() -> Path:
    return cache_root() / "stubs"


def _fetch_source() -> Path:
    """Download, verify and unpack the sdist once; return the folder that holds `object_detection`.

    The unpacked tree is moved into place with a single rename, so a folder that exists is
    complete (an interrupted or concurrent fetch never leaves a half-unpacked tree behind).
    """
    root = cache_root()
    source = root / ODAPI_FOLDER
    if source.is_dir():
        return source
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
               ODAPI_REQUIREMENT, "-d", str(tmp / "dl")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise OracleUnavailable(f"`pip download {ODAPI_REQUIREMENT}` timed out") from None
        sdist = tmp / "dl" / ODAPI_SDIST
        if proc.returncode != 0 or not sdist.is_file():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise OracleUnavailable(f"cannot download {ODAPI_REQUIREMENT} (no package registry?): {tail}")
        # A digest mismatch is not "unavailable": the registry served different code. Fail loudly.
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != ODAPI_SHA256:
            raise RuntimeError(f"{sdist.name}: sha256 {digest}, expected {ODAPI_SHA256}")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp / "unpacked", filter="data")
        try:
            (tmp / "unpacked" / ODAPI_FOLDER).rename(source)
        except OSError:
            if not source.is_dir():  # anything but "a concurrent fetch got there first"
                raise
    return source


def _write_stubs() -> Path:
    """Create the stub-module folder (modules the OD API imports but SSD never uses)."""
    init = _stubs_dir() / "tensorflow_io" / "__init__.py"
    if not init.is_file() or init.read_text() != _STUB_TENSORFLOW_IO:
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text(_STUB_TENSORFLOW_IO)
    return _stubs_dir()


def _pythonpath_entries() -> list[Path]:
    source = _fetch_source()
    return [source, _write_stubs()]


def _pythonpath_entries_or_skip() -> list[Path]:
    import pytest

    try:
        return _pythonpath_entries()
    except OracleUnavailable as exc:
        pytest.skip(f"OD API oracle unavailable: {exc}")


def oracle_dir() -> Path:
    """The unpacked OD API research code (the folder holding `object_detection`), fetched once.

    Also creates the stub folder next to it (`<cache>/stubs`); `oracle_env()` puts both on
    PYTHONPATH. Skips the calling test when the sdist cannot be downloaded here.
    """
    return _pythonpath_entries_or_skip()[0]


def _child_env(paths: list[Path]) -> dict[str, str]:
    pythonpath = [str(p) for p in paths]
    if os.environ.get("PYTHONPATH"):
        pythonpath.append(os.environ["PYTHONPATH"])
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python",
        "TF_USE_LEGACY_KERAS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "_ODAPI_ORACLE_CHILD": "1",  # tells main() the shims are in place (no re-exec)
    }


def oracle_env() -> dict[str, str]:
    """The environment of an oracle subprocess: os.environ plus the shims (see module docstring).

    Everything else (e.g. TF_ENABLE_ONEDNN_OPTS) is inherited, so the oracle runs the same kernels
    as the test process it is compared with.
    """
    return _child_env(_pythonpath_entries_or_skip())


def run_oracle(config: Path, images: list[np.ndarray], out_dir: Path, seed: int = 0,
               num_classes: int | None = None, timeout: float = 600,
               groundtruth: list[tuple[np.ndarray, np.ndarray]] | None = None,
               weights: str | Path | None = None) -> dict:
    """Run the OD API model of `config` on `images` in a subprocess; return its outputs.

    `images` are uint8 HxWx3 arrays (any sizes). Writes out_dir/images.npz, then the child writes
    out_dir/pipeline.config, out_dir/checkpoint/{checkpoint,ckpt-0.index,ckpt-0.data-*},
    out_dir/outputs.npz, out_dir/variables.json and out_dir/oracle.log (its stdout and stderr).

    Returns outputs.npz as a dict of numpy arrays (keys: see `_run_model`) plus "checkpoint": the
    checkpoint prefix, a str ready for tf.train.* (out_dir/checkpoint/ckpt-0).

    `groundtruth`: one (boxes [N, 4] normalized ymin, xmin, ymax, xmax; classes [N] label-map ids) per
    image, the images all of one size: the OD API's training loss of that batch is computed too (see
    `_loss_and_gradients`), and "gradients": the prefix of a checkpoint in the zoo layout whose variables
    hold the loss's gradients instead of the weights.
    `weights`: an OD API checkpoint prefix the model restores (every variable) instead of taking seeded
    random values; out_dir/checkpoint/ckpt-0 is then a copy of it as the OD API saves it.
    Raises RuntimeError with the child's stderr tail when it fails; skips when the OD API code
    cannot be fetched.
    """
    env = oracle_env()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i}: expected uint8 HxWx3, got {image.dtype} {image.shape}")
    np.savez(out_dir / "images.npz", **{f"image_{i}": image for i, image in enumerate(images)})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", str(config),
           "--images", str(out_dir / "images.npz"), "--out", str(out_dir), "--seed", str(seed)]
    if num_classes is not None:
        cmd += ["--num-classes", str(num_classes)]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    if groundtruth is not None:
        np.savez(out_dir / "groundtruth.npz", count=len(groundtruth),
                 **{f"boxes_{i}": np.asarray(b, np.float32).reshape(-1, 4) for i, (b, _) in enumerate(groundtruth)},
                 **{f"classes_{i}": np.asarray(c, np.int64).reshape(-1) for i, (_, c) in enumerate(groundtruth)})
        cmd += ["--groundtruth", str(out_dir / "groundtruth.npz")]
    _run_child(cmd, env, out_dir / "oracle.log", timeout, "oracle")
    with np.load(out_dir / "outputs.npz") as npz:
        outputs = {key: npz[key] for key in npz.files}
    outputs["checkpoint"] = str(out_dir / "checkpoint" / "ckpt-0")
    if groundtruth is not None:
        outputs["gradients"] = str(out_dir / "gradients" / "ckpt-0")
    return outputs


def _run_child(cmd: list[str], env: dict, log: Path, timeout: float, what: str) -> None:
    """Run the child `cmd`; its command line, stdout and stderr go to `log`. Raises RuntimeError with the
    stderr tail when it fails or runs past `timeout` seconds."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"OD API {what} timed out after {timeout}s:\n{_tail(exc.stderr)}") from None
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"OD API {what} failed (exit {proc.returncode}):\n{_tail(proc.stderr)}")


def _tail(text, limit: int = 4000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-limit:]


# ----------------------------------------------------------------------------------------------
# The child process: OD API model, random weights, checkpoint, outputs
# ----------------------------------------------------------------------------------------------

def _kernel_std(layer: str, leaf: str, shape: list[int], separable_layers: set[str]) -> float:
    """He-style std sqrt(gain / fan_in), with the gain chosen so activations stay O(1).

    BatchNorm runs in inference mode on random moving statistics, so it does not re-normalise:
    the kernel scales alone decide whether 17 MobileNetV2 blocks, the FPN and the head tower
    blow up, vanish or saturate ReLU6. Gain 2 compensates the ReLU that follows a conv; linear
    convs get less: MobileNetV2's bottleneck projections get 1/2 so that a residual add
    (x + f(x)) and the plain blocks balance out over the network; the FPN's 1x1 projections
    and the depthwise half of a separable conv (its pointwise half carries the ReLU gain) get 1;
    the box and class predictors get 1/2, which keeps box codes and logits near unit scale
    (sigmoid scores spread out instead of piling up at 1.0, where float32 ties would make the
    order of detections arbitrary).
    """
    depthwise = leaf == "depthwise_kernel"
    fan_in = shape[0] * shape[1] * (1 if depthwise else shape[2])
    if layer.endswith("_project") or layer.endswith("Predictor"):
        gain = 0.5
    elif "projection_" in layer or (depthwise and layer in separable_layers):
        gain = 1.0
    else:
        gain = 2.0
    return float(np.sqrt(gain / fan_in))


def _randomize_variables(model, seed: int) -> None:
    """Give every variable a distinct seeded random value, so that any mapping error shows.

    Variables are visited in name order, so the values depend on the seed and the variable set
    only, not on the order in which Keras happened to create them.
    """
    rng = np.random.default_rng(seed)
    variables = sorted(model.variables, key=lambda v: v.name)
    separable_layers = {v.name.rsplit("/", 1)[0] for v in variables if "pointwise_kernel" in v.name}
    digests = {}
    for var in variables:
        layer, leaf = var.name.rsplit("/", 1)
        leaf = leaf.split(":")[0]
        shape = var.shape.as_list()
        if leaf in ("kernel", "depthwise_kernel", "pointwise_kernel"):
            value = rng.normal(0.0, _kernel_std(layer, leaf, shape, separable_layers), shape)
        elif leaf == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf in ("beta", "moving_mean"):
            value = rng.normal(0.0, 0.2, shape)
        elif leaf == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        elif leaf == "bias" and "ClassPredictor" in layer:
            # Sigmoid scores around sigmoid(-2 +- ...) ~ 0.1-0.5: plenty of confident detections,
            # not all 12804 x K of them.
            value = rng.normal(-2.0, 0.5, shape)
        elif leaf == "bias":
            value = rng.normal(0.0, 0.1, shape)
        else:
            # A variable kind without a rule would keep its (possibly constant) initial value and
            # could hide a mapping error: refuse instead.
            raise ValueError(f"no randomisation rule for variable {var.name} {shape}")
        value = value.astype(var.dtype.as_numpy_dtype)
        digest = hashlib.sha256(value.tobytes()).hexdigest()
        if digest in digests:
            raise AssertionError(f"{var.name} got the same value as {digests[digest]}")
        digests[digest] = var.name
        var.assign(value)


def _describe(name: str, x: np.ndarray) -> str:
    return (f"{name:<28} shape={list(x.shape)!s:<20} mean={x.mean():+.3f} std={x.std():.3f} "
            f"zero={np.mean(x == 0):.2f} relu6-saturated={np.mean(x >= 6.0):.2f}")


def _run_model(config_path: Path, images_path: Path, out_dir: Path, seed: int,
               num_classes: int | None, groundtruth_path: Path | None = None, weights: str | None = None) -> None:
    import tensorflow as tf
    from google.protobuf import text_format
    from object_detection.builders import model_builder
    from object_detection.protos import pipeline_pb2

    pipeline = pipeline_pb2.TrainEvalPipelineConfig()
    text_format.Merge(Path(config_path).read_text(), pipeline)
    if pipeline.model.WhichOneof("model") != "ssd":
        raise SystemExit(f"{config_path}: only SSD models are supported, got {pipeline.model.WhichOneof('model')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if num_classes is not None and num_classes != pipeline.model.ssd.num_classes:
        pipeline.model.ssd.num_classes = num_classes
        (out_dir / "pipeline.config").write_text(text_format.MessageToString(pipeline))
    elif Path(config_path).resolve() != (out_dir / "pipeline.config").resolve():
        shutil.copyfile(config_path, out_dir / "pipeline.config")

    model = model_builder.build(pipeline.model, is_training=False)
    # A first call creates every variable (Keras builds lazily); the image size is irrelevant,
    # preprocess resizes it to the configured input size.
    model.predict(*model.preprocess(tf.zeros([1, 64, 64, 3], tf.float32)))
    if weights:
        # An OD API checkpoint (e.g. one of ours written by zoo.save_od_api), read by the OD API's own code.
        tf.train.Checkpoint(model=model).read(weights).expect_partial().assert_existing_objects_matched()
    else:
        _randomize_variables(model, seed)

    # Same layout as a zoo model folder: checkpoint/ckpt-0.{index,data-*} plus the `checkpoint`
    # state file. CheckpointManager.save also creates `save_counter`, which the zoo index has.
    ckpt_dir = out_dir / "checkpoint"
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(ckpt_dir), max_to_keep=1)
    prefix = manager.save(checkpoint_number=0)
    assert Path(prefix) == ckpt_dir / "ckpt-0", prefix
    variables = [[name, list(shape)] for name, shape in tf.train.list_variables(prefix)]
    (out_dir / "variables.json").write_text(json.dumps(variables, indent=1) + "\n")
    print(f"checkpoint {prefix}: {len(variables)} entries")

    outputs = {}
    with np.load(images_path) as npz:
        images = [npz[f"image_{i}"] for i in range(len(npz.files))]
    for i, image in enumerate(images):
        # Exactly what the exported detection function does, minus tf.function.
        preprocessed, true_shapes = model.preprocess(tf.cast(image[None], tf.float32))
        prediction = model.predict(preprocessed, true_shapes)
        detections = model.postprocess(prediction, true_shapes)
        print(f"image {i}: {image.shape[1]}x{image.shape[0]}")
        outputs[f"preprocessed_{i}"] = preprocessed.numpy()
        outputs[f"true_image_shapes_{i}"] = true_shapes.numpy()
        outputs[f"anchors_{i}"] = prediction["anchors"].numpy()
        outputs[f"box_encodings_{i}"] = prediction["box_encodings"].numpy()
        outputs[f"class_predictions_{i}"] = prediction["class_predictions_with_background"].numpy()
        feature_maps = [fm.numpy() for fm in prediction["feature_maps"]]
        for level, fm in enumerate(feature_maps):
            outputs[f"feature_map_{i}_{level}"] = fm
            print("  " + _describe(f"feature_map[{level}]", fm))
        outputs[f"feature_map_shapes_{i}"] = np.array([fm.shape for fm in feature_maps], np.int64)
        outputs[f"feature_map_std_{i}"] = np.array([fm.std() for fm in feature_maps], np.float32)
        for key in ("box_encodings", "class_predictions"):
            print("  " + _describe(key, outputs[f"{key}_{i}"]))
        for key, value in detections.items():
            outputs[f"{key}_{i}"] = value.numpy()
        scores = outputs[f"detection_scores_{i}"]
        print(f"  num_detections={outputs[f'num_detections_{i}']} max score={scores.max():.3f} "
              f"scores>0.3: {int((scores > 0.3).sum())}")
    # With a fixed-size resizer every image has the same anchors; `anchors` is the usual handle.
    outputs["anchors"] = outputs["anchors_0"]
    if groundtruth_path is not None:
        outputs.update(_loss_and_gradients(model, images, groundtruth_path, out_dir / "gradients"))
    np.savez(out_dir / "outputs.npz", **outputs)


def _loss_and_gradients(model, images: list[np.ndarray], groundtruth_path: Path, gradients_dir: Path) -> dict:
    """The OD API's training loss of the images as one batch, as model_lib_v2's training step computes it
    (provide_groundtruth, predict, loss, plus the regularisation losses), with the batch norms in
    inference mode (the model is built with is_training=False: same weights, no batch statistics).
    Writes the gradients of the total as a checkpoint of the model's own layout (each variable holding
    its gradient), so that a test can restore them into our network by the same name mapping as weights."""
    import tensorflow as tf

    with np.load(groundtruth_path) as npz:
        count = int(npz["count"])
        boxes = [npz[f"boxes_{i}"] for i in range(count)]
        classes = [npz[f"classes_{i}"] for i in range(count)]
    num_classes = model.num_classes
    batch = tf.cast(np.stack(images[:count]), tf.float32)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        model.provide_groundtruth(
            groundtruth_boxes_list=[tf.constant(b, tf.float32) for b in boxes],
            groundtruth_classes_list=[tf.one_hot(tf.constant(c - 1, tf.int32), num_classes) for c in classes])
        preprocessed, true_shapes = model.preprocess(batch)
        prediction = model.predict(preprocessed, true_shapes)
        losses = model.loss(prediction, true_shapes)
        regularization = model.regularization_losses()
        reg = tf.add_n(regularization) if regularization else tf.constant(0.0)
        total = tf.add_n(list(losses.values())) + reg
    grads = tape.gradient(total, variables)
    # The targets the loss was computed against (anchors in the model's flattened order).
    cls_targets, cls_weights, reg_targets, reg_weights, _ = model._assign_targets(
        model.groundtruth_lists("boxes"), model.groundtruth_lists("classes"))
    print(f"loss: {({k: float(v) for k, v in losses.items()})}, regularization {float(reg):.6f}, "
          f"total {float(total):.6f}")
    for var, grad in zip(variables, grads):
        var.assign(tf.zeros_like(var) if grad is None else tf.convert_to_tensor(grad))
    if gradients_dir.exists():
        shutil.rmtree(gradients_dir)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(gradients_dir), max_to_keep=1).save(
        checkpoint_number=0)
    return {"loss_localization": np.float32(losses["Loss/localization_loss"]),
            "loss_classification": np.float32(losses["Loss/classification_loss"]),
            "loss_regularization": np.float32(reg), "loss_total": np.float32(total),
            "loss_batch_preprocessed": preprocessed.numpy(), "loss_cls_targets": cls_targets.numpy(),
            "loss_cls_weights": cls_weights.numpy(), "loss_reg_targets": reg_targets.numpy(),
            "loss_reg_weights": reg_weights.numpy()}


# ----------------------------------------------------------------------------------------------
# Augmentation: the OD API's preprocessor on our draws
# ----------------------------------------------------------------------------------------------

def run_augment_oracle(cases: list[dict], out_dir: Path, timeout: float = 600) -> list[dict]:
    """The OD API's own data augmentation (preprocessor_builder.build + preprocessor.preprocess, as its input
    pipeline calls them) on each case, with the random values taken from the case instead of drawn.

    A case: "options" (pipeline.config text of `data_augmentation_options { ... }` entries), "image" (uint8
    HxWx3), "boxes" ([N, 4] normalized), "classes" ([N] ids), "draws" (one dict per option, as
    pipelines.detection.augment.augment records them: values named after the OD API's PreprocessorCache
    entries, "uniform:i" for plain uniform draws). Returns per case "image" (float32), "boxes", "classes"."""
    import pickle

    env = oracle_env()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "augment_cases.pkl", "wb") as f:
        pickle.dump(cases, f)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--augment", str(out_dir / "augment_cases.pkl"),
           "--out", str(out_dir)]
    _run_child(cmd, env, out_dir / "augment.log", timeout, "augmentation oracle")
    with open(out_dir / "augment_outputs.pkl", "rb") as f:
        return pickle.load(f)


def _augment(cases_path: Path, out_dir: Path) -> None:
    """Child side of run_augment_oracle: our draws put into a PreprocessorCache (keyed as the OD API's
    functions look them up), plain uniform draws served in order by tf.random_uniform / tf.random.uniform."""
    import pickle

    import tensorflow as tf
    from google.protobuf import text_format
    from object_detection.builders import preprocessor_builder
    from object_detection.core import preprocessor, preprocessor_cache
    from object_detection.core import standard_fields as fields
    from object_detection.protos import train_pb2

    Cache = preprocessor_cache.PreprocessorCache
    queue: list = []
    real = {"random_uniform": preprocessor.tf.random_uniform, "uniform": preprocessor.tf.random.uniform}

    def served(kind):
        def uniform(shape, minval=0, maxval=None, dtype=tf.float32, seed=None, name=None):
            if not queue:
                return real[kind](shape, minval, maxval, dtype=dtype, seed=seed, name=name)
            return tf.constant(queue.pop(0), dtype)
        return uniform

    preprocessor.tf.random_uniform = served("random_uniform")
    preprocessor.tf.random.uniform = served("uniform")

    def const(value):
        if isinstance(value, tuple):
            return tuple(const(v) for v in value)
        return tf.constant(value)

    with open(cases_path, "rb") as f:
        cases = pickle.load(f)
    outputs = []
    for number, case in enumerate(cases):
        train = train_pb2.TrainConfig()
        text_format.Merge(case["options"], train)
        options = [preprocessor_builder.build(step) for step in train.data_augmentation_options]
        if len(options) != len(case["draws"]):
            raise SystemExit(f"case {number}: {len(options)} options, {len(case['draws'])} sets of draws")
        cache = Cache()
        queue.clear()
        for (function, kwargs), draws in zip(options, case["draws"]):
            for name, value in draws.items():
                if name.startswith("uniform:"):
                    queue.append(value)
                    continue
                function_id, _, key = name.partition(":")
                if function_id == "strict_crop_image":
                    # Looked up under the crop's min_object_covered (the selected operation's, for ssd_random_crop).
                    covered = kwargs.get("min_object_covered", (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0))
                    key = covered[int(draws["selector_tuples"])] if function is preprocessor.ssd_random_crop \
                        else covered
                elif function_id == "selector_tuples":
                    key = Cache.SSD_CROP_SELECTOR_ID
                elif function_id == "black_patches":
                    key = int(key)
                cache.update(function_id, key, const(value))

        @tf.function
        def run(image, boxes, classes):
            tensors = {fields.InputDataFields.image: image[None], fields.InputDataFields.groundtruth_boxes: boxes,
                       fields.InputDataFields.groundtruth_classes: classes,
                       # The OD API's input pipeline gives every object weight 1 when the data has none.
                       fields.InputDataFields.groundtruth_weights: tf.ones_like(boxes[:, 0])}
            out = preprocessor.preprocess(tensors, options, func_arg_map=preprocessor.get_default_func_arg_map(),
                                          preprocess_vars_cache=cache)
            return (out[fields.InputDataFields.image][0], out[fields.InputDataFields.groundtruth_boxes],
                    out[fields.InputDataFields.groundtruth_classes])

        image, boxes, classes = run(tf.cast(case["image"], tf.float32), tf.constant(case["boxes"], tf.float32),
                                    tf.constant(case["classes"], tf.int64))
        if queue:
            raise SystemExit(f"case {number}: {len(queue)} uniform draws left unused")
        outputs.append({"image": image.numpy(), "boxes": boxes.numpy(), "classes": classes.numpy()})
        print(f"case {number}: {[f.__name__ for f, _ in options]} -> image {image.shape}, {boxes.shape[0]} boxes")
    with open(out_dir / "augment_outputs.pkl", "wb") as f:
        pickle.dump(outputs, f)


def field_schema(timeout: float = 300) -> dict:
    """The OD API's pipeline.config schema as pipelines/config/odapi_fields.json holds it (generated in
    a child process from the OD API's own protos; see `_schema`)."""
    env = oracle_env()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "schema.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--schema", str(out)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"OD API schema dump failed (exit {proc.returncode}):\n{_tail(proc.stderr)}")
        return json.loads(out.read_text())


def text_format_verdicts(configs: list[Path], timeout: float = 300) -> list[str | None]:
    """For each file, None when protobuf's own text_format.Parse accepts it as the OD API's
    TrainEvalPipelineConfig, else the parser's error message."""
    env = oracle_env()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--parse", *map(str, configs)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"OD API parse failed (exit {proc.returncode}):\n{_tail(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _schema() -> dict:
    """Every message reachable from TrainEvalPipelineConfig (the model oneof kept to `ssd`): for
    each field whether it is repeated and its type ('message:NAME', 'enum:NAME', 'map', 'float',
    'int', 'bool' or 'string'); enums with their value names."""
    from google.protobuf.descriptor import FieldDescriptor as FD
    from object_detection.protos import pipeline_pb2

    scalar = {FD.TYPE_DOUBLE: "float", FD.TYPE_FLOAT: "float", FD.TYPE_BOOL: "bool", FD.TYPE_STRING: "string",
              FD.TYPE_BYTES: "string"}
    messages, enums = {}, {}

    def walk(desc, keep=None):
        if desc.full_name in messages:
            return
        entry = messages[desc.full_name] = {}
        for f in desc.fields:
            if keep and f.name not in keep:
                continue
            repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == FD.LABEL_REPEATED
            if f.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP):
                if f.message_type.GetOptions().map_entry:
                    kind = "map"
                else:
                    kind = "message:" + f.message_type.full_name
                    walk(f.message_type)
            elif f.type == FD.TYPE_ENUM:
                kind = "enum:" + f.enum_type.full_name
                enums[f.enum_type.full_name] = [v.name for v in f.enum_type.values]
            else:
                kind = scalar.get(f.type, "int")
            entry[f.name] = [repeated, kind]

    root = pipeline_pb2.TrainEvalPipelineConfig.DESCRIPTOR
    walk(root.fields_by_name["model"].message_type, keep={"ssd"})
    walk(root)
    return {"source": ODAPI_REQUIREMENT, "root": root.full_name, "messages": messages, "enums": enums}


def _parse_verdicts(paths: list[str]) -> list[str | None]:
    from google.protobuf import text_format
    from object_detection.protos import pipeline_pb2

    verdicts = []
    for path in paths:
        try:
            text_format.Parse(Path(path).read_text(), pipeline_pb2.TrainEvalPipelineConfig())
            verdicts.append(None)
        except (text_format.ParseError, RecursionError) as e:
            verdicts.append(str(e) or type(e).__name__)
    return verdicts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="pipeline.config (text TrainEvalPipelineConfig)")
    parser.add_argument("--images", type=Path, help=".npz of uint8 HxWx3 arrays image_0, image_1, ...")
    parser.add_argument("--out", type=Path, help="output folder (zoo-like model folder + outputs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", help="an OD API checkpoint prefix to restore instead of seeded random weights")
    parser.add_argument("--num-classes", type=int, default=None, help="override model.ssd.num_classes")
    parser.add_argument("--groundtruth", type=Path, help=".npz of boxes_i, classes_i (and count): also the loss")
    parser.add_argument("--augment", type=Path, help="instead: the OD API's augmentation of these cases (pickle)")
    parser.add_argument("--schema", type=Path, help="instead: write the pipeline.config field schema (JSON) here")
    parser.add_argument("--parse", nargs="+", help="instead: print protobuf text_format.Parse verdicts as JSON")
    args = parser.parse_args(argv)
    # Run by hand (not through run_oracle): re-exec once with the shims, which must be in place
    # before Python starts (PYTHONPATH) or before protobuf/TensorFlow are imported.
    if os.environ.get("_ODAPI_ORACLE_CHILD") != "1":
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:])],
                  _child_env(_pythonpath_entries()))
    if args.schema:
        args.schema.write_text(json.dumps(_schema(), indent=1, sort_keys=True) + "\n")
        return
    if args.parse:
        print(json.dumps(_parse_verdicts(args.parse)))
        return
    if args.augment:
        _augment(args.augment, args.out)
        return
    if not (args.config and args.images and args.out):
        parser.error("--config, --images and --out are required")
    _run_model(args.config, args.images, args.out, args.seed, args.num_classes, args.groundtruth, args.weights)


if __name__ == "__main__":
    main()
