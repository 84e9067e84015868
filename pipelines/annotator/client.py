"""Upload a prelabel file to coco-annotator through its HTTP API, as its "Import COCO" button does.

The routes (coco-annotator's backend/webserver/api/): `POST /api/user/login` with JSON {"username",
"password"} (a session cookie; 400 {"success": false, "message"} for a wrong password);
`GET /api/dataset/` (the user's datasets: id, name, categories); `GET /api/category/` (the user's categories:
id, name); `POST /api/dataset/<id>/coco` with the file as multipart field `coco` ({"id": task id}); the import
then runs as a task: `GET /api/tasks/` (every task: id, completed, progress, errors, warnings) and
`GET /api/tasks/<id>/logs` ({"logs": ["[time] [LEVEL] message", ...]}).

What the importer does not say, checked here:
- it matches a category by name among all categories, but adds only the ones it creates to the dataset:
  a class whose name belongs to a category outside the dataset would be imported where the annotator does
  not show it. Such an upload is refused before anything is sent, naming the category;
- its task never marks a failure, and reaches 100% before the last annotation is saved: the client waits
  for `completed`, then for the log to stop growing, and reports the log's counts (created, already there,
  warnings, errors); a task still running at the timeout is reported as such (exit 1).

What the client does not trust (the answers come from a server the user named, maybe not coco-annotator):
- redirects: coco-annotator answers these routes in place (Flask routes with their trailing slash, no
  redirect). None is followed to another origin (scheme, host, port): one line names where it pointed. On
  the same origin only a GET's trailing-slash redirect (werkzeug's strict slashes) is followed; the login,
  and so the password, is sent once, to ANNOTATOR_URL only;
- time: each request (connect, send, every read, a followed redirect included) has a deadline,
  ANNOTATOR_REQUEST_TIMEOUT seconds (default 60), besides the per-read timeout: a server that answers one
  byte at a time is cut off there;
- shapes: each answer is checked against the shape coco-annotator gives before it is used; another shape is
  one line naming the route and what came (exit 2), and the dataset and category answers are checked
  before the import starts;
- echoes: the password (as sent, and URL-encoded, JSON- or HTML-escaped) is masked in every line and error
  built from an answer.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, quote_plus, urljoin, urlsplit

from pipelines.workspace import UserError, display_path

READ_TIMEOUT_S = 30  # one read from the connection (the deadline below bounds the whole request)
DEADLINE_ENV = "ANNOTATOR_REQUEST_TIMEOUT"
DEFAULT_DEADLINE_S = 60.0  # one whole request: connect, send, every read
MAX_ANSWER_BYTES = 64 * 2**20  # coco-annotator's largest answer here, an import log, is far below
MAX_REDIRECTS = 2
SHOWN_CHARS = 120  # of an unexpected answer, in an error line
LOGIN_ROUTE = "/api/user/login"
LOG_LINE = re.compile(r"^\[[^\]]*\]\s*\[(\w+)\]\s*(.*)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


class AnnotatorError(UserError):
    """coco-annotator refused a request, answered something its API does not document, or nothing."""


class ImportUnfinished(UserError):
    """The import ran but did not end well (errors in its log, or still running at the timeout)."""

    exit_code = 1


class _Answer(NamedTuple):
    status: int
    headers: dict
    data: bytes


def request_deadline(seconds: float | str | None = None) -> float:
    """The deadline of one request: `seconds`, else ANNOTATOR_REQUEST_TIMEOUT, else 60 s."""
    raw = os.environ.get(DEADLINE_ENV, "") if seconds is None else seconds
    if raw == "" or raw is None:
        return DEFAULT_DEADLINE_S
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        where = f"{DEADLINE_ENV}={raw}" if seconds is None else f"request timeout {raw!r}"
        raise UserError(where, f"expected the seconds one request to coco-annotator may take, a number above 0 "
                               f"(default {DEFAULT_DEADLINE_S:g})")
    return value


class Scrubber:
    """Masks a secret in text: as given, URL-encoded, JSON-, HTML- or Python-escaped (any letter case)."""

    def __init__(self, secret: str | None):
        forms = set()
        if secret:
            forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret), json.dumps(secret)[1:-1],
                     json.dumps(secret, ensure_ascii=False)[1:-1], repr(secret)[1:-1], html.escape(secret),
                     html.escape(secret, quote=False)}
        forms.discard("")
        self.pattern = re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)),
                                  re.IGNORECASE) if forms else None

    def __call__(self, text) -> str:
        text = str(text)
        return self.pattern.sub("***", text) if self.pattern else text


def one_line(text: str) -> str:
    """Control characters (newlines, terminal escapes) of a server's text as spaces."""
    return _CONTROL.sub(" ", str(text))


def _clip(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _as_json(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return str(value)


def _size(count: int) -> str:
    return f"{count / 2**20:g} MiB" if count >= 2**20 else f"{count} bytes"


def _int_id(value) -> int | None:
    """coco-annotator's ids are whole numbers; one given as a string of digits is taken as that number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*\d{1,18}\s*", value, re.ASCII):
        return int(value)
    return None


def _percent(value) -> int | None:
    """A task's progress: a number or a string like "50" or "50%" -> 0..100; None when it is not one."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        number = float(value)
    elif isinstance(value, str) and (match := re.fullmatch(r"\s*(\d{1,6}(?:\.\d*)?)\s*%?\s*", value, re.ASCII)):
        number = float(match.group(1))
    else:
        return None
    return int(max(0.0, min(100.0, number)))


def _origin(url: str) -> tuple[str, str, int] | None:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        return None
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or {"http": 80, "https": 443}[scheme]


def _tracking_adapter(connections: weakref.WeakSet):
    """requests' adapter, whose connections are noted in `connections` (to be shut at a deadline)."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def tracked(pool_class, connection_class):
        class Connection(connection_class):
            def connect(self):
                connections.add(self)
                super().connect()

        return type(pool_class.__name__, (pool_class,), {"ConnectionCls": Connection})

    pools = {"http": tracked(HTTPConnectionPool, HTTPConnection),
             "https": tracked(HTTPSConnectionPool, HTTPSConnection)}

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            if isinstance(getattr(self.poolmanager, "pool_classes_by_scheme", None), dict):
                self.poolmanager.pool_classes_by_scheme = dict(pools)

    return Adapter(max_retries=0)


class CocoAnnotator:
    """A logged-in session with one coco-annotator server."""

    def __init__(self, url: str, user: str, password: str, request_timeout: float | None = None):
        import requests

        if not re.match(r"^https?://[^/\s]+", url or "") or _origin(url) is None:
            raise UserError(url or "ANNOTATOR_URL", "expected coco-annotator's address, e.g. http://localhost:5000")
        if not user:
            raise UserError("ANNOTATOR_USER", "give the coco-annotator user name to log in with")
        if password is None:
            raise UserError("ANNOTATOR_PASSWORD", "set it to the password of the coco-annotator user "
                                                  f"'{user}' (read from the environment only)")
        self.deadline_s = request_deadline(request_timeout)
        self.url = url.rstrip("/")
        self.origin = _origin(self.url)
        self.scrub = Scrubber(password)
        self._connections = weakref.WeakSet()
        self.session = requests.Session()
        adapter = _tracking_adapter(self._connections)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._request("POST", LOGIN_ROUTE, json={"username": user, "password": password},
                      what=f"log in as '{user}'")

    # ------------------------------------------------------------------ messages

    def _error(self, where: str, message: str, kind: type[UserError] = AnnotatorError) -> UserError:
        """One line, the password masked (before anything is cut short)."""
        return kind(one_line(self.scrub(where)), one_line(self.scrub(message)))

    def _shown(self, value) -> str:
        """What came, as JSON, masked and cut short."""
        return _clip(one_line(self.scrub(_as_json(value))))

    def _message(self, body) -> str:
        if isinstance(body, dict):
            text = body.get("message") or body.get("errors") or body
            text = text if isinstance(text, str) else _as_json(text)
        else:
            text = body if isinstance(body, str) else _as_json(body)
        return _clip(one_line(self.scrub(text)), 300)

    # ------------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, what: str, **kwargs):
        """One request to coco-annotator (a same-origin trailing-slash redirect of a GET followed, no other),
        within the deadline; its JSON answer. AnnotatorError for anything else."""
        url = self.url + path
        deadline = time.monotonic() + self.deadline_s
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            answer = self._exchange(method, target, path, what, deadline, **kwargs)
            if not 300 <= answer.status < 400:
                break
            target = self._redirect(method, target, path, what, answer)
        else:
            raise self._error(url, f"cannot {what}: more than {MAX_REDIRECTS} redirects: not followed")
        body = self._json(answer, url, what)
        if answer.status >= 400 or (isinstance(body, dict) and body.get("success") is False):
            raise self._error(url, f"cannot {what}: HTTP {answer.status}: {self._message(body)}")
        return body

    def _redirect(self, method: str, current: str, path: str, what: str, answer: _Answer) -> str:
        location = answer.headers.get("Location")
        if not location:
            raise self._error(current, f"cannot {what}: HTTP {answer.status} (a redirect) without a Location: "
                                       "not coco-annotator's answer (is ANNOTATOR_URL its address?)")
        shown = _clip(one_line(self.scrub(location)), 200)
        target = urljoin(current, location.strip())
        if _origin(target) != self.origin:
            carried = "the request and its password" if path == LOGIN_ROUTE else "the request and its session"
            raise self._error(current, f"cannot {what}: HTTP {answer.status} redirect to {shown}, another address "
                                       f"than {self.url}: not followed ({carried} would go there); if that is "
                                       "coco-annotator's address, set ANNOTATOR_URL to it")
        old, new = urlsplit(current), urlsplit(target)
        if method == "GET" and new.path.rstrip("/") == old.path.rstrip("/") and new.query == old.query:
            return target
        raise self._error(current, f"cannot {what}: HTTP {answer.status} redirect to {shown}: not followed "
                                   "(coco-annotator answers its API routes in place; only a GET's trailing-slash "
                                   "redirect is followed; is ANNOTATOR_URL its address?)")

    def _exchange(self, method: str, url: str, path: str, what: str, deadline: float, **kwargs) -> _Answer:
        """Send one request and read its whole answer before `deadline`, in a worker thread: a server that
        trickles its status line, headers or body is cut off at the deadline (its connection shut)."""
        import requests
        import urllib3

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._late(url, method, path, what)
        outcome = {}

        def work():
            try:
                outcome["answer"] = self._send(method, url, deadline, **kwargs)
            except BaseException as e:  # handed to the caller's thread
                outcome["error"] = e

        worker = threading.Thread(target=work, name=f"coco-annotator {method} {path}", daemon=True)
        worker.start()
        worker.join(remaining)
        if worker.is_alive():
            self._shut_connections()
            raise self._late(url, method, path, what)
        error = outcome.get("error")
        if error is None:
            return outcome["answer"]
        if isinstance(error, UserError):
            raise error
        if isinstance(error, (requests.RequestException, urllib3.exceptions.HTTPError, OSError, _Late)):
            if isinstance(error, _Late) or time.monotonic() >= deadline:
                raise self._late(url, method, path, what)
            raise self._error(self.url, f"cannot {what}: {type(error).__name__}: "
                                        f"{_clip(one_line(self.scrub(error)), 200)}")
        raise error

    def _send(self, method: str, url: str, deadline: float, **kwargs) -> _Answer:
        read = max(0.001, min(READ_TIMEOUT_S, deadline - time.monotonic()))
        with self.session.request(method, url, timeout=(read, read), allow_redirects=False, stream=True,
                                  **kwargs) as response:
            if 300 <= response.status_code < 400:  # its body is not read
                return _Answer(response.status_code, response.headers, b"")
            chunks, size = [], 0
            for chunk in response.iter_content(65536):
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise self._error(url, f"the answer is larger than {_size(MAX_ANSWER_BYTES)}: not read "
                                           "(is ANNOTATOR_URL coco-annotator's address?)")
                if time.monotonic() >= deadline:
                    raise _Late()
                chunks.append(chunk)
            return _Answer(response.status_code, response.headers, b"".join(chunks))

    def _shut_connections(self) -> None:
        for connection in list(self._connections):
            sock = getattr(connection, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _late(self, url: str, method: str, path: str, what: str) -> UserError:
        return self._error(url, f"cannot {what}: no complete answer to {method} {path} within {self.deadline_s:g}s: "
                                f"cut off ({DEADLINE_ENV} sets this limit, default {DEFAULT_DEADLINE_S:g}s)")

    def _json(self, answer: _Answer, url: str, what: str):
        try:
            return json.loads(answer.data)
        except (ValueError, RecursionError):
            text = answer.data[:4096].decode("utf-8", "replace")
            raise self._error(url, f"cannot {what}: HTTP {answer.status}, not JSON (is this coco-annotator's "
                                   f"address?): {_clip(self.scrub(text))!r}") from None

    # ------------------------------------------------------------------ routes

    def dataset(self, id_or_name: str) -> dict:
        """The user's dataset with this id (digits) or name (exact, else case-insensitive if unique); its id
        and category ids as numbers."""
        datasets = self._datasets()
        text = str(id_or_name).strip()
        found = [d for d in datasets if str(d["id"]) == text] if text.isdigit() else []
        found = found or [d for d in datasets if d["name"] == text] or \
            [d for d in datasets if d["name"].lower() == text.lower()]
        if len(found) != 1:
            names = ", ".join(f"{d['name']} (id {d['id']})" for d in datasets) or "none"
            problem = "no" if not found else f"{len(found)} datasets match:"
            raise self._error(f"ANNOTATOR_DATASET={text}", f"{problem} dataset of that id or name for this user "
                                                           f"(datasets: {names})", UserError)
        return found[0]

    def _named_list(self, path: str, what: str, one: str, plural: str) -> tuple[str, list[tuple[int, str, dict]]]:
        """GET `path`, which must answer a list of objects with a whole-number id and a name:
        (where, [(id, name, object)])."""
        items = self._request("GET", path, what=what)
        where = self.url + path
        if not isinstance(items, list):
            raise self._error(where, f"expected a list of {plural}, got {self._message(items)}")
        checked = []
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                raise self._error(where, f"expected a list of {plural} (objects with an id and a name), item {n} "
                                         f"is {self._shown(item)}")
            number, name = _int_id(item.get("id")), item.get("name")
            if number is None or not isinstance(name, str):
                raise self._error(where, f"expected each {one} with a whole-number id"
                                         f" and a name, item {n} is {self._shown(item)}")
            checked.append((number, name, item))
        return where, checked

    def _datasets(self) -> list[dict]:
        where, listed = self._named_list("/api/dataset/", "list the datasets", "dataset", "datasets")
        checked = []
        for number, name, dataset in listed:
            categories = dataset.get("categories")
            categories = [] if categories is None else categories
            ids = [_int_id(c) for c in categories] if isinstance(categories, list) else [None]
            if None in ids:
                raise self._error(where, f"dataset '{name}' (id {number}): expected its categories as a list of "
                                         f"category ids, got {self._shown(categories)}")
            checked.append({**dataset, "id": number, "name": name, "categories": ids})
        return checked

    def check_categories(self, dataset: dict, names: list[str]) -> list[str]:
        """Refuse names the importer would give to a category outside the dataset; returns the names it
        will create (none exists yet)."""
        _, listed = self._named_list("/api/category/", "list the categories", "category", "categories")
        checked = [(number, name) for number, name, _ in listed]
        mine = {_int_id(c) for c in dataset.get("categories") or []}
        created = []
        for name in names:
            same = sorted(number for number, other in checked if other.lower() == name.lower())
            if not same:
                created.append(name)
            elif same[0] not in mine:
                raise self._error(f"category '{name}'", f"coco-annotator has it (id {same[0]}) but dataset "
                                                        f"'{dataset.get('name')}' does not: its import would put the "
                                                        "drafts where the annotator does not show them; add the "
                                                        "category to the dataset (its Settings) and upload again",
                                  UserError)
        return created

    def import_coco(self, dataset: dict, path: Path) -> int:
        """Start the COCO import of `path` into the dataset; the task's id."""
        number = _int_id(dataset.get("id"))
        if number is None:
            raise self._error(self.url + "/api/dataset/", f"the dataset has no whole-number id: "
                                                          f"{self._shown(dataset)}")
        route = f"/api/dataset/{number}/coco"
        with open(path, "rb") as f:
            body = self._request("POST", route, what="start the import",
                                 files={"coco": (path.name, f, "application/json")})
        task_id = _int_id(body.get("id")) if isinstance(body, dict) else None
        if task_id is None:
            raise self._error(self.url + route, f"the import started no task: {self._message(body)}")
        return task_id

    def wait(self, task_id: int, timeout: float, log=print, poll: float = 0.25) -> tuple[dict | None, list[str]]:
        """Poll the task (every `poll` seconds at first, then less often, up to every 2 s) until it is completed
        and its log stops growing; (task, log lines). The task is None when it was not found, and not
        completed when the timeout came first."""
        deadline = time.monotonic() + timeout
        shown, previous = -1, None
        try:
            while True:
                task = self._task(task_id)
                lines = self._task_log(task_id)
                progress = task["progress"] if task else 0
                if progress != shown:
                    log(f"import task {task_id}: {progress}%")
                    shown = progress
                if task and task["completed"]:
                    # 100% is set before the last annotation is saved: done once the log has stopped growing.
                    if previous == len(lines):
                        return task, lines
                    previous = len(lines)
                if time.monotonic() >= deadline:
                    return task, lines
                time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
                poll = min(2.0, poll * 1.5)
        except AnnotatorError as e:
            raise AnnotatorError(e.where, f"{e.message} (import task {task_id} was started: coco-annotator's "
                                          "Tasks page shows how it goes)") from None

    def _task(self, task_id: int) -> dict | None:
        """The task from `GET /api/tasks/`, its progress as 0..100 and `completed` as a bool; None if absent."""
        path = "/api/tasks/"
        tasks = self._request("GET", path, what="read the import task")
        where = self.url + path
        if not isinstance(tasks, list):
            raise self._error(where, f"expected a list of tasks, got {self._shown(tasks)}")
        found = None
        for n, task in enumerate(tasks):
            if not isinstance(task, dict):
                raise self._error(where, f"expected a list of tasks (objects with an id), item {n} is "
                                         f"{self._shown(task)}")
            if _int_id(task.get("id")) == task_id:
                found = task
        if found is None:
            return None
        progress = _percent(found.get("progress"))
        if progress is None:
            raise self._error(where, f"task {task_id}: progress {self._shown(found.get('progress'))} is not a "
                                     "percentage")
        completed = found.get("completed")
        if completed is None or (type(completed) is int and completed in (0, 1)):
            completed = bool(completed)
        if not isinstance(completed, bool):
            raise self._error(where, f"task {task_id}: completed {self._shown(completed)} is not true or false")
        return {**found, "progress": progress, "completed": completed}

    def _task_log(self, task_id: int) -> list[str]:
        """The task's log lines; a log given as one text is taken line by line."""
        path = f"/api/tasks/{task_id}/logs"
        body = self._request("GET", path, what="read the import log")
        where = self.url + path
        logs = body.get("logs") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not (logs is None or isinstance(logs, (str, list))):
            raise self._error(where, f"expected {{\"logs\": [lines]}}, got {self._shown(body)}")
        if logs is None:
            return []
        if isinstance(logs, str):
            return logs.splitlines()
        for n, line in enumerate(logs):
            if not isinstance(line, str):
                raise self._error(where, f"expected the log as a list of lines, line {n} is {self._shown(line)}")
        return list(logs)


class _Late(Exception):
    """The deadline passed while an answer was being read."""


def log_counts(lines: list[str]) -> dict:
    """What an import log says: annotations created, ones already there (undeleted), warnings, errors."""
    counts = {"created": 0, "existing": 0, "warnings": [], "errors": []}
    for line in lines:
        match = LOG_LINE.match(str(line))
        level, text = (match.group(1).upper(), match.group(2)) if match else ("INFO", str(line))
        if text.startswith("Creating annotation"):
            counts["created"] += 1
        elif text.startswith("Annotation already exists"):
            counts["existing"] += 1
        if level.startswith("WARN"):
            counts["warnings"].append(text)
        elif level.startswith("ERR"):
            counts["errors"].append(text)
    return counts


def upload_drafts(path: Path, url: str, user: str, password: str, dataset: str, timeout: float = 600,
                  log=print, request_timeout: float | None = None) -> dict:
    """Log in, check, import `path` into the dataset and report the task's outcome; returns the log's counts.
    UserError (exit 2) for a refused login, dataset or category, or an answer of another shape; exit 1 when the
    task reports errors or is still running at the timeout. `timeout` bounds the wait for the task;
    `request_timeout` (default ANNOTATOR_REQUEST_TIMEOUT, else 60 s) each request. The password never appears
    in what is printed or raised."""
    scrub = Scrubber(password)
    try:
        return _upload(path, url, user, password, dataset, timeout, lambda line: log(one_line(scrub(line))),
                       request_timeout)
    except UserError as e:
        raise type(e)(scrub(e.where) if e.where is not None else None, scrub(e.message)) from None


def _upload(path: Path, url: str, user: str, password: str, dataset: str, timeout: float, log,
            request_timeout: float | None) -> dict:
    from pipelines.data.coco import read_json

    coco = read_json(path)
    if not isinstance(coco, dict) or not coco.get("annotations"):
        raise UserError(display_path(path), "no annotations in this file: nothing to upload")
    categories = coco.get("categories", [])
    if not isinstance(coco["annotations"], list) or not isinstance(coco.get("images", []), list) or \
            not isinstance(categories, list) or \
            not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in categories):
        raise UserError(display_path(path), "not a COCO file: expected lists of images, annotations and categories "
                                            "(each category with a name)")
    client = CocoAnnotator(url, user, password, request_timeout=request_timeout)
    target = client.dataset(dataset)
    created = client.check_categories(target, [c["name"] for c in categories])
    if created:
        log(f"coco-annotator will create the categor{'y' if len(created) == 1 else 'ies'} {', '.join(created)} "
            f"in dataset '{target.get('name')}'")
    task_id = client.import_coco(target, path)
    log(f"uploaded {display_path(path)} ({len(coco['annotations'])} drafts, {len(coco.get('images', []))} images) to "
        f"dataset '{target.get('name')}' (id {target['id']}) at {client.url}: import task {task_id}")
    task, lines = client.wait(task_id, timeout, log=log)
    counts = log_counts(lines)
    for kind in ("errors", "warnings"):
        for text in counts[kind][:10]:
            log(f"  {kind[:-1]}: {text}")
        if len(counts[kind]) > 10:
            log(f"  ... and {len(counts[kind]) - 10} more {kind} (coco-annotator's Tasks page lists them)")
    # "Could not find image NAME" per image; its annotations then say "Could not find image assoicated with
    # annotation N" (sic), which are not more images.
    missing = sum(1 for text in counts["warnings"] if text.startswith("Could not find image ")
                  and not re.match(r"Could not find image ass\w+ with annotation ", text))
    if missing:
        log(f"  {missing} drafted image(s) are not in the dataset yet: let coco-annotator scan the folder (its file "
            "watcher, or Scan on the dataset's page), then upload again (UPLOAD=...)")
    summary = (f"{counts['created']} draft(s) created, {counts['existing']} already there (undeleted), "
               f"{len(counts['warnings'])} warning(s), {len(counts['errors'])} error(s)")
    if task is None or not task.get("completed"):
        raise ImportUnfinished(client.url, f"import task {task_id} not completed after {timeout:.0f}s ({summary}); "
                                           "coco-annotator's Tasks page shows how it goes")
    if counts["errors"]:
        raise ImportUnfinished(client.url, f"import task {task_id} completed with errors: {summary}")
    log(f"import task {task_id} completed: {summary}")
    return counts
