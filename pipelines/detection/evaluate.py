"""Detection's part of `make eval` (pipelines/engine/evaluate.py): COCO metrics with pycocotools.

The detections come from the same serving module the export writes (uint8 image in, boxes
normalized to that image out), built from the checkpoint. Ground truth is read from the validation
TFRecords themselves (boxes, classes, crowd flags, areas), so no annotation file is needed.
metrics.json gets AP@[.5:.95], AP50, AP75, AP small/medium/large, AR, per-class AP; the pictures are
pr_curve.png, threshold.png (precision, recall and F1 against the score threshold, the chosen one marked),
confusion_matrix.png (with background) and predictions.png (val images as labelled / predicted pairs at
the chosen threshold).
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


def pooled_matches(evaluator):
    """(scores, hits, classes, objects per class) of a COCOeval that has run `evaluate()`: every counted
    detection at IoU 0.5 (all areas, 100 per image) in descending score order, whether it found an object
    (pycocotools' own matching: detections matched to crowd regions count neither way), its class, and
    the number of objects to find per class. None without any detection or object."""
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
    if not scores or not sum(objects.values()):
        return None
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    return np.asarray(scores)[order], np.asarray(hits)[order], np.asarray(classes)[order], objects


def _pooled_curves(scores, hits, total):
    """Precision, recall and F1 of keeping the first n detections, n = 1..len."""
    true_pos = np.cumsum(hits)
    precision = true_pos / np.arange(1, len(scores) + 1)
    recall = true_pos / total
    f1 = np.where(true_pos > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return true_pos, precision, recall, f1


def choose_threshold(evaluator, labels: dict[int, str]) -> dict | None:
    """The default score threshold of a detector: the score that maximises F1 over all classes pooled,
    at IoU 0.5, on the detections and truth of a COCOeval that has run `evaluate()`.

    The matching is pycocotools' own (COCOeval.evalImgs at IoU 0.5, all areas, 100 detections per
    image): the detections it ignores (matched to crowd regions) count neither way, the objects it
    ignores are not to be found. Keeping the detections scoring at least the threshold gives the
    returned precision and recall; of equal F1s the highest threshold wins. Returns {'score_threshold',
    'precision', 'recall', 'f1', 'iou', 'objects', 'detections' (kept), 'per_class': {name: {'precision',
    'recall', 'objects', 'detections'}}}, or None without any detection, object or right detection."""
    pooled = pooled_matches(evaluator)
    if pooled is None:
        return None
    scores, hits, classes, objects = pooled
    total = sum(objects.values())
    true_pos, precision, recall, f1 = _pooled_curves(scores, hits, total)
    # A threshold keeps every detection of its score: only the last of a run of equal scores is a cut.
    cuts = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    if not true_pos[-1]:
        return None  # not one detection is right: no threshold makes the model useful
    best = int(cuts[np.argmax(f1[cuts])])
    threshold = float(scores[best])
    kept = scores >= threshold
    per_class = {}
    for cat in evaluator.params.catIds:
        mine = kept & (classes == cat)
        found = int(hits[mine].sum())
        per_class[labels.get(cat, str(cat))] = {
            "precision": found / int(mine.sum()) if mine.any() else None,
            "recall": found / objects[cat] if objects[cat] else None,
            "objects": objects[cat], "detections": int(mine.sum())}
    iou = float(evaluator.params.iouThrs[int(np.argmin(np.abs(np.asarray(evaluator.params.iouThrs) - THRESHOLD_IOU)))])
    return {"score_threshold": threshold, "precision": float(precision[best]), "recall": float(recall[best]),
            "f1": float(f1[best]), "iou": iou, "objects": total, "detections": best + 1,
            "per_class": per_class}


def plot_threshold(evaluator, point: dict | None, path: Path) -> bool:
    """Precision, recall and F1 (all classes pooled, IoU 0.5) against the score threshold, the chosen
    threshold marked: why the export's threshold is what it is. False (nothing drawn) without detections."""
    pooled = pooled_matches(evaluator)
    if pooled is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, hits, _, objects = pooled
    _, precision, recall, f1 = _pooled_curves(scores, hits, sum(objects.values()))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for values, name, color in ((precision, "precision", "#1f77b4"), (recall, "recall", "#ff7f0e"),
                                (f1, "F1", "black")):
        ax.plot(scores, values, label=name, color=color, linewidth=2.2 if name == "F1" else 1.5)
    if point:
        t = point["score_threshold"]
        ax.axvline(t, color="#aa1111", linestyle="--", linewidth=1.2)
        ax.annotate(f"threshold {t:.2f}: F1 {point['f1']:.2f}\n(P {point['precision']:.2f}, R {point['recall']:.2f})",
                    (t, 1.0), textcoords="offset points", xytext=(6, -4), va="top", fontsize=8, color="#aa1111",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    ax.set(xlabel="score threshold (detections kept at or above it)", ylabel="value", xlim=(0, 1), ylim=(0, 1.02),
           title="Precision, recall and F1 against the score threshold (val, IoU 0.5, all classes)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def confusion(gt_annotations: list[dict], detections: list[dict], classes: list[int], threshold: float,
              iou: float = THRESHOLD_IOU) -> np.ndarray:
    """Counts [truth, prediction] over the classes then background (the last row and column), at a score
    threshold: per image, detections at or above it in descending score order each take the unclaimed,
    non-crowd true box of any class it overlaps most (IoU >= `iou`); a true box left unclaimed is a miss
    (prediction: background), a detection left without one a false detection (truth: background)."""
    from pipelines.data.geometry import box_iou

    index = {cat: i for i, cat in enumerate(classes)}
    background = len(classes)
    counts = np.zeros((background + 1, background + 1), np.int64)
    truth: dict[int, list] = {}
    for a in gt_annotations:
        if not a.get("iscrowd") and a["category_id"] in index:
            x, y, w, h = a["bbox"]
            truth.setdefault(a["image_id"], []).append(((x, y, x + w, y + h), index[a["category_id"]]))
    found: dict[int, list] = {}
    for d in detections:
        if d["score"] >= threshold and d["category_id"] in index:
            x, y, w, h = d["bbox"]
            found.setdefault(d["image_id"], []).append((d["score"], (x, y, x + w, y + h), index[d["category_id"]]))
    for image in set(truth) | set(found):
        boxes = truth.get(image, [])
        claimed = [False] * len(boxes)
        for _, box, predicted in sorted(found.get(image, []), key=lambda f: -f[0]):
            overlaps = [box_iou(box, b) if not claimed[j] else -1.0 for j, (b, _) in enumerate(boxes)]
            j = int(np.argmax(overlaps)) if overlaps else -1
            if j >= 0 and overlaps[j] >= iou:
                claimed[j] = True
                counts[boxes[j][1], predicted] += 1
            else:
                counts[background, predicted] += 1
        for j, (_, true_class) in enumerate(boxes):
            if not claimed[j]:
                counts[true_class, background] += 1
    return counts


def plot_confusion(counts: np.ndarray, names: list[str], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names + ["background"]
    size = 1.6 + 0.7 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.4, size), dpi=110)
    shown = counts.astype(float)
    shown[-1, -1] = np.nan  # background found as background: not counted
    ax.imshow(shown, cmap="Blues")
    for (i, j), value in np.ndenumerate(counts):
        if i == j == len(names) - 1:
            continue
        ax.text(j, i, str(value), ha="center", va="center", fontsize=9,
                color="white" if value > np.nanmax(shown) * 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"Detections at score >= {threshold:.2f}, IoU 0.5 (val)\nbackground row: false detections; "
                 "column: missed objects", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pr(evaluator, labels: dict[int, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.viz import class_color

    recall = evaluator.params.recThrs
    precision = evaluator.eval["precision"]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for k, cat_id in enumerate(evaluator.params.catIds):
        curve = precision[0, :, k, 0, -1]
        if (curve > -1).any():
            ax.plot(recall, np.where(curve > -1, curve, np.nan), color=np.asarray(class_color(cat_id)) / 255,
                    label=f"{labels[cat_id]} (AP50 {curve[curve > -1].mean():.2f})")
    mean = np.where(precision[0, :, :, 0, -1] > -1, precision[0, :, :, 0, -1], np.nan)
    if np.isfinite(mean).any():
        ax.plot(recall, np.nanmean(mean, axis=1), color="black", linewidth=2.5, label="all classes")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall at IoU 0.5 (val)", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_predictions(samples: list[tuple[np.ndarray, dict, dict]], labels: dict[int, str], threshold: float,
                     path: Path) -> None:
    """Val images as pairs, the labelled boxes left and the detections at or above `threshold` (what the
    service returns) right, each box in its class's colour with a readable label, under a legend."""
    from PIL import Image, ImageDraw

    from pipelines.viz import class_color, draw_detections, font

    tile, pairs_per_row, legend_h = 300, 2, 30

    def boxes(found: dict, scored: bool, scale: float) -> list[dict]:
        out = []
        for i, (box, cls) in enumerate(zip(found["boxes"], found["classes"])):
            if scored and found["scores"][i] < threshold:
                continue
            x0, y0, x1, y1 = (float(v) * scale for v in box)
            out.append({"box": {"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1}, "class_id": int(cls),
                        "label": labels.get(int(cls), str(int(cls))),
                        **({"score": float(found["scores"][i])} if scored else {})})
        return out

    rows = max(1, -(-len(samples) // pairs_per_row))
    sheet = Image.new("RGB", (pairs_per_row * 2 * tile, legend_h + rows * tile), (32, 32, 32))
    pen = ImageDraw.Draw(sheet)
    x = 8
    for cat, name in sorted(labels.items()):
        pen.rectangle([x, 8, x + 14, 22], fill=class_color(cat))
        pen.text((x + 20, 8), name, fill=(255, 255, 255), font=font())
        x += 34 + int(pen.textlength(name, font=font()))
    pen.text((x + 12, 8), f"each pair: labelled | predicted at score >= {threshold:.2f}", fill=(200, 200, 200),
             font=font())
    for n, (image, gt, det) in enumerate(samples):
        picture = Image.fromarray(image)
        scale = (tile - 6) / max(picture.size)
        picture = np.asarray(picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))))
        for side, drawn in enumerate((draw_detections(picture, boxes(gt, False, scale)),
                                      draw_detections(picture, boxes(det, True, scale)))):
            col = (n % pairs_per_row) * 2 + side
            sheet.paste(drawn, (col * tile + (tile - drawn.width) // 2,
                                legend_h + (n // pairs_per_row) * tile + (tile - drawn.height) // 2))
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
        self.point = choose_threshold(self.coco, self.labels)
        classes = sorted(self.labels)
        self.threshold = self.point["score_threshold"] if self.point else DEFAULT_SCORE_THRESHOLD
        counts = confusion(self.gt_annotations, self.detections, classes, self.threshold)
        return {"objects": len(self.gt_annotations), "detections": len(self.detections), "metrics": stats,
                "per_class": per_class, "operating_point": self.point,
                "confusion": {"classes": [self.labels[c] for c in classes] + ["background"],
                              "score_threshold": self.threshold, "iou": THRESHOLD_IOU, "counts": counts.tolist()}}

    def draw(self, folder: Path, samples: list[tuple[examples.Example, dict]]) -> list[str]:
        plot_pr(self.coco, self.labels, folder / "pr_curve.png")
        pictures = ["pr_curve.png"]
        if plot_threshold(self.coco, self.point, folder / "threshold.png"):
            pictures.append("threshold.png")
        classes = sorted(self.labels)
        plot_confusion(confusion(self.gt_annotations, self.detections, classes, self.threshold),
                       [self.labels[c] for c in classes], self.threshold, folder / "confusion_matrix.png")
        pictures.append("confusion_matrix.png")
        drawn = []
        for record, out in samples:
            h, w = record.height, record.width
            n = int(out["num_detections"])
            boxes = out["detection_boxes"][:n] * np.array([h, w, h, w])
            drawn.append((record.image, {"boxes": record.boxes, "classes": record.classes},
                          {"boxes": boxes[:, [1, 0, 3, 2]], "classes": out["detection_classes"][:n].astype(int),
                           "scores": out["detection_scores"][:n]}))
        draw_predictions(drawn, self.labels, self.threshold, folder / "predictions.png")
        return pictures + ["predictions.png"]

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
