"""Training speed of `make train` against Model Garden's own trainer, and a learning benchmark.

    .venv/bin/python bench/bench_train_detection.py [--steps 40] [--batch 8] [--rounds 2]
    .venv/bin/python bench/bench_train_detection.py --learning [--steps 1500] [--batch 16]

Speed: the bundled sample (300 images) goes through `pipelines data` and `pipelines config`
(ssd_mobilenet_v2_fpnlite_320x320, --batch-size/--num-steps); then, alternating which goes first,
    ours:         python -m pipelines train --run RUN
    Model Garden: python -m official.vision.train --experiment=retinanet --mode=train
                  --config_file=params.yaml --model_dir=...
train the same model from scratch on the same TFRecords. params.yaml is the Model Garden
experiment `make train` builds for RUN (written fresh each round by the same code), so both do
the same work. Images/s are taken from the
"steps/sec" lines both print (orbit's own timing), averaged over every loop after the first
(which includes graph tracing), times the batch size. The ratio ours/Model Garden is printed.

Learning (--learning): our trainer alone, from scratch on CPU, for --steps, then `pipelines eval`:
the COCO AP@[.5:.95] reached and the wall time it took.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pipelines  # noqa: E402,F401

PY = sys.executable
STEPS_PER_SEC = re.compile(r"train \| step:\s+(\d+) \| steps/sec:\s+([\d.]+)")


def sh(cmd: list[str], env: dict, log: Path) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\nsee {log}")
    return elapsed, proc.stdout + proc.stderr


def steady_steps_per_sec(output: str) -> float:
    rates = [float(r) for _, r in STEPS_PER_SEC.findall(output)]
    if not rates:
        raise SystemExit("no 'steps/sec' line in the trainer's output")
    return statistics.mean(rates[1:]) if len(rates) > 1 else rates[0]


def prepare(out: Path, env: dict, batch: int, steps: int, run: str) -> Path:
    dataset = out / "datasets" / "sample"
    if not (dataset / ".exports").is_dir():
        from pipelines.data.sample import generate
        generate(dataset, 300)
    if not (out / "ws" / "sample" / "data").is_dir():
        sh([PY, "-m", "pipelines", "data", "--dataset", str(dataset)], env, out / "data.log")
    sh([PY, "-m", "pipelines", "config", "--dataset", "sample", "--run", run, "--batch-size", str(batch),
        "--num-steps", str(steps)], env, out / f"config-{run}.log")
    return out / "ws" / run


def write_experiment(run: str, folder: Path) -> Path:
    """The Model Garden experiment `make train` builds for RUN, written as params.yaml (as train does)."""
    from official.core import train_utils

    from pipelines.detection.experiment import build_experiment
    from pipelines.runs import load_run

    params, run_dir, _ = load_run(run)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    train_utils.serialize_config(build_experiment(params, str(run_dir / "train")), str(folder))
    return folder / "params.yaml"


def speed(args, out: Path, env: dict) -> None:
    rows = []
    for round_ in range(args.rounds):
        order = ["ours", "model_garden"] if round_ % 2 == 0 else ["model_garden", "ours"]
        for who in order:
            run_dir = prepare(out, env, args.batch, args.steps, f"speed-{round_}")
            if who == "ours":
                shutil.rmtree(run_dir / "train", ignore_errors=True)
                wall, output = sh([PY, "-m", "pipelines", "train", "--run", run_dir.name], env,
                                  out / f"ours-{round_}.log")
            else:
                mg_dir = out / f"mg-{round_}"
                shutil.rmtree(mg_dir, ignore_errors=True)
                params_yaml = write_experiment(run_dir.name, out / f"mg-{round_}-params")
                wall, output = sh([PY, "-m", "official.vision.train", "--experiment=retinanet", "--mode=train",
                                   f"--config_file={params_yaml}", f"--model_dir={mg_dir}"],
                                  env, out / f"mg-{round_}.log")
            sps = steady_steps_per_sec(output)
            rows.append((who, round_, wall, sps, sps * args.batch))
            print(f"  round {round_ + 1} {who:<12} {sps:6.3f} steps/s  {sps * args.batch:6.2f} img/s  wall {wall:6.1f}s",
                  flush=True)
    ours = statistics.median(r[4] for r in rows if r[0] == "ours")
    theirs = statistics.median(r[4] for r in rows if r[0] == "model_garden")
    print(f"\nmedian images/s: ours {ours:.2f}, Model Garden {theirs:.2f}; ratio ours/Model Garden {ours / theirs:.3f}")


def learning(args, out: Path, env: dict) -> None:
    run_dir = prepare(out, env, args.batch, args.steps, "learning")
    shutil.rmtree(run_dir / "train", ignore_errors=True)
    wall, output = sh([PY, "-m", "pipelines", "train", "--run", run_dir.name], env, out / "learning-train.log")
    _, evaluation = sh([PY, "-m", "pipelines", "eval", "--run", run_dir.name], env, out / "learning-eval.log")
    print(f"trained {args.steps} steps at batch {args.batch} from scratch in {wall / 60:.1f} min "
          f"({steady_steps_per_sec(output) * args.batch:.2f} img/s)")
    print("\n".join(line for line in evaluation.splitlines() if line.startswith(("COCO", "  "))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--learning", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "train_detection"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PIPELINES_WORKSPACE=str(out / "ws"), BENTOML_HOME=str(out / "bentoml"))
    os.environ["PIPELINES_WORKSPACE"] = env["PIPELINES_WORKSPACE"]  # write_experiment reads the run here too
    print(f"machine: {os.cpu_count()} CPU(s); steps {args.steps}, batch {args.batch}", flush=True)
    (learning if args.learning else speed)(args, out, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
