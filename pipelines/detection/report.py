"""A detector's section of `make report` (pipelines/report.py assembles the page)."""

from __future__ import annotations

from pathlib import Path

from pipelines.workspace import display_path
from pipelines.report import number, table


def metrics_line(metrics: dict) -> str:
    """A detector's metrics.json in one line (what `make demo` prints)."""
    m = metrics.get("metrics", {})
    point = metrics.get("operating_point")
    return (f"COCO AP {number(m.get('AP'))}, AP50 {number(m.get('AP50'))}, AP75 {number(m.get('AP75'))}, "
            f"AR100 {number(m.get('AR100'))} on {metrics.get('images')} val images ({metrics.get('objects')} objects)"
            + (f"; default score threshold {point['score_threshold']:.2f} (precision {point['precision']:.2f}, "
               f"recall {point['recall']:.2f})" if point else ""))


def metrics_html(metrics: dict, eval_dir: Path) -> tuple[str, Path]:
    """A detector's metrics.json as tables, and the plot beside it (its task's `report` part)."""
    m = metrics.get("metrics", {})
    head = [["images / objects / detections",
             f"{metrics.get('images')} / {metrics.get('objects')} / {metrics.get('detections')}"],
            ["checkpoint", f"{display_path(metrics.get('checkpoint', ''))} (step {metrics.get('step')})"]]
    out = table(None, head, numeric_from=9)
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"]
    out += "<h3>COCO metrics</h3>" + table(names, [[m.get(n, float("nan")) for n in names]], numeric_from=0)
    point = metrics.get("operating_point") or {}
    at = point.get("per_class", {})
    rows = [[name, v.get("AP"), v.get("AP50"), at.get(name, {}).get("precision"), at.get(name, {}).get("recall")]
            for name, v in metrics.get("per_class", {}).items()]
    if point:
        out += (f"<h3>At the default score threshold {point['score_threshold']:.3f}</h3>"
                f"<p>The threshold with the best F1 over all classes on the val set (a detection is right when it "
                f"overlaps an object of its class with IoU &ge; {point['iou']:.2f}); the export stores it and "
                f"/detect, /render and predict use it unless a request gives one.</p>"
                + table(["precision", "recall", "F1", "kept detections", "objects"],
                         [[point["precision"], point["recall"], point["f1"], point["detections"], point["objects"]]],
                         numeric_from=0))
    heads = ["class", "AP", "AP50"] + ([f"precision @{point['score_threshold']:.2f}",
                                        f"recall @{point['score_threshold']:.2f}"] if point else [])
    out += "<h3>Per class</h3>" + table(heads, [row[:len(heads)] for row in rows])
    matrix = metrics.get("confusion")
    if matrix:
        names, counts = matrix["classes"], matrix["counts"]
        out += (f"<h3>Confusion at score &ge; {matrix['score_threshold']:.2f}</h3><p>Rows: the labelled class; "
                f"columns: the predicted one (IoU &ge; {matrix['iou']:.2f}). The background row counts detections "
                "of nothing labelled, the background column labelled objects the model missed.</p>"
                + table(["true \\ predicted"] + names, [[name] + row for name, row in zip(names, counts)]))
    return out, [eval_dir / "pr_curve.png", eval_dir / "threshold.png", eval_dir / "confusion_matrix.png"]
