"""`make report RUN=...`: one self-contained HTML page about a run -> workspace/RUN/report.html.

Sections, each from what the stages wrote (a stage not run yet gets a line saying which command
writes it):

1. Dataset: the data stage's summary.json (images, classes, objects per split, what was dropped or
   repaired) and its preview sheet.
2. Config: the pipeline.config as trained and the changes `make config` made to the template
   (pipeline.config.diff).
3. Training: curves of the losses, the learning rate and the validation metrics over steps, read
   from the TensorBoard event files under train/ (without TensorFlow).
4. Evaluation: eval/metrics.json as tables (COCO AP, or IoU per class) and the precision-recall
   or confusion-matrix plot.
5. Predictions: the val images with predictions next to the truth (eval/predictions.png).

Images are inlined as data: URLs, so the page can be mailed or archived alone. A small script
flags any image the browser could not draw.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from pathlib import Path

from pipelines import checkpoints
from pipelines.workspace import UserError, display_path, write_text_atomic

REPORT_NAME = "report.html"
SECTIONS = ("dataset", "config", "training", "evaluation", "predictions")
CONFIG_DIFF = "pipeline.config.diff"

# ---------------------------------------------------------------------------------- event files


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TensorBoard event files directly in `folder` (TF2 summaries are
    scalar tensors; TF1 ones simple values). A file cut short by a training that is still running is read
    up to its last whole record."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    from pipelines.data.tfrecords import read_records

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        records = []
        try:
            records.extend(read_records(path))
        except ValueError:  # a damaged record: the curves stop there
            pass
        for record in records:
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    number = float(value.simple_value)
                elif kind == "tensor":
                    array = tensor_util.make_ndarray(value.tensor)
                    if array.size != 1 or array.dtype.kind not in "fiu":
                        continue
                    number = float(array.reshape(()))
                else:
                    continue
                scalars.setdefault(value.tag, {})[int(event.step)] = number
    return {tag: sorted(points.items()) for tag, points in scalars.items()}


def training_series(train_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{"train": tags, "validation": tags} for a run's train/ folder (Model Garden's layout: train/train/
    and train/validation/)."""
    series = {}
    for split in ("train", "validation"):
        tags = read_scalars(train_dir / split) if (train_dir / split).is_dir() else {}
        kept: dict[str, list[tuple[int, float]]] = {}
        for tag, points in sorted(tags.items()):  # one loss curve once (Model Garden logs it as two tags)
            if tag.startswith("best_"):  # Model Garden's running best: the best-checkpoint line says it
                continue
            if "loss" not in tag or points not in [v for k, v in kept.items() if "loss" in k]:
                kept[tag] = points
        series[split] = kept
    return series


# ---------------------------------------------------------------------------------------- plots


def _png_data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def curves_png(series: dict[str, dict[str, list[tuple[int, float]]]]) -> bytes | None:
    """Losses, learning rate and validation metrics over steps, side by side; None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, validation = series["train"], series["validation"]
    losses = {tag: points for tag, points in train.items() if "loss" in tag}
    losses.update({f"validation {tag}": points for tag, points in validation.items() if "loss" in tag})
    rate = train.get("learning_rate")
    metrics = {f"validation {tag}": points for tag, points in validation.items()  # the headline ones (all: the table)
               if "loss" not in tag and not tag.startswith("AR") and tag not in ("APs", "APm", "APl")}
    metrics.update({f"train {tag}": points for tag, points in train.items()
                    if tag in ("mean_iou", "iou")})
    panels = [(title, lines) for title, lines in (("loss", losses), ("learning rate", {"learning_rate": rate} if rate
                                                                          else {}), ("metrics", metrics)) if lines]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for tag, points in sorted(lines.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, label=tag, marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title == "loss" and all(v > 0 for _, points in lines.items() for _, v in points):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ html


def _esc(value) -> str:
    return html.escape(str(value))


def _img(path: Path, alt: str) -> str:
    return f'<img src="{_png_data_url(path.read_bytes())}" alt="{_esc(alt)}">'


def table(header: list[str] | None, rows: list[list], numeric_from: int = 1) -> str:
    """A table; without a header, a list of facts (name, value)."""
    head = f"<thead><tr>{''.join(f'<th>{_esc(h)}</th>' for h in header)}</tr></thead>" if header else ""
    body = ""
    for row in rows:
        cells = "".join(f'<td class="{"num" if i >= numeric_from else ""}">{_esc(_fmt(v))}</td>'
                        for i, v in enumerate(row))
        body += f"<tr>{cells}</tr>"
    return f"<table>{head}<tbody>{body}</tbody></table>"


def number(value) -> str:
    """A metric in a line of text: 3 decimals, "n/a" for none or COCO's -1 (no object of that kind)."""
    return "n/a" if value is None or value < 0 else f"{value:.3f}"


def percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) or value < 0 else f"{value:.3f}"
    return "" if value is None else str(value)


def _missing(what: str, command: str) -> str:
    return f'<p class="missing">No {_esc(what)} yet: <code>{_esc(command)}</code> writes it.</p>'


def _written_for(task_name) -> str:
    """What the data stage wrote the records for: its TASK, and whether they hold class masks (which a
    detector does not need but reads the boxes beside)."""
    from pipelines import tasks

    try:
        masks = tasks.get(str(task_name)).class_masks
    except ValueError:
        masks = False
    return f"TASK={task_name}" + (" (with class masks; a detector reads its boxes)" if masks else "")


def dataset_section(data_dir: Path | None, run: str) -> str:
    summary_path = data_dir / "summary.json" if data_dir else None
    if not summary_path or not summary_path.is_file():
        return _missing("data summary", "make data DATASET=...")
    summary = json.loads(summary_path.read_text())
    images = summary.get("images", {})
    source = summary.get("source", {})
    facts = [["dataset", summary.get("dataset")], ["source", f"{source.get('format', '?')}: {source.get('folder', '')}"],
             ["written for", _written_for(summary.get("task"))],
             ["images (train / val)", f"{images.get('train', 0)} / {images.get('val', 0)}"],
             ["images without objects (train / val)",
              f"{images.get('without_objects', {}).get('train', 0)} / {images.get('without_objects', {}).get('val', 0)}"],
             ["items dropped / repaired / skipped",
              (f"{len(summary.get('dropped', []))} / {len(summary.get('repaired', []))} / "
               f"{len(summary.get('skipped_invalid', []))}")],
             ["data folder", display_path(data_dir)]]
    rows = [[c.get("name"), c.get("id"), c.get("objects", {}).get("train", 0), c.get("objects", {}).get("val", 0),
             c.get("images", {}).get("train", 0), c.get("images", {}).get("val", 0), c.get("crowd", 0)]
            for c in summary.get("classes", [])]
    out = table(None, facts, numeric_from=9)
    out += "<h3>Classes</h3>" + table(["class", "id", "objects train", "objects val", "images train",
                                        "images val", "crowd"], rows)
    preview = data_dir / summary.get("files", {}).get("preview", "preview.png")
    if preview.is_file():
        out += f"<h3>Preview</h3><figure>{_img(preview, 'preview of the labelled images')}</figure>"
    return out


def config_section(run_dir: Path) -> str:
    config = run_dir / "pipeline.config"
    if not config.is_file():
        return _missing("pipeline.config", f"make config DATASET=... RUN={run_dir.name}")
    out = ""
    diff = run_dir / CONFIG_DIFF
    if diff.is_file():
        lines = []
        for line in diff.read_text().splitlines():
            kind = "add" if line.startswith("+") and not line.startswith("+++") else \
                "del" if line.startswith("-") and not line.startswith("---") else "note" if line.startswith("#") else ""
            lines.append(f'<span class="{kind}">{_esc(line)}</span>')
        out += "<h3>What <code>make config</code> changed</h3><pre class=\"diff\">" + "\n".join(lines) + "</pre>"
    else:
        out += '<p class="missing">The changes to the template were not recorded (config written before they ' \
               'were kept).</p>'
    out += f"<details><summary>pipeline.config as trained ({_esc(display_path(config))})</summary><pre>" \
           f"{_esc(config.read_text())}</pre></details>"
    return out


def training_section(run_dir: Path) -> str:
    train_dir = run_dir / "train"
    if not train_dir.is_dir():
        return _missing("training", f"make train RUN={run_dir.name}")
    series = training_series(train_dir)
    png = curves_png(series)
    if png is None:
        return '<p class="missing">No training summaries in train/ yet.</p>'
    rows = []
    for split, tags in series.items():
        for tag, points in sorted(tags.items()):
            first, last = points[0], points[-1]
            if tag == "learning_rate":  # set, not learned: no best
                best = "–"
            else:
                at = min(points, key=lambda p: p[1]) if "loss" in tag else max(points, key=lambda p: p[1])
                best = f"{at[1]:.4g} (step {at[0]})"
            rows.append([f"{split}/{tag}", f"{first[1]:.4g} (step {first[0]})", f"{last[1]:.4g} (step {last[0]})",
                         best])
    out = f'<figure><img src="{_png_data_url(png)}" alt="training curves"></figure>'
    out += table(["series", "first", "last", "best"], rows)
    info = checkpoints.best_info(run_dir)
    if info:
        metric = next((k for k in ("mean_iou", "AP") if k in info), None)
        out += f"<p>Best checkpoint: step {_esc(info.get('step'))}" \
               + (f" (validation {_esc(metric)} {_esc(_fmt(info.get(metric)))})" if metric else "") \
               + "; evaluation and export use it.</p>"
    return out


def evaluation_section(run_dir: Path) -> str:
    from pipelines import tasks

    eval_dir = run_dir / "eval"
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.is_file():
        return _missing("evaluation", f"make eval RUN={run_dir.name}")
    metrics = json.loads(metrics_path.read_text())
    try:
        task = tasks.get(tasks.name_in(metrics))
    except ValueError as e:
        return f'<p class="missing">{_esc(display_path(metrics_path))}: {_esc(str(e))}</p>'
    out, plots = task.load("report")(metrics, eval_dir)
    for plot in plots if isinstance(plots, (list, tuple)) else [plots]:
        if plot.is_file():
            out += f"<figure>{_img(plot, plot.stem.replace('_', ' '))}</figure>"
    return out


def predictions_section(run_dir: Path) -> str:
    sheet = run_dir / "eval" / "predictions.png"
    if not sheet.is_file():
        return _missing("predictions", f"make eval RUN={run_dir.name}")
    return f"<p>Validation images: what was labelled beside what the model predicts.</p>" \
           f"<figure>{_img(sheet, 'val images with predictions and truth')}</figure>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
.meta{color:#666} table{border-collapse:collapse;margin:.6rem 0} td,th{border:1px solid #ddd;padding:.25rem .6rem}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #ddd} pre{background:#f7f7f7;padding:.8rem;overflow:auto;font-size:.8rem}
.diff .add{color:#116611} .diff .del{color:#aa1111} .diff .note{color:#555;font-style:italic}
.missing{color:#a05a00} #broken{display:none;background:#fdd;padding:.6rem;border:1px solid #c44}
nav a{margin-right:1rem}
"""

CHECK_IMAGES = """
window.addEventListener("load", function () {
  var broken = Array.prototype.filter.call(document.images, function (img) {
    return !img.complete || img.naturalWidth === 0; });
  document.body.setAttribute("data-images", document.images.length);
  document.body.setAttribute("data-broken-images", broken.length);
  if (broken.length) {
    var note = document.getElementById("broken");
    note.textContent = broken.length + " image(s) of this report could not be drawn: " +
      broken.map(function (img) { return img.alt; }).join(", ");
    note.style.display = "block";
  }
});
"""


def data_dir_of(run_dir: Path) -> Path | None:
    """The data stage's folder the run's config reads (its label map's folder)."""
    from pipelines.config import base
    from pipelines.config.textproto import TextProto

    config = run_dir / "pipeline.config"
    if not config.is_file():
        return None
    doc = TextProto(config.read_text(encoding="utf-8"), display_path(config))
    label_map = doc.get("train_input_reader.label_map_path")
    return base.resolve_path(label_map).parent if label_map else None


def render(run_dir: Path) -> str:
    sections = {
        "dataset": ("Dataset", dataset_section(data_dir_of(run_dir), run_dir.name)),
        "config": ("Config", config_section(run_dir)),
        "training": ("Training", training_section(run_dir)),
        "evaluation": ("Evaluation", evaluation_section(run_dir)),
        "predictions": ("Predictions", predictions_section(run_dir)),
    }
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, (title, _) in sections.items())
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{content}</section>'
                   for key, (title, content) in sections.items())
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Run {_esc(run_dir.name)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><h1>Run {_esc(run_dir.name)}</h1><p class="meta">{_esc(display_path(run_dir))}, report written '
            f'{_esc(when)}</p><div id="broken"></div><nav>{nav}</nav>{body}<script>{CHECK_IMAGES}</script>'
            f'</body></html>')


def write_report(run: str) -> Path:
    from pipelines.runs import run_dir as resolve

    folder = resolve(run)
    if not (folder / "pipeline.config").is_file():
        raise UserError(display_path(folder), f"no run here: `make config DATASET=... RUN={run}` starts one")
    page = render(folder)
    out = folder / REPORT_NAME
    write_text_atomic(out, page)
    return out
