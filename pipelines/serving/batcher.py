"""One worker's adaptive batching: requests' images joined into forward passes by BentoML's CorkDispatcher
(the CORK algorithm behind its batchable APIs), run in-process on decoded arrays.

This is the one module that depends on BentoML's private dispatcher
(`bentoml._internal.marshal.dispatcher.CorkDispatcher`, bentoml 1.4.39 as pinned in requirements.lock);
tests/test_serving.py checks the behaviour relied on here (test_a_burst_is_refused_only_after_a_real_wait).
The interface: `await Batcher(model)(array) -> outputs`, where `model.run(list of arrays) -> list of
outputs`, or `await Batcher(model).prepared(prepare)` where `prepare() -> (anything, array)` reads the
request's input in the same worker thread the model runs in when the model is idle; `Overloaded` when a
request cannot reach the model in time.
"""

from __future__ import annotations

import asyncio
import time

import bentoml
import numpy as np

from pipelines.common import env_int

MAX_BATCH_SIZE = env_int("PIPELINES_MAX_BATCH_SIZE", 8)
MAX_LATENCY_MS = env_int("PIPELINES_MAX_LATENCY_MS", 10_000)


class Overloaded(RuntimeError):
    pass


class Batcher:
    """Adaptive batching of one worker's model calls with BentoML's CorkDispatcher: batches hold at most
    PIPELINES_MAX_BATCH_SIZE images, one batch runs at a time, in a thread, while the event loop goes on
    taking requests, and the dispatcher waits for more requests to join a batch only while that pays.

    At most one batch's worth of requests is in the dispatcher (waiting or running); the others wait
    for a place. The dispatcher refuses a request when it estimates the request's latency as its wait
    plus the time of the *whole* queue in one batch (a*n + b, fitted on past batches): under a burst of
    32 or more requests that estimate charged the first request for every other one and refused
    requests that had waited ~0.1 s, a storm of 503s whose message blamed the queue's wait (two
    batches' worth still let it refuse requests that had waited 0.4 s of a 1 s limit). With one batch
    in it, its estimate is one batch's time, and a refusal comes from a real wait: a request that has
    not reached the model within PIPELINES_MAX_LATENCY_MS is answered 503 saying how long it waited."""

    def __init__(self, model, max_batch_size: int = MAX_BATCH_SIZE,
                 max_latency_ms: int = MAX_LATENCY_MS) -> None:
        from bentoml._internal.marshal.dispatcher import CorkDispatcher, NonBlockSema

        def overloaded():
            raise Overloaded(f"the model is overloaded: its queue would take longer than {max_latency_ms} ms "
                             "(PIPELINES_MAX_LATENCY_MS), estimated from the batches so far")

        self.model = model
        self.max_latency_ms = max_latency_ms
        self.inside = 0  # requests in __call__: waiting for a place, in the dispatcher's queue or its batch
        self.places = asyncio.Semaphore(max_batch_size)
        self.running = NonBlockSema(1)  # the model: one batch at a time, the dispatcher's or the idle path's
        self.call = CorkDispatcher(max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size,
                                   shared_sema=self.running, fallback=overloaded, get_batch_size=lambda _: 1)(self._run)

    def _run(self, arrays) -> list[dict[str, np.ndarray]]:  # in a worker thread
        BATCH_SIZES.observe(len(arrays))
        return self.model.run(list(arrays))

    async def __call__(self, array: np.ndarray) -> dict[str, np.ndarray]:
        self.inside += 1
        try:
            return await self._queued(array)
        finally:
            self.inside -= 1

    async def _queued(self, array: np.ndarray) -> dict[str, np.ndarray]:
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.places.acquire(), timeout=self.max_latency_ms / 1000)
        except asyncio.TimeoutError:
            raise Overloaded(f"the model is overloaded: this request waited {1000 * (time.monotonic() - started):.0f} "
                             f"ms without reaching it (PIPELINES_MAX_LATENCY_MS is {self.max_latency_ms})") from None
        try:
            return await self.call(array)
        finally:
            self.places.release()

    def _idle(self) -> bool:
        return self.inside == 0 and not self.running.is_locked()

    async def prepared(self, prepare) -> tuple[object, dict[str, np.ndarray]]:
        """(what `prepare()` kept, the model's outputs for its array). A request that finds the model idle
        (nothing running, nothing waiting) reads its input and runs in one worker thread, without the
        dispatcher's hops (about 1 ms a request at concurrency 1, bench/RESULTS.md); requests arriving
        meanwhile wait in the dispatcher and run together after it. Otherwise `prepare` runs in a thread
        and its array joins the dispatcher's queue."""
        if not self._idle():
            kept, array = await asyncio.to_thread(prepare)
            return kept, await self(array)
        def alone():
            kept, array = prepare()
            return kept, self._run([array])[0]

        self.running.acquire()  # no await since the check: nothing else started in between
        job = asyncio.ensure_future(asyncio.to_thread(alone))
        job.add_done_callback(lambda _: self.running.release())  # when the thread is done, even if the
        return await asyncio.shield(job)  # request was cancelled (its client went away) meanwhile


def _batch_histogram():
    sizes = [2 ** i for i in range(max(1, MAX_BATCH_SIZE.bit_length()) + 1)]
    return bentoml.metrics.Histogram(name="pipelines_inference_batch_size", buckets=sizes,
                                     documentation="Images per forward pass of the served model")


BATCH_SIZES = _batch_histogram()
