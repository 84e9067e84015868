"""A STAND-IN for coco-annotator's HTTP API, for the tests of `make prelabel`'s upload.

coco-annotator itself needs MongoDB, Celery and its web server, none of which can run here. This small
threaded HTTP server plays the routes the upload uses, with the answers coco-annotator's source gives
(backend/webserver/api/users.py, datasets.py, categories.py, tasks.py), records every request it
receives, and runs the COCO import by the rules of backend/workers/tasks/data.py `import_annotations`
(categories by name, case-insensitive, created when missing and then added to the dataset; images by
exact file_name in the dataset; annotations without polygons or keypoints skipped; an identical one
undeleted instead of added; the new annotation's metadata replaced by the dataset's default, as
AnnotationModel.save() does). `export()` writes what coco-annotator's export would. It is not
coco-annotator: only what the upload needs, as its source reads.

For the tests of the client against answers coco-annotator does not give (a hostile or broken server at
ANNOTATOR_URL), two hooks, both keyed by (method, path): `rewrites[...] = fn(body) -> body` changes the JSON
the stand-in would answer, `overrides[...] = fn(handler)` answers the request itself (after it was read and
recorded), e.g. with `send_raw`. `stopping` is set when the stand-in closes, for answers that take their time.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandIn:
    def __init__(self, users: dict[str, str], datasets: list[dict], categories: list[dict],
                 images: dict[int, list[str]], polls_to_complete: int = 2):
        self.users = users
        self.datasets = datasets  # {"id", "name", "categories": [ids], "default_annotation_metadata"}
        self.categories = categories  # {"id", "name"}
        self.images = {d: [{"id": 1000 * d + i, "file_name": n} for i, n in enumerate(names, 1)]
                       for d, names in images.items()}
        self.annotations: list[dict] = []
        self.tasks: list[dict] = []
        self.logs: dict[int, list[str]] = {}
        self.received: list[dict] = []  # every request: method, path, headers, json or form fields
        self.polls_to_complete = polls_to_complete
        self.sessions: set[str] = set()
        self.lock = threading.Lock()
        self.rewrites: dict[tuple[str, str], object] = {}  # (method, path) -> fn(body) -> body
        self.overrides: dict[tuple[str, str], object] = {}  # (method, path) -> fn(handler)
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ what coco-annotator does

    def _log(self, task: dict, level: str, text: str) -> None:
        self.logs[task["id"]].append(f"[{time.strftime('%d-%m-%Y %H:%M:%S')}] [{level}] {text}")
        if level == "WARNING":
            task["warnings"] += 1
        elif level == "ERROR":
            task["errors"] += 1

    def _import(self, dataset: dict, coco: dict, task: dict) -> None:
        categories_id, images_id = {}, {}
        for category in coco.get("categories", []):
            same = [c for c in sorted(self.categories, key=lambda c: c["id"])
                    if c["name"].lower() == category["name"].lower()]
            if same:
                model = same[0]
            else:
                self._log(task, "WARNING", f"{category['name']} category not found (creating a new one)")
                model = {"id": max([c["id"] for c in self.categories] + [0]) + 1, "name": category["name"]}
                self.categories.append(model)
                dataset["categories"].append(model["id"])
            categories_id[category["id"]] = model["id"]
        for image in coco.get("images", []):
            found = [im for im in self.images.get(dataset["id"], []) if im["file_name"] == image.get("file_name")]
            if not found:
                self._log(task, "WARNING", f"Could not find image {image.get('file_name')}")
                continue
            if len(found) > 1:
                self._log(task, "ERROR", f"Too many images found with the same file name: {image.get('file_name')}")
                continue
            images_id[image["id"]] = found[0]
        for annotation in coco.get("annotations", []):
            segmentation = annotation.get("segmentation", [])
            keypoints = annotation.get("keypoints", [])
            if not segmentation and not keypoints:
                self._log(task, "WARNING", f"Annotation {annotation.get('id')} has no segmentation or keypoints")
                continue
            try:
                image = images_id[annotation["image_id"]]
                category_id = categories_id[annotation["category_id"]]
            except KeyError:
                self._log(task, "WARNING", f"Could not find image assoicated with annotation {annotation.get('id')}")
                continue
            same = next((a for a in self.annotations if a["image_id"] == image["id"] and a["category_id"] == category_id
                         and a["segmentation"] == segmentation and a["keypoints"] == keypoints), None)
            if same is None:
                self._log(task, "INFO", f"Creating annotation data ({image['id']}, {category_id})")
                self.annotations.append({
                    "id": len(self.annotations) + 1, "image_id": image["id"], "category_id": category_id,
                    "segmentation": segmentation, "keypoints": keypoints, "area": annotation.get("area", 0),
                    "bbox": annotation.get("bbox", [0, 0, 0, 0]), "isbbox": annotation.get("isbbox", False),
                    "iscrowd": False, "color": annotation.get("color") or "#123456",
                    "metadata": dict(dataset.get("default_annotation_metadata") or {}), "deleted": False})
            else:
                same.update(deleted=False, isbbox=annotation.get("isbbox", False))
                self._log(task, "INFO", f"Annotation already exists (i:{image['id']}, c:{category_id})")

    def export(self, dataset_id: int) -> dict:
        """What coco-annotator's export writes (.exports/coco-<time>.json): images with annotations that
        are not deleted, annotations with its COCO fields."""
        images = {im["id"]: im for im in self.images[dataset_id]}
        kept = [a for a in self.annotations if not a["deleted"] and a["image_id"] in images]
        used = {a["image_id"] for a in kept}
        fields = ("id", "image_id", "category_id", "segmentation", "iscrowd", "color", "area", "bbox", "metadata",
                  "isbbox")
        return {"images": [{"id": i, "file_name": im["file_name"], "path": f"/datasets/x/{im['file_name']}"}
                           for i, im in images.items() if i in used],
                "categories": [c for c in self.categories
                               if c["id"] in next(d for d in self.datasets if d["id"] == dataset_id)["categories"]],
                "annotations": [{k: a[k] for k in fields} for a in kept]}

    # ------------------------------------------------------------------ HTTP

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body, cookie: str | None = None):
                rewrite = standin.rewrites.get((self.command, self.path))
                if rewrite is not None:
                    body = rewrite(body)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if cookie:
                    self.send_header("Set-Cookie", f"session={cookie}; HttpOnly; Path=/")
                self.end_headers()
                self.wfile.write(data)

            def send_raw(self, status: int, headers: dict[str, str], data: bytes = b"") -> None:
                """An answer of the test's making (Content-Length added when not given)."""
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _overridden(self) -> bool:
                override = standin.overrides.get((self.command, self.path))
                if override is None:
                    return False
                override(self)
                return True

            def _record(self, **extra) -> dict:
                entry = {"method": self.command, "path": self.path, "headers": dict(self.headers), **extra}
                with standin.lock:
                    standin.received.append(entry)
                return entry

            def _logged_in(self) -> bool:
                match = re.search(r"session=([\w-]+)", self.headers.get("Cookie", ""))
                return bool(match) and match.group(1) in standin.sessions

            def do_GET(self):
                self._record()
                if self._overridden():
                    return
                if not self._logged_in():
                    return self._send(401, {"success": False, "message": "Authorization required"})
                with standin.lock:
                    if self.path == "/api/dataset/":
                        return self._send(200, standin.datasets)
                    if self.path == "/api/category/":
                        return self._send(200, standin.categories)
                    if self.path == "/api/tasks/":
                        for task in standin.tasks:  # the worker makes progress between polls
                            task["polls"] += 1
                            task["progress"] = min(100, int(100 * task["polls"] / standin.polls_to_complete))
                            task["completed"] = task["progress"] >= 100
                        return self._send(200, [{k: v for k, v in t.items() if k != "polls"} for t in standin.tasks])
                    match = re.fullmatch(r"/api/tasks/(\d+)/logs", self.path)
                    if match and int(match.group(1)) in standin.logs:
                        return self._send(200, {"logs": standin.logs[int(match.group(1))]})
                    if match:
                        return self._send(400, {"message": "Invalid task id"})
                return self._send(404, {"message": "not one of the stand-in's routes"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if self.path == "/api/user/login":
                    try:
                        data = json.loads(body)
                    except ValueError:
                        data = None
                    self.body = body
                    self._record(json=data)
                    if self._overridden():
                        return
                    if not isinstance(data, dict) or "username" not in data or "password" not in data:
                        return self._send(400, {"message": "Input payload validation failed"})
                    user = next((u for u in standin.users if u.lower() == str(data["username"]).lower()), None)
                    if user is None or standin.users[user] != data["password"]:
                        return self._send(400, {"success": False, "message": "Could not authenticate user"})
                    token = f"s{len(standin.sessions) + 1}-{user}"
                    standin.sessions.add(token)
                    return self._send(200, {"success": True, "user": {"username": user}}, cookie=token)
                fields = self._form(body)
                self.body = body
                self._record(form=fields)
                if self._overridden():
                    return
                if not self._logged_in():
                    return self._send(401, {"success": False, "message": "Authorization required"})
                match = re.fullmatch(r"/api/dataset/(\d+)/coco", self.path)
                if not match:
                    return self._send(404, {"message": "not one of the stand-in's routes"})
                if "coco" not in fields:
                    return self._send(400, {"message": "Input payload validation failed",
                                            "errors": {"coco": "Json coco Missing required parameter in an uploaded file"}})
                with standin.lock:
                    dataset = next((d for d in standin.datasets if d["id"] == int(match.group(1))), None)
                    if dataset is None:
                        return self._send(400, {"message": "Invalid dataset ID"})
                    task = {"id": len(standin.tasks) + 1, "name": f"Import COCO format into {dataset['name']}",
                            "completed": False, "progress": 0, "errors": 0, "warnings": 0, "polls": 0}
                    standin.tasks.append(task)
                    standin.logs[task["id"]] = []
                    standin._import(dataset, json.loads(fields["coco"]["content"]), task)
                return self._send(200, {"celery_id": "c1", "id": task["id"], "name": task["name"]})

            def _form(self, body: bytes) -> dict:
                """multipart/form-data fields: name -> {"filename", "content_type", "content"}."""
                kind = self.headers.get("Content-Type", "")
                if not kind.startswith("multipart/form-data"):
                    return {}
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    f"Content-Type: {kind}\r\n\r\n".encode() + body)
                fields = {}
                for part in message.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    fields[name] = {"filename": part.get_filename(), "content_type": part.get_content_type(),
                                    "content": part.get_payload(decode=True)}
                return fields

        return Handler
