"""Segmentation training for real on a tiny U-Net: data, augmentation, training, resuming, best checkpoint.

The model is shrunk (EfficientNetB0 U-Net with a 32..8-filter decoder at 64x64, random init) so
that the whole file runs in about a minute on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)
import numpy as np
import pytest
import tensorflow as tf

from pipelines.segmentation.data import augment, resize, train_dataset, val_dataset
from pipelines.segmentation.model import build_model
from pipelines.segmentation.params import SegmenterParams
from pipelines import checkpoints
from pipelines.segmentation.model import loss_fn
from pipelines.segmentation.metric import MeanIoU, mean_iou
from pipelines.segmentation.metric import confusion_matrix_tf as confusion_matrix
from pipelines.segmentation.train import build_experiment, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, Path]:
    """24 generated shape images (4 classes) through the real data stage: with class masks
    (--task segmentation) and without (--task detection)."""
    from pipelines.data.sample import generate

    root = tmp_path_factory.mktemp("segmentation-data")
    generate(root / "shapes", num_images=24)
    out = {}
    for task in ("segmentation", "detection"):
        subprocess.run([sys.executable, "-m", "pipelines", "data", "--dataset", str(root / "shapes"), "--task", task,
                        "--out", str(root / task), "--workers", "1"], cwd=REPO, check=True, capture_output=True)
        out[task] = root / task
    return out


def tiny_params(data_dir: Path, **overrides) -> SegmenterParams:
    fields = dict(
        num_classes=4, architecture="unet", backbone="efficientnetb0", image_height=64, image_width=64,
        decoder_filters=[32, 16, 16, 8, 8], batch_size=4, num_steps=36, optimizer="adam", learning_rate=0.01,
        schedule="cosine", warmup_steps=0, random_horizontal_flip=False, random_vertical_flip=False,
        aug_scale_min=1.0, aug_scale_max=1.0, train_files=[str(data_dir / "train-*.tfrecord")],
        eval_files=[str(data_dir / "val-*.tfrecord")], eval_batch_size=4, label_map_path=str(data_dir / "label_map.pbtxt"))
    fields.update(overrides)
    return SegmenterParams(**fields)


@pytest.fixture(scope="module")
def trained(data_dirs, tmp_path_factory) -> tuple[SegmenterParams, Path, dict]:
    """The tiny U-Net trained 36 steps on the 19 training images, without augmentation; evaluated
    every 12 steps, a progress line every 2 (seeded: the training seeds itself from params.seed, 0)."""
    params = tiny_params(data_dirs["segmentation"])
    run_dir = tmp_path_factory.mktemp("run")
    lines: list[str] = []
    result = train(params, run_dir, log=lines.append, eval_every=12)
    result["lines"] = lines
    return params, run_dir, result


# ---------------------------------------------------------------------------------------------- augmentation

CLASSES = (0, 2, 5, 9)  # gaps: a bilinear mask would produce values between them
COLOUR = {0: 20, 2: 60, 5: 120, 9: 200, 255: 250}  # no class is painted 0, the image's padding


def painted_sample() -> tuple[np.ndarray, np.ndarray]:
    """A 96x160 mask of 32-pixel blocks (an asymmetric layout of the classes and one ignored block)
    and an image painted with each block's class colour."""
    layout = [[0, 2, 5, 9, 0],
              [9, 255, 2, 0, 5],
              [5, 0, 9, 2, 2]]
    mask = np.kron(np.array(layout, np.uint8), np.ones((32, 32), np.uint8))
    image = np.vectorize(COLOUR.get)(mask).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=-1), mask


def interior(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2 radius + 1)^2 neighbourhood holds a single mask value: away from block edges,
    where bilinear image values are blends."""
    h, w = mask.shape
    padded = np.pad(mask.astype(np.int32), radius, mode="edge")
    same = np.ones_like(mask, bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy:dy + h, dx:dx + w] == mask
    return same


def test_augment_keeps_masks_aligned_with_images():
    params = SegmenterParams(num_classes=9, image_height=48, image_width=64, random_horizontal_flip=True,
                             random_vertical_flip=True, aug_scale_min=0.5, aug_scale_max=2.0)
    image, mask = painted_sample()
    padded_seen = cropped_seen = 0
    outputs = []
    for seed in range(16):
        out_image, out_mask = augment(params, tf.constant(image), tf.constant(mask), seed=seed)
        assert out_image.dtype == tf.float32 and out_image.shape == (48, 64, 3)
        assert out_mask.dtype == tf.uint8 and out_mask.shape == (48, 64)
        out_image, out_mask = out_image.numpy()[..., 0], out_mask.numpy()
        outputs.append(out_mask)
        assert set(np.unique(out_mask)) <= set(CLASSES) | {255}, "mask resized other than nearest neighbour"
        padding = out_image == 0.0
        assert (out_mask[padding] == 255).all(), "padding must be ignored in the mask"
        padded_seen += padding.any()
        cropped_seen += not padding.any()
        inside = interior(out_mask) & ~padding
        labelled = inside & (out_mask != 255)
        assert labelled.sum() > 0.3 * (~padding).sum(), "too few interior pixels to check"
        expected = np.vectorize(COLOUR.get)(out_mask).astype(np.float32)
        np.testing.assert_allclose(out_image[inside], expected[inside], atol=0.5, err_msg=f"seed {seed}")
    assert padded_seen and cropped_seen, "scales below and above 1 should both occur in 16 draws"
    assert len({m.tobytes() for m in outputs}) == len(outputs)
    again = augment(params, tf.constant(image), tf.constant(mask), seed=3)[1].numpy()
    np.testing.assert_array_equal(again, outputs[3])  # a seed reproduces its draw


def test_flips_mirror_image_and_mask_together():
    image, mask = painted_sample()
    for axis, horizontal in ((1, True), (0, False)):
        params = SegmenterParams(num_classes=9, image_height=48, image_width=64, random_horizontal_flip=horizontal,
                                 random_vertical_flip=not horizontal)
        plain_image, plain_mask = (t.numpy() for t in resize(params, image, mask))
        flipped = 0
        for seed in range(8):
            out_image, out_mask = (t.numpy() for t in augment(params, image, mask, seed=seed))
            if np.array_equal(out_mask, plain_mask):
                np.testing.assert_allclose(out_image, plain_image, atol=1e-4)
            else:
                np.testing.assert_array_equal(out_mask, np.flip(plain_mask, axis))
                np.testing.assert_allclose(out_image, np.flip(plain_image, axis), atol=1e-4)
                flipped += 1
        assert 0 < flipped < 8


def test_without_augmentation_images_are_stretched_to_the_input_size():
    params = SegmenterParams(num_classes=9, image_height=48, image_width=64, random_horizontal_flip=False)
    image, mask = painted_sample()
    out_image, out_mask = augment(params, image, mask)
    np.testing.assert_allclose(out_image.numpy(), tf.image.resize(image, [48, 64]).numpy(), atol=1e-4)
    np.testing.assert_array_equal(out_mask.numpy(),
                                  tf.image.resize(mask[..., None], [48, 64], method="nearest").numpy()[..., 0])


# ---------------------------------------------------------------------------------------------- data, metrics


def test_datasets_batch_records_of_the_data_stage(data_dirs):
    params = tiny_params(data_dirs["segmentation"], eval_batch_size=3, random_horizontal_flip=True,
                         aug_scale_min=0.5, aug_scale_max=1.5)
    images, masks = next(iter(train_dataset(params)))
    assert images.dtype == tf.float32 and images.shape == (4, 64, 64, 3)
    assert masks.dtype == tf.uint8 and masks.shape == (4, 64, 64)
    assert 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255
    assert set(np.unique(masks.numpy())) <= {0, 1, 2, 3, 4, 255}
    sizes = [int(m.shape[0]) for _, m in val_dataset(params)]
    summary = json.loads((data_dirs["segmentation"] / "summary.json").read_text())
    assert sum(sizes) == summary["images"]["val"]
    assert all(s == 3 for s in sizes[:-1])


def test_records_without_masks_or_no_files_are_clear_errors(data_dirs, tmp_path):
    no_masks = tiny_params(data_dirs["detection"])
    with pytest.raises(ValueError, match=r"train-00000-of-00001.tfrecord has no segmentation masks.*TASK=segmentation"):
        train(no_masks, tmp_path / "run")
    with pytest.raises(ValueError, match="TASK=segmentation"):
        val_dataset(no_masks)
    missing = tiny_params(data_dirs["segmentation"], train_files=[str(tmp_path / "nothing-*.tfrecord")])
    with pytest.raises(ValueError, match=r"train_files: no TFRecord file matches .*nothing-\*\.tfrecord"):
        train(missing, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mean_iou_ignores_255_and_absent_classes():
    labels = tf.constant([[0, 0, 1, 255], [3, 3, 1, 1]], tf.uint8)  # class 2 in neither truth nor prediction
    predicted = tf.constant([[0, 1, 1, 3], [3, 3, 1, 0]])
    confusion = confusion_matrix(labels, tf.one_hot(predicted, 4), 4).numpy()
    assert confusion.sum() == 7 and confusion[3, 3] == 2 and confusion[0, 1] == 1
    # IoU: class 0: 1/3 (one hit; one missed, one false), 1: 2/4, 3: 2/2
    assert mean_iou(confusion) == pytest.approx((1 / 3 + 2 / 4 + 1) / 3)
    assert mean_iou(np.zeros((3, 3))) == 0.0
    # The metric object training and validation use: the same, summed over batches until reset.
    metric = MeanIoU(4)
    metric.update_state(labels[:1], tf.one_hot(predicted[:1], 4))
    metric.update_state(labels[1:], tf.one_hot(predicted[1:], 4))
    assert float(metric.result()) == pytest.approx((1 / 3 + 2 / 4 + 1) / 3, abs=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_learning_rate_schedules():
    """The OD API's schedules as Model Garden builds them from the segmenter's settings."""
    from official.modeling.optimization import OptimizerFactory

    def rates(params, steps):
        schedule = OptimizerFactory(build_experiment(params, gpus=0).trainer.optimizer_config).build_learning_rate()
        return [float(schedule(s) if callable(schedule) else schedule) for s in steps]  # constant: a float

    cosine = SegmenterParams(num_classes=1, num_steps=110, learning_rate=0.1, warmup_learning_rate=0.01,
                             warmup_steps=10)
    assert rates(cosine, (0, 5, 10, 60, 110, 200)) == pytest.approx([0.01, 0.055, 0.1, 0.05, 0.0, 0.0], abs=1e-6)
    constant = SegmenterParams(num_classes=1, learning_rate=0.1, schedule="constant")
    assert rates(constant, (0, 10**6)) == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError, match="schedule 'step'"):
        build_experiment(SegmenterParams(num_classes=1, schedule="step"), gpus=0)
    with pytest.raises(ValueError, match="optimizer 'rmsprop'"):
        build_experiment(SegmenterParams(num_classes=1, optimizer="rmsprop"), gpus=0)


# ---------------------------------------------------------------------------------------------- training


def test_tiny_unet_loss_goes_down(trained):
    params, run_dir, result = trained
    history = result["history"]
    assert [h["step"] for h in history] == list(range(2, 37, 2))
    losses = [h["training_loss"] for h in history]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses  # 0.75 measured, seeded
    assert history[-1]["mean_iou"] > history[0]["mean_iou"]
    rates = [h["learning_rate"] for h in history]
    assert rates[0] == pytest.approx(0.01, rel=0.01) and rates[-1] < 1e-4 and rates == sorted(rates, reverse=True)
    assert result["final_step"] == 36 and result["start_step"] == 0
    assert result["steps_per_sec"] > 0 and result["images_per_sec"] == pytest.approx(4 * result["steps_per_sec"])
    assert [e["step"] for e in result["evals"]] == [12, 24, 36]
    line = next(line for line in result["lines"] if line.startswith("step 4/36"))
    assert re.fullmatch(r"step 4/36  loss \d+\.\d{4}  iou \d\.\d{4}  lr \d\.\d{6}  \d+\.\d\d steps/s "
                        r"\(\d+\.\d img/s\)  ETA \d+m\d\ds", line), line
    assert (run_dir / "train" / "ckpt-36.index").is_file() and checkpoints.latest(run_dir).endswith("ckpt-36")
    # TensorBoard event files (Model Garden's layout): training in train/train/, validation in train/validation/.
    assert list((run_dir / "train" / "train").glob("events.out.tfevents.*"))
    assert list((run_dir / "train" / "validation").glob("events.out.tfevents.*"))


def test_seeded_runs_repeat_exactly(data_dirs, tmp_path):
    """The same seed twice: the same losses step for step, with augmentation on (scale, crop, flip drawn per
    element in tf.data's parallel map). That another seed changes the data is the next test's."""
    params = tiny_params(data_dirs["segmentation"], num_steps=4, aug_scale_min=0.75, aug_scale_max=1.5,
                         random_horizontal_flip=True, eval_files=[], seed=3)
    losses = []
    for name in ("a", "b"):
        result = train(params, tmp_path / name, log=lambda _: None, eval_every=2)
        losses.append([h["training_loss"] for h in result["history"]])
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_seeded_augmentation_differs_per_element_and_repeats(data_dirs):
    params = tiny_params(data_dirs["segmentation"], aug_scale_min=0.5, aug_scale_max=1.5, random_horizontal_flip=True,
                         batch_size=8, seed=11)
    first, again = (next(iter(train_dataset(params)))[0].numpy() for _ in range(2))
    other = next(iter(train_dataset(dataclasses.replace(params, seed=12))))[0].numpy()
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def score(model, params: SegmenterParams) -> dict:
    """Mean IoU and loss (mean over batches, as Model Garden's validation) of `model` on the val set."""
    metric, compute_loss, losses = MeanIoU(params.output_classes), loss_fn(params), []
    for images, masks in val_dataset(params):
        logits = model(images, training=False)
        metric.update_state(masks, logits)
        losses.append(float(compute_loss(masks, logits)))
    return {"mean_iou": float(metric.result()), "loss": float(np.mean(losses))}


def test_best_checkpoint_restores_the_trained_model(trained):
    """Model Garden's best-checkpoint exporter kept the best evaluation's weights: a fresh model
    restored from it scores exactly what the trained model scored there."""
    params, run_dir, result = trained
    best = checkpoints.best_info(run_dir)
    assert best == result["best"] and best["mean_iou"] == max(e["mean_iou"] for e in result["evals"])
    prefix = checkpoints.best(run_dir)
    assert prefix == result["best_checkpoint"] and checkpoints.step(prefix) == best["step"]
    assert checkpoints.default(run_dir) == prefix  # what eval and export use

    model = build_model(params, load_encoder_weights=False)
    images, _ = next(iter(val_dataset(params)))
    before = model(images).numpy()
    checkpoints.restore(model, prefix)
    after = model(images).numpy()
    assert not np.allclose(before, after)
    scored = score(model, params)
    assert scored["mean_iou"] == pytest.approx(best["mean_iou"], abs=1e-6)
    at_best = next(e for e in result["evals"] if e["step"] == best["step"])
    assert scored["loss"] == pytest.approx(at_best["validation_loss"], rel=1e-4)

    # The training checkpoint restores the same way (model weights only; optimizer state left out).
    checkpoints.restore(model, checkpoints.latest(run_dir))
    assert score(model, params)["mean_iou"] == pytest.approx(result["evals"][-1]["mean_iou"], abs=1e-6)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoints.restore(model, str(run_dir / "train" / "ckpt-999"))


def test_finished_run_says_so(trained):
    params, run_dir, _ = trained
    lines = []
    result = train(params, run_dir, log=lines.append, eval_every=12)
    assert lines == [f"{run_dir / 'train'}: already trained to step 36 (num_steps 36); nothing to do"]
    assert result["final_step"] == 36 and result["history"] == [] and result["best"]["step"] > 0


def test_killed_run_resumes_from_its_checkpoint(data_dirs, tmp_path):
    # MobileNet traces in half the time of EfficientNet; without eval_files, no evaluation to trace.
    params = tiny_params(data_dirs["segmentation"], backbone="mobilenet", num_steps=24, eval_files=[])
    (tmp_path / "params.json").write_text(json.dumps(dataclasses.asdict(params)))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipelines.segmentation.train", str(tmp_path / "params.json"), str(run_dir),
           "--eval-every", "4"]
    with open(tmp_path / "first.log", "w") as out:  # a file, not a pipe nobody reads while it runs
        first = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        # A checkpoint counts once the trainer's state file names it (what a restart restores).
        while tf.train.latest_checkpoint(str(run_dir / "train")) is None and first.poll() is None \
                and time.time() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = int(tf.train.latest_checkpoint(str(run_dir / "train")).rsplit("-", 1)[1])
    assert first.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert 0 < killed_at < params.num_steps

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["start_step"] == killed_at and result["final_step"] == params.num_steps
    assert f"resuming from step {killed_at}" in second.stdout and "no eval_files" in second.stdout
    steps = [int(line.split()[1].split("/")[0]) for line in second.stdout.splitlines() if line.startswith("step ")]
    assert steps[0] == killed_at + 1 and steps[-1] == params.num_steps, steps
    # The optimizer's state came back too: its step count went on from the killed run's.
    reader = tf.train.load_checkpoint(checkpoints.latest(run_dir))
    assert reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == params.num_steps
    assert reader.get_tensor("optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE") == params.num_steps
