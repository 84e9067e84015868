"""Training speed of `make train` for a segmenter against plain `model.fit` on NumPy arrays, and a
learning benchmark.

    .venv/bin/python bench/bench_train_segmentation.py [--steps 60] [--batch 8] [--size 256] [--rounds 2]
    .venv/bin/python bench/bench_train_segmentation.py --learning [--steps 1000] [--batch 8] [--size 128] [--learning-rate R]

Speed: the bundled sample (300 images) goes through `pipelines data --task segmentation` and
`pipelines config` (unet_efficientnetb0_320x320 at --size, --batch-size/--num-steps, no
augmentation so both sides do the same work per step); then, alternating which goes first,
    ours:  python -m pipelines train --run RUN      (tf.data from the TFRecords, our loop)
    peer:  this script --peer RUN                   (the same segmentation_models network, the train
           images decoded and resized into NumPy arrays in memory, masks one-hot, compiled with
           segmentation_models' DiceLoss + CategoricalFocalLoss and Adam, trained with model.fit)
train the same model from scratch. Images/s: ours is the steady-state rate `make train` prints at
the end (training steps after the first interval, which includes tracing; validation passes and
checkpoint writes excluded); the peer's from a Keras callback timing every batch after the first
5. The ratio ours/peer is printed.

Learning (--learning): `make config/train/eval` from scratch on CPU with augmentation (flip and
scale) for --steps; prints the mean IoU on the val images at their own resolution and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pipelines  # noqa: E402,F401

PY = sys.executable
OUR_RATE = re.compile(r"trained to step \d+ in \S+ \(([\d.]+) steps/s, ([\d.]+) img/s\)")
TEMPLATE = "unet_efficientnetb0_320x320"


def sh(cmd: list[str], env: dict, log: Path) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\nsee {log}")
    return elapsed, proc.stdout + proc.stderr


def template(out: Path, size: int, augment: bool, batch: int, learning_rate: float | None = None) -> Path:
    """The U-Net template at SIZE x SIZE, with or without augmentation; with LEARNING_RATE, that peak
    rate at any batch size (the template's batch is set to the bench's, so make config scales nothing)."""
    text = (REPO / "configs" / f"{TEMPLATE}.config").read_text()
    text = text.replace("height: 320", f"height: {size}").replace("width: 320", f"width: {size}")
    if learning_rate:
        text = re.sub(r"learning_rate_base: [\d.e-]+", f"learning_rate_base: {learning_rate}", text)
        text = re.sub(r"warmup_learning_rate: [\d.e-]+", f"warmup_learning_rate: {learning_rate / 10}", text)
    if not augment:
        text = re.sub(r"  data_augmentation_options \{.*?\n  \}\n", "", text, flags=re.S)
    if learning_rate:  # train_config's batch_size (the first one; eval_config has its own)
        text = re.sub(r"(\n  batch_size:) \d+", rf"\1 {batch}", text, count=1)
    path = out / f"unet_{size}_{'aug' if augment else 'plain'}{f'_lr{learning_rate}' if learning_rate else ''}.config"
    path.write_text(text)
    return path


def prepare(out: Path, env: dict, args, run: str, augment: bool) -> Path:
    dataset = out / "datasets" / "sample"
    if not (dataset / ".exports").is_dir():
        from pipelines.data.sample import generate
        generate(dataset, 300)
    if not (out / "ws" / "sample" / "data").is_dir():
        sh([PY, "-m", "pipelines", "data", "--dataset", str(dataset), "--task", "segmentation"], env, out / "data.log")
    config = template(out, args.size, augment, args.batch, args.learning_rate if augment else None)
    sh([PY, "-m", "pipelines", "config", "--dataset", "sample", "--model", str(config),
        "--run", run, "--batch-size", str(args.batch), "--num-steps", str(args.steps)], env, out / f"config-{run}.log")
    return out / "ws" / run


def our_images_per_sec(output: str) -> float:
    """The steady-state rate `make train` prints at the end: training steps only, without the first
    interval (tracing), the validation passes and the checkpoint writes."""
    found = OUR_RATE.findall(output)
    if not found:
        raise SystemExit("no 'trained to step ...' line in the output of make train")
    return float(found[-1][1])


def peer(run: str, steps: int) -> None:
    """The way the proof of concept trained: NumPy arrays in memory and model.fit."""
    import numpy as np
    import segmentation_models as sm
    import tensorflow as tf

    from pipelines.runs import load_run
    from pipelines.examples import parse
    from pipelines.segmentation.model import build_network, preprocess

    params, _, _, _ = load_run(run)
    size = (params.image_height, params.image_width)
    images, masks = [], []
    for record in tf.data.TFRecordDataset(tf.io.gfile.glob(params.train_files[0])).map(parse):
        images.append(tf.image.resize(record["image"], size).numpy())
        masks.append(tf.image.resize(record["class_mask"][..., None], size, method="nearest").numpy()[..., 0])
    x = np.stack(images).astype("float32")
    y = tf.one_hot(np.stack(masks).astype("int32"), params.output_classes).numpy()  # 255 -> all zeros
    network = build_network(params, None)
    inputs = tf.keras.Input((*size, 3))
    outputs = tf.keras.layers.Softmax()(network(preprocess(params, inputs)))
    model = tf.keras.Model(inputs, outputs)
    model.compile(tf.keras.optimizers.Adam(params.learning_rate),
                  loss=sm.losses.DiceLoss() + sm.losses.CategoricalFocalLoss())

    class Timer(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    timer = Timer()
    per_epoch = len(x) // params.batch_size
    epochs = max(1, -(-steps // per_epoch))
    model.fit(x, y, batch_size=params.batch_size, epochs=epochs, steps_per_epoch=None, shuffle=True, verbose=0,
              callbacks=[timer])
    times = timer.times[5:steps]
    rate = (len(times) - 1) / (times[-1] - times[0])
    print(json.dumps({"steps": len(timer.times), "steps_per_sec": rate, "images_per_sec": rate * params.batch_size}))


def speed(args, out: Path, env: dict) -> None:
    rows = []
    run_dir = prepare(out, env, args, "speed", augment=False)
    for round_ in range(args.rounds):
        for who in (["ours", "fit"] if round_ % 2 == 0 else ["fit", "ours"]):
            if who == "ours":
                shutil.rmtree(run_dir / "train", ignore_errors=True)
                wall, output = sh([PY, "-m", "pipelines", "train", "--run", run_dir.name], env,
                                  out / f"ours-{round_}.log")
                rate = our_images_per_sec(output)
            else:
                wall, output = sh([PY, __file__, "--peer", run_dir.name, "--steps", str(args.steps)], env,
                                  out / f"fit-{round_}.log")
                result = [line for line in output.splitlines() if line.startswith('{"steps"')][-1]
                rate = json.loads(result)["images_per_sec"]
            rows.append((who, rate))
            print(f"  round {round_ + 1} {who:<5} {rate:6.2f} img/s  wall {wall:6.1f}s", flush=True)
    ours = statistics.median(r for w, r in rows if w == "ours")
    fit = statistics.median(r for w, r in rows if w == "fit")
    print(f"\nmedian images/s: make train {ours:.2f}, model.fit on NumPy {fit:.2f}; ratio {ours / fit:.3f}")


def learning(args, out: Path, env: dict) -> None:
    run_dir = prepare(out, env, args, "learning", augment=True)
    shutil.rmtree(run_dir / "train", ignore_errors=True)
    wall, output = sh([PY, "-m", "pipelines", "train", "--run", run_dir.name], env, out / "learning-train.log")
    sh([PY, "-m", "pipelines", "eval", "--run", run_dir.name], env, out / "learning-eval.log")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    print(f"trained {args.steps} steps at batch {args.batch}, {args.size}x{args.size}, from scratch in "
          f"{wall / 60:.1f} min ({our_images_per_sec(output):.2f} img/s)")
    print(json.dumps({k: v for k, v in metrics.items() if k != "confusion_matrix"}, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--learning", action="store_true")
    parser.add_argument("--learning-rate", type=float,
                        help="--learning: peak learning rate (default: the template's, scaled to --batch)")
    parser.add_argument("--peer", metavar="RUN", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "train_segmentation"))
    args = parser.parse_args()
    if args.peer:
        peer(args.peer, args.steps)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PIPELINES_WORKSPACE=str(out / "ws"), BENTOML_HOME=str(out / "bentoml"))
    print(f"machine: {os.cpu_count()} CPU(s); steps {args.steps}, batch {args.batch}, {args.size}x{args.size}",
          flush=True)
    (learning if args.learning else speed)(args, out, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
