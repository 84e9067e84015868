"""Soak: a detector server under load, then hostile requests, then load again; answers, 5xx and memory.

    .venv/bin/python bench/soak_serve.py [--minutes 3] [--concurrency 32] [--fresh]

The export is bench_serve.py's (bench/out/serve/ws, built once: a 4-step detector, accuracy is not the
point). The server is what `make serve` starts (`python -m pipelines.serving.serve`), with
PIPELINES_MAX_BODY_MB=8 and PIPELINES_MAX_PIXELS=20000000. Phases:

1. load: --concurrency threads post the real photos (/work/shared/external/images) round robin to
   /detect for --minutes;
2. hostile: every request the hostile-input campaign found (issue 12) a few times each: a wrong
   multipart field, a second file, a 300-character file name, a malformed multipart body, JSON nested
   100,000 deep, a 1 GB Content-Length, a chunked body past the limit, a 20,000x20,000 PNG of a few
   hundred KB, a truncated JPEG, not an image, 2,000 random unknown paths;
3. load again, as in 1.

Printed per phase: requests, answers by class (2xx, 4xx, 5xx, no answer), requests/s, p50 and p99
latency; the server's resident memory (all its processes) sampled every 2 s; the size of /metrics.
A healthy run: no 5xx and no lost answers in any phase, every hostile request a 4xx, memory back near
its phase-1 level after the hostile phase, /metrics about the same size.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import REPO, percentile, photos, prepare  # noqa: E402

sys.path.insert(0, str(REPO))


def rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 1e6
    except psutil.Error:
        return float("nan")


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self):
        start = time.monotonic()
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - start, rss_mb(self.pid)))
            self.stop.wait(2.0)


def load(url: str, images, minutes: float, concurrency: int) -> dict:
    import httpx

    deadline = time.monotonic() + 60 * minutes
    results, lock = [], threading.Lock()

    def worker(k: int):
        with httpx.Client(base_url=url, timeout=120) as client:
            i = k
            while time.monotonic() < deadline:
                name, data = images[i % len(images)]
                i += concurrency
                t = time.monotonic()
                try:
                    status = client.post("/detect", files={"image": (name, data, "image/jpeg")}).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    results.append((status, time.monotonic() - t))

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return tally(results, time.monotonic() - started)


def tally(results, wall: float) -> dict:
    latencies = [t for s, t in results if s == 200]
    return {"requests": len(results), "2xx": sum(200 <= s < 300 for s, _ in results),
            "4xx": sum(400 <= s < 500 for s, _ in results), "5xx": sum(s >= 500 for s, _ in results),
            "none": sum(s == 0 for s, _ in results), "rps": len(results) / wall,
            "p50": percentile(latencies, 50) if latencies else float("nan"),
            "p99": percentile(latencies, 99) if latencies else float("nan")}


def raw(url: str, head: bytes, body: bytes = b"", chunks: int = 0) -> int:
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + body)
        try:
            for _ in range(chunks):
                sock.sendall(b"%x\r\n" % 100_000 + b"z" * 100_000 + b"\r\n")
        except OSError:
            pass
        data = sock.recv(65536)
    return int(data.split()[1]) if data.startswith(b"HTTP/") else 0


def hostile(url: str, images, repeats: int = 5) -> dict:
    import httpx
    from PIL import Image

    name, jpeg = images[0]
    huge = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(huge, format="PNG")  # a few hundred KB, 400 million pixels
    cases = {
        "wrong field": lambda c: c.post("/detect", files={"picture": (name, jpeg, "image/jpeg")}),
        "second file": lambda c: c.post("/detect", files={"image": (name, jpeg, "image/jpeg"),
                                                          "more": (name, jpeg, "image/jpeg")}),
        "long file name": lambda c: c.post("/detect", files={"image": ("x" * 300 + ".jpg", jpeg, "image/jpeg")}),
        "malformed multipart": lambda c: c.post("/detect", content=b"--B\r\ngarbage",
                                                headers={"content-type": "multipart/form-data; boundary=B"}),
        "deep JSON": lambda c: c.post("/detect/base64", content=b"[" * 100_000 + b"]" * 100_000,
                                      headers={"content-type": "application/json"}),
        "pixel bomb": lambda c: c.post("/detect", files={"image": ("bomb.png", huge.getvalue(), "image/png")}),
        "truncated": lambda c: c.post("/detect", files={"image": (name, jpeg[: len(jpeg) // 3], "image/jpeg")}),
        "not an image": lambda c: c.post("/detect", files={"image": ("a.txt", b"hello" * 100, "text/plain")}),
    }
    statuses: dict[str, list[int]] = {k: [] for k in cases}
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(repeats):
            for case, call in cases.items():
                try:
                    statuses[case].append(call(client).status_code)
                except httpx.HTTPError:
                    statuses[case].append(0)
        head = b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        for _ in range(repeats):
            statuses.setdefault("1 GB Content-Length", []).append(
                raw(url, head + b"Content-Length: 1000000000\r\n\r\n", b"x" * 1000))
            statuses.setdefault("chunked past the limit", []).append(
                raw(url, head + b"Transfer-Encoding: chunked\r\n\r\n", chunks=120))
        rng = random.Random(0)
        unknown = [client.get(f"/{rng.getrandbits(64):x}/{rng.getrandbits(32):x}").status_code for _ in range(2000)]
        statuses["2,000 unknown paths"] = unknown
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="length of each load phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--fresh", action="store_true", help="rebuild the export")
    args = parser.parse_args()

    import httpx

    from pipelines.serving.process import ServerProcess

    out = REPO / "bench" / "out" / "serve"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PIPELINES_WORKSPACE": str(out / "ws"), "BENTOML_HOME": str(out / "bentoml")}
    export = prepare(out, env, args.fresh)
    images = photos()
    server_env = {**env, "PIPELINES_MODEL": str(export), "PIPELINES_MAX_BODY_MB": "8",
                  "PIPELINES_MAX_PIXELS": "20000000"}
    with ServerProcess("pipelines.serving.service:Service", env=server_env, log=out / "soak-server.log") as server:
        sampler = Sampler(server.proc.pid)
        sampler.start()
        metrics = [len(httpx.get(server.url + "/metrics").content)]
        phases = {}
        print(f"phase 1: load, {args.minutes} min at concurrency {args.concurrency}", flush=True)
        phases["1 load"] = load(server.url, images, args.minutes, args.concurrency)
        rss_1 = rss_mb(server.proc.pid)
        metrics.append(len(httpx.get(server.url + "/metrics").content))
        print("phase 2: hostile requests", flush=True)
        started = time.monotonic()
        statuses = hostile(server.url, images)
        rss_2 = rss_mb(server.proc.pid)
        metrics.append(len(httpx.get(server.url + "/metrics").content))
        print(f"phase 3: load again ({time.monotonic() - started:.0f} s of hostile requests)", flush=True)
        phases["3 load"] = load(server.url, images, args.minutes, args.concurrency)
        rss_3 = rss_mb(server.proc.pid)
        metrics.append(len(httpx.get(server.url + "/metrics").content))
        sampler.stop.set()
        sampler.join()

    print("\n| phase | requests | 2xx | 4xx | 5xx | no answer | req/s | p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in phases.items():
        print(f"| {name} | {r['requests']} | {r['2xx']} | {r['4xx']} | {r['5xx']} | {r['none']} | {r['rps']:.2f} | "
              f"{r['p50']:.2f} | {r['p99']:.2f} |")
    print("\n| hostile request | sent | answers |")
    print("|---|---|---|")
    for case, seen in statuses.items():
        counts = {s: seen.count(s) for s in sorted(set(seen))}
        print(f"| {case} | {len(seen)} | {', '.join(f'{s}: {n}' for s, n in counts.items())} |")
    rss = [m for _, m in sampler.samples]
    print(f"\nserver memory (all processes): after phase 1 {rss_1:.0f} MB, after hostile {rss_2:.0f} MB, "
          f"at the end {rss_3:.0f} MB; max {max(rss):.0f} MB over {len(rss)} samples")
    print("/metrics size: " + " -> ".join(f"{m / 1000:.0f} KB" for m in metrics))
    bad = sum(r["5xx"] + r["none"] for r in phases.values()) + sum(
        1 for seen in statuses.values() for s in seen if not 400 <= s < 500)
    print(f"verdict: {'healthy' if bad == 0 else f'{bad} answers were not what they should be'}")


if __name__ == "__main__":
    main()
