"""Our trainer against the Object Detection API's own, side by side in one run.

The same pipeline.config (the SSD MobileNet V2 FPNLite template, written by `make config` for the
dataset), the same TFRecords, the same initial checkpoint, the same steps and batch: trained once with
the OD API's `model_lib_v2.train_loop` (tests/odapi_trainer.py, its research code from the Python
registry) and once with `make train` (`python -m pipelines train`). Both final checkpoints are evaluated
by the same evaluator, the OD API's own `eval_continuously` (COCO metrics) on the val split: ours is
first written in the OD API's checkpoint layout (`zoo.save_od_api`).

Two starts:

* random: seeded random weights written in the zoo layout (tests/odapi_oracle.py's OD API model);
* fine-tune: a checkpoint that `make train` trained first on the same data from that start, written
  in the zoo layout: a stand-in for a model-zoo checkpoint (none can be downloaded here), then
  fine-tuned by both trainers with `fine_tune_checkpoint_type: full`.

Printed: AP, AP50, the loss at matching steps, images/s (after the first loop, which includes tracing)
and the ratios; targets: our AP >= the OD API's - 0.01 in both starts, our images/s >= 1.2x the OD API's.

    python bench/bench_train_parity.py --dataset ../shared/external/bccd_voc/BCCD --steps 300 --batch 8 [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def sh(args: list[str], env: dict, log: Path) -> str:
    """Run one of our CLI commands (what the make target runs); its output is kept in `log`."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    log.write_text(f"$ {' '.join(args)}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"`python -m pipelines {' '.join(args)}` failed ({log}):\n{proc.stderr[-3000:]}")
    print(f"  {' '.join(args[:3])} ... {time.perf_counter() - start:.0f} s", flush=True)
    return proc.stdout


def steady_rate(steps: list[int], rates: list[float], batch: int) -> float:
    """Images/s over the loops after the first (which includes tracing): all their steps over all their time,
    the same statistic for both trainers (each loop's rate covers everything between two loops: the steps,
    summaries and checkpoints)."""
    seconds = sum(n / r for n, r in zip(steps[1:], rates[1:]))
    return sum(steps[1:]) * batch / seconds if seconds else float("nan")


def our_progress(stdout: str, batch: int) -> dict:
    """Losses per loop and the steady images/s from `make train`'s progress lines."""
    lines = re.findall(r"^step (\d+)/\d+\s+loss ([\d.eE+-]+).*?([\d.]+) steps/s", stdout, re.M)
    at = [int(s) for s, _, _ in lines]
    steps = [b - a for a, b in zip([0, *at], at)]
    return {"losses": {int(s): float(v) for s, v, _ in lines},
            "images_per_sec": steady_rate(steps, [float(r) for _, _, r in lines], batch)}


def to_od_api(run: str, env: dict, template: str, out: Path) -> str:
    """The run's latest checkpoint as an OD API checkpoint (in a child: TensorFlow stays out of this process)."""
    code = f"""
import os, sys
from pipelines import checkpoints
from pipelines.detection import ssd, zoo
from pipelines.detection.model import inference_experiment
from pipelines.runs import load_run
params, run_dir, _, _ = load_run({run!r}, need_data=False)
model = ssd.build_model(inference_experiment(params).task)
checkpoints.restore(model, checkpoints.latest_in(checkpoints.train_dir(run_dir)))
print(zoo.save_od_api(model, {template!r}, {str(out / 'ckpt-0')!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"converting {run} to the OD API layout failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def coco(metrics: dict) -> tuple[float, float]:
    m = metrics["metrics"]
    return m["DetectionBoxes_Precision/mAP"], m["DetectionBoxes_Precision/mAP@.50IOU"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=str(REPO.parent / "shared" / "external" / "bccd_voc" / "BCCD"))
    ap.add_argument("--steps", type=int, default=300, help="training steps of each trainer, each start")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="steps of the fine-tune start's checkpoint")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", default="320")
    ap.add_argument("--starts", default="random,finetune")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the random start's weights and of our trainer (make config --seed); the OD API's "
                         "train_loop takes none")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-train-parity"))
    args = ap.parse_args()

    from odapi_oracle import run_oracle
    from odapi_trainer import evaluate_odapi, train_odapi

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = {**os.environ, "PIPELINES_WORKSPACE": str(out / "ws"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    logs = out / "logs"
    logs.mkdir()
    dataset = Path(args.dataset).resolve()
    name = dataset.name
    print(f"data: {dataset}", flush=True)
    sh(["data", "--dataset", str(dataset), "--workers", "2"], env, logs / "data.log")

    def config(run: str, steps: int, checkpoint: str | None) -> Path:
        cmd = ["config", "--dataset", name, "--run", run, "--batch-size", str(args.batch), "--num-steps", str(steps),
               "--image-size", args.image_size, "--seed", str(args.seed)]
        if checkpoint:
            cmd += ["--checkpoint", checkpoint, "--checkpoint-type", "full"]
        sh(cmd, env, logs / f"config-{run}.log")
        return out / "ws" / run / "pipeline.config"

    # The seeded random start, in the zoo layout, from the OD API's own model of this config.
    import numpy as np

    layout = config("layout", args.steps, None)
    random_start = run_oracle(layout, [np.zeros((64, 64, 3), np.uint8)], out / "random-start",
                              seed=args.seed)["checkpoint"]
    template = random_start
    starts = {"random": random_start}
    if "finetune" in args.starts:
        print(f"fine-tune start: make train {args.pretrain_steps} steps from the random start (a stand-in for a "
              f"zoo checkpoint)", flush=True)
        config("pretrain", args.pretrain_steps, random_start)
        sh(["train", "--run", "pretrain", "--eval-every", "0"], env, logs / "train-pretrain.log")
        starts["finetune"] = to_od_api("pretrain", env, template, out / "finetune-start")

    rows = []
    for start in [s for s in args.starts.split(",") if s in starts]:
        print(f"\n== start: {start} ({starts[start]})", flush=True)
        cfg = config(f"ours-{start}", args.steps, starts[start])
        t0 = time.perf_counter()
        stdout = sh(["train", "--run", f"ours-{start}", "--eval-every", "0"], env, logs / f"train-ours-{start}.log")
        ours_wall = time.perf_counter() - t0
        ours = our_progress(stdout, args.batch)
        loop = min(100, max(1, args.steps // 10))  # our steps per loop: the OD API runs as many per call
        theirs = train_odapi(cfg, out / f"odapi-{start}", args.steps, steps_per_iteration=loop, timeout=7200)
        converted = to_od_api(f"ours-{start}", env, template, out / f"ours-{start}-odapi")
        ap_ours = coco(evaluate_odapi(cfg, Path(converted).parent, out / f"eval-ours-{start}"))
        ap_theirs = coco(evaluate_odapi(cfg, out / f"odapi-{start}", out / f"eval-odapi-{start}"))
        their_losses = dict(zip(theirs["steps"], theirs["losses"]["Loss/total_loss"]))
        theirs["images_per_sec"] = steady_rate([loop] * len(theirs["steps_per_sec"]), theirs["steps_per_sec"],
                                               args.batch)
        print("  loss (step: ours / OD API): " + ", ".join(
            f"{s}: {v:.3f} / {their_losses.get(s, float('nan')):.3f}" for s, v in sorted(ours["losses"].items())))
        row = {"start": start, "seed": args.seed, "ap_ours": ap_ours[0], "ap50_ours": ap_ours[1],
               "ap_odapi": ap_theirs[0], "ap50_odapi": ap_theirs[1], "img_s_ours": ours["images_per_sec"],
               "img_s_odapi": theirs["images_per_sec"], "wall_ours_s": ours_wall,
               "wall_odapi_s": theirs["train_loop_s"], "losses_ours": ours["losses"],
               "losses_odapi": {s: their_losses[s] for s in ours["losses"] if s in their_losses}}
        rows.append(row)
        ratio = (row["img_s_ours"] or float("nan")) / (row["img_s_odapi"] or float("nan"))
        print(f"  AP ours {row['ap_ours']:.3f} (AP50 {row['ap50_ours']:.3f}), OD API {row['ap_odapi']:.3f} "
              f"(AP50 {row['ap50_odapi']:.3f}): difference {row['ap_ours'] - row['ap_odapi']:+.3f} "
              f"[target >= -0.01: {'met' if row['ap_ours'] >= row['ap_odapi'] - 0.01 else 'NOT met'}]", flush=True)
        print(f"  images/s ours {row['img_s_ours']:.2f}, OD API {row['img_s_odapi']:.2f}: x{ratio:.2f} "
              f"[target >= 1.2: {'met' if ratio >= 1.2 else 'NOT met'}]", flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
