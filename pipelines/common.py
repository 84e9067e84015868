"""Small helpers every stage uses: settings read from the environment, printing to stderr, durations in
progress lines, and an ordered process-parallel map."""

from __future__ import annotations

import math
import os
import sys


def env_number(name: str, default: float) -> float:
    """A limit or setting from the environment, read at each call; the default when unset or not a finite
    number (nan would pass every comparison with a limit, inf could not be made an integer)."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        return default
    return value if math.isfinite(value) else default


def env_int(name: str, default: int) -> int:
    """A whole-number setting of at least 1 from the environment, read once; the default when unset or not
    a whole number."""
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def ordered_parallel_map(fn, items, workers: int, window_per_worker: int = 4):
    """Yield fn(item) for each item, in order, computed by `workers` spawned processes.

    At most `workers * window_per_worker` items are in flight, so memory stays flat however many
    items there are. Workers are spawned (not forked): they start clean, without the parent's
    TensorFlow threads. With one worker everything runs in this process.
    """
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    iterator = iter(items)
    pending = collections.deque()
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for item in iterator:
            pending.append(executor.submit(fn, item))
            if len(pending) >= workers * window_per_worker:
                break
        while pending:
            result = pending.popleft().result()
            for item in iterator:
                pending.append(executor.submit(fn, item))
                break
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def duration(seconds: float) -> str:
    """1m05s, 2h03m00s: for progress lines and ETAs."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
