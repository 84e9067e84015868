"""Device formats of `make export FORMAT=tflite|onnx|all`: TFLite and ONNX files converted from the
checkpoint's model, for phone, board and other runtimes, with their accuracy measured by the task's own
evaluator.

Every file takes one image of the model's fixed input size, `uint8 [1, H, W, 3]` (the app stretches
its picture to H x W; the model's own scaling of the pixels is inside the file), and gives the task's
outputs in a fixed order. TFLite: detection has the TFLite_Detection_PostProcess outputs (boxes,
classes, scores, count), segmentation the class map and the probabilities. ONNX: the SavedModel's
outputs, at the fixed input size. The task's exporter says how to build the function converted
(`tflite_function`, `onnx_function`), how an image becomes the input (`device_input`) and how a file's
outputs become the SavedModel's (`tflite_outputs`, `onnx_outputs`), so that `make eval MODEL=...` and
`predict --model ...` measure and use a file with the same code as the SavedModel.

Files (FORMAT=, QUANT=):
    model.tflite       tflite none     float32 weights and compute
    model_fp16.tflite  tflite float16  float16 weights (half the size), float32 compute on a CPU
    model_int8.tflite  tflite int8     weights and activations int8, calibrated on images of the run's
                                       training TFRecords prepared as the model's input; input stays
                                       uint8 pixels, outputs float32
    model.onnx         onnx            float32, opset ONNX_OPSET (tf2onnx), run by onnxruntime
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from pipelines.workspace import UserError, display_path

QUANTIZATIONS = {"none": "model.tflite", "float16": "model_fp16.tflite", "int8": "model_int8.tflite"}  # TFLite
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
# Images of the training TFRecords that int8 calibration sees (fewer if it has fewer); the environment's
# PIPELINES_CALIBRATION_IMAGES changes it.
CALIBRATION_IMAGES = 300
LABELS_FILE = "labels.txt"


def quantization_of(path: Path) -> str:
    """The quantization a file name of QUANTIZATIONS stands for ("none" for any other file)."""
    return next((q for q, name in QUANTIZATIONS.items() if Path(path).name == name), "none")


def describe(name: str) -> str:
    """'TFLite int8', 'ONNX', ... for a file name of make export."""
    if name.endswith(".onnx"):
        return "ONNX float32"
    quant = quantization_of(Path(name))
    return f"TFLite {'float32' if quant == 'none' else quant}"


def write(name: str, exporter, model, folder: Path, calibration: list[np.ndarray] | None = None) -> Path:
    """Convert the checkpoint's `model` into the device file `name` (QUANTIZATIONS' or ONNX_FILE) in `folder`."""
    if name == ONNX_FILE:
        data = convert_onnx(exporter.onnx_function(model), exporter.outputs)
    else:
        quant = next(q for q, file in QUANTIZATIONS.items() if file == name)
        data = convert_tflite(exporter.tflite_function(model), model.variables, exporter.tflite_output_order, quant,
                              calibration)
    path = Path(folder) / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------ converting


def calibration_images(params, exporter, count: int | None = None) -> list[np.ndarray]:
    """Up to `count` (default CALIBRATION_IMAGES) training images as the TFLite input (uint8 [1, H, W, 3]);
    UserError when the run has no training TFRecords to calibrate an int8 model on."""
    from pipelines import examples
    from pipelines.common import env_number

    count = count or max(1, int(env_number("PIPELINES_CALIBRATION_IMAGES", CALIBRATION_IMAGES)))
    patterns = list(params.train_files or [])
    try:
        files = examples.find_files(patterns, "train_files") if patterns else []
    except ValueError:
        files = []
    if not files:
        raise UserError(None, "an int8 TFLite export is calibrated on the run's training images, and its "
                              f"train_input_reader finds no TFRecords ({', '.join(patterns) or 'no input_path'}): "
                              "run `make data` for its dataset, or export QUANT=none or float16")
    size = (params.image_height, params.image_width)
    images = []
    for record in examples.read(files, what="train_files"):
        images.append(exporter.device_input(record.image, size))
        if len(images) >= count:
            break
    return images


def convert_tflite(function, variables, output_order: list[str], quant: str,
                   calibration: list[np.ndarray] | None = None) -> bytes:
    """The TFLite flatbuffer of a tf.function with a fixed input signature that returns a dict; its outputs
    in `output_order` (names of that dict)."""
    import tensorflow as tf

    concrete = function.get_concrete_function()
    holder = tf.Module()  # what the function reads, tracked; not a Keras model (which would trace every layer)
    holder.variables_read = list(variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
    if quant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quant == "int8":
        if not calibration:
            raise ValueError("int8 needs calibration images")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    elif quant != "none":
        raise ValueError(f"unknown quantization {quant!r} (known: {', '.join(QUANTIZATIONS)})")
    return order_outputs(converter.convert(), list(output_order))


def order_outputs(data: bytes, names: list[str]) -> bytes:
    """The model with its outputs in the order of `names` (its signature's output names).

    The converter orders a model's outputs as it likes; apps without metadata (the TFLite Task Library's
    ObjectDetector, for one) read them by position."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    signature = model.signatureDefs[0]
    by_name = {entry.name.decode(): entry.tensorIndex for entry in signature.outputs}
    if sorted(by_name) != sorted(names):
        raise ValueError(f"the converted model's outputs are {sorted(by_name)}, expected {names}")
    model.subgraphs[0].outputs = np.array([by_name[name] for name in names], dtype=np.int32)
    signature.outputs.sort(key=lambda entry: names.index(entry.name.decode()))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def convert_onnx(function, output_order) -> bytes:
    """The ONNX model of a tf.function with a fixed input signature that returns a dict (tf2onnx): input and
    outputs named as the function's, the outputs in `output_order`.

    The function is frozen first (variables and every captured tensor made constants: a Keras layer's
    constants, EfficientNet's ImageNet mean for one, would otherwise become inputs of the ONNX graph)."""
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    import tensorflow as tf

    concrete = function.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    if len(frozen.inputs) != 1:
        raise ValueError(f"the frozen function has {len(frozen.inputs)} inputs, expected the image only")
    # The frozen function's outputs are the flattened dict's: its keys' order.
    keys = tf.nest.flatten({name: name for name in concrete.structured_outputs})
    outputs = {name: tensor.name for name, tensor in zip(keys, frozen.outputs)}
    if sorted(outputs) != sorted(output_order):
        raise ValueError(f"the function's outputs are {sorted(outputs)}, expected {list(output_order)}")
    image = frozen.inputs[0].name
    proto, _ = tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=[image],
                                              output_names=[outputs[name] for name in output_order], opset=ONNX_OPSET)
    names = {outputs[name]: name for name in output_order}
    names[image] = image.split(":")[0]
    graph = proto.graph
    for value in list(graph.input) + list(graph.output):
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
        node.output[:] = [names.get(name, name) for name in node.output]
    return proto.SerializeToString()


# ------------------------------------------------------------------------------------------ running


def _interpreter_class():
    """LiteRT's interpreter (the ai-edge-litert package), else TensorFlow's own."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - ai-edge-litert is in requirements.lock
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


class TFLiteModel:
    """A .tflite file in an interpreter: `run(input)` -> {output name: array} in the file's output order."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import os

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(display_path(self.path), "no such file")
        try:
            self.interpreter = _interpreter_class()(model_path=str(self.path),
                                                    num_threads=threads or min(4, os.cpu_count() or 1))
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise UserError(display_path(self.path), f"not a TFLite model this runtime can load ({e})") from None
        details = self.interpreter.get_input_details()
        if len(details) != 1 or list(details[0]["shape"][[0, 3]]) != [1, 3]:
            raise UserError(display_path(self.path), "not an export of this pipeline: expected one input [1, H, W, 3]")
        self.input = details[0]
        self.outputs = self.interpreter.get_output_details()
        signature = self.interpreter.get_signature_list().get("serving_default", {})
        runner = self.interpreter.get_signature_runner("serving_default") if signature else None
        self.names = self._output_names(runner)

    def _output_names(self, runner) -> list[str]:
        """The signature's output names in the file's output order (its tensors' names without one)."""
        if runner is None:
            return [d["name"] for d in self.outputs]
        by_index = {runner.get_output_details()[name]["index"]: name for name in runner.get_output_details()}
        return [by_index.get(d["index"], d["name"]) for d in self.outputs]

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.input["shape"][1]), int(self.input["shape"][2])

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """One uint8 [1, H, W, 3] input -> the outputs by name (copies)."""
        self.interpreter.set_tensor(self.input["index"], image)
        self.interpreter.invoke()
        return {name: self.interpreter.get_tensor(d["index"]).copy() for name, d in zip(self.names, self.outputs)}


class ONNXModel:
    """A .onnx file in onnxruntime (CPU): `run(input)` -> {output name: array} in the file's output order."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import os

        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(display_path(self.path), "no such file")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise UserError(display_path(self.path), f"not an ONNX model onnxruntime can load ({e})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[0] != 1 or inputs[0].shape[3] != 3:
            raise UserError(display_path(self.path), "not an export of this pipeline: expected one input [1, H, W, 3]")
        self.input = inputs[0]
        self.names = [output.name for output in self.session.get_outputs()]

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.input.shape[1]), int(self.input.shape[2])

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(None, {self.input.name: image})))


def open_model(path: str | Path, threads: int | None = None):
    """A device file of make export in its runtime (by its suffix)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return ONNXModel(path, threads)
    if path.suffix == ".tflite":
        return TFLiteModel(path, threads)
    raise UserError(display_path(path), "not a device file of make export (.tflite or .onnx)")


def serving_function(path: str | Path, exporter_class, threads: int | None = None):
    """uint8 [B, h, w, 3] of any size -> the SavedModel's outputs (NumPy), computed image by image by the
    device file: the image made its input by the task's `device_input`, its outputs the SavedModel's by
    `tflite_outputs` or `onnx_outputs`."""
    model = open_model(path, threads)
    decode = exporter_class.onnx_outputs if isinstance(model, ONNXModel) else exporter_class.tflite_outputs

    def serve(images: np.ndarray) -> dict[str, np.ndarray]:
        """Images of one size, one at a time through the file's batch of 1."""
        outputs = [decode(model.run(exporter_class.device_input(image, model.input_size)), image.shape[:2])
                   for image in images]
        return {key: np.concatenate([out[key] for out in outputs]) for key in outputs[0]}
    serve.model = model
    return serve


def latency_ms(run, example: np.ndarray, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of `run(example)` in milliseconds, after `warmup` calls."""
    for _ in range(warmup):
        run(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(example)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def write_labels(path: Path, labels: dict[int, str], first_id: int, last_id: int) -> None:
    """labels.txt: one name per line, line n for the model's class n + `first_id`... as the TFLite
    outputs number them; ids the label map lacks get '???', as the Object Detection API's label files do."""
    lines = [labels.get(i, "???") for i in range(first_id, last_id + 1)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
