"""Device formats of `make export` against the SavedModel, side by side in one run.

    .venv/bin/python bench/bench_export.py --run demo-detector --run demo-segmenter [--export] [--threads 2]
                                           [--repeats 50]

For each trained run (`make demo` leaves demo-detector and demo-segmenter), with --export first
`python -m pipelines export --run RUN --format all` (SavedModel + float32, float16 and int8 TFLite, and ONNX).
Then every format of workspace/RUN/export is measured in a process of its own, limited to --threads
threads (TensorFlow's intra/inter-op pools for the SavedModel, the interpreter's threads for TFLite):

    size      bytes on disk (the saved_model folder, or the file)
    load      seconds from nothing to the first answer (tf.saved_model.load / interpreter + allocate / onnxruntime session, then
              one image)
    latency   median and 90th percentile of --repeats calls on one image of the model's input size, batch 1
    metric    the task's val metric (COCO AP / mean IoU) by the task's own evaluator, the SavedModel
              through its serving signature, TFLite and ONNX through pipelines/engine/formats.py

and printed with its ratio (size, latency) or difference (metric) against the SavedModel's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FORMATS = ("saved_model", "model.tflite", "model_fp16.tflite", "model_int8.tflite", "model.onnx")


def measure_one(run: str, name: str, threads: int, repeats: int) -> dict:
    """In this process (started with the thread limits set): one format of RUN's export, measured."""
    import pipelines  # noqa: F401
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from pipelines import tasks
    from pipelines.data.label_map import read_label_map
    from pipelines.engine import formats
    from pipelines.engine.evaluate import score
    from pipelines.model_store import INPUT_NAME, check_images
    from pipelines.runs import load_run

    params, folder, _, _ = load_run(run)
    task = tasks.of_params(params)
    exporter = task.load("exporter")
    path = folder / "export" / name
    example = exporter.device_input(check_images(params, 1)[0], (params.image_height, params.image_width))
    started = time.perf_counter()
    if name == "saved_model":
        signature = tf.saved_model.load(str(path)).signatures["serving_default"]

        def call(x):
            return signature(**{INPUT_NAME: tf.constant(x)})

        def serve(images):
            return {k: v.numpy() for k, v in call(images).items()}
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    else:
        serve = formats.serving_function(path, exporter, threads)
        call = serve.model.run
        size = path.stat().st_size
    call(example)
    load_s = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call(example)
        times.append(1000 * (time.perf_counter() - t))
    evaluator = task.load("evaluator")(params, read_label_map(Path(params.label_map_path)))
    images, _ = score(evaluator, serve, params.eval_files, log=lambda line: None)
    value = evaluator.evaluate()["metrics"][task.metric]
    return {"format": name, "bytes": size, "load_s": load_s, "p50_ms": float(np.percentile(times, 50)),
            "p90_ms": float(np.percentile(times, 90)), "metric": task.metric, "value": value, "images": images}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", help="trained run(s) under workspace/ (default: the demo's two)")
    parser.add_argument("--export", action="store_true", help="run `pipelines export --format all` first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this format in this process
    args = parser.parse_args()
    runs = args.run or ["demo-detector", "demo-segmenter"]
    if args.one:
        print(json.dumps(measure_one(runs[0], args.one, args.threads, args.repeats)))
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TF_NUM_INTRAOP_THREADS": str(args.threads),
           "TF_NUM_INTEROP_THREADS": str(args.threads)}
    for run in runs:
        if args.export:
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "pipelines", "export", "--run", run, "--format", "all"], cwd=REPO,
                           check=True, capture_output=True, text=True)
            print(f"{run}: make export FORMAT=all in {time.monotonic() - started:.0f} s")
        results = []
        for name in FORMATS:
            proc = subprocess.run([sys.executable, __file__, "--run", run, "--one", name, "--threads", str(args.threads),
                                   "--repeats", str(args.repeats)], cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{run} {name}: failed\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        ref = results[0]
        print(f"\n{run}: {ref['images']} val images, batch 1, {args.threads} threads, {args.repeats} calls")
        print(f"  {'format':<19} {'size MB':>8} {'x SM':>6} {'load s':>7} {'p50 ms':>7} {'p90 ms':>7} {'x SM':>6} "
              f"{ref['metric']:>9} {'vs SM':>9}")
        for r in results:
            print(f"  {r['format']:<19} {r['bytes'] / 2**20:>8.2f} {r['bytes'] / ref['bytes']:>6.2f} {r['load_s']:>7.2f} "
                  f"{r['p50_ms']:>7.1f} {r['p90_ms']:>7.1f} {r['p50_ms'] / ref['p50_ms']:>6.2f} {r['value']:>9.4f} "
                  f"{100 * (r['value'] - ref['value']):>+7.2f}pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
