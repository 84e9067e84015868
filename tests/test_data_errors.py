"""Bad input: one clear line naming file and item, exit code 2, nothing written; --skip-invalid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import all_records, load_summary, run_cli
from pipelines.data.sources import newest_export


@pytest.fixture
def dataset(sample_dir, tmp_path):
    """A private copy of the small sample whose newest export a test may edit."""
    target = tmp_path / "datasets" / "mine"
    shutil.copytree(sample_dir, target)
    return target


def edit_export(folder: Path, change) -> dict:
    path = newest_export(folder)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return data


def assert_user_error(proc, *fragments, workspace: Path):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (workspace / "mine").exists(), "no output folder may be left behind"
    return lines[0]


def convert(dataset, tmp_path, *extra):
    return run_cli("data", "--dataset", dataset, "--workers", "2", *extra, workspace=tmp_path / "ws")


def test_malformed_json(dataset, tmp_path):
    path = newest_export(dataset)
    path.write_text(path.read_text()[:-40])
    proc = convert(dataset, tmp_path)
    assert_user_error(proc, path.name, "invalid JSON at line 1 column", workspace=tmp_path / "ws")
    proc = convert(dataset, tmp_path, "--skip-invalid")  # a broken file cannot be skipped
    assert_user_error(proc, "invalid JSON", workspace=tmp_path / "ws")


def test_missing_image_file(dataset, tmp_path):
    data = json.loads(newest_export(dataset).read_text())
    victim = data["images"][5]
    (dataset / victim["path"].split("/", 3)[3]).unlink()
    proc = convert(dataset, tmp_path)
    assert_user_error(proc, newest_export(dataset).name, f"image id {victim['id']}", victim["file_name"],
                      "image file not found", workspace=tmp_path / "ws")

    proc = convert(dataset, tmp_path, "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "ws" / "mine" / "data"
    assert len(all_records(out)) == len(data["images"]) - 1
    skipped = load_summary(out)["skipped_invalid"]
    assert [s["item"] for s in skipped] == [f"image id {victim['id']} ('{victim['file_name']}')"]


def test_annotation_with_unknown_image(dataset, tmp_path):
    def change(data):
        data["annotations"][0]["image_id"] = 999999

    data = edit_export(dataset, change)
    ann_id = data["annotations"][0]["id"]
    proc = convert(dataset, tmp_path)
    assert_user_error(proc, f"annotation id {ann_id}", "unknown image id 999999", workspace=tmp_path / "ws")
    proc = convert(dataset, tmp_path, "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    summary = load_summary(tmp_path / "ws" / "mine" / "data")
    assert summary["skipped_invalid"][0]["item"] == f"annotation id {ann_id}"
    total = sum(c["objects"]["train"] + c["objects"]["val"] for c in summary["classes"])
    usable = sum(1 for a in data["annotations"] if any(len(p) >= 6 for p in a["segmentation"]))
    assert total == usable - 1


def test_annotation_with_unknown_category(dataset, tmp_path):
    def change(data):
        data["annotations"][3]["category_id"] = 4242

    data = edit_export(dataset, change)
    proc = convert(dataset, tmp_path)
    assert_user_error(proc, f"annotation id {data['annotations'][3]['id']}", "unknown category id 4242",
                      workspace=tmp_path / "ws")


def test_duplicate_category_names(dataset, tmp_path):
    def change(data):
        data["categories"].append({"id": 99, "name": "circle", "supercategory": "shape"})
        data["annotations"][0]["category_id"] = 99

    data = edit_export(dataset, change)
    proc = convert(dataset, tmp_path)
    assert_user_error(proc, "category id 99 ('circle')", "duplicate category name", workspace=tmp_path / "ws")
    proc = convert(dataset, tmp_path, "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    summary = load_summary(tmp_path / "ws" / "mine" / "data")
    assert [c["name"] for c in summary["classes"]] == ["circle", "square", "triangle", "star"]
    dropped = [d for d in summary["dropped"] if d["item"] == f"annotation id {data['annotations'][0]['id']}"]
    assert dropped and "duplicates the name 'circle'" in dropped[0]["reason"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_image(dataset, tmp_path, damage):
    data = json.loads(newest_export(dataset).read_text())
    victim = next(im for im in data["images"] if im["file_name"].endswith(".jpg"))
    path = dataset / victim["path"].split("/", 3)[3]
    content = path.read_bytes()
    path.write_bytes({"truncated": content[: len(content) // 3], "garbage": b"not an image at all" * 50,
                      "empty": b""}[damage])
    proc = convert(dataset, tmp_path)
    line = assert_user_error(proc, victim["file_name"], f"image id {victim['id']}", workspace=tmp_path / "ws")
    assert "image" in line.split(":", 2)[-1]
    proc = convert(dataset, tmp_path, "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "ws" / "mine" / "data"
    assert victim["file_name"] not in {Path(r["filename"]).name for r in all_records(out)}
    assert len(load_summary(out)["skipped_invalid"]) == 1


def test_size_mismatch_between_export_and_file(dataset, tmp_path):
    def change(data):
        data["images"][0]["width"] += 10

    data = edit_export(dataset, change)
    proc = convert(dataset, tmp_path)
    assert_user_error(proc, f"image id {data['images'][0]['id']}", "but the annotations say",
                      workspace=tmp_path / "ws")


def test_failed_rerun_keeps_the_previous_output(dataset, tmp_path):
    proc = convert(dataset, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "ws" / "mine" / "data"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    victim = next(p for p in dataset.rglob("img_*.jpg"))
    victim.write_bytes(b"broken")
    proc = convert(dataset, tmp_path)
    assert proc.returncode == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]  # no temporary folder left


def test_unknown_dataset_and_missing_annotations(tmp_path):
    proc = run_cli("data", "--dataset", "no-such-dataset", workspace=tmp_path / "ws")
    assert proc.returncode == 2 and "no such dataset" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli("data", "--dataset", tmp_path / "empty", workspace=tmp_path / "ws")
    assert proc.returncode == 2 and "no annotations found" in proc.stderr
    assert not (tmp_path / "ws").exists()


def test_invalid_voc_xml(tmp_path):
    folder = tmp_path / "voc"
    (folder / "Annotations").mkdir(parents=True)
    (folder / "Annotations" / "a.xml").write_text("<annotation><filename>a.jpg</filename><object>")
    proc = run_cli("data", "--dataset", folder, workspace=tmp_path / "ws")
    assert proc.returncode == 2 and "a.xml" in proc.stderr and "invalid XML" in proc.stderr
    assert "Traceback" not in proc.stderr
