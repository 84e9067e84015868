"""Segmentation's part of `make eval` (pipelines/engine/evaluate.py): IoU on the validation shards.

Every val image is segmented at its own resolution by `segment`, the computation the export
serves (stretch to the model's input size, softmax, probabilities resized back, argmax), with the
checkpoint's weights, so what is measured is what will be served. The predicted class of every
pixel is counted against the class mask of the TFRecords in a (K + 1) x (K + 1) confusion matrix
(rows = truth, columns = prediction; class 0 is the background); pixels labelled 255 are ignored.

RUN_DIR/eval/ gets metrics.json (mean IoU over the classes present in the truth or the
predictions, background included, and over the foreground classes 1..K only; per-class IoU; pixel
accuracy; the confusion matrix), confusion_matrix.png and predictions.png (val images with the
true and the predicted masks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines import examples
from pipelines.examples import IGNORE_LABEL
from pipelines.model_store import MASK_OUTPUT
from pipelines.segmentation.metric import class_names, confusion_matrix, iou_metrics, out_of_range_pixels
from pipelines.segmentation.params import SegmenterParams

DRAW_IMAGES = 6  # val images shown in predictions.png
ANNOTATE_UP_TO = 25  # classes (with background) up to which the confusion matrix's cells are written in


# ------------------------------------------------------------------------------------------ data


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
    """A sheet of val images, each twice: the true mask (ignored pixels grey) and the predicted one with
    its wrong pixels striped white, captioned, with a legend of the class colours below."""
    from PIL import Image, ImageDraw

    from pipelines.viz import IGNORE_COLOR, WRONG_COLOR, class_color, font, mark_wrong, overlay

    tile, caption, pairs_per_row = 300, 18, 2
    rows = max(1, -(-len(samples) // pairs_per_row))
    legend = [(name, class_color(c)) for c, name in enumerate(names) if c] + [("ignored", IGNORE_COLOR),
                                                                             ("wrong (striped)", WRONG_COLOR)]
    legend_rows = -(-len(legend) // 6)
    sheet = Image.new("RGB", (2 * pairs_per_row * tile, rows * (tile + caption) + legend_rows * 20 + 8), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    pen_font = font()
    for n, (image, truth, pred, filename) in enumerate(samples):
        valid = truth != IGNORE_LABEL
        accuracy = float(np.mean(truth[valid] == pred[valid])) if valid.any() else float("nan")
        panels = [(overlay(image, truth, ignore_label=IGNORE_LABEL), f"truth: {filename}"),
                  (mark_wrong(overlay(image, pred), valid & (truth != pred)),
                   f"prediction: {100 * accuracy:.1f}% pixels right")]
        for k, (array, text) in enumerate(panels):
            x, y = (2 * (n % pairs_per_row) + k) * tile, (n // pairs_per_row) * (tile + caption)
            img = Image.fromarray(array)
            img.thumbnail((tile - 6, tile - 6))
            sheet.paste(img, (x + (tile - img.width) // 2, y + caption + (tile - 6 - img.height) // 2))
            if len(text) > 44:
                text = text[:20] + "..." + text[-21:]
            draw.text((x + 4, y + 2), text, fill=(230, 230, 230), font=pen_font)
    top = rows * (tile + caption) + 4
    for k, (name, color) in enumerate(legend):
        x, y = 8 + (k % 6) * (2 * pairs_per_row * tile // 6), top + (k // 6) * 20
        draw.rectangle([x, y + 2, x + 14, y + 14], fill=color)
        draw.text((x + 20, y + 1), name, fill=(230, 230, 230), font=pen_font)
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
    if metrics.get("out_of_range_pixels"):
        lines.append(f"  warning: {metrics['out_of_range_pixels']} pixel(s) of the val masks have class ids the model "
                     f"does not have (first in {metrics.get('first_out_of_range') or '?'}): left out, as training "
                     "leaves them out; were these TFRecords written with another label map?")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ evaluator


class Evaluator:
    """Per-pixel IoU over a confusion matrix (pipelines/engine/evaluate.py runs it): every val image
    segmented at its own resolution by `segment`, the export's computation, against its class mask."""

    needs_class_masks = True
    draw_images = DRAW_IMAGES

    def __init__(self, params: SegmenterParams, labels: dict[int, str]):
        self.params = params
        self.names = class_names(labels, params.num_classes)
        self.batch_size = max(1, params.eval_batch_size)  # images of one size at a time
        self.reset()

    def serving_function(self, checkpoint: str):
        """uint8 [B, H, W, 3] -> {segmentation_mask: [B, H, W]} (NumPy): the export's computation on the
        checkpoint's weights, one trace for every image and batch size."""
        from pipelines.segmentation.export import restore_model, segment

        model = restore_model(self.params, checkpoint)
        predict = tf.function(lambda images: segment(model, self.params.input_size, images)[MASK_OUTPUT],
                              input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        return lambda images: {MASK_OUTPUT: predict(tf.constant(images)).numpy()}

    def reset(self) -> None:
        num = self.params.output_classes
        self.cm = np.zeros((num, num), dtype=np.int64)
        self.ignored = self.out_of_range = 0
        self.first_out_of_range = ""

    def process(self, record: examples.Example, outputs: dict) -> None:
        num = self.params.output_classes
        self.cm += confusion_matrix(record.class_mask, outputs[MASK_OUTPUT], num)
        self.ignored += int(np.sum(record.class_mask == IGNORE_LABEL))
        outside = out_of_range_pixels(record.class_mask, num)
        if outside:  # a mask with ids the model does not have (another label map's data): left out, as in training
            self.out_of_range += outside
            self.first_out_of_range = self.first_out_of_range or record.filename

    def evaluate(self) -> dict:
        scores = iou_metrics(self.cm, self.names)
        return {
            "pixels": int(self.cm.sum()),
            "ignored_pixels": self.ignored,
            "out_of_range_pixels": self.out_of_range,
            **({"first_out_of_range": self.first_out_of_range} if self.out_of_range else {}),
            "metrics": {key: scores[key] for key in ("mean_iou", "mean_iou_foreground", "pixel_accuracy")},
            "per_class": scores["per_class"],
            "confusion_matrix": {"classes": self.names, "rows": "true class", "columns": "predicted class",
                                 "counts": self.cm.tolist()},
        }

    def draw(self, folder: Path, samples: list[tuple[examples.Example, dict]]) -> list[str]:
        plot_confusion_matrix(self.cm, self.names, folder / "confusion_matrix.png")
        draw_predictions([(r.image, r.class_mask, out[MASK_OUTPUT], r.filename) for r, out in samples], self.names,
                         folder / "predictions.png")
        return ["confusion_matrix.png", "predictions.png"]

    @staticmethod
    def format(metrics: dict) -> str:
        return format_metrics(metrics)
