"""A segmenter's section of `make report` (pipelines/report.py assembles the page)."""

from __future__ import annotations

from pathlib import Path

from pipelines.workspace import display_path
from pipelines.report import percent, table


def metrics_line(metrics: dict) -> str:
    """A segmenter's metrics.json in one line (what `make demo` prints)."""
    m = metrics.get("metrics", {})
    return (f"mean IoU {percent(m.get('mean_iou'))}, foreground mean IoU {percent(m.get('mean_iou_foreground'))}, "
            f"pixel accuracy {percent(m.get('pixel_accuracy'))} on {metrics.get('images')} val images")


def metrics_html(metrics: dict, eval_dir: Path) -> tuple[str, Path]:
    """A segmenter's metrics.json as tables, and the plot beside it (its task's `report` part)."""
    m = metrics.get("metrics", {})
    head = [["mean IoU (background included)", m.get("mean_iou")],
            ["foreground mean IoU", m.get("mean_iou_foreground")], ["pixel accuracy", m.get("pixel_accuracy")],
            ["images", metrics.get("images")],
            ["checkpoint", f"{display_path(metrics.get('checkpoint') or '')} (step {metrics.get('step')})"]]
    rows = [[name, v.get("iou"), v.get("true_pixels"), v.get("predicted_pixels")]
            for name, v in metrics.get("per_class", {}).items()]
    out = table(None, head) + "<h3>IoU per class</h3>" + table(["class", "IoU", "true pixels",
                                                                      "predicted pixels"], rows)
    return out, eval_dir / "confusion_matrix.png"
