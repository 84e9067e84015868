"""The data stage end to end: read and check the export, split, write label map, shards, reports."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipelines import tasks
from pipelines.common import ordered_parallel_map
from pipelines.workspace import (UserError, atomic_output_dir, dataset_name, display_path, output_lock, resolve_dataset,
                                 workspace_dir)
from pipelines.data.checks import max_pixels
from pipelines.data.encode import EncodedImage, EncodeOptions, apply_pixel_limit, encode_or_report
from pipelines.data.items import Report
from pipelines.data import tfrecords
from pipelines.data.label_map import write_label_map
from pipelines.data.report import PREVIEW_IMAGES, Tally, contact_sheet, format_table, reports_json
from pipelines.data.sources import discover
from pipelines.data.split import assign_splits

@dataclass
class DataOptions:
    dataset: str
    task: str = tasks.BEFORE_TASK_FIELD  # the one whose TFRecords to write (class masks: tasks.Task.class_masks)
    masks: bool = False
    val_ratio: float = 0.2
    seed: int = 0
    shards: int | None = None
    workers: int | None = None
    skip_invalid: bool = False
    annotations: str | None = None
    val_annotations: str | None = None
    images: str | None = None
    out: str | None = None
    max_pixels: int | None = None  # None: PIPELINES_MAX_PIXELS, else 40 million (as the server)
    allow_outside_images: bool = False  # read image paths that lead out of the dataset/--images folder
    skip_drafts: bool = False  # leave out images that still hold a model's unreviewed drafts


def _first_problem(invalid: list[Report]) -> UserError:
    first = invalid[0]
    more = f" (and {len(invalid) - 1} more problem(s); --skip-invalid drops such items)" if len(invalid) > 1 \
        else " (--skip-invalid drops such items)"
    return UserError(first.file, f"{first.item}: {first.reason}{more}")


def _drafts(sources: list, skip: bool) -> dict:
    """Count the model drafts nobody has reviewed (make prelabel's; pipelines/annotator/drafts.py) and say
    so; with `skip`, leave out every image holding one (its other annotations too: a half-reviewed image
    would teach the model that what its dropped drafts cover is background)."""
    from pipelines.annotator.drafts import DRAFT_COLOR

    held = [(s, im, sum(o.draft for o in im.objects)) for s in sources for im in s.images]
    held = [(s, im, n) for s, im, n in held if n]
    count, images = sum(n for _, _, n in held), len(held)
    if count and skip:
        for source in sources:
            source.images = [im for im in source.images if not any(o.draft for o in im.objects)]
        print(f"left out {images} image(s) that hold {count} unreviewed model draft(s) (SKIP_DRAFTS=1)")
    elif count:
        print(f"warning: {count} annotation(s) on {images} image(s) are model drafts nobody has reviewed (make "
              f"prelabel's colour {DRAFT_COLOR}) and are used as truth: review them in coco-annotator (give each "
              "checked draft another colour) and export again, or leave their images out with SKIP_DRAFTS=1")
    return {"annotations": count, "images": images, "left_out": bool(count and skip)}


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run(opts: DataOptions) -> Path:
    """Run the data stage; returns the output folder. Raises UserError for bad input."""
    try:
        task = tasks.get(opts.task)
    except ValueError as e:
        raise UserError(None, str(e)) from None
    if not 0.0 <= opts.val_ratio < 1.0:
        raise UserError(None, f"val ratio {opts.val_ratio} must be at least 0 and below 1")
    started = time.monotonic()
    pixel_limit = max_pixels(opts.max_pixels)
    apply_pixel_limit(pixel_limit)  # the preview decodes images in this process
    dataset = resolve_dataset(opts.dataset)
    out = Path(opts.out) if opts.out else workspace_dir() / dataset_name(dataset) / "data"
    train_src, val_src = discover(dataset, Path(opts.annotations) if opts.annotations else None,
                                  Path(opts.val_annotations) if opts.val_annotations else None,
                                  Path(opts.images) if opts.images else None,
                                  allow_outside=opts.allow_outside_images)
    sources = [train_src] + ([val_src] if val_src else [])
    print(f"read {train_src.format} annotations: {', '.join(f for s in sources for f in s.annotation_files)}")
    invalid = [r for s in sources for r in s.invalid]
    if invalid and not opts.skip_invalid:
        raise _first_problem(invalid)
    drafts = _drafts(sources, opts.skip_drafts)
    categories = train_src.categories
    if not categories:
        raise UserError(train_src.annotation_files[0], "no categories: nothing to learn")
    if len(categories) > 254 and task.class_masks:
        raise UserError(train_src.annotation_files[0], f"{len(categories)} classes: a class mask holds at most 254")
    names = {c.label_id: c.name for c in categories}

    if val_src is None:
        splits = assign_splits([im.key for im in train_src.images], opts.val_ratio, opts.seed)
        items = [(splits[im.key], im) for im in train_src.images]
        split_info = {"method": "hash of the image path", "val_ratio": opts.val_ratio, "seed": opts.seed}
    else:
        items = [("train", im) for im in train_src.images] + [("val", im) for im in val_src.images]
        split_info = {"method": "separate annotation files"}
    if not items:
        raise UserError(train_src.annotation_files[0], "no usable images")
    counts = {s: sum(1 for split, _ in items if split == s) for s in ("train", "val")}
    workers = opts.workers or default_workers()
    options = EncodeOptions(names=names, instance_masks=opts.masks, class_mask=task.class_masks,
                            max_pixels=pixel_limit, parent_pid=os.getpid())

    tally = Tally(categories)
    dropped = [r for s in sources for r in s.dropped]
    repaired = [r for s in sources for r in s.repaired]
    skipped = list(invalid)
    preview: list[tuple[str, EncodedImage]] = []
    preview_empty: list[tuple[str, EncodedImage]] = []
    # Holding the lock, the run removes every `.NAME.tmp-*` folder killed data runs left (printed).
    with output_lock(out), atomic_output_dir(out) as tmp:
        write_label_map(tmp, categories)
        writers = {s: tfrecords.ShardWriter(tmp, s, tfrecords.shard_count(n, opts.shards))
                   for s, n in counts.items() if n}
        converting = time.monotonic()
        progress = tqdm(total=len(items), unit="img", desc="writing TFRecords", disable=None, mininterval=1)
        try:
            results = ordered_parallel_map(encode_or_report, ((im, options) for _, im in items), workers)
            for (split, source), result in zip(items, results):
                progress.update()
                if isinstance(result, Report):
                    if not opts.skip_invalid:
                        raise _first_problem([result])
                    skipped.append(result)
                    continue
                if result.invalid:  # objects with unusable numbers: left out of the example
                    if not opts.skip_invalid:
                        raise _first_problem(result.invalid)
                    skipped += result.invalid
                writers[split].write(result.example)
                tally.add(split, result)
                dropped += result.dropped
                repaired += result.repaired
                if result.objects and len(preview) < PREVIEW_IMAGES - 1:
                    preview.append((split, result))
                elif not result.objects and not preview_empty:
                    preview_empty.append((split, result))
        finally:
            converting = time.monotonic() - converting
            progress.close()
            for writer in writers.values():
                writer.close()
        if not sum(tally.images.values()):
            raise UserError(train_src.annotation_files[0], "every image was skipped: nothing written")

        summary = {
            "dataset": dataset_name(dataset),
            "source": {"format": train_src.format, "folder": display_path(dataset),
                       "annotation_files": [f for s in sources for f in s.annotation_files]},
            "task": opts.task,
            "instance_masks": opts.masks,
            "split": split_info,
            "images": {"train": tally.images["train"], "val": tally.images["val"],
                       "without_objects": {"train": tally.empty["train"], "val": tally.empty["val"]},
                       "copied": tally.copied, "reencoded": tally.reencoded},
            "classes": tally.classes(),
            "files": {"label_map": "label_map.pbtxt", "label_map_json": "label_map.json",
                      **{s: w.names for s, w in writers.items()}, "preview": "preview.png"},
            "dropped": reports_json(dropped),
            "repaired": reports_json(repaired),
            "skipped_invalid": reports_json(skipped),
            "drafts": drafts,
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8",
                                          errors="backslashreplace")  # a lone surrogate from a JSON name
        contact_sheet(preview + preview_empty, names).save(tmp / "preview.png")

    elapsed = time.monotonic() - started
    total = sum(tally.images.values())
    print(format_table(summary))
    print(f"wrote {display_path(out)}/: label_map.pbtxt, {sum(len(w.names) for w in writers.values())} shard(s) "
          f"({', '.join(f'{s}: {len(w.names)}' for s, w in writers.items())}), summary.json, preview.png")
    print(f"{total} images converted in {converting:.1f}s ({total / max(converting, 1e-9):.0f} img/s, "
          f"{workers} worker(s)); {elapsed:.1f}s in all")
    return out


