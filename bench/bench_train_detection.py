"""Training speed of `make train` (the exact network) against the previous network, and a learning benchmark.

    .venv/bin/python bench/bench_train_detection.py [--steps 40] [--batch 8] [--rounds 2]
    .venv/bin/python bench/bench_train_detection.py --learning [--steps 1500] [--batch 16]

Speed: the bundled sample (300 images) goes through `pipelines data` and `pipelines config`
(ssd_mobilenet_v2_fpnlite_320x320, --batch-size/--num-steps); then, alternating which goes first,
    exact:    python -m pipelines train --run RUN
              (the Object Detection API's network, pipelines/detection/ssd.py, in our DetectionTask)
    previous: python -m official.vision.train --experiment=retinanet --mode=train
              --config_file=params.yaml --model_dir=...
train from scratch on the same TFRecords with the same batch, steps and loops. The previous
network is the one `make train` trained before commit 2479dba: Model Garden's stock RetinaNet made
to look like SSD MobileNet V2 FPNLite (separable FPN, level-shared separable RetinaNetHead, Model
Garden anchors, ImageNet mean/std normalisation), trained by Model Garden's own trainer. Its
params.yaml is the experiment `make train` builds for RUN (written fresh each round by the same
code), with the `task.ssd` block removed (Model Garden's RetinaNetTask has no such field) and the
fields set as the previous FIELDS table (b4967f6:pipelines/detection/experiment.py) set them:
`task.model.decoder.fpn.use_separable_conv`, `task.model.head.use_separable_conv` and
`task.model.head.share_level_convs` true; `task.model.norm_activation.norm_momentum` and
`norm_epsilon`, which the current table takes from the pipeline.config's batch_norm decay and
epsilon, back to the retinanet experiment's defaults as the previous table left them (see
`previous_experiment`). Images/s are taken from the "steps/sec" lines both print (orbit's own
timing), averaged over every loop after the first (which includes graph tracing), times the batch
size. The ratio exact/previous is printed.

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
    # Model Garden's trainer logs each loop's line twice (absl to stderr and stdout): one rate per step.
    by_step: dict[int, float] = {}
    for step, rate in STEPS_PER_SEC.findall(output):
        by_step.setdefault(int(step), float(rate))
    rates = [by_step[step] for step in sorted(by_step)]
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


# The fields the previous FIELDS table (commit b4967f6) set for the stock RetinaNet that the current one no
# longer sets; the current table's `task.ssd.*` rows replace them.
PREVIOUS_FIELDS = {
    "task.model.decoder.fpn.use_separable_conv": True,
    "task.model.head.use_separable_conv": True,
    "task.model.head.share_level_convs": True,
}
# Set by the current table (from batch_norm decay/epsilon) but not by the previous one: the previous
# network used the retinanet experiment's defaults (filled in from retinanet_cfg.retinanet()).
PREVIOUS_DEFAULTS = ("task.model.norm_activation.norm_momentum", "task.model.norm_activation.norm_epsilon")


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def previous_experiment(exp):
    """The previous network's experiment from the current one: no `task.ssd`, stock-RetinaNet fields.

    `exp` is locked (build_experiment locks it): the result is a fresh retinanet experiment
    overridden with `exp`'s values.
    """
    from official.vision.configs import retinanet as retinanet_cfg

    from pipelines.detection.experiment import _set

    values = exp.as_dict()
    values["task"].pop("ssd")
    previous = retinanet_cfg.retinanet()
    previous.override(values, is_strict=True)
    for path, value in PREVIOUS_FIELDS.items():
        _set(previous, path, value)
    stock = retinanet_cfg.retinanet()
    for path in PREVIOUS_DEFAULTS:
        _set(previous, path, _get(stock, path))
    return previous


def write_experiment(run: str, folder: Path) -> Path:
    """The previous network's Model Garden experiment for RUN, written as params.yaml (as train does).

    The current experiment is built by the code `make train` uses, then `previous_experiment`.
    """
    from official.core import train_utils

    from pipelines.detection.experiment import build_experiment
    from pipelines.runs import load_run

    params, run_dir, _, _ = load_run(run)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    exp = previous_experiment(build_experiment(params))
    train_utils.serialize_config(exp, str(folder))
    return folder / "params.yaml"


def speed(args, out: Path, env: dict) -> None:
    rows = []
    for round_ in range(args.rounds):
        order = ["exact", "previous"] if round_ % 2 == 0 else ["previous", "exact"]
        for who in order:
            run_dir = prepare(out, env, args.batch, args.steps, f"speed-{round_}")
            if who == "exact":
                shutil.rmtree(run_dir / "train", ignore_errors=True)
                wall, output = sh([PY, "-m", "pipelines", "train", "--run", run_dir.name, "--eval-every", "0"], env,
                                  out / f"exact-{round_}.log")
            else:
                mg_dir = out / f"previous-{round_}"
                shutil.rmtree(mg_dir, ignore_errors=True)
                params_yaml = write_experiment(run_dir.name, out / f"previous-{round_}-params")
                wall, output = sh([PY, "-m", "official.vision.train", "--experiment=retinanet", "--mode=train",
                                   f"--config_file={params_yaml}", f"--model_dir={mg_dir}"],
                                  env, out / f"previous-{round_}.log")
            sps = steady_steps_per_sec(output)
            rows.append((who, round_, wall, sps, sps * args.batch))
            print(f"  round {round_ + 1} {who:<9} {sps:6.3f} steps/s  {sps * args.batch:6.2f} img/s  wall {wall:6.1f}s",
                  flush=True)
    exact = statistics.median(r[4] for r in rows if r[0] == "exact")
    previous = statistics.median(r[4] for r in rows if r[0] == "previous")
    for round_ in range(args.rounds):
        ratio = [r[4] for r in rows if r[1] == round_ and r[0] == "exact"][0] / \
            [r[4] for r in rows if r[1] == round_ and r[0] == "previous"][0]
        print(f"round {round_ + 1}: exact/previous {ratio:.3f}")
    print(f"\nmedian images/s: exact (ours) {exact:.2f}, previous {previous:.2f}; "
          f"ratio exact/previous {exact / previous:.3f}")


def learning(args, out: Path, env: dict) -> None:
    run_dir = prepare(out, env, args.batch, args.steps, "learning")
    shutil.rmtree(run_dir / "train", ignore_errors=True)
    wall, output = sh([PY, "-m", "pipelines", "train", "--run", run_dir.name, "--eval-every", "0"], env, out / "learning-train.log")
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
