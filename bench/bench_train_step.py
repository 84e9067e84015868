"""Where one training step of the detector goes, and what the CPU's alternative kernels do with it.

    .venv/bin/python bench/bench_train_step.py [--batch 8] [--size 320] [--steps 10] [--num-classes K] [--profile]

One step of `make train`'s detector (SSD MobileNet V2 FPNLite from configs/ssd_mobilenet_v2_fpnlite_320x320.config,
the config's optimizer, Model Garden's RetinaNet task step on our loss) on one fixed batch of labelled random
images, timed after warm-up, each variant in its own process (the Keras precision policy is process-wide):

* float32: what `make train` runs on a CPU;
* mixed_bfloat16: Keras' bfloat16 compute policy (oneDNN's bfloat16 kernels where the CPU has AVX512_BF16 or AMX);
* onednn_bf16_graph: float32 model, the graph rewritten to bfloat16 by TensorFlow's
  auto_mixed_precision_onednn_bfloat16 grappler pass;
* xla: the whole step compiled with XLA (tf.function(jit_compile=True)).

For float32 it also splits the step: forward, forward + backward (loss and gradients), the backbone alone;
with --profile, TensorFlow's profiler traces --steps steps and the ops' time is summed by kind (convolutions,
batch norm, activations, the loss's own ops, the optimizer, the rest): each op's wall time while it ran (one op
may use both cores inside), summed.
Printed: ms/step and images/s per variant and the ratio to float32."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
VARIANTS = ("float32", "mixed_bfloat16", "onednn_bf16_graph", "xla")


def op_kind(name: str, op_type: str) -> str:
    """The kind of one traced op, by its type, or by its name scope for the loss's element-wise ops."""
    if "Conv2D" in op_type or "Depthwise" in op_type:
        return "convolutions (forward and gradients)"
    if "BatchNorm" in op_type:
        return "batch norm (forward and gradients)"
    if op_type.startswith("Relu"):
        return "activations"
    if "FocalLoss" in name or "huber_loss" in name:
        return "loss (focal, Huber; forward and gradients)"
    if op_type.startswith("ResourceApply") or "Regularizer" in name:
        return "optimizer and regularizer"
    return "the rest"


def profile(fn, args, steps: int) -> dict[str, float]:
    """ms per step of each op kind (op_kind): the ops' wall times from a profiler trace, summed."""
    import collections
    import glob
    import shutil
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="bench-train-step-")
    tf.profiler.experimental.start(logdir)
    for _ in range(steps):
        out = fn(*args)
    tf.nest.map_structure(lambda t: t.numpy(), out)
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1]).read_bytes())
    shutil.rmtree(logdir)
    kinds: collections.Counter = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith(("tf_Compute", "tf_numa")):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or "::" in name:  # the executor's own spans (ExecutorState::Process) wrap ops
                    continue
                scope, op_type = name.rsplit(":", 1)
                kinds[op_kind(scope, op_type)] += event.duration_ps / 1e9 / steps
    return dict(kinds.most_common())


def measure(variant: str, batch: int, size: int, steps: int, with_profile: bool = False,
            num_classes: int | None = None) -> dict:
    import pipelines  # noqa: F401  (TensorFlow's environment)
    import numpy as np
    import tensorflow as tf
    from official.modeling import performance

    from pipelines.config.textproto import TextProto
    from pipelines.detection import config as tr
    from pipelines.detection.experiment import build_experiment
    from pipelines.detection.train import DetectionTask

    if variant == "mixed_bfloat16":
        performance.set_mixed_precision_policy("bfloat16")
    if variant == "onednn_bf16_graph":
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    template = REPO / "configs" / "ssd_mobilenet_v2_fpnlite_320x320.config"
    params = tr.translate(TextProto(template.read_text(), str(template)), check_paths=False).params
    params = dataclasses.replace(params, batch_size=batch, image_height=size, image_width=size, augmentations=[],
                                 num_classes=num_classes or params.num_classes)
    exp = build_experiment(params)
    task = DetectionTask(exp.task)
    model = task.build_model()
    optimizer = task.create_optimizer(exp.trainer.optimizer_config, exp.runtime)
    parser = task.parser(exp.task.train_data)
    rng = np.random.default_rng(0)
    images, labels = [], []
    for _ in range(batch):
        boxes = np.sort(rng.uniform(0, 1, (3, 2, 2)), axis=1).transpose(0, 2, 1).reshape(3, 4)[:, [0, 2, 1, 3]]
        decoded = {"image": tf.constant(rng.integers(0, 255, (size, size, 3), np.uint8)),
                   "height": tf.constant(size), "width": tf.constant(size), "source_id": tf.constant("0"),
                   "groundtruth_boxes": tf.constant(boxes, tf.float32),
                   "groundtruth_classes": tf.constant([1, min(2, params.num_classes), 1], tf.int64),
                   "groundtruth_is_crowd": tf.zeros(3, tf.bool), "groundtruth_area": tf.constant([100.0] * 3)}
        image, label = parser._parse_train_data(decoded)
        images.append(image)
        labels.append({k: v for k, v in label.items() if k != "groundtruths"})
    images = tf.stack(images)
    labels = tf.nest.map_structure(lambda *xs: tf.stack(xs), *labels)

    def timed(fn, *args) -> float:
        compiled = tf.function(fn, jit_compile=variant == "xla")
        for _ in range(3):
            compiled(*args)
        start = time.perf_counter()
        for _ in range(steps):
            out = compiled(*args)
        tf.nest.map_structure(lambda t: t.numpy(), out)
        return (time.perf_counter() - start) / steps * 1000

    def step(images, labels):
        return task.train_step((images, labels), model, optimizer, metrics=[])

    result = {"variant": variant, "step_ms": timed(step, images, labels)}
    if variant == "float32":
        def forward(images, labels):
            return model(images, image_shape=labels["image_info"][:, 1, :], anchor_boxes=labels["anchor_boxes"],
                         training=True)["cls_outputs"]

        def gradients(images, labels):
            with tf.GradientTape() as tape:
                outputs = model(images, image_shape=labels["image_info"][:, 1, :],
                                anchor_boxes=labels["anchor_boxes"], training=True)
                total, *_ = task.build_losses(outputs=outputs, labels=labels, aux_losses=model.losses)
            return tape.gradient(total, model.trainable_variables)

        def backbone(images):
            with tf.GradientTape() as tape:
                total = tf.add_n([tf.reduce_sum(v) for v in model.backbone(images, training=True).values()])
            return tape.gradient(total, model.backbone.trainable_variables)

        result.update(forward_ms=timed(forward, images, labels), forward_backward_ms=timed(gradients, images, labels),
                      backbone_forward_backward_ms=timed(backbone, images))
        if with_profile:
            result["profile"] = profile(tf.function(step), (images, labels), steps)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--num-classes", type=int, help="classes (default: the template's 90; BCCD has 3)")
    ap.add_argument("--profile", action="store_true", help="float32: the ops' time by kind, from a profiler trace")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.size, args.steps, args.profile, args.num_classes)))
        return 0
    results = []
    for variant in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                               "--size", str(args.size), "--steps", str(args.steps)] + ["--profile"] * args.profile
                              + (["--num-classes", str(args.num_classes)] if args.num_classes else []),
                              capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            print(f"{variant}: failed\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{variant:18s} {r['step_ms']:7.0f} ms/step  {args.batch * 1000 / r['step_ms']:5.1f} img/s  "
              f"x{results[0]['step_ms'] / r['step_ms']:.2f} of {results[0]['variant']}", flush=True)
        if "forward_ms" in r:
            print(f"{'':18s} forward {r['forward_ms']:.0f} ms, forward+backward {r['forward_backward_ms']:.0f} ms "
                  f"(the rest of the step, optimizer and bookkeeping: {r['step_ms'] - r['forward_backward_ms']:.0f} ms); "
                  f"backbone forward+backward {r['backbone_forward_backward_ms']:.0f} ms", flush=True)
        if "profile" in r:
            total = sum(r["profile"].values())
            print(f"{'':18s} ops' time by kind, ms per step, each op's wall time summed (all ops: {total:.0f} ms):")
            for kind, ms in r["profile"].items():
                print(f"{'':20s}{ms:7.0f} ms  {100 * ms / total:4.1f}%  {kind}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
