"""`python -m pipelines STAGE ...`: one subcommand per stage; the Makefile calls these."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from pipelines import tasks
from pipelines.common import eprint, start_tensorflow, use_replicas
from pipelines.workspace import UserError, datasets_dir, display_path

SAMPLE_NAME = "sample"


def _number_option(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
                   high_open: bool = False):
    """An argparse `type` for every numeric option: `kind` (int or float) within the bounds, refusing what
    float() reads but is no usable number (nan, inf, 1e400) with the same message as a value out of range:
    "must be a finite number above 0, got nan"."""
    bounds = ([f"{'above' if low_open else 'at least'} {low:g}"] if low is not None else []) + \
             ([f"{'below' if high_open else 'at most'} {high:g}"] if high is not None else [])
    if low is not None and high is not None and not (low_open or high_open):
        bounds = [f"from {low:g} to {high:g}"]
    requirement = f"must be {'a whole number' if kind is int else 'a finite number'}" + \
                  (" " + " and ".join(bounds) if bounds else "")

    def parse(text: str):
        shown = text.strip()[:40] or repr(text)
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{requirement}, got {shown}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"{requirement}, got {shown}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


_positive_int = _number_option(int, low=1)
_seed = _number_option(int, low=0)
_positive_float = _number_option(float, low=0, low_open=True)
_ratio = _number_option(float, low=0, high=1, high_open=True)
_score = _number_option(float, low=0, high=1)
_non_negative_int = _number_option(int, low=0)


def _image_size(text: str) -> tuple[int, int]:
    """'256' or '256x320' (height x width) -> (height, width), each at least 32."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or HEIGHTxWIDTH, e.g. 256 or 256x320") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 32:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or HEIGHTxWIDTH, each at least 32")
    return size


def _quantizations(text: str) -> tuple[str, ...]:
    from pipelines.engine.formats import QUANTIZATIONS

    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in QUANTIZATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or text!r}: expected {', '.join(QUANTIZATIONS)} "
                                         "(comma-separated)")
    return names


def add_data_parser(sub) -> None:
    p = sub.add_parser(
        "data", help="annotator export -> label map, TFRecord shards, summary, preview",
        description="Read a dataset folder (coco-annotator export, COCO JSON or Pascal VOC XML), check it, and "
                    "write workspace/NAME/data/: label_map.pbtxt, label_map.json, train-*/val-*.tfrecord shards, "
                    "summary.json and preview.png.")
    p.add_argument("--dataset", required=True,
                   help="a folder name under datasets/, or a path to a dataset folder or annotation file "
                        f"('{SAMPLE_NAME}' is generated on first use)")
    p.add_argument("--task", choices=tasks.names(), default=tasks.BEFORE_TASK_FIELD,
                   help="whose TFRecords to write: segmentation also writes a class-id PNG per image "
                        f"(default: {tasks.BEFORE_TASK_FIELD})")
    p.add_argument("--masks", action="store_true", help="write one instance mask PNG per object")
    p.add_argument("--val-ratio", type=_ratio, default=0.2, help="share of images for validation (default 0.2)")
    p.add_argument("--seed", type=_number_option(int), default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--annotations", help="annotation file to use instead of the newest export / auto-detected one")
    p.add_argument("--val-annotations", help="a separate annotation file for validation (no random split)")
    p.add_argument("--images", help="extra folder to look for images in")
    p.add_argument("--shards", type=_positive_int, help="shards per split (default: one per 500 images)")
    p.add_argument("--workers", type=_positive_int, help="worker processes (default: all cores)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop invalid items (missing images, unknown ids, ...) instead of stopping; "
                        "each is listed in summary.json")
    p.add_argument("--max-pixels", type=_positive_int,
                   help="largest image (width x height) to read (default: PIPELINES_MAX_PIXELS, else 40000000)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="read image paths that lead out of the dataset folder (and --images), e.g. ../x.jpg")
    p.add_argument("--skip-drafts", action="store_true",
                   help="leave out images that still hold a model's unreviewed drafts (make prelabel's, still in "
                        "their draft colour); without it they are used as truth and counted")
    p.add_argument("--out", help="output folder (default workspace/NAME/data)")


def cmd_data(args) -> int:
    from pipelines.data.convert import DataOptions, run

    if args.dataset == SAMPLE_NAME:
        _ensure_sample()
    run(DataOptions(dataset=args.dataset, task=args.task, masks=args.masks, val_ratio=args.val_ratio,
                    seed=args.seed, shards=args.shards, workers=args.workers, skip_invalid=args.skip_invalid,
                    annotations=args.annotations, val_annotations=args.val_annotations, images=args.images,
                    out=args.out, max_pixels=args.max_pixels, allow_outside_images=args.allow_outside_images,
                    skip_drafts=args.skip_drafts))
    return 0


def _ensure_sample(num_images: int = 300) -> None:
    from pipelines.data.sample import ensure_sample

    target = datasets_dir() / SAMPLE_NAME
    if not (target / ".exports").is_dir():
        print(f"generating the bundled sample dataset in {display_path(target)} ({num_images} images)")
        ensure_sample(target, num_images)


def add_config_parser(sub) -> None:
    p = sub.add_parser(
        "config", help="rewrite a pipeline.config template for a dataset -> workspace/RUN/pipeline.config",
        description="Copy a pipeline.config template (configs/MODEL.config or a file) for the dataset's label "
                    "map and TFRecords, and write workspace/RUN/pipeline.config, printing what changed.")
    p.add_argument("--dataset", required=True, help="the dataset name used with `make data`")
    p.add_argument("--model", default="ssd_mobilenet_v2_fpnlite_320x320",
                   help="a template name in configs/ or a path to a pipeline.config")
    p.add_argument("--run", help="run name: writes workspace/RUN/ (default: the dataset name)")
    p.add_argument("--batch", "--batch-size", dest="batch_size", type=_positive_int, help="train_config.batch_size (learning rates scale with it)")
    p.add_argument("--steps", "--num-steps", dest="num_steps", type=_positive_int, help="train_config.num_steps (and the schedule's total_steps)")
    p.add_argument("--checkpoint", help="detection: fine_tune_checkpoint (a ckpt-N prefix; without it the field is "
                                        "removed); segmentation: encoder_weights (a backbone .h5 file, imagenet "
                                        "or none)")
    p.add_argument("--checkpoint-type", choices=("detection", "classification", "full"),
                   help="fine_tune_checkpoint_type (default: the template's, else detection): classification "
                        "restores the backbone, detection the backbone and FPN, full everything (same classes)")
    p.add_argument("--freeze", choices=("backbone", "feature_extractor"),
                   help="train_config.freeze_variables: leave the backbone (or backbone and FPN) untrained")
    p.add_argument("--lr", "--learning-rate", dest="learning_rate", type=_positive_float,
                   help="the schedule's peak learning rate (applied after --batch's scaling; warmup keeps "
                        "its ratio)")
    p.add_argument("--optimizer", choices=("adam", "momentum"),
                   help="train_config.optimizer: adam_optimizer (peak learning rate 0.001 unless --lr) "
                        "or momentum_optimizer (0.9; peak 0.01 unless --lr); the schedule is kept")
    p.add_argument("--size", "--image-size", dest="image_size", type=_image_size, metavar="HxW|N",
                   help="the network's input size (image_resizer.fixed_shape_resizer), e.g. 256 or 256x320")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of initialisation, data order and augmentation (default 0), written to "
                        "workspace/RUN/run.json: the same seed gives the same training on the same CPU machine")


def cmd_config(args) -> int:
    from pipelines.config.rewrite import ConfigOptions, write_run_config

    from pipelines.runs import record_seed

    out = write_run_config(ConfigOptions(dataset=args.dataset, model=args.model, run=args.run,
                                         batch_size=args.batch_size, num_steps=args.num_steps,
                                         checkpoint=args.checkpoint, checkpoint_type=args.checkpoint_type,
                                         learning_rate=args.learning_rate, image_size=args.image_size,
                                         freeze=args.freeze, optimizer=args.optimizer))
    record_seed(out.parent, args.seed)
    print(f"seed {args.seed} (initialisation, data order, augmentation) in {display_path(out.parent / 'run.json')}")
    return 0


def add_run_parsers(sub) -> None:
    p = sub.add_parser("train", help="train the detector or segmenter of workspace/RUN/pipeline.config",
                       description="Train from workspace/RUN/pipeline.config (a detector with Model Garden, or a "
                                   "segmentation_models segmenter); checkpoints and TensorBoard summaries go to "
                                   "workspace/RUN/train/. Started again, it resumes from the last checkpoint. A "
                                   "segmenter is evaluated on the val shards as it trains and its best checkpoint "
                                   "by val mean IoU is kept in workspace/RUN/train/best/.")
    p.add_argument("--run", required=True, help="run name under workspace/ (or a run folder)")
    p.add_argument("--seed", type=_seed, help="seed of initialisation, data order and augmentation, recorded in "
                                           "workspace/RUN/run.json (default: the run's, which make config wrote)")
    p.add_argument("--eval-every", type=_non_negative_int,
                   help="evaluate on the val shards every N steps (in whole loops) and at the end, keeping the best "
                        "checkpoint (detection: by COCO AP, segmentation: by mean IoU); 0: no evaluation during "
                        "training (default: five per run for a detector, ten for a segmenter)")
    p.add_argument("--with-eval", action="store_true", help=argparse.SUPPRESS)  # evaluation is on by default now
    p.add_argument("--replicas", type=_positive_int,
                   help="replicas of the model, the batch split between them (tf.distribute.MirroredStrategy): with "
                        "GPUs the first N (default all); on a CPU N logical devices (default 1: a check of the "
                        "multi-GPU path, not faster)")
    p.add_argument("--workers", type=_positive_int,
                   help="training processes on this machine, one tf.distribute.MultiWorkerMirroredStrategy cluster "
                        "on loopback ports (worker 0, the chief, writes the run); on a cluster, run make train on "
                        "each node with its TF_CONFIG instead (docs/training.md)")
    p.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="who starts the --workers: local (processes on this machine) or ray (Ray Train's "
                        "TensorflowTrainer, on the cluster RAY_ADDRESS names or a local one; make ray-setup "
                        "installs it; default 2 workers)")
    p = sub.add_parser("eval", help="metrics on the val shards (COCO AP or IoU) -> workspace/RUN/eval/",
                       description="Evaluate a trained run on the validation TFRecords (its best checkpoint when "
                                   "training kept one, else the latest). Detection: COCO metrics with "
                                   "pycocotools; writes eval/metrics.json, pr_curve.png, predictions.png. "
                                   "Segmentation: mean and "
                                   "per-class IoU, pixel accuracy and the confusion matrix at each image's own "
                                   "resolution; writes eval/metrics.json, confusion_matrix.png, predictions.png.")
    p.add_argument("--run", required=True, help="run name under workspace/ (or a run folder)")
    p.add_argument("--checkpoint", help="a checkpoint prefix (workspace/RUN/train/ckpt-N) instead of the best or latest")
    p.add_argument("--model", help="a .tflite or .onnx file of the run's export (make export FORMAT=...) to measure "
                                   "instead, by the same code; writes workspace/RUN/eval-<file name>/")
    p = sub.add_parser("export", help="SavedModel with a stable serving signature -> workspace/RUN/export/, BentoML store",
                       description="Export a trained run as a SavedModel, check it against the checkpoint and "
                                   "record it in the BentoML model store (its best checkpoint when training kept "
                                   "one, else the latest). Detection: "
                                   "serving_default takes uint8 images and returns num_detections, detection_boxes, "
                                   "detection_scores, detection_classes. Segmentation: uint8 "
                                   "images of any size in, segmentation_mask and probabilities at that size out. "
                                   "--format tflite|onnx|all also writes device files (model.tflite, "
                                   "model_fp16.tflite, model_int8.tflite, model.onnx) and labels.txt, each measured "
                                   "beside the SavedModel: size, latency, and the val metric.")
    p.add_argument("--run", required=True, help="run name under workspace/ (or a run folder)")
    p.add_argument("--checkpoint", help="a checkpoint prefix (workspace/RUN/train/ckpt-N) instead of the best or latest")
    p.add_argument("--name", help="BentoML model name (default: the run name)")
    p.add_argument("--format", choices=("savedmodel", "tflite", "onnx", "all"), default="savedmodel",
                   help="savedmodel (default; always written: serving and the accuracy reference use it), tflite "
                        "(also the --quant TFLite files), onnx (also model.onnx), all (also every TFLite "
                        "quantization and ONNX)")
    p.add_argument("--quant", type=_quantizations,
                   help="TFLite quantizations, comma-separated: none (model.tflite), float16 (model_fp16.tflite), "
                        "int8 (model_int8.tflite, calibrated on the run's training images); default none, all with "
                        "--format all")
    p = sub.add_parser("predict", help="run an exported model on images: JSON + drawn images or masks",
                       description="Run workspace/RUN/export on image files. Detection: prints JSON (label, "
                                   "class_id, score, box in pixels) and writes each image with its boxes drawn. "
                                   "Segmentation: prints each class's pixel area as JSON and writes the class mask "
                                   "as a palette PNG and an overlay.")
    p.add_argument("images", nargs="+", help="image files")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="the run whose export to use (workspace/RUN/export)")
    which.add_argument("--model", help="an export folder (workspace/RUN/export), its saved_model folder or one of "
                                       "its .tflite or .onnx files")
    p.add_argument("--score", "--score-threshold", dest="score_threshold", type=_score,
                   help="detection: drop detections below this score (default: the export's, chosen on the val set "
                        "by make eval; 0.5 for an export without one)")
    p.add_argument("--out", help="folder for the drawn images (default: workspace/RUN/predictions)")

    p = sub.add_parser("report", help="one self-contained HTML page about a run -> workspace/RUN/report.html",
                       description="Write workspace/RUN/report.html (images inlined): the dataset summary and "
                                   "preview, the config and what make config changed, training curves from the "
                                   "TensorBoard event files, the evaluation's tables and plots, val predictions "
                                   "next to the truth. make eval writes it too.")
    p.add_argument("--run", required=True, help="run name under workspace/ (or a run folder)")


def _engine_errors(fn):
    """Missing checkpoints, records without masks, encoder weights that cannot be loaded: raised
    deep in the engines, they are user errors here."""
    def wrapped(args):
        from pipelines.detection.zoo import CheckpointError
        from pipelines.segmentation.model import EncoderWeightsError

        try:
            return fn(args)
        except (FileNotFoundError, EncoderWeightsError, CheckpointError) as e:
            raise UserError(None, str(e)) from None
    return wrapped


def _log(line: str) -> None:
    print(line, flush=True)


def add_import_parser(sub) -> None:
    p = sub.add_parser("import", help="an Object Detection API zoo model as a run -> workspace/RUN/ (eval, export, "
                                      "serve it like any other)",
                       description="Turn an extracted Object Detection API model-zoo folder (pipeline.config, "
                                   "checkpoint/ckpt-0.*) into workspace/RUN/: its pipeline.config, the weights as a "
                                   "checkpoint of this pipeline (train/ckpt-0) and a label map.")
    p.add_argument("--zoo", required=True, help="the extracted zoo folder (e.g. ssd_mobilenet_v2_fpnlite_320x320_"
                                                "coco17_tpu-8/)")
    p.add_argument("--run", help="run name (default: the zoo folder's name)")
    p.add_argument("--label-map", help="the model's label map (default: configs/mscoco_label_map.pbtxt, COCO's 90 ids)")
    p.add_argument("--force", action="store_true", help="replace an existing workspace/RUN/")


@_engine_errors
def cmd_import(args) -> int:
    from pipelines.detection.zoo_import import import_zoo

    import_zoo(Path(args.zoo), args.run, Path(args.label_map) if args.label_map else None, force=args.force, log=_log)
    return 0


@_engine_errors
def cmd_train(args) -> int:
    from pipelines.runs import check_memory, load_run

    if args.seed is not None:
        _record_train_seed(args.run, args.seed)
    if (args.workers and args.workers > 1) or args.launcher == "ray":
        from pipelines.engine import workers

        load_run(args.run)  # what is missing, said once here rather than by every worker
        passed = [("--eval-every", args.eval_every), ("--replicas", args.replicas)]
        train_args = ["--run", args.run, *[f"{o}={v}" for o, v in passed if v is not None]]
        if args.launcher == "ray":
            return workers.launch_ray(args.workers or 2, train_args, log=_log)
        return workers.launch(args.workers, train_args, log=_log)
    params, folder, notes, task = load_run(args.run)
    told = folder / "pipeline.config.diff"  # `make config` wrote its notes there after printing them
    told = told.read_text(encoding="utf-8").splitlines() if told.is_file() else []
    for note in notes:
        if f"# note: {note}" not in told:
            print(f"note: {note}")
    check_memory(task, params, display_path(folder / "pipeline.config"))
    train = task.load("train")
    try:
        evaluate = args.eval_every != 0 and bool(params.eval_files)
        train(params, folder, log=_log, mode="train_and_eval" if evaluate else "train",
              eval_every=args.eval_every or None)
    except ValueError as e:  # the data the config points at cannot be used (no files, no masks, bad settings)
        raise UserError(display_path(folder / "pipeline.config"), str(e)) from None
    except Exception as e:  # noqa: BLE001  damaged records, or a worker of a cluster gone
        import tensorflow as tf

        from pipelines.engine import distribute

        if isinstance(e, tf.errors.DataLossError):  # TensorFlow's message names no file
            first = next((line.strip() for line in str(e.message).splitlines() if line.strip()), "")
            first = re.sub(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:.*$", "", first)
            raise UserError(display_path(folder / "pipeline.config"),
                            f"a record of {', '.join(params.train_files + params.eval_files)} cannot be read "
                            f"({first[:200]}): make data again") from None
        lost = distribute.lost_worker(e)
        if lost is None:
            raise
        raise UserError(None, lost) from None
    print(f"next: make eval RUN={args.run}")
    return 0


def _record_train_seed(run: str, seed: int) -> None:
    """`make train SEED=N`: the run's seed becomes N (run.json), unless it has trained with another."""
    from pipelines import checkpoints
    from pipelines.runs import RUN_JSON, read_seed, record_seed, run_dir

    folder = run_dir(run)
    if not (folder / "pipeline.config").is_file() or read_seed(folder) == seed:
        return  # load_run says what is missing
    before = read_seed(folder)
    if checkpoints.latest(folder):
        raise UserError(display_path(folder / RUN_JSON),
                        f"{run} has trained with seed {before}; another seed needs a new run (make config ... "
                        f"RUN=NEW SEED={seed}) or its train/ folder removed")
    record_seed(folder, seed)
    print(f"seed {seed} (was {before}) recorded in {display_path(folder / RUN_JSON)}")


@_engine_errors
def cmd_eval(args) -> int:
    from pipelines.engine.evaluate import evaluate
    from pipelines.runs import load_run

    params, folder, _, task = load_run(args.run)
    if args.model:
        if args.checkpoint:
            raise UserError(None, "give --checkpoint or --model, not both")
        evaluate(params, folder, model=Path(args.model), log=_log, task=task)
        return 0
    evaluate(params, folder, checkpoint=args.checkpoint, log=_log, task=task)
    _write_report(args.run)
    print(f"next: make export RUN={args.run}")
    return 0


def _write_report(run: str) -> None:
    from pipelines.report import write_report

    print(f"wrote {display_path(write_report(run))} (open it in a browser)")


def cmd_report(args) -> int:
    _write_report(args.run)
    return 0


def _device_files(kind: str, quantizations: tuple[str, ...] | None) -> tuple[str, ...]:
    """The files of --format KIND --quant Q,... beside the SavedModel."""
    from pipelines.engine.formats import ONNX_FILE, QUANTIZATIONS

    if kind in ("savedmodel", "onnx") and quantizations:
        raise UserError(None, "--quant is for TFLite files: add --format tflite or all (make export FORMAT=tflite "
                              "QUANT=...)")
    tflite = {"savedmodel": (), "onnx": (), "tflite": quantizations or ("none",),
              "all": quantizations or tuple(QUANTIZATIONS)}[kind]
    return tuple(QUANTIZATIONS[q] for q in tflite) + ((ONNX_FILE,) if kind in ("onnx", "all") else ())


@_engine_errors
def cmd_export(args) -> int:
    from pipelines.engine.export import export
    from pipelines.runs import load_run

    params, folder, _, task = load_run(args.run, need_data=False)
    export(params, folder, params.label_map_path, name=args.name or folder.name, checkpoint=args.checkpoint,
           device_files=_device_files(args.format, args.quant), log=_log, task=task)
    return 0


@_engine_errors
def cmd_predict(args) -> int:
    from pipelines.engine.predict import predict, print_json

    from pipelines.runs import run_dir

    model = Path(args.model) if args.model else run_dir(args.run) / "export"
    options = {name: getattr(args, name) for name in tasks.of_export(model).predict_options}
    print_json(predict(model, [Path(p) for p in args.images], Path(args.out) if args.out else None,
                       log=eprint, **options))
    return 0


def add_prelabel_parser(sub) -> None:
    p = sub.add_parser("prelabel", help="a run's model drafts a dataset's labels -> a COCO file coco-annotator imports",
                       description="Run workspace/RUN/export over the images of a dataset folder (by default those "
                                   "without any annotation in its newest coco-annotator export) and write "
                                   "workspace/RUN/prelabel/<dataset>-<time>.json: the drafts as a COCO file for "
                                   "coco-annotator's import (categories by name, images by file name, boxes as "
                                   "4-corner polygons), each marked as a draft (colour #ff00ff, metadata). With --annotator-url "
                                   "(ANNOTATOR_URL) it also uploads the file to coco-annotator and reports the "
                                   "import.")
    p.add_argument("--run", required=True, help="run name under workspace/ (or a run folder) with an export")
    p.add_argument("--dataset", required=True, help="a folder name under datasets/, or a path to the dataset folder")
    p.add_argument("--only-unlabelled", type=int, choices=(0, 1), default=1,
                   help="1 (default): draft only images without annotations; 0: every image")
    p.add_argument("--all-images", action="store_true", help="the same as --only-unlabelled 0")
    p.add_argument("--annotations", help="the COCO file that says which images are labelled (default: the newest "
                                         "export, .exports/coco-*.json)")
    p.add_argument("--score", "--score-threshold", dest="score_threshold", type=_score,
                   help="detection: draft boxes at or above this score (default: the export's, as /detect)")
    p.add_argument("--max-detections", type=_positive_int, help="detection: at most this many boxes per image")
    p.add_argument("--min-area", type=_non_negative_int, help="segmentation: draft regions of at least this many pixels "
                                                "(default: PIPELINES_ANNOTATE_MIN_AREA, else 16)")
    p.add_argument("--suggested", metavar="FILE", help="a make suggest file (workspace/RUN/suggest/*.json): draft "
                                                      "exactly its images, in its order")
    p.add_argument("--upload", metavar="FILE", help="upload this prelabel file instead of drafting a new one")
    add_annotator_arguments(p)


def add_suggest_parser(sub) -> None:
    from pipelines.annotator.suggest import CANDIDATES, DEFAULT_COUNT, DEFAULT_STRATEGY, STRATEGIES

    p = sub.add_parser("suggest", help="a run's model picks which unlabelled images of a dataset to label next",
                       description="Rank the images of a dataset folder that have no annotation in its newest "
                                   "coco-annotator export with workspace/RUN/export, print the COUNT best with each "
                                   "one's reason, and write workspace/RUN/suggest/<dataset>-<time>.json (make "
                                   "prelabel SUGGESTED=that file drafts exactly them). Strategies: uncertainty (what "
                                   "the model is least sure of), diversity (k-center on image features: no two "
                                   f"near-copies), hybrid (k-center among the {CANDIDATES} x COUNT most uncertain; "
                                   "the default), random (the baseline).")
    p.add_argument("--run", required=True, help="run name under workspace/ (or a run folder) with an export")
    p.add_argument("--dataset", required=True, help="a folder name under datasets/, or a path to the dataset folder")
    p.add_argument("--count", type=_positive_int, default=DEFAULT_COUNT,
                   help=f"how many images to suggest (default {DEFAULT_COUNT})")
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                   help=f"how to pick them (default {DEFAULT_STRATEGY})")
    p.add_argument("--seed", type=_seed, default=0, help="seed of random draws and ties (default 0)")
    p.add_argument("--annotations", help="the COCO file that says which images are labelled (default: the newest "
                                         "export, .exports/coco-*.json)")


def cmd_suggest(args) -> int:
    from pipelines.annotator.suggest import suggest, summary_lines

    if args.dataset == SAMPLE_NAME:
        _ensure_sample()
    result = suggest(args.run, args.dataset, count=args.count, strategy=args.strategy, seed=args.seed,
                     annotations=args.annotations, log=_log)
    for line in summary_lines(result, args.run, args.dataset):
        print(line, flush=True)
    return 0


def add_annotator_arguments(p) -> None:
    p.add_argument("--annotator-url", default=os.environ.get("ANNOTATOR_URL"),
                   help="coco-annotator's address, e.g. http://localhost:5000 (default: ANNOTATOR_URL); the "
                        "password is read from ANNOTATOR_PASSWORD")
    p.add_argument("--annotator-user", default=os.environ.get("ANNOTATOR_USER"),
                   help="coco-annotator user name (default: ANNOTATOR_USER)")
    p.add_argument("--annotator-dataset", default=os.environ.get("ANNOTATOR_DATASET"),
                   help="coco-annotator dataset id or name (default: ANNOTATOR_DATASET, else the dataset's folder name)")
    p.add_argument("--annotator-timeout", type=_positive_float, default=600.0,
                   help="seconds to wait for coco-annotator's import task (default 600)")


def cmd_prelabel(args) -> int:
    from pipelines.annotator.prelabel import prelabel, summary_lines

    if args.upload:
        path = Path(args.upload)
        if not path.is_file():
            raise UserError(args.upload, "no such file")
    else:
        if args.dataset == SAMPLE_NAME:
            _ensure_sample()
        result = prelabel(args.run, args.dataset, only_unlabelled=bool(args.only_unlabelled) and not args.all_images, annotations=args.annotations,
                          suggested=args.suggested, log=_log, score_threshold=args.score_threshold, max_detections=args.max_detections,
                          min_area=args.min_area)
        for line in summary_lines(result):
            print(line, flush=True)
        path = result.path
    if args.annotator_url and path is not None:
        from pipelines.annotator.client import upload_drafts

        upload_drafts(path, args.annotator_url, args.annotator_user, os.environ.get("ANNOTATOR_PASSWORD"),
                      args.annotator_dataset or Path(args.dataset).name, timeout=args.annotator_timeout, log=_log)
    elif path is not None:
        print("import it in coco-annotator (the dataset's Import COCO button), or upload it: the same command with "
              "ANNOTATOR_URL, ANNOTATOR_USER, ANNOTATOR_PASSWORD (make prelabel ... UPLOAD=file to send this one)",
              flush=True)
    return 0


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate the bundled sample dataset (coco-annotator layout)",
                       description="Write a deterministic coco-annotator dataset folder of shapes, with the "
                                   "export quirks of the real tool.")
    p.add_argument("--out", default=str(datasets_dir() / SAMPLE_NAME), help="folder to write (replaced)")
    p.add_argument("--images", "--num-images", dest="num_images", type=_positive_int, default=300,
                   help="number of images (default 300)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")


def cmd_sample(args) -> int:
    from pipelines.data.sample import generate

    export = generate(Path(args.out), args.num_images, args.seed)
    print(f"wrote {args.num_images} images and {display_path(export)}")
    return 0


def add_serving_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve a run's export (or a model-store tag) over HTTP: /detect, /segment, ...",
                       description="Start the BentoML service (pipelines.serving.service:Service) for a run's export "
                                   "or a BentoML model-store tag; docs/serving.md lists its endpoints.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="the run whose export to serve (workspace/RUN/export, after `make export`)")
    which.add_argument("--model", help="a model-store tag, NAME:VERSION (`make export` prints it)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                                                      "0.0.0.0 exposes it: set PIPELINES_API_TOKEN then)")
    p.add_argument("--port", type=_number_option(int, low=1, high=65535), default=3000, help="port (default 3000)")
    from pipelines.serving.bento import add_arguments

    add_arguments(sub.add_parser("bento", help="a Bento (model + code + requirements.lock) in the bento store",
                                 description="Build a Bento of a run's export or of a model-store tag, in the bento "
                                             "store under $BENTOML_HOME (default ~/bentoml). Nothing is downloaded."))


def cmd_serve(args) -> int:
    from pipelines.runs import run_dir
    from pipelines.serving import serve

    os.environ["PIPELINES_MODEL"] = args.model or str(run_dir(args.run) / "export")
    serve.main(["pipelines.serving.service:Service", "--host", args.host, "--port", str(args.port)])
    return 0


def cmd_bento(args) -> int:
    from pipelines.serving import bento

    return bento.run(args)


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole job on the bundled sample: data, config, train, eval, export, serve",
                       description="Run every stage on the bundled sample (generated on first use), printing the make "
                                   "command of each: data -> config -> train -> eval (+ report) -> export -> serve "
                                   "one val image, for a detector and a segmenter. About 16 minutes on 2 CPU cores.")
    p.add_argument("--task", choices=("both", "detection", "segmentation"), default="both",
                   help="which models to train (default: both)")
    p.add_argument("--dataset", default=SAMPLE_NAME,
                   help=f"dataset name or folder (default: '{SAMPLE_NAME}', generated if missing)")
    p.add_argument("--num-images", type=_positive_int, default=300, help="images of the sample when it is generated")
    p.add_argument("--detector-steps", type=_positive_int, help="training steps of the detector (default 800)")
    p.add_argument("--segmenter-steps", type=_positive_int, help="training steps of the segmenter (default 1400)")
    p.add_argument("--detector-size", type=_positive_int, help="input size of the detector (default 256)")
    p.add_argument("--batch", "--batch-size", dest="batch_size", type=_positive_int,
                   help="batch size of both models (default 8)")
    p.add_argument("--port", type=_number_option(int, low=1, high=65535),
                   help="port of the demo's server (default: a free one)")


def cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    if args.dataset == SAMPLE_NAME:
        _ensure_sample(args.num_images)
    run_demo(args.dataset, task=args.task, batch=args.batch_size, port=args.port,
             steps={"detection": args.detector_steps, "segmentation": args.segmenter_steps},
             sizes={"detection": args.detector_size})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines",
                                     description="Annotator exports to trained, served detection and "
                                                 "segmentation models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    add_sample_parser(sub)
    add_data_parser(sub)
    add_config_parser(sub)
    add_import_parser(sub)
    add_run_parsers(sub)
    add_prelabel_parser(sub)
    add_suggest_parser(sub)
    add_serving_parsers(sub)
    add_demo_parser(sub)
    return parser


COMMANDS = {"sample": cmd_sample, "data": cmd_data, "config": cmd_config, "import": cmd_import,
            "train": cmd_train, "eval": cmd_eval,
            "export": cmd_export, "predict": cmd_predict, "report": cmd_report, "prelabel": cmd_prelabel,
            "suggest": cmd_suggest,
            "serve": cmd_serve, "bento": cmd_bento, "demo": cmd_demo}
# Stages that start no TensorFlow devices in this process (the data stage writes records without a model;
# the server's workers start their own).
WITHOUT_TENSORFLOW = ("sample", "data", "serve", "bento")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command not in WITHOUT_TENSORFLOW:
            start_tensorflow()
        if args.command == "train":
            from pipelines.engine import distribute

            try:
                use_replicas(args.replicas)
                if distribute.multi_worker() and not (args.workers or 0) > 1 and args.launcher != "ray":
                    distribute.start_cluster()  # before TensorFlow runs anything
            except ValueError as e:
                raise UserError(None, str(e)) from None
        return COMMANDS[args.command](args)
    except UserError as e:
        eprint(f"error: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        eprint("interrupted: nothing was written")
        return 130
