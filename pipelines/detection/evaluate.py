"""Detection's part of `make eval` (pipelines/engine/evaluate.py): COCO metrics with pycocotools.

The detections come from the same serving module the export writes (uint8 image in, boxes
normalized to that image out), built from the checkpoint. Ground truth is read from the validation
TFRecords themselves (boxes, classes, crowd flags, areas), so no annotation file is needed.
metrics.json gets AP@[.5:.95], AP50, AP75, AP small/medium/large, AR, per-class AP; the pictures are
pr_curve.png and predictions.png (val images with true boxes dashed and predicted boxes solid).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines import checkpoints, examples
from pipelines.detection.params import DetectorParams
from pipelines.detection.predict import DEFAULT_SCORE_THRESHOLD

COCO_STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
DRAW_SCORE = 0.3  # predictions drawn in predictions.png
DRAW_IMAGES = 8


def coco_eval(gt_images: list[dict], gt_annotations: list[dict], detections: list[dict], labels: dict[int, str]):
    """Run pycocotools' COCOeval; returns (stats dict, per-class AP dict, COCOeval)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {"info": {}, "images": gt_images, "annotations": gt_annotations,
                  "categories": [{"id": k, "name": v} for k, v in sorted(labels.items())]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(detections) if detections else COCO()
        if not detections:
            dt.dataset = {"images": gt_images, "annotations": [], "categories": gt.dataset["categories"]}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(COCO_STATS, evaluator.stats)}
    precision = evaluator.eval["precision"]  # [IoU thresholds, recall points, classes, area ranges, max dets]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]
        per_class[labels[cat_id]] = {
            "AP": float(p[p > -1].mean()) if (p > -1).any() else None,
            "AP50": float(p50[p50 > -1].mean()) if (p50 > -1).any() else None,
        }
    return stats, per_class, evaluator


THRESHOLD_IOU = 0.5  # a detection is right when it overlaps an unclaimed true box of its class this much


def choose_threshold(evaluator, labels: dict[int, str]) -> dict | None:
    """The default score threshold of a detector: the score that maximises F1 over all classes pooled,
    at IoU 0.5, on the detections and truth of a COCOeval that has run `evaluate()`.

    The matching is pycocotools' own (COCOeval.evalImgs at IoU 0.5, all areas, 100 detections per
    image): the detections it ignores (matched to crowd regions) count neither way, the objects it
    ignores are not to be found. Keeping the detections scoring at least the threshold gives the
    returned precision and recall; of equal F1s the highest threshold wins. Returns {'score_threshold',
    'precision', 'recall', 'f1', 'iou', 'objects', 'detections' (kept), 'per_class': {name: {'precision',
    'recall', 'objects', 'detections'}}}, or None without any detection, object or right detection."""
    params = evaluator.params
    t = int(np.argmin(np.abs(np.asarray(params.iouThrs) - THRESHOLD_IOU)))
    areas, images = len(params.areaRng), len(params.imgIds)
    scores, hits, classes = [], [], []
    objects = {cat: 0 for cat in params.catIds}
    for k, cat in enumerate(params.catIds):
        for i in range(images):
            entry = evaluator.evalImgs[k * areas * images + i]  # area range 0: all
            if entry is None:
                continue
            objects[cat] += int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))
            kept = ~np.asarray(entry["dtIgnore"], bool)[t]
            scores.extend(np.asarray(entry["dtScores"])[kept])
            hits.extend(np.asarray(entry["dtMatches"])[t][kept] > 0)
            classes.extend([cat] * int(kept.sum()))
    total = sum(objects.values())
    if not scores or not total:
        return None
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    scores, hits, classes = np.asarray(scores)[order], np.asarray(hits)[order], np.asarray(classes)[order]
    true_pos = np.cumsum(hits)
    precision = true_pos / np.arange(1, len(scores) + 1)
    recall = true_pos / total
    f1 = np.where(true_pos > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    # A threshold keeps every detection of its score: only the last of a run of equal scores is a cut.
    cuts = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    if not true_pos[-1]:
        return None  # not one detection is right: no threshold makes the model useful
    best = int(cuts[np.argmax(f1[cuts])])
    threshold = float(scores[best])
    kept = scores >= threshold
    per_class = {}
    for cat in params.catIds:
        mine = kept & (classes == cat)
        found = int(hits[mine].sum())
        per_class[labels.get(cat, str(cat))] = {
            "precision": found / int(mine.sum()) if mine.any() else None,
            "recall": found / objects[cat] if objects[cat] else None,
            "objects": objects[cat], "detections": int(mine.sum())}
    return {"score_threshold": threshold, "precision": float(precision[best]), "recall": float(recall[best]),
            "f1": float(f1[best]), "iou": float(params.iouThrs[t]), "objects": total, "detections": best + 1,
            "per_class": per_class}


def plot_pr(evaluator, labels: dict[int, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = evaluator.params.recThrs
    precision = evaluator.eval["precision"]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for k, cat_id in enumerate(evaluator.params.catIds):
        curve = precision[0, :, k, 0, -1]
        if (curve > -1).any():
            ax.plot(recall, np.where(curve > -1, curve, np.nan), label=f"{labels[cat_id]} (AP50 {curve[curve > -1].mean():.2f})")
    mean = np.where(precision[0, :, :, 0, -1] > -1, precision[0, :, :, 0, -1], np.nan)
    if np.isfinite(mean).any():
        ax.plot(recall, np.nanmean(mean, axis=1), color="black", linewidth=2.5, label="all classes")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall at IoU 0.5 (val)", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_predictions(samples: list[tuple[np.ndarray, dict, dict]], labels: dict[int, str], path: Path) -> None:
    from PIL import Image, ImageDraw

    from pipelines.viz import class_color

    tile = 320
    cols = 4
    rows = max(1, -(-len(samples) // cols))
    sheet = Image.new("RGB", (cols * tile, rows * tile), (32, 32, 32))
    for n, (image, gt, det) in enumerate(samples):
        img = Image.fromarray(image)
        draw = ImageDraw.Draw(img)
        width = max(2, round(max(img.size) / 200))
        for box, cls in zip(gt["boxes"], gt["classes"]):
            x0, y0, x1, y1 = box
            color = class_color(int(cls))
            for i in range(0, 4):  # dashed outline: the truth
                edge = [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x0, y1), (x1, y1)), ((x0, y0), (x0, y1))][i]
                (ax, ay), (bx, by) = edge
                length = max(abs(bx - ax), abs(by - ay))
                for t in np.arange(0, length, 8):
                    s, e = t / max(length, 1), min(t + 4, length) / max(length, 1)
                    draw.line([(ax + (bx - ax) * s, ay + (by - ay) * s), (ax + (bx - ax) * e, ay + (by - ay) * e)],
                              fill=color, width=width)
        for box, cls, score in zip(det["boxes"], det["classes"], det["scores"]):
            if score < DRAW_SCORE:
                continue
            color = class_color(int(cls))
            draw.rectangle(list(box), outline=color, width=width)
            draw.text((box[0] + 2, box[1] + 1), f"{labels.get(int(cls), int(cls))} {score:.2f}", fill=color)
        img.thumbnail((tile - 4, tile - 4))
        sheet.paste(img, ((n % cols) * tile + (tile - img.width) // 2, (n // cols) * tile + (tile - img.height) // 2))
    sheet.save(path)


class Evaluator:
    """COCO box metrics with pycocotools (pipelines/engine/evaluate.py runs it): the val records' own
    ground truth (boxes, classes, crowd flags, areas) against the served detections."""

    needs_class_masks = False
    batch_size = 1  # the detection module's signature takes one image at a time
    draw_images = DRAW_IMAGES

    def __init__(self, params: DetectorParams, labels: dict[int, str]):
        self.params = params
        self.labels = labels
        self.reset()

    def serving_function(self, checkpoint: str):
        """uint8 [1, H, W, 3] -> the serving outputs (NumPy): the export's module on the checkpoint's weights."""
        from pipelines.detection.export import ODAPIDetectionModule
        from pipelines.detection.model import inference_experiment

        params = self.params
        module = ODAPIDetectionModule(inference_experiment(params), batch_size=None,
                                      input_image_size=[params.image_height, params.image_width],
                                      input_type="image_tensor")
        checkpoints.restore(module.model, checkpoint)
        detect = tf.function(module.serve, input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8)])
        return lambda images: {key: value.numpy() for key, value in detect(tf.constant(images)).items()}

    def reset(self) -> None:
        self.gt_images: list[dict] = []
        self.gt_annotations: list[dict] = []
        self.detections: list[dict] = []
        self.coco = None

    def process(self, record: examples.Example, outputs: dict) -> None:
        h, w = record.height, record.width
        n = int(outputs["num_detections"])
        boxes = outputs["detection_boxes"][:n] * np.array([h, w, h, w])  # ymin, xmin, ymax, xmax
        image_id = int(record.source_id)
        self.gt_images.append({"id": image_id, "width": w, "height": h, "file_name": record.filename})
        for i, (box, cls) in enumerate(zip(record.boxes, record.classes)):
            self.gt_annotations.append({
                "id": len(self.gt_annotations) + 1, "image_id": image_id, "category_id": int(cls),
                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                "area": float(record.area[i]) if len(record.area) else float((box[2] - box[0]) * (box[3] - box[1])),
                "iscrowd": int(record.crowd[i]) if record.crowd is not None and len(record.crowd) else 0})
        for box, score, cls in zip(boxes, outputs["detection_scores"][:n], outputs["detection_classes"][:n]):
            if int(cls) in self.labels:
                self.detections.append({"image_id": image_id, "category_id": int(cls), "score": float(score),
                                        "bbox": [float(box[1]), float(box[0]), float(box[3] - box[1]),
                                                 float(box[2] - box[0])]})

    def evaluate(self) -> dict:
        stats, per_class, self.coco = coco_eval(self.gt_images, self.gt_annotations, self.detections, self.labels)
        return {"objects": len(self.gt_annotations), "detections": len(self.detections), "metrics": stats,
                "per_class": per_class, "operating_point": choose_threshold(self.coco, self.labels)}

    def draw(self, folder: Path, samples: list[tuple[examples.Example, dict]]) -> list[str]:
        plot_pr(self.coco, self.labels, folder / "pr_curve.png")
        drawn = []
        for record, out in samples:
            h, w = record.height, record.width
            n = int(out["num_detections"])
            boxes = out["detection_boxes"][:n] * np.array([h, w, h, w])
            drawn.append((record.image, {"boxes": record.boxes, "classes": record.classes},
                          {"boxes": boxes[:, [1, 0, 3, 2]], "classes": out["detection_classes"][:n].astype(int),
                           "scores": out["detection_scores"][:n]}))
        draw_predictions(drawn, self.labels, folder / "predictions.png")
        return ["pr_curve.png", "predictions.png"]

    @staticmethod
    def format(metrics: dict) -> str:
        return format_metrics(metrics)


def format_metrics(metrics: dict) -> str:
    s = metrics["metrics"]
    lines = [f"COCO box metrics on {metrics['images']} val images ({metrics['objects']} objects), step {metrics['step']}:",
             f"  AP {s['AP']:.3f}  AP50 {s['AP50']:.3f}  AP75 {s['AP75']:.3f}  "
             f"APs {s['APs']:.3f}  APm {s['APm']:.3f}  APl {s['APl']:.3f}  AR100 {s['AR100']:.3f}"]
    point = metrics.get("operating_point")
    at = point["per_class"] if point else {}
    for name, v in metrics["per_class"].items():
        ap = "  n/a" if v["AP"] is None else f"{v['AP']:.3f}"
        ap50 = "  n/a" if v["AP50"] is None else f"{v['AP50']:.3f}"
        pr = at.get(name)
        lines.append(f"  {name:<20} AP {ap}  AP50 {ap50}"
                     + (f"  precision {_fraction(pr['precision'])}  recall {_fraction(pr['recall'])}" if pr else ""))
    if point:
        lines.append(f"default score threshold {point['score_threshold']:.3f}: the best F1 over all classes on val "
                     f"(IoU {point['iou']:.2f}): precision {point['precision']:.3f}, recall {point['recall']:.3f}, "
                     f"F1 {point['f1']:.3f}" + ("" if metrics.get("model") else
                                                 "; make export stores it, /detect and predict use it unless given one"))
    else:
        lines.append(f"default score threshold {DEFAULT_SCORE_THRESHOLD}: no detection or no object on val to choose "
                     "one from")
    return "\n".join(lines)


def _fraction(value) -> str:
    return "  n/a" if value is None else f"{value:.3f}"
