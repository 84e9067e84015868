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
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from pipelines.common import UserError, display_path

TIMEOUT_S = 30  # one HTTP request
LOG_LINE = re.compile(r"^\[[^\]]*\]\s*\[(\w+)\]\s*(.*)$")


class AnnotatorError(UserError):
    """coco-annotator refused a request, answered something its API does not document, or nothing."""


class ImportUnfinished(UserError):
    """The import ran but did not end well (errors in its log, or still running at the timeout)."""

    exit_code = 1


def _json(response, url: str, what: str):
    try:
        return response.json()
    except ValueError:
        raise AnnotatorError(url, f"cannot {what}: HTTP {response.status_code}, not JSON (is this coco-annotator's "
                                  f"address?): {response.text[:120]!r}") from None


def _message(body) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or body.get("errors") or body)[:300]
    return str(body)[:300]


class CocoAnnotator:
    """A logged-in session with one coco-annotator server."""

    def __init__(self, url: str, user: str, password: str):
        import requests

        if not re.match(r"^https?://[^/\s]+", url or ""):
            raise UserError(url or "ANNOTATOR_URL", "expected coco-annotator's address, e.g. http://localhost:5000")
        if not user:
            raise UserError("ANNOTATOR_USER", "give the coco-annotator user name to log in with")
        if password is None:
            raise UserError("ANNOTATOR_PASSWORD", "set it to the password of the coco-annotator user "
                                                  f"'{user}' (read from the environment only)")
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self._request("POST", "/api/user/login", json={"username": user, "password": password},
                      what=f"log in as '{user}'")

    def _request(self, method: str, path: str, what: str, **kwargs):
        import requests

        url = self.url + path
        try:
            response = self.session.request(method, url, timeout=TIMEOUT_S, **kwargs)
        except requests.RequestException as e:
            raise AnnotatorError(self.url, f"cannot {what}: {type(e).__name__}: {str(e)[:200]}") from None
        body = _json(response, url, what)
        if response.status_code >= 400 or (isinstance(body, dict) and body.get("success") is False):
            raise AnnotatorError(url, f"cannot {what}: HTTP {response.status_code}: {_message(body)}")
        return body

    def dataset(self, id_or_name: str) -> dict:
        """The user's dataset with this id (digits) or name (exact, else case-insensitive if unique)."""
        datasets = self._request("GET", "/api/dataset/", what="list the datasets")
        if not isinstance(datasets, list):
            raise AnnotatorError(self.url + "/api/dataset/", f"expected a list of datasets, got {_message(datasets)}")
        text = str(id_or_name).strip()
        found = [d for d in datasets if str(d.get("id")) == text] if text.isdigit() else []
        found = found or [d for d in datasets if d.get("name") == text] or \
            [d for d in datasets if str(d.get("name", "")).lower() == text.lower()]
        if len(found) != 1:
            names = ", ".join(f"{d.get('name')} (id {d.get('id')})" for d in datasets) or "none"
            problem = "no" if not found else f"{len(found)} datasets match:"
            raise UserError(f"ANNOTATOR_DATASET={text}", f"{problem} dataset of that id or name for this user "
                                                         f"(datasets: {names})")
        return found[0]

    def check_categories(self, dataset: dict, names: list[str]) -> list[str]:
        """Refuse names the importer would give to a category outside the dataset; returns the names it
        will create (none exists yet)."""
        categories = self._request("GET", "/api/category/", what="list the categories")
        if not isinstance(categories, list):
            raise AnnotatorError(self.url + "/api/category/", f"expected a list of categories, got "
                                                              f"{_message(categories)}")
        mine = set(dataset.get("categories") or [])
        created = []
        for name in names:
            same = sorted((c for c in categories if str(c.get("name", "")).lower() == name.lower()),
                          key=lambda c: c.get("id", 0))
            if not same:
                created.append(name)
            elif same[0].get("id") not in mine:
                raise UserError(f"category '{name}'", f"coco-annotator has it (id {same[0].get('id')}) but dataset "
                                                      f"'{dataset.get('name')}' does not: its import would put the "
                                                      "drafts where the annotator does not show them; add the "
                                                      "category to the dataset (its Settings) and upload again")
        return created

    def import_coco(self, dataset: dict, path: Path) -> int:
        """Start the COCO import of `path` into the dataset; the task's id."""
        with open(path, "rb") as f:
            body = self._request("POST", f"/api/dataset/{dataset['id']}/coco", what="start the import",
                                 files={"coco": (path.name, f, "application/json")})
        if not isinstance(body, dict) or not isinstance(body.get("id"), int):
            raise AnnotatorError(self.url, f"the import started no task: {_message(body)}")
        return body["id"]

    def wait(self, task_id: int, timeout: float, log=print, poll: float = 0.25) -> tuple[dict | None, list[str]]:
        """Poll the task (every `poll` seconds at first, then less often, up to every 2 s) until it is completed
        and its log stops growing; (task, log lines). The task is None when it was not found, and not
        completed when the timeout came first."""
        deadline = time.monotonic() + timeout
        shown, previous = -1, None
        while True:
            tasks = self._request("GET", "/api/tasks/", what="read the import task")
            task = next((t for t in tasks if isinstance(t, dict) and t.get("id") == task_id), None) \
                if isinstance(tasks, list) else None
            body = self._request("GET", f"/api/tasks/{task_id}/logs", what="read the import log")
            lines = (body.get("logs") if isinstance(body, dict) else None) or []
            progress = int(task.get("progress") or 0) if task else 0
            if progress != shown:
                log(f"import task {task_id}: {progress}%")
                shown = progress
            if task and task.get("completed"):
                # 100% is set before the last annotation is saved: done once the log has stopped growing.
                if previous == len(lines):
                    return task, lines
                previous = len(lines)
            if time.monotonic() >= deadline:
                return task, lines
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
            poll = min(2.0, poll * 1.5)


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
                  log=print) -> dict:
    """Log in, check, import `path` into the dataset and report the task's outcome; returns the log's counts.
    UserError (exit 2) for a refused login, dataset or category; exit 1 when the task reports errors or is
    still running at the timeout."""
    from pipelines.data.coco import read_json

    coco = read_json(path)
    if not isinstance(coco, dict) or not coco.get("annotations"):
        raise UserError(display_path(path), "no annotations in this file: nothing to upload")
    client = CocoAnnotator(url, user, password)
    target = client.dataset(dataset)
    created = client.check_categories(target, [c["name"] for c in coco.get("categories", [])])
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
    missing = sum(1 for text in counts["warnings"] if text.startswith("Could not find image"))
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
