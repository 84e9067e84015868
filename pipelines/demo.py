"""`make demo`: the whole job on the bundled sample, stage by stage, as a user would run it.

sample -> data -> config -> train -> eval (+ report) -> export -> serve -> one request, for a detector
and a segmenter (`--task` picks one). Every stage runs as its own `python -m pipelines ...` process
(what the make target runs) and is announced with the make command that reruns it, so the same
commands work on a user's own dataset. The defaults are sized for a 2-core CPU machine: about 16
minutes in all, with a detector that finds the sample's shapes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines import tasks
from pipelines.workspace import REPO_ROOT, UserError, display_path, resolve_dataset, workspace_dir
from pipelines.data.geometry import box_iou
from pipelines.serving.process import ServerProcess, free_port

DETECTOR_TEMPLATE = "ssd_mobilenet_v2_fpnlite_320x320"
SEGMENTER_TEMPLATE = "unet_mobilenetv2_320x320"


@dataclass
class ModelPlan:
    """One model of the demo: template and the CPU-sized training it gets."""

    task: str
    run: str
    template: str
    image_size: int
    batch: int
    steps: int
    learning_rate: float
    route: str  # the route the demo calls
    optimizer: str | None = None  # OPTIMIZER= of make config (None: the template's)


def default_plans() -> dict[str, ModelPlan]:
    # From scratch on 2 CPU cores: a smaller input than the templates'. The detector trains with Adam
    # (the template's momentum optimizer, made for fine-tuning, learned far less in 800 steps at any
    # peak). The segmenter is the MobileNetV2 U-Net with its light decoder at 96x96: about 45 images/s,
    # so 1400 steps fit in the stage's 5 minutes, and it needs them (800 steps at 128x128: val mean IoU
    # 0.63; the EfficientNet-B0 U-Net at 128x128, 400 steps: 0.35-0.41), at a peak of 0.003 (0.002:
    # 0.61-0.73 by seed); the template's, scaled to batch 8 (0.0005), barely moves in so few steps
    # (bench/RESULTS.md, "make demo", "Detection from scratch" and "Segmenter learning on the sample").
    return {
        "detection": ModelPlan("detection", "demo-detector", DETECTOR_TEMPLATE, 256, 8, 800, 0.003, "/detect",
                               optimizer="adam"),
        "segmentation": ModelPlan("segmentation", "demo-segmenter", SEGMENTER_TEMPLATE, 96, 8, 1400, 0.003,
                                  "/segment"),
    }


def _make(target: str, **variables) -> str:
    return " ".join(["make", target] + [f"{k}={v}" for k, v in variables.items() if v is not None])


class Demo:
    def __init__(self, dataset: str, plans: list[ModelPlan], port: int | None = None, log=print):
        self.dataset = dataset
        self.plans = plans
        self.port = port
        self.log = log
        self.timings: list[tuple[str, float]] = []
        self.started = time.monotonic()

    # ------------------------------------------------------------------------------------ stages

    def stage(self, title: str, make: str, argv: list[str]) -> None:
        """Run `python -m pipelines ARGV`, its output streamed; a failure stops the demo with the command
        to rerun."""
        self.log(f"\n== {title}\n$ {make}", flush=True)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pipelines", *argv], cwd=REPO_ROOT)
        elapsed = time.monotonic() - started
        self.timings.append((title, elapsed))
        if proc.returncode != 0:
            raise UserError(None, f"the demo stopped at '{title}' (exit {proc.returncode}); fix what it says and "
                                  f"rerun it with: {make}")
        self.log(f"-- {title}: {_duration(elapsed)}", flush=True)

    def data(self) -> str:
        # One data stage for every plan: with class masks when a plan's task needs them.
        task = next((p.task for p in self.plans if tasks.get(p.task).class_masks), self.plans[0].task)
        self.stage("data: check the annotator export, write the label map and TFRecords",
                   _make("data", DATASET=self.dataset, TASK=task),
                   ["data", "--dataset", self.dataset, "--task", task])
        return task

    def train_model(self, plan: ModelPlan) -> None:
        size = str(plan.image_size)
        self.stage(f"config: {plan.template} for this dataset -> workspace/{plan.run}/pipeline.config",
                   _make("config", DATASET=self.dataset, MODEL=plan.template, RUN=plan.run, BATCH=plan.batch,
                         STEPS=plan.steps, OPTIMIZER=plan.optimizer, LR=plan.learning_rate, SIZE=size),
                   ["config", "--dataset", self.dataset, "--model", plan.template, "--run", plan.run,
                    "--batch", str(plan.batch), "--steps", str(plan.steps),
                    *(["--optimizer", plan.optimizer] if plan.optimizer else []),
                    "--lr", str(plan.learning_rate), "--size", size])
        self.stage(f"train the {plan.task} model ({plan.steps} steps of {plan.batch} at {size}x{size}, on the CPU)",
                   _make("train", RUN=plan.run), ["train", "--run", plan.run])
        self.stage("eval: metrics on the val images, and the run report",
                   _make("eval", RUN=plan.run), ["eval", "--run", plan.run])
        self.stage("export: SavedModel with the serving signature, and the BentoML model store",
                   _make("export", RUN=plan.run), ["export", "--run", plan.run])

    # ------------------------------------------------------------------------------------- serve

    def serve_once(self, plan: ModelPlan, data_dir: Path) -> dict | list:
        """Start the service on the export, send it one val image, print the answer, stop it."""
        import httpx

        port = self.port or free_port()
        export = workspace_dir() / plan.run / "export"
        filename, encoded, truth, objects = val_example(data_dir)
        try:  # the image as a path from the checkout's root, where the printed commands run
            source = resolve_dataset(self.dataset) / filename
            shown = display_path(source) if source.is_file() else filename
        except UserError:
            shown = filename
        self.log(f"\n== serve: the {plan.task} model over HTTP, one val image sent\n"
                 f"$ {_make('serve', RUN=plan.run, PORT=port)}\n"
                 f"$ curl -F image=@{shown} http://localhost:{port}{plan.route}", flush=True)
        started = time.monotonic()
        server_log = workspace_dir() / plan.run / "demo-serve.log"
        with ServerProcess("pipelines.serving.service:Service", env={"PIPELINES_MODEL": export}, log=server_log,
                           port=port) as server:
            self.log(f"server ready on port {port} after {time.monotonic() - started:.0f} s "
                     f"(log: {display_path(server_log)})")
            response = httpx.post(server.url + plan.route, files={"image": (Path(filename).name, encoded)},
                                  timeout=120)
            if response.status_code != 200:
                raise UserError(server_log, f"{plan.route} answered {response.status_code}: {response.text[:300]}")
            answer = response.json()
        self.timings.append((f"serve {plan.task}", time.monotonic() - started))
        saved = workspace_dir() / plan.run / "demo-answer.json"
        saved.write_text(json.dumps({"image": filename, "truth": truth, "route": plan.route, "answer": answer},
                                    indent=2) + "\n")
        self.log(f"truth for {filename}: {truth}")
        self.log(answer_line(answer))
        if isinstance(answer, dict) and "detections" in answer:
            self.log(compare_line(objects, answer["detections"]))
        self.log(f"answer of POST {plan.route} in short (the whole JSON: {display_path(saved)}):")
        self.log(answer_summary(answer))
        self.log("server stopped")
        return answer

    # ------------------------------------------------------------------------------------ summary

    def summary(self) -> None:
        total = time.monotonic() - self.started
        self.log("\n== done in " + _duration(total))
        for title, seconds in self.timings:
            self.log(f"  {_duration(seconds):>8}  {title}")
        for plan in self.plans:
            run = workspace_dir() / plan.run
            self.log(f"\n{plan.task} ({plan.run}):")
            self.log(f"  {metrics_line(run / 'eval' / 'metrics.json')}")
            self.log(f"  report:  {display_path(run / 'report.html')}  (open it in a browser)")
            self.log(f"  export:  {display_path(run / 'export')}  (BentoML model '{plan.run}')")
            self.log(f"  serve:   {_make('serve', RUN=plan.run)}   package: {_make('bento', RUN=plan.run)}")
        self.log("\nWith your own data: label it (docker/compose.annotator.yml), put the export under datasets/NAME, "
                 "and run the same commands with DATASET=NAME (README.md: From your own images to a served model).")


def metrics_line(path: Path) -> str:
    if not path.is_file():
        return "no metrics"
    metrics = json.loads(path.read_text())
    return tasks.get(tasks.name_in(metrics)).load("summary")(metrics)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def answer_summary(answer, items: int = 8) -> str:
    """The service's JSON in a few lines: the model, then each detection (label, score, box in pixels) or each
    class (share of the pixels, regions and their outline points); at most `items` lines of them."""
    lines = [f"  model {answer['model']['name']}:{answer['model']['version']}, image {answer['width']}x"
             f"{answer['height']}" + (f", score_threshold {answer['score_threshold']:.3f}"
                                      if "score_threshold" in answer else "")]
    if "detections" in answer:
        rows = [f"  {d['label']:<10} {d['score']:.2f}  box x {d['box']['xmin']:.0f}-{d['box']['xmax']:.0f}, "
                f"y {d['box']['ymin']:.0f}-{d['box']['ymax']:.0f}" for d in answer["detections"]]
    else:
        rows = [f"  {c['label']:<10} {100 * c['fraction']:5.1f}% of the pixels, {len(c['polygons'])} region(s), "
                f"{sum(len(p) for p in c['polygons'])} outline points" for c in answer.get("classes", [])]
    return "\n".join(lines + rows[:items] + ([f"  ... and {len(rows) - items} more"] if len(rows) > items else []))


def val_example(data_dir: Path) -> tuple[str, bytes, str, list[tuple[str, tuple[float, ...]]]]:
    """(file name, encoded image, its truth in words, its objects as (label, (xmin, ymin, xmax, ymax) in
    pixels)) of the val image with the most objects (the first of those in the shards' order): one that
    shows what the model does."""
    from pipelines.data.tfrecords import parse_example, read_records

    best = None
    for shard in sorted(data_dir.glob("val-*.tfrecord")):
        for record in read_records(shard):
            example = parse_example(record)
            names = [t.decode() for t in example.get("image/object/class/text", [])]
            if best is None or len(names) > len(best[1]):
                best = (example, names)
    if best is None:
        raise UserError(display_path(data_dir), "no val images to send to the service")
    example, names = best
    width, height = float(example["image/width"][0]), float(example["image/height"][0])
    coords = [example.get(f"image/object/bbox/{k}", []) for k in ("xmin", "ymin", "xmax", "ymax")]
    objects = [(name, (x0 * width, y0 * height, x1 * width, y1 * height))
               for name, x0, y0, x1, y1 in zip(names, *coords)]
    return example["image/filename"][0].decode(), example["image/encoded"][0], _counted(names) or "no objects", objects


def compare_line(objects: list[tuple[str, tuple]], detections: list[dict]) -> str:
    """The served boxes against the image's labels: each detection, best score first, takes the unmatched
    object of its class it overlaps most (IoU >= 0.5, as COCO's AP50 counts a hit)."""
    left = list(range(len(objects)))
    extra = []
    for d in sorted(detections, key=lambda d: -d["score"]):
        box = tuple(d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax"))
        scored = [(box_iou(box, objects[i][1]), i) for i in left if objects[i][0] == d["label"]]
        best = max(scored, default=(0.0, None))
        if best[0] >= 0.5:
            left.remove(best[1])
        else:
            extra.append(f"{d['label']} ({d['score']:.2f})")
    found = len(objects) - len(left)
    missed = _counted([objects[i][0] for i in left]) or "none"
    return (f"matched {found} of {len(objects)} labelled objects (IoU >= 0.5); missed: {missed}; "
            f"extra: {', '.join(extra) or 'none'}")


def _counted(names: list[str]) -> str:
    return ", ".join(f"{names.count(name)} {name}" for name in sorted(set(names)))


def answer_line(answer) -> str:
    """The service's answer in words: what was found."""
    if isinstance(answer, dict) and "detections" in answer:
        found = answer["detections"]
        scores = ", ".join(f"{d['label']} {d['score']:.2f}" for d in found[:10])
        at = f" at score >= {answer['score_threshold']:.2f}" if "score_threshold" in answer else ""
        return f"found{at}: {_counted([d['label'] for d in found]) or 'nothing'}" + (f" ({scores})" if found else "")
    if isinstance(answer, dict) and "classes" in answer:
        parts = [f"{c['label']} {100 * c['fraction']:.1f}% ({len(c['polygons'])} regions)"
                 for c in answer["classes"] if c["class_id"] != 0]
        return "found: " + (", ".join(parts) or "background only")
    return ""


def run_demo(dataset: str, task: str = "both", steps: dict[str, int] | None = None, batch: int | None = None,
             port: int | None = None, sizes: dict[str, int | None] | None = None) -> dict:
    """The demo; returns {task: the service's answer}."""
    from pipelines.config.rewrite import data_dir as data_output_dir

    plans = default_plans()
    chosen = [plans[t] for t in (list(plans) if task == "both" else (task,))]
    for plan in chosen:
        if steps and steps.get(plan.task):
            plan.steps = steps[plan.task]
        if sizes and sizes.get(plan.task):
            plan.image_size = sizes[plan.task]
        if batch:
            plan.batch = batch
    demo = Demo(dataset, chosen, port=port)
    demo.log(f"the demo: {' and '.join(p.task for p in chosen)} on dataset '{dataset}'; every stage's command is "
             "printed before it runs")
    demo.data()
    data_dir = data_output_dir(dataset)
    answers = {}
    for plan in chosen:
        demo.train_model(plan)
        answers[plan.task] = demo.serve_once(plan, data_dir)
    demo.summary()
    return answers
