"""The door of every service: an ASGI middleware that checks a request before BentoML parses it.

- Bearer token: when PIPELINES_API_TOKEN is set, every route but the health and metrics ones
  (/livez, /readyz, /healthz, /metrics) needs `Authorization: Bearer <token>`; else 401.
- Body size: at most PIPELINES_MAX_BODY_MB (default 32) megabytes, refused from the Content-Length
  header before anything is read, or as soon as a chunked body passes the limit (413).
- File routes (/detect, /segment, ...): the body must be multipart/form-data (415 otherwise) that
  parses (400), carries the route's file field (400 naming the field, and what came instead), and
  a file name BentoML can keep (400 past 200 bytes: it becomes part of a temporary file's name).
- BentoML's own 400s for a form it cannot validate (a raw pydantic report) are rewritten to our
  one-line {"error": "..."} shape.

Every refusal is JSON {"error": "..."} with a 4xx status, like the routes' own.
"""

from __future__ import annotations

import hmac
import json
import os

from pipelines.common import env_number

TOKEN_ENV = "PIPELINES_API_TOKEN"
MAX_BODY_ENV = "PIPELINES_MAX_BODY_MB"
DEFAULT_MAX_BODY_MB = 32.0
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")
MAX_FILENAME_BYTES = 200


def max_body_bytes() -> int:
    return int(max(env_number(MAX_BODY_ENV, DEFAULT_MAX_BODY_MB), 0.001) * 1024 * 1024)


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


async def send_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


class RequestGuard:
    """ASGI middleware; `file_fields` maps a route to the multipart file field it takes."""

    def __init__(self, app, file_fields: dict[str, str] | None = None):
        self.app = app
        self.file_fields = file_fields or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            self._authorize(scope)
            if scope["method"] not in ("POST", "PUT", "PATCH"):
                await self.app(scope, receive, send)
                return
            body = await self._read_body(scope, receive)
            field = self.file_fields.get(scope["path"])
            if field:
                await self._check_form(scope, body, field)
        except Refused as e:
            await send_error(send, e.status, e.message, e.headers)
            return
        await self.app(scope, _replay(body, receive), _reshape_validation_errors(send))

    def _authorize(self, scope) -> None:
        token = os.environ.get(TOKEN_ENV, "")
        if not token:
            return
        given = _header(scope, b"authorization")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise Refused(401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
                               f"({TOKEN_ENV} of the server)", {"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope, receive) -> bytes:
        limit = max_body_bytes()
        length = _header(scope, b"content-length")
        too_large = f"the request body is over the limit of {limit / 1024 / 1024:g} MB ({MAX_BODY_ENV})"
        if length.isdigit() and int(length) > limit:
            raise Refused(413, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client went away before the body was complete")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refused(413, too_large)
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _check_form(self, scope, body: bytes, field: str) -> None:
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException
        from starlette.requests import Request

        how = f'send it as multipart/form-data with the file field "{field}" (curl -F {field}=@file)'
        if not _header(scope, b"content-type").lower().startswith("multipart/form-data"):
            raise Refused(415, f"the body is {_header(scope, b'content-type') or 'of no content type'}: {how}")

        async def receive_body():
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, receive_body)
        try:
            form = await request.form(max_files=8, max_fields=64)
        except MultiPartException as e:
            raise Refused(400, f"malformed multipart body ({e}): {how}") from None
        except (ValueError, KeyError, AssertionError) as e:
            raise Refused(400, f"malformed multipart body ({e or type(e).__name__}): {how}") from None
        try:
            files = {k: v for k, v in form.multi_items() if isinstance(v, UploadFile)}
            if field not in files:
                came = ", ".join(f'"{k}"' for k in files) or "none"
                raise Refused(400, f'no file field "{field}" (file fields sent: {came}): {how}')
            for name, upload in files.items():
                if name != field:
                    raise Refused(400, f'unexpected file field "{name}": {how}')
                filename = upload.filename or ""
                if len(filename.encode()) > MAX_FILENAME_BYTES:
                    raise Refused(400, f"the file name is {len(filename.encode())} bytes long, over "
                                       f"{MAX_FILENAME_BYTES}: rename the file")
        finally:
            await form.close()


def _replay(body: bytes, receive):
    """The receive channel of a request whose body was already read: the body once, then the client's
    own messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _reshape_validation_errors(send):
    """BentoML answers a form it cannot validate with 400 {"error": "<pydantic report>", "detail": [...]};
    make that {"error": "image: Field required; ..."}."""
    held = {}

    async def wrapped(message):
        if message["type"] == "http.response.start" and message["status"] == 400:
            held["start"] = message
            return
        if "start" in held and message["type"] == "http.response.body":
            held.setdefault("body", []).append(message.get("body", b""))
            if message.get("more_body"):
                return
            start, body = held.pop("start"), b"".join(held.pop("body"))
            try:
                payload = json.loads(body)
                details = payload.get("detail") if isinstance(payload, dict) else None
            except ValueError:
                details = None
            if isinstance(details, list):
                parts = [f"{'.'.join(map(str, d.get('loc', []))) or 'body'}: {d.get('msg', 'invalid')}"
                         for d in details if isinstance(d, dict)]
                body = json.dumps({"error": "; ".join(parts) or "invalid request"}).encode()
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                start = {**start, "headers": headers + [(b"content-length", str(len(body)).encode())]}
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return wrapped


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
