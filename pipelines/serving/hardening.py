"""What the server under every service lacks, fixed in each worker before BentoML builds its app and
uvicorn its protocol. Each fix replaces a private part of BentoML or uvicorn, so each says why and is
checked by tests/test_serving.py against a real server.

- `finishing_timeouts`: BentoML's TimeoutMiddleware waits for the first byte of the response, or for its
  timeout (PIPELINES_TIMEOUT_S, 120 s). An app below it that raised before answering left the request
  with no answer at all for those 120 s, and the worker's graceful shutdown waited for that request: one
  malformed upload kept SIGTERM from stopping the server. Here the wait also ends when the app does; the
  app's exception then reaches Starlette's error handler (a 500) at once.
- `header_timeouts`: uvicorn has no time limit on a request's headers (its keep-alive timer stops at the
  first byte of the next request), so a client that sends its headers a byte at a time, or opens a
  connection and sends nothing, holds it forever. Such a connection is answered 408 and closed after
  PIPELINES_HEADER_TIMEOUT_S. On shutdown, a connection whose request body is still arriving is closed
  (its request sees the client go away) instead of being waited for.
- `parsed_form_handoff`: the guard (pipelines/serving/guard.py) parses a file route's multipart body to
  check it; BentoML's multipart input then takes that parsed form instead of parsing the body again,
  and hands the route its file as bytes instead of writing it to a temporary file to be read back.
- `bound_metric_labels`: one metrics label for every path no route serves.
"""

from __future__ import annotations

import asyncio
import json

from pipelines.common import env_number

HEADER_TIMEOUT_ENV = "PIPELINES_HEADER_TIMEOUT_S"
DEFAULT_HEADER_TIMEOUT_S = 10.0
PARSED_FORM = "pipelines.parsed_form"  # the scope key the guard hands its parsed form on in


def header_timeout_s() -> float:
    return max(env_number(HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT_S), 0.1)


def install() -> None:
    """All of the fixes; idempotent (each service module calls it when it is imported)."""
    finishing_timeouts()
    header_timeouts()
    parsed_form_handoff()
    bound_metric_labels()


# ------------------------------------------------------------------------------- BentoML's timeouts


def finishing_timeouts() -> None:
    from bentoml._internal.server.http import traffic
    from starlette.responses import JSONResponse

    original = traffic.TimeoutMiddleware
    if getattr(original, "finishes_with_app", False):
        return

    class FinishingTimeout(original):
        """BentoML's timeout (504 when nothing was answered within the timeout), ended by the app's end."""

        finishes_with_app = True

        async def __call__(self, scope, receive, send):
            if scope["type"] not in ("http", "websocket"):
                await self.app(scope, receive, send)
                return
            loop = asyncio.get_running_loop()
            answered = loop.create_future()  # done at the response's first message, the app's end, or the timeout

            def settle(error: BaseException | None = None) -> None:
                if not answered.done():
                    answered.set_exception(error) if error else answered.set_result(None)

            async def first_send(message):
                settle()
                await send(message)

            app = asyncio.ensure_future(self.app(scope, receive, first_send))
            app.add_done_callback(lambda _: settle())
            timer = loop.call_later(self.timeout, settle, asyncio.TimeoutError())
            try:
                await answered
            except asyncio.TimeoutError:
                if app.cancel():
                    response = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                            status_code=504)
                    await response(scope, receive, send)
                    return
            finally:
                timer.cancel()
            await app  # the app's result, or its exception for the error handler above

    traffic.TimeoutMiddleware = FinishingTimeout


# ------------------------------------------------------------------------------ uvicorn's protocol


def _timeout_response(seconds: float) -> bytes:
    import json

    body = json.dumps({"error": f"the request's headers did not arrive within {seconds:g} s "
                                f"({HEADER_TIMEOUT_ENV})"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def with_header_timeout(base: type) -> type:
    """uvicorn's HTTP protocol class `base` with a time limit on each request's headers."""

    class HeaderTimeout(base):
        timed_headers = True
        _header_timer = None

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s(), self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.write(_timeout_response(header_timeout_s()))
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()  # a connection that sends nothing is closed too

        def data_received(self, data: bytes) -> None:
            if self._between_requests() and self._header_timer is None:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            request = self.cycle
            super().data_received(data)
            if self.cycle is not request:  # its headers are complete: the request is the app's now
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            self._disarm()
            if self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body:
                self.transport.close()  # a body still arriving: its request reads a disconnect and ends
                return
            super().shutdown()

    HeaderTimeout.__name__ = HeaderTimeout.__qualname__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeout


def header_timeouts() -> None:
    """Every HTTP protocol uvicorn may pick ("auto", "h11", "httptools") gets the header time limit; the
    classes are looked up by name when the worker's server starts, after the service is imported."""
    import importlib

    from uvicorn.config import HTTP_PROTOCOLS

    for name in ("auto", "h11", "httptools"):  # the ones whose requests live in `.cycle` as wrapped here
        module_name, _, attr = HTTP_PROTOCOLS[name].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # httptools is optional
            continue
        protocol = getattr(module, attr, None)
        if protocol is not None and not getattr(protocol, "timed_headers", False):
            setattr(module, attr, with_header_timeout(protocol))


# --------------------------------------------------------------------------------- one form parse


def parsed_form_handoff() -> None:
    """A route's multipart input built from the guard's parsed form: its file field as the upload's bytes
    (no temporary file written and read back: a route reads it with `upload_bytes`), its other fields
    validated as BentoML would (same field names in a 400's report). Without a parsed form (a route the
    guard does not check) BentoML's own parse runs."""
    from _bentoml_impl.serde import MultipartSerde

    original = MultipartSerde.parse_request
    if getattr(original, "takes_parsed_form", False):
        return

    async def parse_request(self, request, cls):
        form = request.scope.get(PARSED_FORM)
        if form is None:
            return await original(self, request, cls)
        files, values = {}, {}
        for key in form:
            uploads = [v for v in form.getlist(key) if not isinstance(v, str)]
            if key in cls.multipart_fields and len(uploads) == 1:  # the guard let one file through
                files[key] = await uploads[0].read()
            elif key in cls.multipart_fields:
                request._form = form  # what Starlette's request.form() returns once it has parsed
                return await original(self, request, cls)
            else:
                value = form[key]
                value = await value.read() if not isinstance(value, str) else value
                try:
                    values[key] = json.loads(value)
                except ValueError:
                    values[key] = value
        checked = _fields_without_files(cls).model_validate(values)
        return cls.model_construct(**{**dict(checked), **files})

    parse_request.takes_parsed_form = True
    MultipartSerde.parse_request = parse_request


_FIELD_MODELS: dict[type, type] = {}


def _fields_without_files(cls):
    """A pydantic model of an input's fields but its file ones (once per input class)."""
    if cls not in _FIELD_MODELS:
        import pydantic

        fields = {name: (field.annotation, field) for name, field in cls.model_fields.items()
                  if name not in cls.multipart_fields}
        _FIELD_MODELS[cls] = pydantic.create_model(f"{cls.__name__}Fields", **fields)
    return _FIELD_MODELS[cls]


def upload_bytes(value) -> bytes:
    """A route's file input: the bytes the guard's form handed on, or the temporary file BentoML wrote."""
    from pathlib import Path

    return value if isinstance(value, (bytes, bytearray)) else Path(value).read_bytes()


# ------------------------------------------------------------------------------------ metrics labels

BUILTIN_PATHS = ("/", "/docs.json", "/schema.json", "/livez", "/readyz", "/healthz", "/metrics")
UNKNOWN_PATH_LABEL = "/<unknown>"


def bound_metric_labels() -> None:
    """BentoML's request metrics label each request by its URL path, so every path ever asked for
    (20,000 random ones: +660 MB of RSS, a 99 MB /metrics page) became a label set of its own. Paths
    no route serves get one label, UNKNOWN_PATH_LABEL; the request itself goes on unchanged (404).
    Installed in the worker before BentoML builds its middleware stack."""
    import copy

    from bentoml._internal.context import server_context
    from bentoml._internal.server.http import instruments

    original = instruments.RunnerTrafficMetricsMiddleware
    if getattr(original, "bounded_labels", False):
        return

    class BoundedLabels(original):
        bounded_labels = True

        async def __call__(self, scope, receive, send):
            path = scope.get("path", "")
            known = path in BUILTIN_PATHS or path in server_context.service_routes or \
                path.startswith("/static_content/")
            if scope.get("type") != "http" or known:
                await super().__call__(scope, receive, send)
                return
            if not self._is_setup:
                self._setup()  # once, on the shared instance: the copy below must not register again
            inner = self.app

            async def real_scope(_labelled, receive_, send_):
                await inner(scope, receive_, send_)

            labelled = copy.copy(self)  # the same metrics, a different inner app: safe under concurrency
            labelled.app = real_scope
            await original.__call__(labelled, {**scope, "path": UNKNOWN_PATH_LABEL}, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedLabels
