"""`make prelabel` for real: the demo's trained models draft a dataset copy's unlabelled images, the COCO file
is checked against each rule of coco-annotator's importer, read back by our own data stage, and uploaded to
a stand-in for coco-annotator's API (tests/annotator_standin.py: coco-annotator needs MongoDB and cannot run
here). `make data` then counts the drafts nobody reviewed, and SKIP_DRAFTS leaves their images out.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from annotator_standin import StandIn
from conftest import read_records, run_cli
from PIL import Image

from pipelines.annotator.drafts import DRAFT_COLOR, is_draft, region_annotations
from pipelines.data.label_map import read_label_map
from pipelines.data.sources import newest_export

USER, PASSWORD = "alice", "s3cret"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


@pytest.fixture(scope="module")
def shapes(sample_dir, tmp_path_factory):
    """A copy of the sample whose newest export has lost the annotations of 6 images: (folder, export, names of
    the images annotated in it)."""
    folder = tmp_path_factory.mktemp("prelabel") / "shapes"
    shutil.copytree(sample_dir, folder)
    export = newest_export(folder)  # the sample also holds an older export
    coco = json.loads(export.read_text())
    annotated = sorted({a["image_id"] for a in coco["annotations"]})
    cleared = set(annotated[:6])
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in cleared]
    export.write_text(json.dumps(coco))
    labelled = {im["file_name"] for im in coco["images"] if im["id"] in set(annotated) - cleared}
    return folder, export, labelled


def _prelabel(demo, shapes, run: str, *options, env=None):
    workspace, _ = demo
    folder = shapes[0]
    proc = run_cli("prelabel", "--run", run, "--dataset", folder, *options, workspace=workspace, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    written = re.search(r"^wrote (.+\.json)$", proc.stdout, re.M)
    assert written, proc.stdout
    path = Path(written.group(1))
    return (path if path.is_absolute() else Path(__file__).resolve().parent.parent / path), proc.stdout


@pytest.fixture(scope="module")
def detector_drafts(demo, shapes):
    # The demo test's detector is weak (150 steps): a low threshold gives every cleared image drafts.
    return _prelabel(demo, shapes, "demo-detector", "--score-threshold", "0.05")


def _standin(folder: Path, **kwargs) -> StandIn:
    return StandIn(users={USER: PASSWORD},
                   datasets=[{"id": 7, "name": "shapes", "categories": [1, 2], "default_annotation_metadata": {}},
                             {"id": 8, "name": "other", "categories": [5], "default_annotation_metadata": {}}],
                   categories=[{"id": 1, "name": "Circle"}, {"id": 2, "name": "square"}, {"id": 5, "name": "bolt"}],
                   images={7: [p.name for p in image_files(folder)], 8: []}, **kwargs)


def _upload_env(standin: StandIn, dataset="shapes", password=PASSWORD) -> dict:
    return {"ANNOTATOR_URL": standin.url, "ANNOTATOR_USER": USER, "ANNOTATOR_PASSWORD": password,
            "ANNOTATOR_DATASET": dataset}


# ------------------------------------------------------------------------------------------ drafting


def test_prelabel_drafts_only_unlabelled_images_and_prints_per_class_counts(detector_drafts, shapes):
    path, out = detector_drafts
    folder, export, labelled = shapes
    coco = json.loads(path.read_text())
    assert path.parent.name == "prelabel" and path.parent.parent.name == "demo-detector"
    assert re.fullmatch(r"shapes-\d{8}-\d{6}\.json", path.name)
    drafted = {im["file_name"] for im in coco["images"]}
    unlabelled = {p.name for p in image_files(folder)} - labelled
    assert drafted and drafted <= unlabelled
    assert f"{len(labelled)} image(s) already have annotations in" in out and "not drafted" in out
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for name in names.values():
        ids = [a for a in coco["annotations"] if names[a["category_id"]] == name]
        images = len({a["image_id"] for a in ids})
        assert re.search(rf"^\s+{name}\s+{images}\s+{len(ids)}$", out, re.M), out
    assert f"drafted {len(coco['annotations'])} annotation(s) on {len(drafted)} of " in out


def import_rule_problems(coco: dict, folder: Path, labels: dict[int, str]) -> list[str]:
    """Every way the file breaks a rule of coco-annotator's COCO import (backend/workers/tasks/data.py) or
    of the annotator's display; empty when it follows them all."""
    problems = []
    for key in ("images", "categories", "annotations"):
        if not coco.get(key):
            problems.append(f"'{key}' missing or empty")
    names = [c["name"] for c in coco["categories"]]
    # Categories are matched by name, case-insensitive: each must be a class of the model, once.
    if len({n.lower() for n in names}) != len(names) or not set(names) <= set(labels.values()):
        problems.append(f"category names {names} are not distinct names of the label map")
    if len({c["id"] for c in coco["categories"]}) != len(names):
        problems.append("duplicate category ids")
    # Images are matched by exact file_name among the dataset's: a base name held by one file only.
    on_disk = Counter(p.name for p in image_files(folder))
    sizes = {p.name: Image.open(p).size for p in image_files(folder)}
    for image in coco["images"]:
        name = image["file_name"]
        if "/" in name or "\\" in name or on_disk[name] != 1:
            problems.append(f"file_name {name!r} is not the base name of exactly one image of the dataset")
        elif (image["width"], image["height"]) != sizes[name]:
            problems.append(f"{name}: {image['width']}x{image['height']} is not its stored size {sizes[name]}")
    image_ids = {im["id"]: im for im in coco["images"]}
    category_ids = {c["id"] for c in coco["categories"]}
    seen = set()
    for a in coco["annotations"]:
        where = f"annotation {a.get('id')}"
        if a["image_id"] not in image_ids or a["category_id"] not in category_ids:
            problems.append(f"{where}: unknown image or category id")
            continue
        # Without a polygon the importer skips it; the annotator draws polygons of at least 3 points.
        polygons = a.get("segmentation")
        if not polygons or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in polygons):
            problems.append(f"{where}: segmentation is not a non-empty list of polygons")
            continue
        image = image_ids[a["image_id"]]
        xs = [v for p in polygons for v in p[0::2]]
        ys = [v for p in polygons for v in p[1::2]]
        if min(xs) < 0 or min(ys) < 0 or max(xs) > image["width"] or max(ys) > image["height"]:
            problems.append(f"{where}: polygon outside the image")
        # area is an IntField there, and only annotations with area > 0 are counted on their image.
        if not isinstance(a.get("area"), int) or a["area"] < 1:
            problems.append(f"{where}: area {a.get('area')!r} is not a whole number of pixels above 0")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0):
            problems.append(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
        elif a.get("isbbox"):
            x, y, w, h = bbox
            corners = {(round(px, 2), round(py, 2)) for px, py in zip(polygons[0][0::2], polygons[0][1::2])}
            expected = {(round(x, 2), round(y, 2)), (round(x + w, 2), round(y, 2)), (round(x + w, 2), round(y + h, 2)),
                        (round(x, 2), round(y + h, 2))}
            if len(polygons) != 1 or len(polygons[0]) != 8 or corners != expected:
                problems.append(f"{where}: a box is not the 4-corner polygon of its bbox")
        elif abs(min(xs) - bbox[0]) > 1 or abs(min(ys) - bbox[1]) > 1:  # outlines are simplified within a pixel
            problems.append(f"{where}: bbox does not start at its outline's corner")
        # The mark of a draft: the colour survives the import; metadata for tools that keep it.
        if not is_draft(a) or a.get("color") != DRAFT_COLOR or a.get("metadata", {}).get("draft") is not True:
            problems.append(f"{where}: not marked as a draft")
        # An identical annotation is not added again by the importer (it is undeleted).
        key = (a["image_id"], a["category_id"], json.dumps(polygons))
        if key in seen:
            problems.append(f"{where}: identical to another annotation")
        seen.add(key)
    return problems


def test_import_rules_catch_what_the_importer_would_refuse(detector_drafts, shapes):
    """The rule checker finds each kind of mistake (so that its silence below means something)."""
    path, _ = detector_drafts
    labels = read_label_map(path.parent.parent / "export" / "label_map.pbtxt")
    coco = json.loads(path.read_text())
    broken = json.loads(path.read_text())
    broken["images"][0]["file_name"] = "batch_1/" + broken["images"][0]["file_name"]
    first = broken["annotations"][0]
    first["area"] = 0.5
    first["segmentation"] = []
    broken["annotations"].append(dict(broken["annotations"][1], id=10**6, color="#00ff00"))
    broken["categories"].append({"id": 99, "name": broken["categories"][0]["name"].upper()})
    problems = "\n".join(import_rule_problems(broken, shapes[0], labels))
    for expected in ("is not the base name", "segmentation is not", "not marked as a draft",
                     "identical to another annotation", "not distinct names"):
        assert expected in problems, problems
    assert import_rule_problems(coco, shapes[0], labels) == []


def test_segmenter_drafts_follow_the_import_rules_and_upload_in_the_same_command(demo, shapes):
    folder = shapes[0]
    with _standin(folder) as standin:
        path, out = _prelabel(demo, shapes, "demo-segmenter", "--min-area", "4", env=_upload_env(standin))
        coco = json.loads(path.read_text())
        labels = read_label_map(path.parent.parent / "export" / "label_map.pbtxt")
        assert import_rule_problems(coco, folder, labels) == []
        assert not any(a["isbbox"] for a in coco["annotations"])
        assert all(a["area"] >= 4 for a in coco["annotations"])
        posted = [r for r in standin.received if r["method"] == "POST" and r["path"] == "/api/dataset/7/coco"]
        assert len(posted) == 1 and posted[0]["form"]["coco"]["content"] == path.read_bytes()
        assert f"import task 1 completed: {len(coco['annotations'])} draft(s) created, 0 already there" in out


# ------------------------------------------------------------------------------------ read back


def test_detector_drafts_read_back_by_make_data_within_a_pixel(detector_drafts, shapes, tmp_path):
    """The prelabel file as a coco-annotator export of the drafted images: our data stage writes the same
    boxes, classes and images, and counts every annotation as an unreviewed draft."""
    path, _ = detector_drafts
    folder = tmp_path / "readback"
    (folder / ".exports").mkdir(parents=True)
    coco = json.loads(path.read_text())
    for image in coco["images"]:
        source = next(p for p in image_files(shapes[0]) if p.name == image["file_name"])
        shutil.copy(source, folder / image["file_name"])
    shutil.copy(path, folder / ".exports" / "coco-1800000000.json")
    proc = run_cli("data", "--dataset", folder, "--val-ratio", "0", "--workers", "1", "--out", tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    count = len(coco["annotations"])
    assert f"warning: {count} annotation(s) on {len(coco['images'])} image(s) are model drafts nobody has " \
           "reviewed" in proc.stdout
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["drafts"] == {"annotations": count, "images": len(coco["images"]), "left_out": False}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    records = {Path(r["filename"]).name: r for r in read_records(tmp_path / "data", "train")}
    assert set(records) == {im["file_name"] for im in coco["images"]}
    for image in coco["images"]:
        drafts = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        record = records[image["file_name"]]
        assert (record["width"], record["height"]) == (image["width"], image["height"])
        want = sorted((names[a["category_id"]], a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                       a["bbox"][1] + a["bbox"][3]) for a in drafts)
        got = sorted((t, *box) for t, box in zip(record["texts"], record["boxes"].tolist()))
        assert [w[0] for w in want] == [g[0] for g in got]
        assert np.abs(np.array([w[1:] for w in want]) - np.array([g[1:] for g in got])).max() <= 1.0


def test_region_drafts_read_back_as_the_class_mask_with_their_holes(tmp_path):
    """A class mask with a ring (its hole open), touching regions of two classes, a separate part and a
    one-pixel speck, drafted as regions and read back by the data stage as a coco-annotator export: the
    class mask it writes differs from the drafted one only within a pixel of a region's edge."""
    height, width = 120, 160
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width), np.uint8)
    radius = np.hypot(yy - 60, xx - 50)
    mask[radius <= 32] = 1
    mask[radius <= 12] = 0  # the ring's hole
    mask[20:70, 82:130] = 2  # touches the ring
    mask[90:112, 100:150] = 3
    mask[98:104, 118:126] = 0  # a hole in it
    mask[5:15, 140:152] = 1  # another part of class 1
    mask[110, 10] = 2  # a speck
    drafts = region_annotations(mask, min_area=0, model="test:1")
    folder = tmp_path / "regions"
    (folder / ".exports").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)).save(folder / "img.png")
    coco = {"images": [{"id": 1, "file_name": "img.png", "path": "/datasets/regions/img.png", "width": width,
                        "height": height}],
            "categories": [{"id": i, "name": n} for i, n in ((1, "circle"), (2, "square"), (3, "triangle"))],
            "annotations": [{"id": n, "image_id": 1, **a} for n, a in enumerate(drafts, 1)]}
    (folder / ".exports" / "coco-1800000000.json").write_text(json.dumps(coco))
    proc = run_cli("data", "--dataset", folder, "--task", "segmentation", "--val-ratio", "0", "--workers", "1",
                   "--out", tmp_path / "d")
    assert proc.returncode == 0, proc.stderr
    written = read_records(tmp_path / "d", "train")[0]["class_mask"]
    assert written[60, 50] == 0 and written[100, 121] == 0, "a hole was filled"
    assert written[60, 25] == 1 and written[40, 100] == 2 and written[95, 105] == 3 and written[10, 145] == 1
    # Pixels next to another value (4-neighbourhood) are edge pixels: differences only there or next to them.
    edge = np.zeros_like(mask, bool)
    edge[:-1] |= mask[:-1] != mask[1:]
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    near = edge.copy()
    near[1:] |= edge[:-1]
    near[:-1] |= edge[1:]
    near[:, 1:] |= edge[:, :-1]
    near[:, :-1] |= edge[:, 1:]
    differ = written != mask
    assert not (differ & ~near).any(), np.argwhere(differ & ~near)[:10]
    assert differ.mean() < 0.03


# ------------------------------------------------------------------------------------------ upload


def test_upload_logs_in_imports_and_reports_the_task(detector_drafts, shapes):
    path, _ = detector_drafts
    coco = json.loads(path.read_text())
    with _standin(shapes[0], polls_to_complete=3) as standin:
        proc = run_cli("prelabel", "--run", "demo-detector", "--dataset", shapes[0], "--upload", path,
                       env=_upload_env(standin))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        count = len(coco["annotations"])
        created = [c["name"] for c in coco["categories"] if c["name"] not in ("circle", "square")]
        # coco-annotator logs each category it creates as a warning.
        assert f"import task 1 completed: {count} draft(s) created, 0 already there (undeleted), " \
               f"{len(created)} warning(s), 0 error(s)" in proc.stdout
        assert f"will create the categor{'y' if len(created) == 1 else 'ies'} {', '.join(created)}" \
            in proc.stdout or not created
        login = standin.received[0]
        assert login["path"] == "/api/user/login" and login["json"] == {"username": USER, "password": PASSWORD}
        assert login["headers"]["Content-Type"] == "application/json"
        (post,) = [r for r in standin.received if r["method"] == "POST" and r["path"].endswith("/coco")]
        assert post["path"] == "/api/dataset/7/coco" and "session=" in post["headers"]["Cookie"]
        assert post["form"]["coco"]["filename"] == path.name and post["form"]["coco"]["content"] == path.read_bytes()
        polled = [r["path"] for r in standin.received if r["path"] == "/api/tasks/"]
        assert len(polled) >= 3  # until completed and the log has stopped growing
        assert len(standin.annotations) == count
        # What survives the import: the draft colour; the metadata is replaced by the dataset's default.
        assert all(a["color"] == DRAFT_COLOR and a["metadata"] == {} for a in standin.annotations)
        assert {c["name"] for c in standin.categories} >= set(created)
        # The same file again: nothing added, every draft "already exists" (undeleted if a person deleted it).
        again = run_cli("prelabel", "--run", "demo-detector", "--dataset", shapes[0], "--upload", path,
                        env={**_upload_env(standin), "ANNOTATOR_DATASET": "7"})
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"0 draft(s) created, {count} already there (undeleted)" in again.stdout
        assert len(standin.annotations) == count


@pytest.mark.parametrize("case, expected", [
    ("password", "cannot log in as 'alice': HTTP 400: Could not authenticate user"),
    ("dataset", "ANNOTATOR_DATASET=nope: no dataset of that id or name for this user (datasets: shapes (id 7), "
                "other (id 8))"),
    ("category", "coco-annotator has it (id 5) but dataset 'shapes' does not"),
    ("no password", "ANNOTATOR_PASSWORD: set it to the password"),
    ("unreachable", "cannot log in as 'alice': ConnectionError"),
])
def test_upload_refusals_are_one_line_and_send_no_file(detector_drafts, shapes, tmp_path, case, expected):
    path, _ = detector_drafts
    with _standin(shapes[0]) as standin:
        env = _upload_env(standin)
        upload = path
        if case == "password":
            env["ANNOTATOR_PASSWORD"] = "wrong"
        elif case == "dataset":
            env["ANNOTATOR_DATASET"] = "nope"
        elif case == "category":  # a class named like a category of another dataset
            coco = json.loads(path.read_text())
            coco["categories"][0]["name"] = "Bolt"
            upload = tmp_path / "renamed.json"
            upload.write_text(json.dumps(coco))
        elif case == "no password":
            del env["ANNOTATOR_PASSWORD"]
        elif case == "unreachable":
            env["ANNOTATOR_URL"] = "http://127.0.0.1:9"
        proc = run_cli("prelabel", "--run", "demo-detector", "--dataset", shapes[0], "--upload", upload, env=env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not [r for r in standin.received if r["path"].endswith("/coco")]


def test_an_import_with_errors_exits_1_and_lists_them(detector_drafts, shapes):
    """Two images of the dataset share the drafted file's base name: coco-annotator's importer refuses it."""
    path, _ = detector_drafts
    coco = json.loads(path.read_text())
    with _standin(shapes[0]) as standin:
        standin.images[7].append({"id": 99999, "file_name": coco["images"][0]["file_name"]})
        proc = run_cli("prelabel", "--run", "demo-detector", "--dataset", shapes[0], "--upload", path,
                       env=_upload_env(standin))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"error: Too many images found with the same file name: {coco['images'][0]['file_name']}" in proc.stdout
        assert "completed with errors" in proc.stderr


def test_drafts_of_images_the_annotator_has_not_scanned_yet_are_pointed_out(detector_drafts, shapes):
    path, _ = detector_drafts
    first = json.loads(path.read_text())["images"][0]["file_name"]
    with _standin(shapes[0]) as standin:
        standin.images[7] = [im for im in standin.images[7] if im["file_name"] != first]
        proc = run_cli("prelabel", "--run", "demo-detector", "--dataset", shapes[0], "--upload", path,
                       env=_upload_env(standin))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"warning: Could not find image {first}" in proc.stdout
        assert "1 drafted image(s) are not in the dataset yet: let coco-annotator scan the folder" in proc.stdout


# ------------------------------------------------------------------------------- reviewed vs drafted


def test_make_data_counts_unreviewed_drafts_and_skip_drafts_leaves_their_images_out(detector_drafts, shapes,
                                                                                        tmp_path):
    """The loop: drafts imported (stand-in), the person reviews two images (recolours their drafts), the
    dataset is exported; `make data` counts the drafts still unreviewed, SKIP_DRAFTS=1 leaves their images out."""
    path, _ = detector_drafts
    folder, export, labelled = shapes
    with _standin(folder) as standin:
        proc = run_cli("prelabel", "--run", "demo-detector", "--dataset", folder, "--upload", path,
                       env=_upload_env(standin))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        drafts = standin.export(7)
    # The new export: what the dataset had, plus the imported drafts (coco-annotator's export of both).
    coco = json.loads(export.read_text())
    image_of = {im["file_name"]: im["id"] for im in coco["images"]}
    category_of = {c["name"].lower(): c["id"] for c in coco["categories"]}
    names = {c["id"]: c["name"] for c in drafts["categories"]}
    files = {im["id"]: im["file_name"] for im in drafts["images"]}
    drafted_files = sorted(set(files.values()))
    reviewed = set(drafted_files[:2])
    for n, a in enumerate(drafts["annotations"]):
        if files[a["image_id"]] in reviewed:
            a["color"] = "#3fa9f5"  # the person checked it and gave it another colour
        coco["annotations"].append({**a, "id": 10**6 + n, "image_id": image_of[files[a["image_id"]]],
                                    "category_id": category_of[names[a["category_id"]].lower()]})
    copy = tmp_path / "shapes"
    shutil.copytree(folder, copy)
    (copy / ".exports" / "coco-1900000000.json").write_text(json.dumps(coco))
    unreviewed = [a for a in drafts["annotations"] if files[a["image_id"]] not in reviewed]
    left = len(drafted_files) - 2
    proc = run_cli("data", "--dataset", copy, "--workers", "1", "--out", tmp_path / "all")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {len(unreviewed)} annotation(s) on {left} image(s) are model drafts nobody has reviewed" \
           in proc.stdout
    everything = json.loads((tmp_path / "all" / "summary.json").read_text())
    proc = run_cli("data", "--dataset", copy, "--skip-drafts", "--workers", "1", "--out", tmp_path / "reviewed")
    assert proc.returncode == 0, proc.stderr
    assert f"left out {left} image(s) that hold {len(unreviewed)} unreviewed model draft(s) (SKIP_DRAFTS=1)" \
           in proc.stdout
    summary = json.loads((tmp_path / "reviewed" / "summary.json").read_text())
    assert summary["drafts"] == {"annotations": len(unreviewed), "images": left, "left_out": True}
    total = sum(everything["images"][s] for s in ("train", "val"))
    assert sum(summary["images"][s] for s in ("train", "val")) == total - left


# ------------------------------------------------------------------------------------------ rules


def test_which_images_are_drafted(tmp_path):
    """As coco-annotator's scan: image extensions only, hidden folders left out; images annotated in the
    newest export left out by default; two images of one base name (coco-annotator's importer cannot tell
    them apart) never drafted, and said so."""
    from pipelines.annotator.prelabel import select_images

    folder = tmp_path / "ds"
    for name in ("a/same.jpg", "b/same.jpg", "c/new.PNG", "c/done.jpg", "c/notes.txt", ".thumbnail/new.jpg"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    (folder / ".exports").mkdir()
    export = folder / ".exports" / "coco-1700000000.json"
    export.write_text(json.dumps({"images": [{"id": 1, "file_name": "done.jpg"}, {"id": 2, "file_name": "new.PNG"}],
                                  "categories": [{"id": 1, "name": "x"}],
                                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]}))
    images, notes = select_images(folder, only_unlabelled=True, annotations=None)
    assert [p.relative_to(folder).as_posix() for p in images] == ["c/new.PNG"]
    assert any("2 image(s) share a base name" in n and "a/same.jpg, b/same.jpg" in n for n in notes)
    assert any("1 image(s) already have annotations" in n and "not drafted" in n for n in notes)
    images, notes = select_images(folder, only_unlabelled=False, annotations=None)
    assert [p.relative_to(folder).as_posix() for p in images] == ["c/done.jpg", "c/new.PNG"]
    assert any("their drafts are added beside them" in n for n in notes)
    export.unlink()
    images, notes = select_images(folder, only_unlabelled=True, annotations=None)
    assert len(images) == 2 and any("every image is drafted" in n for n in notes)


@pytest.mark.parametrize("annotation, draft", [
    ({"color": DRAFT_COLOR}, True),
    ({"color": DRAFT_COLOR.upper()}, True),
    ({"color": "#3fa9f5", "metadata": {}}, False),  # recoloured by the person: reviewed
    ({"color": "#3fa9f5", "metadata": {"draft": True}}, True),  # a tool that keeps metadata
    ({"metadata": {"draft": "true"}}, True),
    ({"metadata": {"draft": 1}}, True),  # the annotator's metadata editor turns "1" into 1
    ({"metadata": {"draft": False}}, False),
    ({"metadata": {"draft": "false"}}, False),
    ({"metadata": {"draft": 0}}, False),
    ({"metadata": "draft"}, False),
    ({}, False),
])
def test_the_reviewed_or_draft_rule(annotation, draft):
    assert is_draft(annotation) is draft
