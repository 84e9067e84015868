"""Benchmark of the data stage: our converter against Model Garden's create_coco_tf_record.

    .venv/bin/python bench/bench_data.py [--images 2000] [--out bench/out] [--repeats 3]

What it does:

1. Generates one coco-annotator export of --images images with `pipelines.data.sample.generate`
   into OUT/export-N (once; reused when it is already there).
2. Prepares ONE input that both converters read (OUT/input-N):
   - images/: a flat folder of symlinks named by `file_name` (Model Garden opens
     `image_dir/file_name` and cannot follow coco-annotator's absolute `path` into batch_*/
     subfolders; file names are unique in the sample). Our converter is pointed at the same folder
     (`--dataset OUT/input-N/images`), so both read the very same files.
   - annotations.json: a cleaned copy of the export (see `clean_export` for what changes and why),
     and annotations-SUBSET.json, the same for the first --subset images (memory flatness).
3. Runs, in the same process, alternating which converter goes first, for "no masks" and "masks":
     Model Garden: python -m official.vision.data.create_coco_tf_record --image_dir ...
                   --object_annotations_file ... --num_processes 2 [--include_masks]
     ours:         python -m pipelines data --dataset ... --annotations ... --workers 2 [--masks]
   each as a subprocess writing its own output folder, --repeats times (medians are reported).
   Both get 2 worker processes (Model Garden's --num_processes, our --workers) for the 2 cores.
   Measured per run: wall time (process start to exit, start-up included) -> images/s;
   the peak of the summed RSS of the process and all its descendants, sampled every 50 ms with
   psutil; the CPU seconds of the process and its workers (os.wait4); and each converter's own
   timing (ours: the conversion time it prints, start-up excluded (it imports no TensorFlow);
   Model Garden: from its "writing to output path" to its "Finished writing" log line, after its
   TensorFlow import).
4. Runs both the same way on the first --subset images (a subset JSON), interleaved with the
   full runs: peak memory at SUBSET vs N images (memory flatness), and the per-image cost without
   start-up, (wall time at N - wall time at SUBSET) / (N - SUBSET): Python start, Model Garden's
   TensorFlow import (~4 s here) and pool start cancel out.
5. Memory runs: every command once more, untimed, sampling every 100 ms the summed PSS
   (proportional set size: a page shared by k processes counts 1/k in each) and "main RSS +
   children USS" (the converter process's RSS plus the pages private to each worker). They are
   separate because reading smaps costs ~20 ms per TensorFlow process, which would slow the
   timed runs.
6. Counts the records (tf.data.TFRecordDataset) and the objects and instance masks in them for
   every output, so that the comparison is checked to be on the same work.

Why three memory numbers: Model Garden's multiprocessing.Pool forks its workers from a parent
that has TensorFlow loaded, so every worker's RSS counts again the copy-on-write pages it
shares with the parent (~350 MB each here, against ~20-40 MB of its own); our workers are
spawned and import no TensorFlow (~45 MB RSS each). Summed RSS (the number asked for) therefore
over-states Model Garden's memory. PSS does not double-count, but
it also divides shared library pages with any other process on the machine that maps them (a
concurrent TensorFlow job lowers it), so it is noisy on a shared machine. "Main RSS + children
USS" counts each page once and is not affected by other processes; it misses only pages the
workers share with each other but not with the parent (a few MB of libraries for ours).
Growth between the --subset and the full run is best read from the summed RSS of the timed runs.

Each run also records the CPU seconds of the converter and its workers (os.wait4) and the CPU
load of everything else on the machine during the run ("other load", in cores), and the CPU
time the hypervisor took away from this VM ("steal"): numbers taken while other jobs ran are not
comparable to a quiet machine, and the table says so.

Raw results go to OUT/results.json and the logs of every run to OUT/runs/*.log; the runs'
TFRecord folders are deleted once counted unless --keep-outputs is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, only bench/ is on sys.path: put the repository root first so that `pipelines`
# is found without installing the project.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipelines  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS etc. before anything imports TensorFlow)

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import threading
import time

import psutil

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
WORKERS = 2  # both converters get the same number of worker processes
RSS_INTERVAL_S = 0.05  # timed runs: summed RSS only, which costs ~0.02 ms per process
PSS_INTERVAL_S = 0.1  # memory runs: reading smaps costs ~20 ms per TensorFlow process


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------

def ensure_export(out: Path, images: int) -> Path:
    """Generate the coco-annotator export once; returns the newest export JSON."""
    from pipelines.data.sample import generate
    from pipelines.data.sources import newest_export

    folder = out / f"export-{images}"
    export = newest_export(folder) if (folder / ".exports").is_dir() else None
    if export is None:
        print(f"generating {images} images into {folder} (once) ...", flush=True)
        started = time.monotonic()
        export = generate(folder, images, seed=0)
        print(f"  done in {time.monotonic() - started:.0f}s", flush=True)
    else:
        print(f"reusing {export}", flush=True)
    return export


def clean_export(data: dict) -> tuple[dict, dict]:
    """A copy of a coco-annotator export that Model Garden's converter reads as ours does.

    Changes, and why (counts are returned):
    - keypoint-only annotations (`segmentation: []`, `bbox: [0,0,0,0]`) are dropped: they carry
      no region; Model Garden skips a zero-size box, ours drops it as "keypoint-only". Removing
      them keeps the annotation lists identical.
    - polygons with fewer than 3 points (coco-annotator's stray 2-point clicks) are removed from
      `segmentation`: with --include_masks Model Garden hands every polygon to pycocotools
      (a 4-number polygon is even taken for a box when it comes first); ours drops them.
    - `bbox` is clipped to the image: Model Garden silently skips every annotation whose box
      runs past the right or bottom edge (`x + w > width`) and keeps negative x/y (writing
      xmin < 0); ours clips polygons to the image and recomputes the box. Unclipped, Model
      Garden would write ~3% fewer objects (and masks) than ours, i.e. do less work.
    - `iscrowd` JSON booleans become 0/1, as the COCO format has them. (Model Garden 2.20
      actually tolerates booleans; this only removes a quirk, it changes no value.)
    Not changed: images (the EXIF-rotated JPEG, the grayscale JPEG, the PNGs and the WebP named
    .jpeg are kept; Model Garden copies their bytes as they are and labels them all 'jpg',
    ours re-encodes the three that need it), `path` (ours resolves it to the same flat
    folder, Model Garden ignores it), extra coco-annotator fields (both ignore them). No `info`
    key is needed: Model Garden's loader reads only images, categories and annotations.
    """
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    stats = {"keypoint_only_dropped": 0, "degenerate_polygons_removed": 0, "bbox_clipped": 0,
             "iscrowd_bool_to_int": 0}
    annotations = []
    for ann in data["annotations"]:
        ann = dict(ann)
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            kept = [p for p in seg if len(p) >= 6]
            stats["degenerate_polygons_removed"] += len(seg) - len(kept)
            ann["segmentation"] = kept
        x, y, w, h = ann["bbox"]
        if not ann.get("segmentation") and (w <= 0 or h <= 0):
            stats["keypoint_only_dropped"] += 1
            continue
        width, height = sizes[ann["image_id"]]
        x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        clipped = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
        if clipped != [round(v, 2) for v in ann["bbox"]]:
            stats["bbox_clipped"] += 1
            ann["bbox"] = clipped
        if isinstance(ann.get("iscrowd"), bool):
            stats["iscrowd_bool_to_int"] += 1
            ann["iscrowd"] = int(ann["iscrowd"])
        annotations.append(ann)
    return {"images": data["images"], "categories": data["categories"], "annotations": annotations}, stats


def subset(data: dict, n: int) -> dict:
    images = data["images"][:n]
    ids = {im["id"] for im in images}
    return {"images": images, "categories": data["categories"],
            "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}


def prepare_input(out: Path, export: Path, images: int, subset_images: int) -> dict:
    folder = out / f"input-{images}"
    image_dir = folder / "images"
    full_json = folder / "annotations.json"
    sub_json = folder / f"annotations-{subset_images}.json"
    data = json.loads(export.read_text())
    root = export.parent.parent
    if image_dir.exists():
        shutil.rmtree(image_dir)
    image_dir.mkdir(parents=True)
    for im in data["images"]:
        # The export's absolute path is /datasets/NAME/<sub>/<file>: its last two parts lie below root.
        source = root.joinpath(*Path(im["path"]).parts[-2:]).resolve()
        link = image_dir / im["file_name"]
        if link.exists() or link.is_symlink():
            raise SystemExit(f"file_name {im['file_name']} is not unique: cannot build a flat image dir")
        link.symlink_to(source)
    cleaned, stats = clean_export(data)
    full_json.write_text(json.dumps(cleaned))
    sub = subset(cleaned, subset_images)
    sub_json.write_text(json.dumps(sub))
    # Warm the page cache so that no run pays for the first read of the images.
    for path in image_dir.iterdir():
        path.read_bytes()
    return {"image_dir": image_dir, "json": {images: full_json, len(sub["images"]): sub_json},
            "cleaning": stats, "annotations": {images: len(cleaned["annotations"]),
                                              len(sub["images"]): len(sub["annotations"])}}


# ----------------------------------------------------------------------------------------------
# Running and measuring
# ----------------------------------------------------------------------------------------------

class TreeSampler(threading.Thread):
    """Peak summed RSS, and with `pss` summed PSS, of a process and all its descendants."""

    def __init__(self, pid: int, pss: bool):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.pss = pss
        self.interval = PSS_INTERVAL_S if pss else RSS_INTERVAL_S
        self.stop = threading.Event()
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_dedup = 0  # RSS of the converter's own process + USS of its descendants
        self.peak_procs = 0
        self.samples = 0

    def _tree(self):
        try:
            return [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def run(self):
        while not self.stop.is_set():
            procs = self._tree()
            rss = pss = dedup = 0
            for p in procs:
                try:
                    if self.pss:
                        info = p.memory_full_info()
                        pss += info.pss
                        dedup += info.rss if p.pid == self.root.pid else info.uss
                    else:
                        info = p.memory_info()
                    rss += info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_dedup = max(self.peak_dedup, dedup)
            self.peak_procs = max(self.peak_procs, len(procs))
            self.samples += 1
            self.stop.wait(self.interval)


def command(converter: str, masks: bool, inp: dict, n: int, out_dir: Path) -> list[str]:
    if converter == "model_garden":
        cmd = [PYTHON, "-m", "official.vision.data.create_coco_tf_record",
               f"--image_dir={inp['image_dir']}", f"--object_annotations_file={inp['json'][n]}",
               f"--output_file_prefix={out_dir / 'train'}", f"--num_shards={max(1, math.ceil(n / 500))}",
               f"--num_processes={WORKERS}"]
        return cmd + (["--include_masks"] if masks else [])
    cmd = [PYTHON, "-m", "pipelines", "data", "--dataset", str(inp["image_dir"]),
           "--annotations", str(inp["json"][n]), "--workers", str(WORKERS), "--out", str(out_dir)]
    return cmd + (["--masks"] if masks else [])


ABSL_TIME = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+) ", re.M)
OURS_TIME = re.compile(r"(\d+) images converted in ([\d.]+)s \(([\d.]+) img/s")


def internal_seconds(converter: str, log: str) -> float | None:
    """The converter's own time for its work, TensorFlow import excluded."""
    if converter == "ours":
        m = OURS_TIME.search(log)
        return float(m.group(2)) if m else None
    # Model Garden: from "writing to output path" (after TF import and flag parsing) to the
    # final "Finished writing" line.
    stamps = []
    for line in log.splitlines():
        if "writing to output path" in line or "Finished writing" in line:
            m = ABSL_TIME.match(line)
            if m:
                h, mi, s = m.groups()
                stamps.append(int(h) * 3600 + int(mi) * 60 + float(s))
    return stamps[-1] - stamps[0] if len(stamps) >= 2 else None


def run_one(converter: str, masks: bool, inp: dict, n: int, out: Path, tag: str, pss: bool = False) -> dict:
    out_dir = out / "runs" / tag
    log_path = out / "runs" / f"{tag}.log"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(converter, masks, inp, n, out_dir)
    with open(log_path, "w") as log:
        cpu_before, self_before = psutil.cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, pss)
        sampler.start()
        # wait4 also returns the CPU time of the converter and of every worker it waited for.
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
        cpu_after, self_after = psutil.cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
    text = log_path.read_text(errors="replace")
    # CPU time spent by anything else on the machine during the run (other users' jobs): the
    # machine's busy time minus the converter's and this script's own (the sampler).
    busy = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("user", "nice", "system", "irq", "softirq"))
    tree_cpu = usage.ru_utime + usage.ru_stime
    self_cpu = (self_after.ru_utime + self_after.ru_stime) - (self_before.ru_utime + self_before.ru_stime)
    other_cores = max(0.0, busy - tree_cpu - self_cpu) / seconds
    result = {"converter": converter, "masks": masks, "images": n, "tag": tag, "rc": rc,
              "seconds": seconds, "images_per_s": n / seconds, "peak_rss_mb": sampler.peak_rss / 2**20,
              "peak_pss_mb": sampler.peak_pss / 2**20 if pss else None, "pss_run": pss,
              "peak_main_rss_children_uss_mb": sampler.peak_dedup / 2**20 if pss else None,
              "peak_processes": sampler.peak_procs, "samples": sampler.samples, "internal_s": internal_seconds(converter, text),
              "cpu_s": tree_cpu, "sampler_cpu_s": self_cpu, "other_load_cores": other_cores,
              "steal_s": getattr(cpu_after, "steal", 0.0) - getattr(cpu_before, "steal", 0.0),
              "out_dir": str(out_dir), "log": str(log_path), "command": cmd}
    status = "ok" if rc == 0 else f"FAILED rc={rc}, see {log_path}"
    memory = (f"peak PSS {result['peak_pss_mb']:6.0f} MB, main RSS + children USS "
              f"{result['peak_main_rss_children_uss_mb']:6.0f} MB" if pss else
              f"peak RSS {result['peak_rss_mb']:6.0f} MB")
    print(f"  {converter:12s} masks={'yes' if masks else 'no ':3s} n={n:5d}: {seconds:6.1f}s "
          f"{n / seconds:6.1f} img/s  {memory}  CPU {tree_cpu:5.1f}s  other load {other_cores:.2f} cores  "
          f"({status})", flush=True)
    if rc != 0:
        print("\n".join(text.splitlines()[-15:]), flush=True)
    return result


def count_output(out_dir: str) -> dict:
    """Records, objects and instance masks in every *.tfrecord below out_dir."""
    import tensorflow as tf

    files = sorted(str(p) for p in Path(out_dir).glob("*.tfrecord"))
    records = objects = masks = 0
    if files:
        for raw in tf.data.TFRecordDataset(files):
            example = tf.train.Example.FromString(raw.numpy())
            feature = example.features.feature
            records += 1
            objects += len(feature["image/object/bbox/xmin"].float_list.value)
            masks += len(feature["image/object/mask"].bytes_list.value)
    return {"files": len(files), "records": records, "objects": objects, "masks": masks}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

NAMES = {"model_garden": "Model Garden", "ours": "ours"}


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    keys = []
    for r in results:
        key = (r["converter"], r["masks"], r["images"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        same = [r for r in results if (r["converter"], r["masks"], r["images"]) == key and r["rc"] == 0]
        runs = [r for r in same if not r["pss_run"]]
        pss_runs = [r for r in same if r["pss_run"]]
        if not runs:
            rows.append({"converter": key[0], "masks": key[1], "images": key[2], "failed": True})
            continue
        internal = [r["internal_s"] for r in runs if r["internal_s"] is not None]
        rows.append({
            "converter": key[0], "masks": key[1], "images": key[2], "runs": len(runs),
            "seconds": statistics.median(r["seconds"] for r in runs),
            "seconds_all": [round(r["seconds"], 2) for r in runs],
            "images_per_s": statistics.median(r["images_per_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "peak_pss_mb": max(r["peak_pss_mb"] for r in pss_runs) if pss_runs else None,
            "peak_dedup_mb": max(r["peak_main_rss_children_uss_mb"] for r in pss_runs) if pss_runs else None,
            "self_reported_s": statistics.median(internal) if internal else None,
            "other_load_cores": max(r["other_load_cores"] for r in runs + pss_runs),
            "steal_s": max(r["steal_s"] for r in runs),
        })
    rows.sort(key=lambda r: (r["masks"], -r["images"], r["converter"] != "model_garden"))
    return rows


def _markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _mb(value) -> str:
    return f"{value:.0f}" if value else "?"


def table(rows: list[dict], counts: dict) -> str:
    """Per converter, mode and size: wall time, throughput, CPU, memory, what was written."""
    head = ["converter", "masks", "images", "runs", "wall s (median)", "images/s", "ours/MG images/s", "CPU s",
            "peak RSS MB (tree sum)", "peak PSS MB (tree sum)", "peak MB (main RSS + workers USS)",
            "records", "objects", "masks written", "other load (cores, max)", "CPU steal s (max)"]
    by_key = {(r["converter"], r["masks"], r["images"]): r for r in rows}
    body = []
    for r in rows:
        key = (r["converter"], r["masks"], r["images"])
        cells = [NAMES[r["converter"]], "yes" if r["masks"] else "no", str(r["images"])]
        if r.get("failed"):
            body.append(cells + ["FAILED"] + [""] * (len(head) - 4))
            continue
        ratio = ""
        mg = by_key.get(("model_garden", r["masks"], r["images"]))
        if r["converter"] == "ours" and mg and not mg.get("failed"):
            ratio = f"**{r['images_per_s'] / mg['images_per_s']:.2f}**"
        c = counts.get(key, {})
        body.append(cells + [str(r["runs"]), f"{r['seconds']:.2f}", f"{r['images_per_s']:.0f}", ratio,
                             f"{r['cpu_s']:.1f}", _mb(r["peak_rss_mb"]), _mb(r["peak_pss_mb"]),
                             _mb(r["peak_dedup_mb"]), str(c.get("records", "?")), str(c.get("objects", "?")),
                             str(c.get("masks", "?")), f"{r['other_load_cores']:.2f}", f"{r['steal_s']:.2f}"])
    return _markdown(head, body)


def marginal(rows: list[dict], n: int, n_sub: int) -> tuple[str, list[dict]]:
    """Cost of the N - SUBSET extra images, so that fixed start-up costs cancel out.

    From the converters' own timings (ours: the conversion time it prints, worker start
    included, a constant; Model Garden: its log span) and, less precisely, from the wall time and CPU time of
    the whole process tree, whose start-up (Model Garden's ~5-7 s TensorFlow import) varies by about a second
    from run to run and can hide a small per-image cost.
    """
    by_key = {(r["converter"], r["masks"], r["images"]): r for r in rows if not r.get("failed")}
    extra = n - n_sub
    out = []
    for masks in (False, True):
        for conv in ("model_garden", "ours"):
            big, small = by_key.get((conv, masks, n)), by_key.get((conv, masks, n_sub))
            if not big or not small or extra <= 0:
                continue
            own = (big["self_reported_s"] - small["self_reported_s"]
                   if big.get("self_reported_s") and small.get("self_reported_s") else None)
            wall = big["seconds"] - small["seconds"]
            cpu = big["cpu_s"] - small["cpu_s"]
            out.append({"converter": conv, "masks": masks, "extra_images": extra, "extra_own_s": own,
                        "marginal_images_per_s": extra / own if own and own > 0 else None,
                        "extra_wall_s": wall, "marginal_wall_images_per_s": extra / wall if wall > 0 else None,
                        "marginal_cpu_ms_per_image": cpu / extra * 1e3})
    head = ["converter", "masks", f"own timing s, {n_sub} -> {n} images", "marginal images/s (own timing)",
            "ours/MG", "marginal images/s (wall)", "CPU ms per extra image (tree)"]
    body = []
    for m in out:
        ratio = ""
        if m["converter"] == "ours":
            mg = next((x for x in out if x["converter"] == "model_garden" and x["masks"] == m["masks"]), None)
            if mg and mg["marginal_images_per_s"] and m["marginal_images_per_s"]:
                ratio = f"**{m['marginal_images_per_s'] / mg['marginal_images_per_s']:.2f}**"
        small = by_key[(m["converter"], m["masks"], n_sub)]["self_reported_s"]
        big = by_key[(m["converter"], m["masks"], n)]["self_reported_s"]
        rate, wall_rate = m["marginal_images_per_s"], m["marginal_wall_images_per_s"]
        cpu = m["marginal_cpu_ms_per_image"]
        body.append([NAMES[m["converter"]], "yes" if m["masks"] else "no",
                     f"{small:.2f} -> {big:.2f}" if small and big else "?",
                     f"{rate:.0f}" if rate else "n/a", ratio,
                     f"{wall_rate:.0f}" if wall_rate else "n/a (start-up noise)",
                     f"{cpu:.2f}" if cpu > 0 else "n/a (start-up noise)"])
    return _markdown(head, body), out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_state() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "pipelines"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return commit + (" + uncommitted changes in pipelines/" if dirty else "")
    except OSError:
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the generated export (default 2000)")
    parser.add_argument("--subset", type=int, default=500,
                        help="images in the subset runs: memory flatness and per-image cost (default 500)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per converter, mode and size (default 3)")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"), help="work folder (default bench/out)")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep every run's TFRecord folder (default: delete them once counted; logs are kept)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n, n_sub = args.images, min(args.subset, args.images)

    print(f"machine: {os.cpu_count()} CPU(s) ({cpu_model()}), "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM, Python {platform.python_version()}", flush=True)
    print(f"code: {git_state()}", flush=True)
    export = ensure_export(out, n)
    inp = prepare_input(out, export, n, n_sub)
    print(f"input: {inp['image_dir']} ({n} symlinks), {inp['json'][n]} ({inp['annotations'][n]} annotations), "
          f"subset {inp['json'][n_sub]} ({n_sub} images, {inp['annotations'][n_sub]} annotations)")
    print(f"cleaning: {inp['cleaning']}", flush=True)

    # Untimed warm-up: the first import of TensorFlow and Model Garden reads ~1 GB of files.
    subprocess.run([PYTHON, "-c", "import pipelines, tensorflow, official.vision.data.create_coco_tf_record, "
                                  "pipelines.data.encode"], cwd=REPO, check=True, capture_output=True)

    results = []
    started = time.monotonic()
    for rep in range(args.repeats):
        print(f"round {rep + 1}/{args.repeats}", flush=True)
        for masks in (False, True):
            for images in ((n, n_sub) if n_sub < n else (n,)):
                # Alternate which converter goes first, so neither always runs on a warmer machine.
                first = (rep + masks + (images == n_sub)) % 2 == 0
                for conv in (("model_garden", "ours") if first else ("ours", "model_garden")):
                    results.append(run_one(conv, masks, inp, images, out,
                                           f"{conv}-{'masks' if masks else 'boxes'}-{images}-r{rep}"))
    # Memory runs: the same commands once more, untimed, sampling PSS and USS (slow to read).
    print("memory runs (PSS and USS sampled every 100 ms; their times are not used)", flush=True)
    for images in ((n, n_sub) if n_sub < n else (n,)):
        for masks in (False, True):
            for conv in ("ours", "model_garden"):
                results.append(run_one(conv, masks, inp, images, out,
                                       f"{conv}-{'masks' if masks else 'boxes'}-{images}-mem", pss=True))
    bench_seconds = time.monotonic() - started

    # Sanity: every output holds one record per image and the same objects and masks.
    counts = {}
    for r in results:
        key = (r["converter"], r["masks"], r["images"])
        if r["rc"] == 0 and not r["pss_run"] and key not in counts:
            counts[key] = count_output(r["out_dir"])
    print("\nrecord counts (first run of each):")
    problems = []
    for key, c in counts.items():
        print(f"  {NAMES[key[0]]:12s} masks={'yes' if key[1] else 'no ':3s} n={key[2]:5d}: {c['records']} records "
              f"in {c['files']} file(s), {c['objects']} objects, {c['masks']} masks")
        if c["records"] != key[2]:
            problems.append(f"{key}: {c['records']} records for {key[2]} images")
    for masks in (False, True):
        for images in (n, n_sub):
            a, b = counts.get(("ours", masks, images)), counts.get(("model_garden", masks, images))
            if a and b and (a["records"], a["objects"], a["masks"]) != (b["records"], b["objects"], b["masks"]):
                problems.append(f"masks={masks} n={images}: ours {a} vs Model Garden {b}")
    print("  same records, objects and masks in both: " + ("yes" if not problems else "NO"))
    for p in problems:
        print("  MISMATCH: " + p)

    if not args.keep_outputs:  # ~75 MB per run; the counts above are kept in results.json
        for r in results:
            shutil.rmtree(r["out_dir"], ignore_errors=True)

    rows = summarise(results)
    print(f"\nresults (wall time and CPU: median of {args.repeats} runs; peak memory: max over runs; RSS from "
          f"the timed runs, PSS and main RSS + workers USS from the memory runs):\n")
    print(table(rows, counts))
    marginal_table, marginal_rows = marginal(rows, n, n_sub)
    if marginal_rows:
        print(f"\nper-image cost without start-up: the {n - n_sub} images between the {n_sub}- and the "
              f"{n}-image runs (medians)\n")
        print(marginal_table)
    by_key = {(r["converter"], r["masks"], r["images"]): r for r in rows}
    print(f"\nmemory flatness, peak at {n_sub} -> {n} images:")
    for conv in ("ours", "model_garden"):
        for masks in (False, True):
            small, big = by_key.get((conv, masks, n_sub)), by_key.get((conv, masks, n))
            if small and big and not small.get("failed") and not big.get("failed") and n_sub < n:
                line = (f"  {NAMES[conv]:12s} masks={'yes' if masks else 'no ':3s}: summed RSS "
                        f"{small['peak_rss_mb']:.0f} -> {big['peak_rss_mb']:.0f} MB "
                        f"({big['peak_rss_mb'] - small['peak_rss_mb']:+.0f})")
                for label, field in (("PSS", "peak_pss_mb"), ("main RSS + workers USS", "peak_dedup_mb")):
                    if small[field] and big[field]:
                        line += (f", {label} {small[field]:.0f} -> {big[field]:.0f} MB "
                                 f"({big[field] - small[field]:+.0f})")
                print(line)
    reported = [r for r in rows if r.get("self_reported_s")]
    if reported:
        print("\nthe converters' own timing (median), beside the wall time: ours = the time our CLI prints on its "
              "last line; Model Garden = its log from 'writing to output path' to 'Finished writing' (after "
              "its TensorFlow import):")
        for r in reported:
            print(f"  {NAMES[r['converter']]:12s} masks={'yes' if r['masks'] else 'no ':3s} n={r['images']:5d}: "
                  f"{r['self_reported_s']:.2f}s ({r['images'] / r['self_reported_s']:.0f} img/s) vs "
                  f"{r['seconds']:.2f}s wall")
    loaded = [r for r in results if r["other_load_cores"] > 0.25]
    if loaded:
        print(f"\nWARNING: {len(loaded)} run(s) shared the machine with other jobs (other load > 0.25 cores): "
              + ", ".join(f"{r['tag']} ({r['other_load_cores']:.2f})" for r in loaded))
    stolen = [r for r in results if r["steal_s"] > 0.25]
    if stolen:
        print(f"\nnote: the hypervisor took CPU time (steal > 0.25 s) in {len(stolen)} run(s): "
              + ", ".join(f"{r['tag']} ({r['steal_s']:.2f} s)" for r in stolen))
    print(f"\nbenchmark runs took {bench_seconds:.0f}s")

    (out / "results.json").write_text(json.dumps({
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(PYTHON).name] + sys.argv), "cpu": cpu_model(), "cpus": os.cpu_count(),
        "ram_gib": psutil.virtual_memory().total / 2**30, "images": n, "subset": n_sub, "repeats": args.repeats,
        "commit": git_state(), "cleaning": inp["cleaning"], "runs": results, "summary": rows,
        "marginal": marginal_rows,
        "counts": [{"converter": k[0], "masks": k[1], "images": k[2], **v} for k, v in counts.items()],
        "problems": problems}, indent=2))
    print(f"raw results: {out / 'results.json'}")
    return 1 if problems or any(r["rc"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
