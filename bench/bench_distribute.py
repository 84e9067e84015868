"""What training on several replicas or several workers costs on this machine, against one device, for both
tasks: `make train` as one process, with `--replicas 2` (MirroredStrategy over two logical CPU devices, or
two GPUs) and with `--workers 2` (two worker processes, MultiWorkerMirroredStrategy over loopback).

    .venv/bin/python bench/bench_distribute.py [--steps 30] [--batch 8] [--tasks detection segmentation]

A generated 40-image sample goes through `pipelines data` and `pipelines config` (detection: the default
SSD template at 128x128; segmentation: unet_mobilenetv2_320x320 at 96x96; the same global batch for the
three ways), then each way trains from scratch to --steps, one after the other, evaluations off. Printed
per task and way: the wall time of the whole command to the last step (start, tracing, training), the
steady-state images/s `make train` reports (loops after the first), and both as ratios to one device.
On a CPU the ways share the same cores: the point is the overhead of the path, not a speed-up.
Results also go to bench/out/distribute.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pipelines  # noqa: E402,F401

WAYS = {"one device": [], "2 replicas": ["--replicas", "2"], "2 workers": ["--workers", "2"]}
TASKS = {"detection": ([], ["--size", "128"]),
         "segmentation": (["--task", "segmentation"], ["--model", "unet_mobilenetv2_320x320", "--size", "96"])}
DONE = re.compile(r"^trained to step (\d+) in \S+(?: \(([\d.]+) steps/s, ([\d.]+) img/s\))?", re.M)


def cli(*args, workspace: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipelines", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PIPELINES_WORKSPACE": str(workspace)})
    if proc.returncode:
        sys.exit(f"pipelines {' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-distribute-"))
    try:
        results = measure(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(results)


def measure(root: Path, args) -> list[dict]:
    from pipelines.data.sample import generate

    generate(root / "datasets" / "shapes", num_images=40, seed=0)
    results = []
    for task in args.tasks:
        data_args, config_args = TASKS[task]
        workspace = root / task
        cli("data", "--dataset", root / "datasets" / "shapes", *data_args, workspace=workspace)
        for way, train_args in WAYS.items():
            run = re.sub(r"\W+", "-", way)
            cli("config", "--dataset", "shapes", "--run", run, "--batch", args.batch, "--steps", args.steps,
                *config_args, workspace=workspace)
            started = time.perf_counter()
            out = cli("train", "--run", run, "--eval-every", "0", *train_args, workspace=workspace)
            wall = time.perf_counter() - started
            done = DONE.search(out)
            if not done or int(done.group(1)) != args.steps:
                sys.exit(f"{task}, {way}: no 'trained to step {args.steps}' line:\n{out[-2000:]}")
            images = float(done.group(3)) if done.group(3) else None
            results.append({"task": task, "way": way, "steps": args.steps, "batch": args.batch,
                            "wall_s": round(wall, 1), "images_per_sec": images})
            print(f"{task:12s} {way:10s} {wall:6.1f} s to step {args.steps}, steady "
                  + (f"{images:.1f} img/s" if images else "? img/s"), flush=True)
    return results


def report(results: list[dict]) -> None:
    print(f"\n{'task':12s} {'way':10s} {'wall s':>7s} {'x one':>6s} {'img/s':>7s} {'x one':>6s}")
    for row in results:
        one = next(r for r in results if r["task"] == row["task"] and r["way"] == "one device")
        speed = row["images_per_sec"]
        print(f"{row['task']:12s} {row['way']:10s} {row['wall_s']:7.1f} {row['wall_s'] / one['wall_s']:6.2f} "
              + (f"{speed:7.1f} {speed / one['images_per_sec']:6.2f}" if speed and one["images_per_sec"] else "      ?"))
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "distribute.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
