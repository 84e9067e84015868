"""Serving speed: `POST /detect` on a BentoML server against the same SavedModel called in-process.

    .venv/bin/python bench/bench_serve.py [--concurrency 1 8 32] [--requests 200] [--client stdlib|httpx] [--fresh]

Set-up (once, reused from bench/out/serve/ws unless --fresh): the bundled sample generator (60 images)
→ `pipelines data` → `pipelines config` (ssd_mobilenet_v2_fpnlite_320x320, batch 2, 4 steps) →
`pipelines train` → `pipelines export`, with PIPELINES_WORKSPACE and BENTOML_HOME under bench/out/serve.
Accuracy is irrelevant here, only speed (a score threshold of 0 keeps the post-processing honest).

The photos are the real ones in /work/shared/external/images (see /work/shared/external/SOURCES.json),
of several sizes; the script exits with a message when the folder is absent.

- In-process: one image at a time, as a script without a server would: decode the JPEG
  (pipelines.serving.images.decode_image), call the serving signature, turn outputs into detections.
- Server: `bentoml serve pipelines.serving.service:Service --port FREE` (what `make serve` runs) with
  PIPELINES_MODEL = the export, waited for on /readyz. At concurrency 1 the two paths take turns,
  photo by photo (in-process, then the same photo over HTTP, --requests times), so a change in the
  machine's load during the run touches both alike. At each higher concurrency C, C threads each post
  their share of --requests multipart images (round robin over the photos) with keep-alive
  connections. Requests/s = requests / wall time; latencies per request.

Printed: a table, the ratio of the server's p50 latency at concurrency 1 to the in-process one (target:
at most 1.10), and of the server's requests/s at the highest concurrency to the in-process loop's
(target: at least 1.5, thanks to adaptive batching), and the mean batch the model ran at each level (the
service's pipelines_inference_batch_size metric).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pipelines  # noqa: E402,F401  (the TensorFlow environment)

PY = sys.executable
PHOTOS = Path("/work/shared/external/images")
TEMPLATE = "ssd_mobilenet_v2_fpnlite_320x320"
RUN = "serve"
SETTLE_S = 0.3


def sh(cmd: list[str], env: dict, log: Path) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\nsee {log}")


def prepare(out: Path, env: dict, fresh: bool) -> Path:
    export = out / "ws" / RUN / "export"
    if (export / "saved_model" / "saved_model.pb").is_file() and not fresh:
        return export
    started = time.monotonic()
    dataset = out / "datasets" / "sample"
    if not (dataset / ".exports").is_dir():
        from pipelines.data.sample import generate
        generate(dataset, 60)
    if not (out / "ws" / "sample" / "data").is_dir():
        sh([PY, "-m", "pipelines", "data", "--dataset", str(dataset)], env, out / "data.log")
    sh([PY, "-m", "pipelines", "config", "--dataset", "sample", "--model", TEMPLATE, "--run", RUN,
        "--batch-size", "2", "--num-steps", "4"], env, out / "config.log")
    sh([PY, "-m", "pipelines", "train", "--run", RUN, "--eval-every", "0"], env, out / "train.log")
    sh([PY, "-m", "pipelines", "export", "--run", RUN], env, out / "export.log")
    print(f"set-up: exported {export} in {time.monotonic() - started:.0f} s", flush=True)
    return export


def photos() -> list[tuple[str, bytes]]:
    if not PHOTOS.is_dir():
        raise SystemExit(f"{PHOTOS} is absent: this benchmark needs the real photos listed in "
                         f"{PHOTOS.parent / 'SOURCES.json'}; nothing measured")
    files = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no .jpg/.png in {PHOTOS}; nothing measured")
    return [(p.name, p.read_bytes()) for p in files]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(latencies: list[float], wall: float) -> dict:
    return {"rps": len(latencies) / wall, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "mean": statistics.mean(latencies)}


def in_process(export: Path, images: list[tuple[str, bytes]]):
    """The script-without-a-server path, warmed up: a function of one photo's bytes -> its detections."""
    import tensorflow as tf

    from pipelines.detection.predict import detections_of
    from pipelines.model_store import read_metadata
    from pipelines.serving.images import decode_image

    labels = {int(k): v for k, v in (read_metadata(export).get("label_map") or {}).items()}
    serve = tf.saved_model.load(str(export / "saved_model")).signatures["serving_default"]

    def once(data: bytes) -> list:
        array = decode_image(data)
        out = serve(input_tensor=tf.constant(array[None]))
        out = {k: v.numpy() for k, v in out.items()}
        return detections_of(out, array.shape[1], array.shape[0], labels, 0.0)

    for _, data in images:  # warm-up: the first call builds the graph
        once(data)
    return once


class Client:
    """POST /detect with one keep-alive connection. "stdlib": http.client with each photo's multipart body
    built once (what the server receives is the same bytes a browser or curl sends); "httpx": httpx builds
    the body per request, which costs the client itself about 0.8 ms a request on this machine (measured
    against a server that only reads the body: RESULTS.md), time the server's latency would be charged."""

    BOUNDARY = "benchserveboundary7d1f"

    def __init__(self, url: str, kind: str):
        from urllib.parse import urlsplit

        self.url, self.kind = url, kind
        self.bodies: dict[str, bytes] = {}
        if kind == "httpx":
            import httpx

            self.http = httpx.Client(base_url=url, timeout=300)
        else:
            import http.client

            parts = urlsplit(url)
            self.http = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)

    def _body(self, name: str, data: bytes) -> bytes:
        if name not in self.bodies:
            b = self.BOUNDARY
            self.bodies[name] = (
                f'--{b}\r\nContent-Disposition: form-data; name="score_threshold"\r\n\r\n0\r\n'
                f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
        return self.bodies[name]

    def post(self, name: str, data: bytes) -> None:
        if self.kind == "httpx":
            r = self.http.post("/detect", files={"image": (name, data, "image/jpeg")}, data={"score_threshold": "0"})
            status, text = r.status_code, r.text
        else:
            self.http.request("POST", "/detect", self._body(name, data),
                              {"Content-Type": f"multipart/form-data; boundary={self.BOUNDARY}"})
            r = self.http.getresponse()
            status, text = r.status, r.read().decode(errors="replace")
        if status != 200:
            raise SystemExit(f"/detect answered {status}: {text[:300]}")

    def close(self) -> None:
        self.http.close()


def paired(once, url: str, images: list[tuple[str, bytes]], count: int, kind: str) -> tuple[dict, dict]:
    """Concurrency 1, side by side: each photo in-process, then the same photo through the server, in
    turn, so both paths see the same machine state (a drift in load between two separate phases would
    otherwise decide the ratio). A pause after each call lets the other process's TensorFlow threads go
    idle first (they spin a while after a call, taking CPU from whoever runs next). Returns (in-process,
    server) summaries."""
    local, remote = [], []
    client = Client(url, kind)
    try:
        for name, data in images:  # warm-up: the connection, each photo once
            client.post(name, data)
        for i in range(count):
            name, data = images[i % len(images)]
            t0 = time.perf_counter()
            once(data)
            local.append(time.perf_counter() - t0)
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            client.post(name, data)
            remote.append(time.perf_counter() - t0)
            time.sleep(SETTLE_S)
    finally:
        client.close()
    return summary(local, sum(local)), summary(remote, sum(remote))


def load(url: str, images: list[tuple[str, bytes]], concurrency: int, count: int, kind: str) -> dict:
    import threading

    mine = threading.local()  # a connection per thread, kept alive
    clients: list[Client] = []

    def call(i: int) -> float:
        if not hasattr(mine, "client"):
            mine.client = Client(url, kind)
            clients.append(mine.client)
        name, data = images[i % len(images)]
        t0 = time.perf_counter()
        mine.client.post(name, data)
        return time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(concurrency) as pool:  # warm-up: connections, each photo once
            list(pool.map(call, range(max(concurrency, len(images)))))
            started = time.perf_counter()
            latencies = list(pool.map(call, range(count)))
            wall = time.perf_counter() - started
    finally:
        for client in clients:
            client.close()
    return summary(latencies, wall)


BATCH_METRIC = re.compile(r'^pipelines_inference_batch_size_(sum|count)(?:\{[^}]*\})?\s+([\d.e+]+)',
                          re.MULTILINE)


def batch_sizes(url: str) -> tuple[float, float]:
    """(batches run, mean batch size) of the model from the service's Prometheus metrics."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    found = {kind: float(value) for kind, value in BATCH_METRIC.findall(text)}
    count = found.get("count", 0.0)
    return count, (found.get("sum", 0.0) / count if count else float("nan"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help="levels to measure; 1 must come first (it is also where the in-process loop runs)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per concurrency level")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-latency-ms", type=int, default=10_000)
    parser.add_argument("--client", choices=["stdlib", "httpx"], default="stdlib",
                        help="the HTTP client that posts the photos (see Client)")
    parser.add_argument("--fresh", action="store_true", help="train and export the model again")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "serve"))
    args = parser.parse_args()

    if args.concurrency[0] != 1:
        parser.error("--concurrency must start with 1 (the in-process comparison runs there)")
    images = photos()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PIPELINES_WORKSPACE=str(out / "ws"), BENTOML_HOME=str(out / "bentoml"))
    print(f"photos: {len(images)} from {PHOTOS} ({sum(len(d) for _, d in images) / len(images) / 1e3:.0f} kB mean)")
    print(f"client: {args.client}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs", flush=True)
    export = prepare(out, env, args.fresh)

    from pipelines.serving.process import ServerProcess

    server_env = {**env, "PIPELINES_MODEL": str(export), "PIPELINES_MAX_BATCH_SIZE": str(args.max_batch_size),
                  "PIPELINES_MAX_LATENCY_MS": str(args.max_latency_ms)}
    rows = []
    with ServerProcess("pipelines.serving.service:Service", env=server_env, log=out / "server.log") as server:
        url = server.url
        once = in_process(export, images)
        for c in args.concurrency:
            before = batch_sizes(url)
            if c == 1:
                local, r = paired(once, url, images, max(args.requests, 2), args.client)
                print(f"in-process, one at a time: {local['rps']:.2f} img/s, p50 {local['p50'] * 1e3:.0f} ms, "
                      f"p99 {local['p99'] * 1e3:.0f} ms", flush=True)
            else:
                r = load(url, images, c, max(args.requests, 2 * c), args.client)
            after = batch_sizes(url)
            batches = after[0] - before[0]
            total = after[0] * after[1] - (before[0] * before[1] if before[0] else 0)
            r["batch"] = total / batches if batches else float("nan")
            rows.append((c, r))
            print(f"server, concurrency {c}: {r['rps']:.2f} req/s, p50 {r['p50'] * 1e3:.0f} ms, "
                  f"p99 {r['p99'] * 1e3:.0f} ms, mean batch {r['batch']:.2f}", flush=True)

    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1 min)")
    print("\n| path | concurrency | req/s | p50 ms | p99 ms | mean batch | req/s vs in-process | p50 vs in-process |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| in-process, one at a time | 1 | {local['rps']:.2f} | {local['p50'] * 1e3:.0f} | "
          f"{local['p99'] * 1e3:.0f} | 1 | 1.00 | 1.00 |")
    for c, r in rows:
        print(f"| `POST /detect` | {c} | {r['rps']:.2f} | {r['p50'] * 1e3:.0f} | {r['p99'] * 1e3:.0f} | "
              f"{r['batch']:.2f} | {r['rps'] / local['rps']:.2f} | {r['p50'] / local['p50']:.2f} |")
    first, last = rows[0], rows[-1]
    overhead = first[1]["p50"] / local["p50"] - 1
    print(f"\nconcurrency {first[0]}: the server adds {overhead * 100:+.0f}% to the in-process p50 latency "
          f"(target at most +10%: {'met' if overhead <= 0.10 else 'NOT met'})")
    gain = last[1]["rps"] / local["rps"]
    print(f"concurrency {last[0]}: server throughput / in-process one-at-a-time = {gain:.2f} "
          f"(target at least 1.5: {'met' if gain >= 1.5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
