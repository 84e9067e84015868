"""The door of every service: an ASGI middleware that checks a request before BentoML parses it.

- Bearer token: when PIPELINES_API_TOKEN is set, every route but the health and metrics ones
  (/livez, /readyz, /healthz, /metrics) needs `Authorization: Bearer <token>`; else 401.
- Body size: at most PIPELINES_MAX_BODY_MB (default 32) megabytes, refused from the Content-Length
  header before anything is read, or as soon as a chunked body passes the limit (413).
- Body time: the body must arrive within PIPELINES_BODY_TIMEOUT_S (default 20) seconds plus one second
  for each PIPELINES_BODY_MIN_RATE_KB (default 1) kilobytes already received, so a slow link keeps
  going while a client that trickles a byte at a time is answered 408 and its connection closed. (The
  headers' time limit is uvicorn's part: pipelines/serving/hardening.py.)
- File routes (/detect, /segment, ...): the body must be multipart/form-data (415 otherwise, before
  the body is read) that parses (400), with exactly one file in the route's file field (400 naming the
  field, and what came instead), and a file name BentoML can keep (400 past 200 bytes: it becomes part
  of a temporary file's name). The parsed form is handed on to BentoML, which does not parse it again.
- BentoML's own 400s for a form it cannot validate (a raw pydantic report) are rewritten to our
  one-line {"error": "..."} shape; an exception that escapes a route before it answered becomes a 500
  with that shape (and its traceback in the log) instead of a request left without an answer.

Every refusal is JSON {"error": "..."} with a 4xx status, like the routes' own.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import time

from pipelines.common import env_number
from pipelines.serving import hardening

TOKEN_ENV = "PIPELINES_API_TOKEN"
MAX_BODY_ENV = "PIPELINES_MAX_BODY_MB"
DEFAULT_MAX_BODY_MB = 32.0
BODY_TIMEOUT_ENV = "PIPELINES_BODY_TIMEOUT_S"
DEFAULT_BODY_TIMEOUT_S = 20.0
BODY_RATE_ENV = "PIPELINES_BODY_MIN_RATE_KB"
DEFAULT_BODY_MIN_RATE_KB = 1.0
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")
MAX_FILENAME_BYTES = 200
MAX_FILES, MAX_FIELDS = 8, 64  # per multipart body: the routes take one file and two or three fields


def max_body_bytes() -> int:
    return int(max(env_number(MAX_BODY_ENV, DEFAULT_MAX_BODY_MB), 0.001) * 1024 * 1024)


def install(service, file_fields: dict[str, str]) -> None:
    """The guard in front of a service's routes (`file_fields`: route -> its multipart file field), and
    the server fixes every worker needs (pipelines/serving/hardening.py)."""
    hardening.install()
    service.add_asgi_middleware(RequestGuard, file_fields=file_fields)


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


CLOSE = {"Connection": "close"}  # a refusal before the whole body was read: the rest is not waited for


class RequestGuard:
    """ASGI middleware; `file_fields` maps a route to the multipart file field it takes."""

    def __init__(self, app, file_fields: dict[str, str] | None = None):
        self.app = app
        self.file_fields = file_fields or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        form = None
        try:
            self._authorize(scope)
            if scope["method"] not in ("POST", "PUT", "PATCH"):
                await self._answered(scope, receive, send)
                return
            field = self.file_fields.get(scope["path"])
            if field:
                self._check_content_type(scope, field)
            body = await self._read_body(scope, receive)
            if field:
                form = await self._check_form(scope, body, field)
                scope[hardening.PARSED_FORM] = form
        except Refused as e:
            await send_error(send, e.status, e.message, e.headers)
            return
        try:
            await self._answered(scope, _replay(body, receive), _reshape_validation_errors(send))
        finally:
            if form is not None:
                await form.close()

    async def _answered(self, scope, receive, send) -> None:
        """The app below; an exception it raises before answering becomes a JSON 500 (logged)."""
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:
                raise
            import traceback

            print(f"{scope.get('method')} {scope.get('path')}: unexpected error", file=sys.stderr, flush=True)
            traceback.print_exc()
            await send_error(send, 500, "an unexpected error: see the server's log")

    def _authorize(self, scope) -> None:
        token = os.environ.get(TOKEN_ENV, "")
        if not token:
            return
        given = _header(scope, b"authorization")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise Refused(401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
                               f"({TOKEN_ENV} of the server)", {"WWW-Authenticate": "Bearer", **CLOSE})

    async def _read_body(self, scope, receive) -> bytes:
        limit = max_body_bytes()
        length = _header(scope, b"content-length")
        too_large = f"the request body is over the limit of {limit / 1024 / 1024:g} MB ({MAX_BODY_ENV})"
        if length.isdigit() and int(length) > limit:
            raise Refused(413, too_large, CLOSE)
        grace = max(env_number(BODY_TIMEOUT_ENV, DEFAULT_BODY_TIMEOUT_S), 0.1)
        rate = max(env_number(BODY_RATE_ENV, DEFAULT_BODY_MIN_RATE_KB), 0.001) * 1024  # bytes per second
        started = time.monotonic()
        chunks, size = [], 0
        while True:
            left = started + grace + size / rate - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except asyncio.TimeoutError:
                raise Refused(408, f"the request body came too slowly: {size} byte(s) in "
                                   f"{time.monotonic() - started:.0f} s ({BODY_TIMEOUT_ENV}, {BODY_RATE_ENV})",
                              CLOSE) from None
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client went away before the body was complete")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refused(413, too_large, CLOSE)
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    def _how(field: str) -> str:
        return f'send it as multipart/form-data with the file field "{field}" (curl -F {field}=@file)'

    def _check_content_type(self, scope, field: str) -> None:
        content_type = _header(scope, b"content-type")
        if not content_type.lower().startswith("multipart/form-data"):
            raise Refused(415, f"the body is {content_type[:100] or 'of no content type'}: {self._how(field)}", CLOSE)

    async def _check_form(self, scope, body: bytes, field: str):
        """The parsed form of a file route's body, checked (the caller closes it)."""
        from starlette.datastructures import Headers, UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        how = self._how(field)

        async def stream():
            yield body

        try:
            form = await MultiPartParser(Headers(scope=scope), stream(), max_files=MAX_FILES,
                                         max_fields=MAX_FIELDS).parse()
        except MultiPartException as e:  # the parser's own reason, where it gave one
            reason = str(e.__cause__ or "") or e.message
            raise Refused(400, f"malformed multipart body ({reason[:200]}): {how}") from None
        except Exception as e:  # noqa: BLE001  (whatever else a hostile body makes the parser raise)
            raise Refused(400, f"malformed multipart body ({str(e)[:200] or type(e).__name__}): {how}") from None
        try:
            files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
            names = [k for k, _ in files]
            if field not in names:
                came = ", ".join(f'"{k}"' for k in dict.fromkeys(names)) or "none"
                raise Refused(400, f'no file field "{field}" (file fields sent: {came}): {how}')
            for name, upload in files:
                if name != field:
                    raise Refused(400, f'unexpected file field "{name}": {how}')
                filename = upload.filename or ""
                if len(filename.encode()) > MAX_FILENAME_BYTES:
                    raise Refused(400, f"the file name is {len(filename.encode())} bytes long, over "
                                       f"{MAX_FILENAME_BYTES}: rename the file")
            if len(names) > 1:
                raise Refused(400, f'{len(names)} files in the field "{field}": send one image per request')
        except Refused:
            await form.close()
            raise
        return form


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


