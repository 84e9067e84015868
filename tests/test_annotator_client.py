"""`make prelabel`'s upload client against a server that is not the coco-annotator it expects.

Every test drives the real client (pipelines/annotator/client.py) over HTTP on 127.0.0.1 against the
STAND-IN for coco-annotator's API (tests/annotator_standin.py), whose answers a test rewrites or replaces:
redirects to another address (a second stand-in records that nothing reached it), a login answered one byte
at a time, answers that echo the password, and answers of shapes coco-annotator does not give. No model is
trained: the uploaded file is a small COCO file written here.
"""

from __future__ import annotations

import html
import json
from urllib.parse import quote, quote_plus

import pytest
from annotator_standin import StandIn
from conftest import run_cli

from pipelines.annotator import client
from pipelines.annotator.client import DEADLINE_ENV, AnnotatorError, request_deadline, upload_drafts
from pipelines.workspace import UserError

pytestmark = pytest.mark.timeout(60)

USER = "alice"
PASSWORD = 'Zq9x"s3\\cr&t/é %+<y>'  # every escape: JSON, URL, HTML; "Zq9" is in each of its forms
LOGIN = "/api/user/login"


def password_forms() -> list[str]:
    return ["Zq9", PASSWORD, quote(PASSWORD, safe=""), quote_plus(PASSWORD), json.dumps(PASSWORD)[1:-1],
            html.escape(PASSWORD), "s3\\cr", "s3\\\\cr"]


def standin(**kwargs) -> StandIn:
    return StandIn(users={USER: PASSWORD},
                   datasets=[{"id": 7, "name": "shapes", "categories": [1], "default_annotation_metadata": {}},
                             {"id": 8, "name": "other", "categories": [5], "default_annotation_metadata": {}}],
                   categories=[{"id": 1, "name": "circle"}, {"id": 5, "name": "bolt"}],
                   images={7: ["a.png"], 8: []}, **kwargs)


@pytest.fixture
def coco_file(tmp_path):
    path = tmp_path / "drafts.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "circle"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]],
                         "area": 25, "bbox": [1, 1, 5, 5], "isbbox": True, "color": "#ff00ff",
                         "metadata": {"draft": True}}]}))
    return path


def upload(server: StandIn, path, dataset="shapes", request_timeout=5.0) -> tuple[dict, list[str]]:
    lines: list[str] = []
    counts = upload_drafts(path, server.url, USER, PASSWORD, dataset, timeout=10, log=lines.append,
                           request_timeout=request_timeout)
    return counts, lines


def refused(server: StandIn, path, **kwargs) -> UserError:
    with pytest.raises(UserError) as caught:
        upload(server, path, **kwargs)
    error = caught.value
    assert error.exit_code == 2 and "\n" not in str(error) and len(str(error)) < 700, str(error)
    return error


def posted_files(server: StandIn) -> list[dict]:
    return [r for r in server.received if r["method"] == "POST" and r["path"].endswith("/coco")]


def logins(server: StandIn) -> list[dict]:
    return [r for r in server.received if r["path"] == LOGIN]


def test_the_client_uploads_to_the_standin(coco_file):
    """The harness: the unaltered stand-in takes the file and the client reports the task."""
    with standin() as server:
        counts, lines = upload(server, coco_file)
    assert counts["created"] == 1 and not counts["errors"]
    assert "import task 1 completed: 1 draft(s) created, 0 already there (undeleted), 0 warning(s), 0 error(s)" \
        in lines
    assert len(posted_files(server)) == 1 and len(logins(server)) == 1


# ------------------------------------------------------------------------------------------ redirects


@pytest.mark.parametrize("method, path, status, relative", [
    ("POST", LOGIN, 307, False),
    ("POST", LOGIN, 302, False),
    ("POST", LOGIN, 308, False),
    ("POST", LOGIN, 303, True),  # scheme-relative: //host:port/...
    ("GET", "/api/dataset/", 302, False),
    ("GET", "/api/tasks/", 301, False),
])
def test_a_redirect_to_another_address_is_refused_and_that_address_gets_nothing(coco_file, method, path, status,
                                                                                relative):
    with standin() as other, standin() as server:
        location = other.url + path
        if relative:
            location = location.removeprefix("http:")
        server.overrides[(method, path)] = lambda h: h.send_raw(status, {"Location": location})
        error = refused(server, coco_file)
        assert f"HTTP {status} redirect to {location}, another address than {server.url}: not followed" \
            in str(error), str(error)
        assert other.received == []
        assert len(logins(server)) == 1
        if path != "/api/tasks/":
            assert posted_files(server) == []
        else:
            assert "import task 1 was started" in str(error)


def test_a_same_origin_redirect_of_the_login_is_not_followed(coco_file):
    """The password is sent once: a redirect of the login, even to the same server, is refused."""
    with standin() as server:
        server.overrides[("POST", LOGIN)] = lambda h: h.send_raw(307, {"Location": "/api/user/login/"})
        error = refused(server, coco_file)
    assert "HTTP 307 redirect to /api/user/login/: not followed" in str(error)
    assert [r["path"] for r in server.received] == [LOGIN]


def test_a_trailing_slash_redirect_of_a_get_is_followed_and_no_other(coco_file):
    with standin() as server:
        server.overrides[("GET", "/api/dataset/")] = lambda h: h.send_raw(308, {"Location": "/api/dataset"})
        server.overrides[("GET", "/api/dataset")] = lambda h: h._send(200, server.datasets)
        counts, _ = upload(server, coco_file)
        assert counts["created"] == 1
        assert [r["path"] for r in server.received[:3]] == [LOGIN, "/api/dataset/", "/api/dataset"]
    with standin() as server:
        server.overrides[("GET", "/api/dataset/")] = lambda h: h.send_raw(302, {"Location": "/login?next=/api/"})
        error = refused(server, coco_file)
        assert "HTTP 302 redirect to /login?next=/api/: not followed" in str(error)
        assert [r["path"] for r in server.received] == [LOGIN, "/api/dataset/"]


# ------------------------------------------------------------------------------------------ deadline


def trickle(server: StandIn, part: str):
    """An answer to the login sent one byte every 0.4 s (80 s in all, unless the client hangs up)."""
    payload = json.dumps({"success": True, "user": {"username": USER}, "pad": " " * 200}).encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            + "".join(f"X-Pad-{n}: {n}\r\n" for n in range(20)) + "\r\n").encode()
    status_line = len(b"HTTP/1.1 200 OK\r\n")

    def answer(handler):
        sent, slow = {"status line": (b"", head + payload), "headers": (head[:status_line], head[status_line:]),
                      "body": (head, payload)}[part]
        try:
            handler.wfile.write(sent)
            for n in range(min(len(slow), 200)):
                if server.stopping.wait(0.4):
                    return
                handler.wfile.write(slow[n:n + 1])
        except OSError:  # the client hung up
            return

    return answer


@pytest.mark.timeout(30)
@pytest.mark.parametrize("part", ["status line", "headers", "body"])
def test_a_login_answered_one_byte_at_a_time_is_cut_at_the_deadline(coco_file, monkeypatch, part):
    """Each byte comes well within the per-read timeout: only the deadline of the whole request ends it (the
    answer would take 80 s; the test's own timeout is 30 s)."""
    monkeypatch.setenv(DEADLINE_ENV, "1.5")
    with standin() as server:
        server.overrides[("POST", LOGIN)] = trickle(server, part)
        error = refused(server, coco_file, request_timeout=None)
        assert f"{server.url}{LOGIN}: cannot log in as 'alice': no complete answer to POST {LOGIN} within 1.5s: " \
               f"cut off ({DEADLINE_ENV} sets this limit, default 60s)" == str(error)
        assert posted_files(server) == []


def test_the_request_deadline_setting(monkeypatch):
    monkeypatch.delenv(DEADLINE_ENV, raising=False)
    assert request_deadline() == 60
    assert request_deadline(2.5) == 2.5
    monkeypatch.setenv(DEADLINE_ENV, "12")
    assert request_deadline() == 12
    for bad in ("soon", "0", "-3", "nan", "inf"):
        monkeypatch.setenv(DEADLINE_ENV, bad)
        with pytest.raises(UserError, match=f"^{DEADLINE_ENV}={bad}: expected the seconds one request"):
            request_deadline()


# ------------------------------------------------------------------------------------------ password echoes


def echo(server: StandIn, other: StandIn, where: str) -> dict:
    """Make the stand-in echo the password at `where`; the upload's arguments for that case."""
    if where == "login message":  # long: the old client cut the message in the middle of the password
        server.overrides[("POST", LOGIN)] = lambda h: h._send(400, {"success": False, "message": (
            "x" * 280 + f" wrong password {PASSWORD} in {h.body.decode()} ({quote_plus(PASSWORD)})")})
    elif where == "login page":
        server.overrides[("POST", LOGIN)] = lambda h: h.send_raw(
            500, {"Content-Type": "text/html"}, f"<p>{html.escape(PASSWORD)} {quote(PASSWORD)}</p>".encode())
    elif where == "redirect":
        server.overrides[("POST", LOGIN)] = lambda h: h.send_raw(
            302, {"Location": f"{other.url}/?p={quote(PASSWORD, safe='')}&q={quote_plus(PASSWORD)}"})
    elif where == "dataset names":
        server.datasets.append({"id": 9, "name": f"{PASSWORD}", "categories": []})
        return {"dataset": "nope"}
    elif where == "dataset name printed":
        server.datasets[0]["name"] = PASSWORD
        return {"dataset": "7"}
    elif where == "import log":
        server.rewrites[("GET", "/api/tasks/1/logs")] = lambda body: {
            "logs": body["logs"] + [f"[01-01-2026 00:00:00] [WARNING] user {USER} password {PASSWORD}\x1b[2J"]}
    return {}


@pytest.mark.parametrize("where", ["login message", "login page", "redirect", "dataset names", "dataset name printed",
                                   "import log"])
def test_the_password_is_never_printed_whatever_the_server_echoes(coco_file, capsys, where):
    with standin() as other, standin() as server:
        kwargs = echo(server, other, where)
        lines: list[str] = []
        error = None
        try:
            upload_drafts(coco_file, server.url, USER, PASSWORD, kwargs.get("dataset", "shapes"), timeout=10,
                          log=lines.append, request_timeout=5)
        except UserError as e:
            error = str(e)
        captured = capsys.readouterr()
        shown = "\n".join([*lines, error or "", captured.out, captured.err])
        assert "***" in shown, shown  # the echo came through, masked
        for form in password_forms():
            assert form not in shown, f"{form!r} in:\n{shown}"
        assert (error is None) == (where in ("dataset name printed", "import log")), error
        assert "\x1b" not in shown and all("\n" not in line for line in lines)
        assert other.received == []


# ------------------------------------------------------------------------------------------ answer shapes


def _dataset(body, **changes):
    return [{**d, **changes} for d in body]


BAD_SHAPES = [
    # (method, path, rewrite of the stand-in's JSON answer, expected in the error, before the import)
    ("GET", "/api/dataset/", lambda b: [d["name"] for d in b], 'item 0 is "shapes"', True),
    ("GET", "/api/dataset/", lambda b: [{k: v for k, v in d.items() if k != "id"} for d in b],
     "expected each dataset with a whole-number id and a name, item 0 is", True),
    ("GET", "/api/dataset/", lambda b: _dataset(b, id="7/../8"), "whole-number id", True),
    ("GET", "/api/dataset/", lambda b: _dataset(b, name=None), "whole-number id and a name", True),
    ("GET", "/api/dataset/", lambda b: {"datasets": b}, "expected a list of datasets, got", True),
    ("GET", "/api/dataset/", lambda b: _dataset(b, categories=[{"id": 1}]),
     "dataset 'shapes' (id 7): expected its categories as a list of category ids, got [{\"id\": 1}]", True),
    ("GET", "/api/dataset/", lambda b: _dataset(b, categories={"1": "circle"}), "as a list of category ids", True),
    ("GET", "/api/category/", lambda b: {str(c["id"]): c for c in b}, "expected a list of categories, got", True),
    ("GET", "/api/category/", lambda b: [c["name"] for c in b], 'item 0 is "circle"', True),
    ("GET", "/api/category/", lambda b: [{"name": c["name"]} for c in b], "whole-number id and a name", True),
    ("GET", "/api/category/", lambda b: [{**c, "id": 1.5} for c in b], "whole-number id and a name", True),
    ("POST", "/api/dataset/7/coco", lambda b: {"celery_id": "c1"}, 'the import started no task: {"celery_id"',
     False),
    ("GET", "/api/tasks/", lambda b: {"tasks": b}, "expected a list of tasks, got", False),
    ("GET", "/api/tasks/", lambda b: ["task 1"], 'item 0 is "task 1"', False),
    ("GET", "/api/tasks/", lambda b: [{**t, "progress": {"value": 50}} for t in b],
     'task 1: progress {"value": 50} is not a percentage', False),
    ("GET", "/api/tasks/", lambda b: [{**t, "progress": "half"} for t in b], "is not a percentage", False),
    ("GET", "/api/tasks/", lambda b: [{**t, "completed": "yes"} for t in b], 'completed "yes" is not true or false',
     False),
    ("GET", "/api/tasks/1/logs", lambda b: {"logs": 3}, 'expected {"logs": [lines]}, got {"logs": 3}', False),
    ("GET", "/api/tasks/1/logs", lambda b: {"logs": {"0": "x"}}, 'expected {"logs": [lines]}', False),
    ("GET", "/api/tasks/1/logs", lambda b: b["logs"], 'expected {"logs": [lines]}, got ["[', False),
    ("GET", "/api/tasks/1/logs", lambda b: {"logs": [1, 2]}, "expected the log as a list of lines, line 0 is 1",
     False),
]


@pytest.mark.parametrize("method, path, rewrite, expected, before_import", BAD_SHAPES,
                         ids=[f"{c[0]} {c[1]} {n}" for n, c in enumerate(BAD_SHAPES)])
def test_an_answer_of_another_shape_is_one_line_naming_the_route(coco_file, method, path, rewrite, expected,
                                                                 before_import):
    with standin() as server:
        server.rewrites[(method, path)] = rewrite
        error = refused(server, coco_file)
        assert isinstance(error, AnnotatorError) and str(error).startswith(f"{server.url}{path}: "), str(error)
        assert expected in str(error), str(error)
        if before_import:  # nothing sent, nothing imported
            assert posted_files(server) == [] and server.annotations == []
        else:
            assert "import task 1 was started: coco-annotator's Tasks page shows how it goes" in str(error) or \
                path.endswith("/coco")


@pytest.mark.parametrize("case", ["not JSON", "nested too deeply", "too large"])
def test_an_answer_that_is_not_json_or_too_large_is_one_line(coco_file, monkeypatch, case):
    if case == "too large":
        monkeypatch.setattr(client, "MAX_ANSWER_BYTES", 1000)
    data = {"not JSON": b"<html>" + b"x" * 5000, "nested too deeply": b"[" * 200_000,
            "too large": json.dumps([{"id": 7, "name": "x" * 5000}]).encode()}[case]
    expected = "the answer is larger than 1000 bytes: not read" if case == "too large" else \
        "HTTP 200, not JSON (is this coco-annotator's address?)"
    with standin() as server:
        server.overrides[("GET", "/api/dataset/")] = lambda h: h.send_raw(200, {"Content-Type": "text/html"}, data)
        error = refused(server, coco_file)
        assert str(error).startswith(f"{server.url}/api/dataset/: ") and expected in str(error), str(error)
        assert posted_files(server) == []


@pytest.mark.parametrize("case", ["progress as 50%", "logs as one text", "category ids of mixed types",
                                  "dataset id as text"])
def test_answers_of_a_close_shape_are_understood(coco_file, case):
    with standin() as server:
        if case == "progress as 50%":
            server.rewrites[("GET", "/api/tasks/")] = lambda b: [{**t, "progress": f"{t['progress']}%"} for t in b]
        elif case == "logs as one text":  # read character by character, it would count nothing
            server.rewrites[("GET", "/api/tasks/1/logs")] = lambda b: {
                "logs": "\n".join(b["logs"] + ["[t] [WARNING] w"])}
        elif case == "category ids of mixed types":  # the oldest of two same-named categories is the dataset's
            server.rewrites[("GET", "/api/category/")] = lambda b: [{"id": 9, "name": "Circle"},
                                                                    {"id": "1", "name": "circle"}]
            server.rewrites[("GET", "/api/dataset/")] = lambda b: _dataset(b, categories=["1", 2])
        elif case == "dataset id as text":
            server.rewrites[("GET", "/api/dataset/")] = lambda b: [{**d, "id": str(d["id"])} for d in b]
        counts, lines = upload(server, coco_file)
        assert counts["created"] == 1, lines
        assert len(posted_files(server)) == 1 and posted_files(server)[0]["path"] == "/api/dataset/7/coco"
        if case == "progress as 50%":
            assert "import task 1: 50%" in lines and "import task 1: 100%" in lines
        if case == "logs as one text":
            assert counts["warnings"] == ["w"]


def test_an_image_the_annotator_has_not_scanned_is_counted_once(coco_file):
    """coco-annotator logs "Could not find image NAME" for the image, then "Could not find image assoicated
    with annotation N" (sic) for each of its annotations: one image, not 1 + its annotations."""
    with standin() as server:
        server.images[7] = []
        counts, lines = upload(server, coco_file)
    assert counts["warnings"] == ["Could not find image a.png", "Could not find image assoicated with annotation 1"]
    assert any(line.startswith("  1 drafted image(s) are not in the dataset yet") for line in lines), lines


# ------------------------------------------------------------------------------------------ the command


@pytest.mark.parametrize("case", ["password echo", "redirect", "trickle", "bad shape"])
def test_the_command_prints_one_line_and_exits_2(coco_file, tmp_path, case):
    """`make prelabel UPLOAD=...` as a user runs it: one `error:` line, exit 2, no traceback, no password."""
    with standin() as other, standin() as server:
        env = {"ANNOTATOR_URL": server.url, "ANNOTATOR_USER": USER, "ANNOTATOR_PASSWORD": PASSWORD,
               "ANNOTATOR_DATASET": "shapes", DEADLINE_ENV: "1.5"}
        if case == "password echo":
            echo(server, other, "login message")
        elif case == "redirect":
            server.overrides[("POST", LOGIN)] = lambda h: h.send_raw(307, {"Location": other.url + LOGIN})
        elif case == "trickle":
            server.overrides[("POST", LOGIN)] = trickle(server, "headers")
        elif case == "bad shape":
            server.rewrites[("GET", "/api/dataset/")] = lambda b: ["shapes"]
        proc = run_cli("prelabel", "--run", "demo-detector", "--dataset", tmp_path, "--upload", coco_file, env=env,
                       timeout=30)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert {"password echo": "cannot log in as 'alice': HTTP 400: xxx", "redirect": "not followed",
                "trickle": "within 1.5s: cut off", "bad shape": 'item 0 is "shapes"'}[case] in errors[0], errors[0]
        for form in password_forms():
            assert form not in proc.stdout + proc.stderr
        assert other.received == [] and posted_files(server) == []
