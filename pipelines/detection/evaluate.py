"""`make eval`: COCO metrics of a trained detector on the validation shards, with pycocotools.

The detections come from the same serving module the export writes (uint8 image in, boxes
normalized to that image out), built from the checkpoint, so what is measured is what will be
served. Ground truth is read from the validation TFRecords themselves (boxes, classes, crowd
flags, areas), so no annotation file is needed. Writes RUN/eval/: metrics.json (AP@[.5:.95], AP50,
AP75, AP small/medium/large, AR, per-class AP), pr_curve.png and predictions.png (val images with
true boxes dashed and predicted boxes solid).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipelines.common import atomic_output_dir, display_path
from pipelines.data.label_map import read_label_map
from pipelines.detection.params import DetectorParams

COCO_STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
DRAW_SCORE = 0.3  # predictions drawn in predictions.png
DRAW_IMAGES = 8


def read_val_examples(files: list[str]):
    """Yield (image uint8 HxWx3, ground truth dict) for every example of the given shards/globs."""
    paths = sorted({p for pattern in files for p in tf.io.gfile.glob(pattern)})
    for raw in tf.data.TFRecordDataset(paths).as_numpy_iterator():
        feats = tf.train.Example.FromString(raw).features.feature

        def floats(key):
            return np.array(feats[key].float_list.value, dtype=np.float64) if key in feats else np.zeros(0)

        def ints(key):
            return np.array(feats[key].int64_list.value, dtype=np.int64) if key in feats else np.zeros(0, np.int64)

        image = tf.io.decode_image(feats["image/encoded"].bytes_list.value[0], channels=3).numpy()
        h, w = image.shape[:2]
        yield image, {
            "source_id": int(feats["image/source_id"].bytes_list.value[0]),
            "filename": feats["image/filename"].bytes_list.value[0].decode("utf-8"),
            "width": w, "height": h,
            "boxes": np.stack([floats("image/object/bbox/xmin") * w, floats("image/object/bbox/ymin") * h,
                               floats("image/object/bbox/xmax") * w, floats("image/object/bbox/ymax") * h], axis=-1),
            "classes": ints("image/object/class/label"),
            "crowd": ints("image/object/is_crowd") if "image/object/is_crowd" in feats else None,
            "area": floats("image/object/area"),
        }


def coco_eval(gt_images: list[dict], gt_annotations: list[dict], detections: list[dict], labels: dict[int, str]):
    """Run pycocotools' COCOeval; returns (stats dict, per-class AP dict, COCOeval)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {"info": {}, "images": gt_images, "annotations": gt_annotations,
                  "categories": [{"id": k, "name": v} for k, v in sorted(labels.items())]}
    gt.createIndex()
    with contextlib.redirect_stdout(io.StringIO()):
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

    from pipelines.data.report import class_color

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


def evaluate(params: DetectorParams, run_dir: str | Path, checkpoint: str | None = None, log=print) -> dict:
    from pipelines.detection.export import ODAPIDetectionModule, _experiment

    run_dir = Path(run_dir)
    checkpoint = checkpoint or tf.train.latest_checkpoint(str(run_dir / "train"))
    if not checkpoint:
        raise FileNotFoundError(f"{display_path(run_dir / 'train')}: no checkpoint to evaluate; train first")
    labels = read_label_map(Path(params.label_map_path))
    module = ODAPIDetectionModule(_experiment(params), batch_size=None,
                                  input_image_size=[params.image_height, params.image_width], input_type="image_tensor")
    tf.train.Checkpoint(model=module.model).read(checkpoint).expect_partial()
    detect = tf.function(module.serve, input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8)])

    gt_images, gt_annotations, detections, samples = [], [], [], []
    log(f"evaluating {checkpoint} on {', '.join(display_path(f) for f in params.eval_files)}")
    for image, gt in read_val_examples(params.eval_files):
        out = detect(tf.convert_to_tensor(image[None]))
        h, w = gt["height"], gt["width"]
        n = int(out["num_detections"][0])
        boxes = out["detection_boxes"][0, :n].numpy() * np.array([h, w, h, w])  # ymin, xmin, ymax, xmax
        scores = out["detection_scores"][0, :n].numpy()
        classes = out["detection_classes"][0, :n].numpy().astype(int)
        image_id = gt["source_id"]
        gt_images.append({"id": image_id, "width": w, "height": h, "file_name": gt["filename"]})
        for i, (box, cls) in enumerate(zip(gt["boxes"], gt["classes"])):
            gt_annotations.append({
                "id": len(gt_annotations) + 1, "image_id": image_id, "category_id": int(cls),
                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                "area": float(gt["area"][i]) if len(gt["area"]) else float((box[2] - box[0]) * (box[3] - box[1])),
                "iscrowd": int(gt["crowd"][i]) if gt["crowd"] is not None and len(gt["crowd"]) else 0})
        for box, score, cls in zip(boxes, scores, classes):
            if cls in labels:
                detections.append({"image_id": image_id, "category_id": int(cls), "score": float(score),
                                   "bbox": [float(box[1]), float(box[0]), float(box[3] - box[1]), float(box[2] - box[0])]})
        if len(samples) < DRAW_IMAGES:
            samples.append((image, gt, {"boxes": boxes[:, [1, 0, 3, 2]], "classes": classes, "scores": scores}))
    if not gt_images:
        raise FileNotFoundError(f"no validation examples in {params.eval_files}")
    stats, per_class, evaluator = coco_eval(gt_images, gt_annotations, detections, labels)

    step = int(Path(checkpoint).name.split("-")[-1]) if "-" in Path(checkpoint).name else None
    metrics = {"checkpoint": str(checkpoint), "step": step, "images": len(gt_images),
               "objects": len(gt_annotations), "detections": len(detections), "metrics": stats,
               "per_class": per_class}
    with atomic_output_dir(run_dir / "eval") as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        plot_pr(evaluator, labels, tmp / "pr_curve.png")
        draw_predictions(samples, labels, tmp / "predictions.png")
    log(format_metrics(metrics))
    log(f"wrote {display_path(run_dir / 'eval')}/: metrics.json, pr_curve.png, predictions.png")
    return metrics


def format_metrics(metrics: dict) -> str:
    s = metrics["metrics"]
    lines = [f"COCO box metrics on {metrics['images']} val images ({metrics['objects']} objects), step {metrics['step']}:",
             f"  AP {s['AP']:.3f}  AP50 {s['AP50']:.3f}  AP75 {s['AP75']:.3f}  "
             f"APs {s['APs']:.3f}  APm {s['APm']:.3f}  APl {s['APl']:.3f}  AR100 {s['AR100']:.3f}"]
    for name, v in metrics["per_class"].items():
        ap = "  n/a" if v["AP"] is None else f"{v['AP']:.3f}"
        ap50 = "  n/a" if v["AP50"] is None else f"{v['AP50']:.3f}"
        lines.append(f"  {name:<20} AP {ap}  AP50 {ap50}")
    return "\n".join(lines)
