"""`make suggest` against picking at random, by simulation on real labels, side by side in one run.

    .venv/bin/python bench/bench_suggest.py [--dataset ../shared/external/bccd_voc/BCCD | sample]
        [--strategies random,hybrid,uncertainty,diversity] [--seeds 0,1] [--initial 20] [--per-round 20]
        [--rounds 5] [--steps 600] [--size 256] [--batch 8] [--out /tmp/bench-suggest]
        [--retrain ROUND [--retrain-seed-offset 100]] [--typicality]

A labelled dataset is split once into a pool and a fixed test set (BCCD: its own test list; a
coco-annotator folder such as the bundled sample: 20% drawn with seed 0); the pool leaves out images without
any object (make suggest would take them for unlabelled ones). The pool's images are linked into
a dataset folder whose labels are hidden: a COCO file lists the labelled ones only. For each seed, `--initial`
pool images drawn with that seed are labelled; then, round after round, each strategy's arm goes through
what a user runs, each command in its own process: `make data` (the labelled images, the test set as val),
`make config` (the same schedule every round: --steps of --batch at --size, seeded), `make train` (no
evaluation during training), `make eval` (COCO AP on the test set, or mean IoU with --task segmentation),
`make export`, and `make suggest --strategy S --count PER_ROUND`, whose images' labels are then revealed.
The first round is the same for every strategy of a seed (trained once).

With `--cost RUN_FOLDER [--cost-images 1000] [--cost-repeats 3]` it measures instead what ranking costs
against predicting: the bundled sample generator writes that many images, all taken as unlabelled (an empty
annotation file), and RUN_FOLDER's export drafts them all (`make prelabel`: one prediction pass, drafts written) and
ranks them all (`make suggest`, hybrid), each command timed as a whole, start-up included, the two taking
turns --cost-repeats times.

With `--retrain ROUND` it trains each seed's and strategy's labelled set of that round (of the runs OUT holds)
once more with another seed, and prints both trainings' metric: how much of a gap between strategies is the
training's own noise rather than the images picked.

With `--typicality` it reports, for the runs OUT holds, how typical each strategy's picks were: where each
picked image ranks in typicality among the images unlabelled when it was picked (0 the least typical, 1 the
most; a random draw averages 0.5), in the feature space of the export that picked it (the image features
`make suggest` uses). Typicality is the inverse mean distance to the 20 nearest unlabelled images (TypiClust's
measure, Hacohen et al. 2022, who find typical images worth more than outlying ones at small budgets).

Printed and written (OUT/results.json, OUT/curves.png): the metric against the number of labelled images
per strategy and seed, and their mean; for each strategy, the labelled images it needed to reach what
`random` reaches at the last round (linear interpolation between rounds; "not reached" otherwise) and the
saving against random's count, and the same counted in labelled boxes (the objects a person draws: a
strategy that picks fuller images labels more boxes per image); the mean time of a suggest against its
training round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sh(args: list[str], env: dict, log: Path) -> str:
    """One of our CLI commands (what the make target runs), its output kept in `log`."""
    proc = subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    log.write_text(f"$ {' '.join(args)}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"`python -m pipelines {' '.join(args)}` failed ({log}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def voc_as_coco(root: Path) -> dict:
    """A Pascal VOC folder's boxes as one COCO dict (file names: the JPEGImages files)."""
    from lxml import etree

    names, images, annotations = {}, [], []
    for xml in sorted((root / "Annotations").glob("*.xml")):
        tree = etree.parse(str(xml))
        file_name = tree.findtext("filename").strip()
        if not (root / "JPEGImages" / file_name).is_file():
            file_name = xml.stem + ".jpg"
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": int(float(tree.findtext("size/width"))),
                       "height": int(float(tree.findtext("size/height")))})
        for obj in tree.iterfind("object"):
            name = obj.findtext("name").strip()
            box = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            category = names.setdefault(name, len(names) + 1)
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in sorted(names.items(), key=lambda x: x[1])]}


def load_dataset(dataset: str) -> tuple[dict, dict[str, Path], set[str] | None]:
    """(COCO dict with base file names, {file name: image file}, the test set's names when the dataset has its own)."""
    from pipelines.annotator.prelabel import dataset_images
    from pipelines.data.sources import newest_export
    from pipelines.workspace import resolve_dataset

    folder = resolve_dataset(dataset)
    if (folder / "Annotations").is_dir():
        coco = voc_as_coco(folder)
        files = {p.name: p for p in (folder / "JPEGImages").iterdir()}
        test_list = folder / "ImageSets" / "Main" / "test.txt"
        test = {line.strip() + ".jpg" for line in test_list.read_text().split()} if test_list.is_file() else None
        return coco, files, test
    export = newest_export(folder)
    if export is None:
        raise SystemExit(f"{folder}: neither a VOC folder nor a dataset folder with an export")
    coco = json.loads(export.read_text())
    files = {p.name: p for p in dataset_images(folder)}
    for image in coco["images"]:
        image["file_name"] = Path(str(image.get("file_name") or image.get("path")).replace("\\", "/")).name
    return coco, files, None


def subset(coco: dict, names: set[str]) -> dict:
    images = [im for im in coco["images"] if im["file_name"] in names]
    ids = {im["id"] for im in images}
    return {"images": images, "categories": coco["categories"],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def metric(workspace: Path, task: str) -> float:
    m = json.loads((workspace / "al" / "eval" / "metrics.json").read_text())["metrics"]
    return m["AP"] if task == "detection" else m["mean_iou"]


def train_round(arm: Path, labelled: set[str], coco: dict, out: Path, args, seed: int, export: bool) -> dict:
    """make data, config, train, eval (and export) on the labelled images; the round's folder is `arm`."""
    arm.mkdir(parents=True, exist_ok=True)
    ws = arm / "ws"
    env = {**os.environ, "PIPELINES_WORKSPACE": str(ws), "BENTOML_HOME": str(out / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True"}
    labels = arm / "labelled.json"
    labels.write_text(json.dumps(subset(coco, labelled)))
    started = time.perf_counter()
    data = ["data", "--dataset", str(out / "pool"), "--annotations", str(labels), "--val-annotations",
            str(out / "test.json"), "--images", str(out / "test"), "--workers", "2"]
    if args.task == "segmentation":
        data += ["--task", "segmentation"]
    sh(data, env, arm / "data.log")
    config = ["config", "--dataset", "pool", "--run", "al", "--batch-size", str(args.batch), "--num-steps",
              str(args.steps), "--size", str(args.size), "--seed", str(seed)]
    if args.model:
        config += ["--model", args.model]
    sh(config, env, arm / "config.log")
    sh(["train", "--run", "al", "--eval-every", "0"], env, arm / "train.log")
    sh(["eval", "--run", "al"], env, arm / "eval.log")
    if export:
        sh(["export", "--run", "al"], env, arm / "export.log")
    return {"metric": metric(ws, args.task), "labelled": len(labelled), "seconds": time.perf_counter() - started,
            "workspace": str(ws), "labels": str(labels)}


def suggest(arm: Path, strategy: str, count: int, seed: int, out: Path) -> tuple[list[str], float]:
    env = {**os.environ, "PIPELINES_WORKSPACE": str(arm / "ws")}
    started = time.perf_counter()
    stdout = sh(["suggest", "--run", "al", "--dataset", str(out / "pool"), "--annotations", str(arm / "labelled.json"),
                 "--count", str(count), "--strategy", strategy, "--seed", str(seed)], env, arm / f"suggest-{strategy}.log")
    seconds = time.perf_counter() - started
    written = re.search(r"^wrote (.+\.json)$", stdout, re.M)
    if not written:
        return [], seconds  # nothing left to suggest
    path = Path(written.group(1))
    path = path if path.is_absolute() else REPO / path
    return [item["file_name"] for item in json.loads(path.read_text())["images"]], seconds


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The labelled images at which a curve (labelled, metric), linearly interpolated, first reaches `target`."""
    for (n0, m0), (n1, m1) in zip(curve, curve[1:]):
        if m0 >= target:
            return float(n0)
        if m1 >= target:
            return n0 + (n1 - n0) * (target - m0) / (m1 - m0)
    return float(curve[0][0]) if curve and curve[0][1] >= target else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=str(REPO.parent / "shared" / "external" / "bccd_voc" / "BCCD"))
    ap.add_argument("--task", choices=("detection", "segmentation"), default="detection")
    ap.add_argument("--model", help="make config's --model (default: the task's template)")
    ap.add_argument("--strategies", default="random,hybrid,uncertainty,diversity")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--initial", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="trainings per arm, the first included")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-suggest"))
    ap.add_argument("--cost", type=Path, metavar="RUN_FOLDER", help="measure ranking against predicting instead")
    ap.add_argument("--cost-images", type=int, default=1000)
    ap.add_argument("--cost-repeats", type=int, default=3)
    ap.add_argument("--report-only", action="store_true", help="print the results OUT holds, train nothing")
    ap.add_argument("--retrain", type=int, metavar="ROUND",
                    help="train each seed's and strategy's ROUND labelled set of OUT again, with the seed plus "
                         "--retrain-seed-offset: how much of a difference is the training's own noise")
    ap.add_argument("--retrain-seed-offset", type=int, default=100)
    ap.add_argument("--typicality", action="store_true",
                    help="how typical each strategy's picks were among the unlabelled images (module docstring)")
    args = ap.parse_args()
    if args.cost:
        return cost(args.cost.resolve(), args.cost_images, args.out, args.cost_repeats)
    if args.retrain is not None and args.retrain < 1:
        raise SystemExit(f"--retrain {args.retrain}: a round from 1 on (round 0 is the same for every strategy)")
    strategies = args.strategies.split(",")
    if "random" not in strategies:
        raise SystemExit("--strategies must include random (the baseline)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    coco, files, test = load_dataset(args.dataset)
    names = sorted(im["file_name"] for im in coco["images"] if im["file_name"] in files)
    if test is None:
        test = set(random.Random(0).sample(names, len(names) // 5))
    # An image without any object counts as unlabelled for make suggest (as for make prelabel): the pool has
    # none, so that every revealed image stays labelled.
    with_objects = {im["file_name"] for im in coco["images"]
                    if any(a["image_id"] == im["id"] for a in coco["annotations"])}
    pool = [n for n in names if n not in test and n in with_objects]
    for folder, members in (("pool", pool), ("test", sorted(test & set(names)))):
        (out / folder).mkdir(exist_ok=True)
        for n in members:
            link = out / folder / n
            if not link.exists():
                link.symlink_to(files[n].resolve())
    (out / "test.json").write_text(json.dumps(subset(coco, test)))
    print(f"{args.dataset}: pool {len(pool)}, test {len(test)} images; {args.rounds} rounds from {args.initial}, "
          f"+{args.per_round} each; {args.steps} steps of {args.batch} at {args.size}", flush=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    train = not (args.report_only or args.retrain is not None or args.typicality)
    for seed in (int(s) for s in args.seeds.split(",")) if train else []:
        start = set(random.Random(seed).sample(pool, args.initial))
        first_key = f"seed{seed}/round0"
        if first_key not in results:
            results[first_key] = train_round(out / f"seed{seed}" / "round0", start, coco, out, args, seed, export=True)
            results_path.write_text(json.dumps(results, indent=1))
        first = results[first_key]
        print(f"seed {seed} round 0: {len(start)} labelled, metric {first['metric']:.3f}", flush=True)
        for strategy in strategies:
            labelled, previous = set(start), out / f"seed{seed}" / "round0"
            for r in range(1, args.rounds):
                key = f"seed{seed}/{strategy}/round{r}"
                arm = out / f"seed{seed}" / strategy / f"round{r}"
                if key not in results:
                    picked, seconds = suggest(previous, strategy, args.per_round, seed, out)
                    new = set(picked) - labelled
                    if len(new) != len(picked):
                        raise SystemExit(f"{key}: make suggest named an already labelled image")
                    labelled |= new
                    results[key] = {**train_round(arm, labelled, coco, out, args, seed, export=r + 1 < args.rounds),
                                    "suggest_seconds": seconds, "picked": sorted(new)}
                    results_path.write_text(json.dumps(results, indent=1))
                else:
                    labelled |= set(results[key]["picked"])
                previous = arm
                print(f"seed {seed} {strategy} round {r}: {results[key]['labelled']} labelled, metric "
                      f"{results[key]['metric']:.3f}", flush=True)
    if args.typicality:
        return typicality(results, strategies, [int(s) for s in args.seeds.split(",")], args, out)
    if args.retrain is not None:
        return retrain(results, strategies, [int(s) for s in args.seeds.split(",")], args, coco, out)
    report(results, strategies, [int(s) for s in args.seeds.split(",")], args, out)
    return 0


def retrain(results: dict, strategies: list[str], seeds: list[int], args, coco: dict, out: Path) -> int:
    """--retrain ROUND: the labelled sets of that round trained again with another seed (OUT/retrain.json, resumable);
    printed: each set's metric from both trainings, and per strategy the mean over seeds of the two trainings' mean."""
    import numpy as np

    path = out / "retrain.json"
    again = json.loads(path.read_text()) if path.is_file() else {}
    means: dict[str, list[float]] = {}
    for seed in seeds:
        for strategy in strategies:
            key = f"seed{seed}/{strategy}/round{args.retrain}"
            if key not in results:
                continue
            if key not in again:
                names = {im["file_name"] for im in json.loads(Path(results[key]["labels"]).read_text())["images"]}
                again[key] = train_round(out / "retrain" / key, names, coco, out, args,
                                         seed + args.retrain_seed_offset, export=False)
                path.write_text(json.dumps(again, indent=1))
            first, second = results[key]["metric"], again[key]["metric"]
            means.setdefault(strategy, []).append((first + second) / 2)
            print(f"{key}: {results[key]['labelled']} labelled, metric {first:.3f} (seed {seed}), {second:.3f} "
                  f"(seed {seed + args.retrain_seed_offset}): difference {second - first:+.3f}", flush=True)
    for strategy, values in means.items():
        print(f"{strategy}: mean of both trainings, over seeds {', '.join(f'{v:.3f}' for v in values)}: "
              f"{np.mean(values):.3f}")
    return 0


def typicality(results: dict, strategies: list[str], seeds: list[int], args, out: Path, neighbours: int = 20) -> int:
    """--typicality (module docstring): per strategy and round, the picks' mean typicality percentile over seeds."""
    import numpy as np
    import tensorflow as tf

    from pipelines.annotator.prelabel import read_pixels
    from pipelines.annotator.suggest import project
    from pipelines.model_store import FEATURES_OUTPUT, INPUT_NAME, SUGGEST_SIGNATURE

    pool = sorted(p.name for p in (out / "pool").iterdir())

    def names(labels: str) -> set[str]:
        return {im["file_name"] for im in json.loads(Path(labels).read_text())["images"]}

    table: dict[str, dict[int, list[float]]] = {}
    for seed in seeds:
        for strategy in strategies:
            before = results.get(f"seed{seed}/round0")
            for r in range(1, args.rounds):
                after = results.get(f"seed{seed}/{strategy}/round{r}")
                if before is None or after is None:
                    break
                labelled = names(before["labels"])
                picked = names(after["labels"]) - labelled
                export = Path(before["labels"]).parent / "ws" / "al" / "export" / "saved_model"
                if not export.is_dir():
                    raise SystemExit(f"{export}: no export to read the picks' features from (the run was moved?)")
                signature = tf.saved_model.load(str(export)).signatures[SUGGEST_SIGNATURE]
                unlabelled = [n for n in pool if n not in labelled]
                features = np.concatenate([
                    project(signature(**{INPUT_NAME: tf.constant(read_pixels(out / "pool" / n)[None])})[FEATURES_OUTPUT])
                    for n in unlabelled])
                gaps = np.linalg.norm(features[:, None] - features[None], axis=-1)  # a pool of hundreds
                np.fill_diagonal(gaps, np.inf)
                typical = 1.0 / np.sort(gaps, axis=1)[:, :neighbours].mean(axis=1)
                percentile = typical.argsort().argsort() / max(len(typical) - 1, 1)
                place = {n: i for i, n in enumerate(unlabelled)}
                value = float(np.mean([percentile[place[n]] for n in picked]))
                table.setdefault(strategy, {}).setdefault(r, []).append(value)
                print(f"seed {seed} {strategy} round {r}: {len(picked)} picked of {len(unlabelled)} unlabelled, "
                      f"mean typicality percentile {value:.2f}", flush=True)
                before = after
    print("\nmean typicality percentile of the picks (0.5: as typical as a random draw), mean over seeds:")
    for strategy, rounds in table.items():
        print(f"  {strategy:<12} " + "  ".join(f"round {r}: {np.mean(v):.2f}" for r, v in sorted(rounds.items()))
              + f"  (seeds: {len(rounds[1])})")
    return 0


def cost(run: Path, images: int, out: Path, repeats: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    folder = out / f"cost-{images}"
    env = {**os.environ, "PIPELINES_WORKSPACE": str(run.parent)}
    if not folder.is_dir():
        sh(["sample", "--out", str(folder), "--images", str(images), "--seed", "7"], env, out / "cost-sample.log")
    empty = out / "no-labels.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    timings: dict[str, list[float]] = {}
    commands = (("predict (make prelabel, every image)", ["prelabel", "--run", run.name, "--dataset", str(folder),
                                                          "--annotations", str(empty)]),
                ("rank (make suggest, hybrid)", ["suggest", "--run", run.name, "--dataset", str(folder),
                                                 "--annotations", str(empty), "--count", "50"]))
    for _ in range(repeats):  # interleaved, so that a slow spell of a shared machine hits both alike
        for name, command in commands:
            started = time.perf_counter()
            sh(command, env, out / f"cost-{command[0]}.log")
            timings.setdefault(name, []).append(time.perf_counter() - started)
    base = timings[commands[0][0]]
    for name, seconds in timings.items():
        ratios = [t / b for t, b in zip(seconds, base)]
        print(f"{name:<40} {' '.join(f'{t:6.1f}' for t in seconds)} s  {images / min(seconds):6.1f} images/s (best)  "
              f"{' '.join(f'{r:.2f}' for r in ratios)}x (each repeat)")
    return 0


def boxes_labelled(results: dict, strategy: str, seeds: list[int]) -> list[float]:
    """The mean over `seeds` of the boxes labelled at each round of `strategy` (its labelled.json files)."""
    import numpy as np

    per_seed = []
    for seed in seeds:
        keys = [f"seed{seed}/round0"] + [f"seed{seed}/{strategy}/round{r}" for r in range(1, 100)
                                         if f"seed{seed}/{strategy}/round{r}" in results]
        per_seed.append([len(json.loads(Path(results[k]["labels"]).read_text())["annotations"]) for k in keys])
    rounds = min(len(p) for p in per_seed)
    return [float(np.mean([p[r] for p in per_seed])) for r in range(rounds)]


def report(results: dict, strategies: list[str], seeds: list[int], args, out: Path) -> None:
    import numpy as np

    name = "AP" if args.task == "detection" else "mean IoU"
    curves = {}
    for strategy in strategies:
        ran = [seed for seed in seeds if f"seed{seed}/{strategy}/round1" in results]
        per_seed = []
        for seed in ran:
            points = [(results[f"seed{seed}/round0"]["labelled"], results[f"seed{seed}/round0"]["metric"])]
            points += [(results[f"seed{seed}/{strategy}/round{r}"]["labelled"], results[f"seed{seed}/{strategy}/round{r}"]["metric"])
                       for r in range(1, args.rounds) if f"seed{seed}/{strategy}/round{r}" in results]
            per_seed.append(points)
        if not per_seed:
            continue
        rounds = min(len(p) for p in per_seed)
        mean = [(per_seed[0][r][0], float(np.mean([p[r][1] for p in per_seed]))) for r in range(rounds)]
        curves[strategy] = {"seeds": ran, "per_seed": per_seed, "mean": mean}
    strategies = [s for s in strategies if s in curves]
    print(f"\n{name} against labelled images: mean over seeds (each seed's value in brackets)")
    print("labelled".ljust(10) + "".join(f"{s} (seeds {','.join(map(str, curves[s]['seeds']))})".rjust(34)
                                          for s in strategies))
    for r, (n, _) in enumerate(curves["random"]["mean"]):
        row = str(n).ljust(10)
        for s in strategies:
            if r < len(curves[s]["mean"]):
                seeds_text = "/".join(f"{p[r][1]:.3f}" for p in curves[s]["per_seed"])
                row += f"{curves[s]['mean'][r][1]:.3f} ({seeds_text})".rjust(34)
        print(row)
    print(f"\nlabelled images each strategy needs to reach the {name} random reaches at the last round, on the same "
          "seeds (linear between rounds):")
    summary = {}
    random_by_seed = dict(zip(curves["random"]["seeds"], curves["random"]["per_seed"]))
    for s in strategies:
        same = [random_by_seed[seed] for seed in curves[s]["seeds"] if seed in random_by_seed]
        if s == "random" or not same:
            continue
        last = len(curves[s]["mean"]) - 1
        target_n, target = same[0][last][0], float(np.mean([p[last][1] for p in same]))
        needed = labels_to_reach(curves[s]["mean"], target)
        saving = None if needed is None else 1.0 - needed / target_n
        summary[s] = {"seeds": curves[s]["seeds"], "random_last": [target_n, target],
                      "labelled_to_reach_random_last": needed, "saving": saving,
                      "mean_gain_over_rounds": float(np.mean([m for _, m in curves[s]["mean"][1:]]) - np.mean(
                          [np.mean([p[r][1] for p in same]) for r in range(1, last + 1)]))}
        # The same in boxes: a person's work is also the objects drawn, and some strategies pick fuller images.
        own_boxes = boxes_labelled(results, s, curves[s]["seeds"])
        target_boxes = boxes_labelled(results, "random", curves[s]["seeds"])[last]
        boxes_needed = labels_to_reach([(b, m) for b, (_, m) in zip(own_boxes, curves[s]["mean"])], target)
        summary[s].update(random_last_boxes=target_boxes, boxes_to_reach_random_last=boxes_needed,
                          box_saving=None if boxes_needed is None else 1.0 - boxes_needed / target_boxes)
        print(f"  {s:<12} random: {name} {target:.3f} at {target_n} images ({target_boxes:.0f} boxes); " +
              ("not reached" if needed is None else
               f"{s} reaches it at {needed:.1f} images ({100 * saving:.0f}% fewer), {boxes_needed:.0f} boxes "
               f"({100 * summary[s]['box_saving']:.0f}% fewer)") +
              f"; mean {name} gain over rounds 1-{last}: {summary[s]['mean_gain_over_rounds']:+.3f}")
    print("\nlabelled boxes (objects a person drew) against labelled images, mean over the same seeds:")
    widths = {s: max(14, len(s) + 2) for s in strategies}
    print("labelled".ljust(10) + "".join(s.rjust(widths[s]) for s in strategies))
    boxes = {s: boxes_labelled(results, s, curves[s]["seeds"]) for s in strategies}
    for r, (n, _) in enumerate(curves["random"]["mean"]):
        print(str(n).ljust(10) + "".join((f"{boxes[s][r]:.0f}" if r < len(boxes[s]) else "").rjust(widths[s])
                                         for s in strategies))
    target = curves["random"]["mean"][-1]
    trainings = [v["seconds"] for v in results.values() if "seconds" in v]
    suggests = [v["suggest_seconds"] for k, v in results.items() if "suggest_seconds" in v and "/random/" not in k]
    if trainings and suggests:
        print(f"mean round (data, config, train, eval, export): {np.mean(trainings):.0f} s; mean make suggest "
              f"(model strategies, whole command): {np.mean(suggests):.0f} s")
    (out / "summary.json").write_text(json.dumps({"curves": curves, "reach": summary, "boxes": boxes}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for s in strategies:
        xs, ys = zip(*curves[s]["mean"])
        ax.plot(xs, ys, marker="o", label=s, linewidth=2.5 if s in ("random", "hybrid") else 1.2)
    ax.axhline(target[1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("labelled images")
    ax.set_ylabel(f"test {name}")
    ax.set_title(f"{Path(args.dataset).name}: test {name}, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    print(f"wrote {out / 'results.json'}, {out / 'summary.json'}, {out / 'curves.png'}")


if __name__ == "__main__":
    sys.exit(main())
