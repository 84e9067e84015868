"""`make eval` for segmentation: IoU of a trained segmenter on the validation shards.

Every val image is segmented at its own resolution by `segment`, the computation the export
serves (stretch to the model's input size, softmax, probabilities resized back, argmax), with the
checkpoint's weights, so what is measured is what will be served. The predicted class of every
pixel is counted against the class mask of the TFRecords in a (K + 1) x (K + 1) confusion matrix
(rows = truth, columns = prediction; class 0 is the background); pixels labelled 255 are ignored.

Writes RUN_DIR/eval/: metrics.json (mean IoU over the classes present in the truth or the
predictions, background included, and over the foreground classes 1..K only; per-class IoU; pixel
accuracy; the confusion matrix), confusion_matrix.png and predictions.png (val images with the
true and the predicted masks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines.common import UserError, atomic_output_dir, display_path
from pipelines.data.label_map import read_label_map
from pipelines.segmentation.params import IGNORE_LABEL, SegmenterParams

DRAW_IMAGES = 6  # val images shown in predictions.png
ANNOTATE_UP_TO = 25  # classes (with background) up to which the confusion matrix's cells are written in


# ------------------------------------------------------------------------------------------ metrics


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes] pixel counts, rows = true class, columns = predicted class.

    Pixels whose truth is IGNORE_LABEL (255) are left out; any other id outside 0..num_classes - 1
    is a ValueError."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth of shape {truth.shape} and prediction of shape {pred.shape}")
    keep = truth != IGNORE_LABEL
    truth, pred = truth[keep].astype(np.int64), pred[keep].astype(np.int64)
    for what, ids in (("truth", truth), ("prediction", pred)):
        bad = ids[(ids < 0) | (ids >= num_classes)]
        if bad.size:
            raise ValueError(f"{what} has class id {int(bad[0])}, outside 0..{num_classes - 1} "
                             f"(and {IGNORE_LABEL} for ignored pixels)")
    counts = np.bincount(truth * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_metrics(cm: np.ndarray, names: list[str]) -> dict:
    """Metrics of a confusion matrix (rows = truth) whose classes are `names` (index 0 = background).

    IoU of a class = true positives / (true + predicted - true positives) pixels. A class absent
    from both the truth and the predictions has no IoU (None) and is left out of the means, so an
    evaluation set without some class is not penalised for it; a class predicted but absent from
    the truth counts with IoU 0. Returns {"mean_iou" (all classes present, background included),
    "mean_iou_foreground" (classes 1..K present), "pixel_accuracy", "per_class": {name: {"class_id",
    "iou", "true_pixels", "predicted_pixels"}}}; means and accuracy are None when nothing is there."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {len(names)} class names")
    hits = np.diag(cm)
    true, predicted = cm.sum(axis=1), cm.sum(axis=0)
    union = true + predicted - hits
    ious = [float(hits[c] / union[c]) if union[c] else None for c in range(len(names))]
    present = [iou for iou in ious if iou is not None]
    present_foreground = [iou for iou in ious[1:] if iou is not None]
    total = int(cm.sum())
    return {
        "mean_iou": float(np.mean(present)) if present else None,
        "mean_iou_foreground": float(np.mean(present_foreground)) if present_foreground else None,
        "pixel_accuracy": float(hits.sum() / total) if total else None,
        "per_class": {name: {"class_id": c, "iou": ious[c], "true_pixels": int(true[c]),
                             "predicted_pixels": int(predicted[c])} for c, name in enumerate(names)},
    }


def class_names(labels: dict[int, str], num_classes: int) -> list[str]:
    """Names of the model's classes 0..K: "background", then the label map's (the id where it has none)."""
    names = ["background"] + [labels.get(i, str(i)) for i in range(1, num_classes + 1)]
    if names.count("background") > 1:  # a label-map class named so: keep the names distinct keys
        names[0] = "(background)"
    return names


# ------------------------------------------------------------------------------------------ data


def read_val_examples(files: list[str]):
    """Yield (image uint8 [H, W, 3], mask uint8 [H, W], filename) for every example of the shards/globs."""
    from pipelines.segmentation.data import check_masks, find_files, parse_example

    try:
        paths = find_files(files, "eval_files")
        check_masks(paths, "eval_files")
    except ValueError as e:
        raise UserError(None, str(e)) from None
    for path in paths:
        for n, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            example = parse_example(raw)
            image, mask = example["image"].numpy(), example["mask"].numpy()
            filename = example["filename"].numpy().decode("utf-8") or f"record {n}"
            if image.shape[:2] != mask.shape:
                raise UserError(display_path(path), f"{filename}: mask of {mask.shape[1]}x{mask.shape[0]} for an "
                                f"image of {image.shape[1]}x{image.shape[0]}")
            yield image, mask, filename


def _same_size_batches(examples, size: int):
    """Consecutive examples of one image size, up to `size` at a time (images keep their resolution)."""
    batch = []
    for example in examples:
        if batch and (len(batch) == size or batch[0][0].shape != example[0].shape):
            yield batch
            batch = []
        batch.append(example)
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------ plots


def _compact(count: int) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            return f"{count / limit:.1f}{suffix}"
    return str(int(count))


def plot_confusion_matrix(cm: np.ndarray, names: list[str], path: Path) -> None:
    """Rows normalized to the true class's pixels (colour and percentage), with the pixel counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    rows = cm.sum(axis=1, keepdims=True)
    normalized = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = max(5.0, 0.75 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=110)
    shown = ax.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=names, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(n), labels=[f"{name} ({_compact(r)} px)" for name, r in zip(names, rows[:, 0])], fontsize=9)
    ax.set(xlabel="predicted class", ylabel="true class",
           title="Confusion matrix (val pixels, each row normalized to its true class)")
    if n <= ANNOTATE_UP_TO:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{100 * normalized[i, j]:.1f}%\n{_compact(cm[i, j])}", ha="center", va="center",
                            fontsize=7, color="white" if normalized[i, j] > 0.5 else "black")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's pixels")
    fig.savefig(path, bbox_inches="tight")  # long class names on the left: grow the figure, don't clip
    plt.close(fig)


def draw_predictions(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], names: list[str],
                     path: Path) -> None:
    """A sheet of val images, each twice: the true mask (ignored pixels grey) and the predicted one,
    captioned, with a legend of the class colours below."""
    from PIL import Image, ImageDraw

    from pipelines.data.report import _font, class_color
    from pipelines.segmentation.predict import IGNORE_COLOR, overlay

    tile, caption, pairs_per_row = 300, 18, 2
    rows = max(1, -(-len(samples) // pairs_per_row))
    legend = [(name, class_color(c)) for c, name in enumerate(names) if c] + [("ignored", IGNORE_COLOR)]
    legend_rows = -(-len(legend) // 6)
    sheet = Image.new("RGB", (2 * pairs_per_row * tile, rows * (tile + caption) + legend_rows * 20 + 8), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for n, (image, truth, pred, filename) in enumerate(samples):
        valid = truth != IGNORE_LABEL
        accuracy = float(np.mean(truth[valid] == pred[valid])) if valid.any() else float("nan")
        panels = [(overlay(image, truth, ignore_label=IGNORE_LABEL), f"truth: {filename}"),
                  (overlay(image, pred), f"prediction: {100 * accuracy:.1f}% pixels right")]
        for k, (array, text) in enumerate(panels):
            x, y = (2 * (n % pairs_per_row) + k) * tile, (n // pairs_per_row) * (tile + caption)
            img = Image.fromarray(array)
            img.thumbnail((tile - 6, tile - 6))
            sheet.paste(img, (x + (tile - img.width) // 2, y + caption + (tile - 6 - img.height) // 2))
            if len(text) > 44:
                text = text[:20] + "..." + text[-21:]
            draw.text((x + 4, y + 2), text, fill=(230, 230, 230), font=font)
    top = rows * (tile + caption) + 4
    for k, (name, color) in enumerate(legend):
        x, y = 8 + (k % 6) * (2 * pairs_per_row * tile // 6), top + (k // 6) * 20
        draw.rectangle([x, y + 2, x + 14, y + 14], fill=color)
        draw.text((x + 20, y + 1), name, fill=(230, 230, 230), font=font)
    sheet.save(path)


def format_metrics(metrics: dict) -> str:
    def pct(value):
        return "  n/a" if value is None else f"{100 * value:5.1f}"

    m = metrics["metrics"]
    width = max([len("class")] + [len(name) for name in metrics["per_class"]])
    lines = [f"IoU on {metrics['images']} val images ({metrics['pixels']} pixels, "
             f"{metrics['ignored_pixels']} ignored), step {metrics['step']}:",
             f"  {'class':<{width}}  {'IoU %':>6}  {'true px':>9}  {'pred px':>9}"]
    for name, v in metrics["per_class"].items():
        lines.append(f"  {name:<{width}}  {pct(v['iou']):>6}  {v['true_pixels']:>9}  {v['predicted_pixels']:>9}")
    lines.append(f"  mean IoU {pct(m['mean_iou']).strip()}% (foreground {pct(m['mean_iou_foreground']).strip()}%), "
                 f"pixel accuracy {pct(m['pixel_accuracy']).strip()}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ evaluate


def evaluate(params: SegmenterParams, run_dir: str | Path, checkpoint: str | None = None, log=print) -> dict:
    """Evaluate RUN_DIR/train's best (else latest) or the given checkpoint on params.eval_files; writes
    RUN_DIR/eval/ and returns what metrics.json holds."""
    from pipelines.segmentation.export import MASK_KEY as OUTPUT_MASK
    from pipelines.segmentation.export import checkpoint_step, default_checkpoint, restore_model, segment

    run_dir = Path(run_dir)
    checkpoint = str(checkpoint or default_checkpoint(run_dir))
    if not params.label_map_path:
        raise UserError(None, "the run has no label map (eval_input_reader.label_map_path)")
    names = class_names(read_label_map(Path(params.label_map_path)), params.num_classes)
    model = restore_model(params, checkpoint)
    # One trace for every image size and batch size: the export's own computation, in a graph.
    predict = tf.function(lambda images: segment(model, params.input_size, images)[OUTPUT_MASK],
                          input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])

    log(f"evaluating {checkpoint} on {', '.join(display_path(f) for f in params.eval_files)}")
    num = params.output_classes
    cm = np.zeros((num, num), dtype=np.int64)
    images, ignored, samples = 0, 0, []
    for batch in _same_size_batches(read_val_examples(params.eval_files), max(1, params.eval_batch_size)):
        preds = predict(tf.constant(np.stack([image for image, _, _ in batch]))).numpy()
        for (image, truth, filename), pred in zip(batch, preds):
            try:
                cm += confusion_matrix(truth, pred, num)
            except ValueError as e:  # a mask with ids the model does not have: another label map's data
                raise UserError(filename, f"{e}; the model has {params.num_classes} classes") from None
            ignored += int(np.sum(truth == IGNORE_LABEL))
            if len(samples) < DRAW_IMAGES:
                samples.append((image, truth, pred, filename))
        images += len(batch)
        if images // 100 > (images - len(batch)) // 100:
            log(f"  {images} images")
    if not images:
        raise FileNotFoundError(f"no validation examples in {', '.join(params.eval_files)}")

    scores = iou_metrics(cm, names)
    metrics = {
        "task": "segmentation",
        "checkpoint": checkpoint,
        "step": checkpoint_step(checkpoint),
        "images": images,
        "pixels": int(cm.sum()),
        "ignored_pixels": ignored,
        "metrics": {key: scores[key] for key in ("mean_iou", "mean_iou_foreground", "pixel_accuracy")},
        "per_class": scores["per_class"],
        "confusion_matrix": {"classes": names, "rows": "true class", "columns": "predicted class",
                             "counts": cm.tolist()},
    }
    with atomic_output_dir(run_dir / "eval") as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        plot_confusion_matrix(cm, names, tmp / "confusion_matrix.png")
        draw_predictions(samples, names, tmp / "predictions.png")
    log(format_metrics(metrics))
    log(f"wrote {display_path(run_dir / 'eval')}/: metrics.json, confusion_matrix.png, predictions.png")
    return metrics
