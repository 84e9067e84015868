"""The bundled sample and its conversion: every record checked against the coco-annotator export."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from conftest import all_records, load_summary, read_records, run_cli
from pipelines.data.sample import generate
from pipelines.data.sources import newest_export
from pipelines.data.split import assign_splits


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sample_is_deterministic(tmp_path):
    generate(tmp_path / "a" / "shapes", num_images=12, seed=3)
    generate(tmp_path / "b" / "shapes", num_images=12, seed=3)
    a, b = _tree(tmp_path / "a" / "shapes"), _tree(tmp_path / "b" / "shapes")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    generate(tmp_path / "c" / "shapes", num_images=12, seed=4)
    assert _tree(tmp_path / "c" / "shapes") != a


def test_sample_has_coco_annotator_layout_and_quirks(sample_dir):
    exports = sorted(p.name for p in (sample_dir / ".exports").iterdir())
    assert len(exports) == 2
    newest = newest_export(sample_dir)
    assert newest.name == "coco-1700000000.25.json"  # by time, not by name
    data = json.loads(newest.read_text())
    assert set(data) == {"images", "categories", "annotations"}  # no 'info'
    image_ids = [im["id"] for im in data["images"]]
    assert min(image_ids) > 1 and len(set(np.diff(image_ids))) > 1  # database ids with gaps
    assert [c["id"] for c in data["categories"]] != sorted(c["id"] for c in data["categories"])
    ann_ids = [a["id"] for a in data["annotations"]]
    assert ann_ids != sorted(ann_ids)
    for im in data["images"]:
        assert im["path"] == f"/datasets/{sample_dir.name}/{im['path'].split('/')[-2]}/{im['file_name']}"
        assert "/" not in im["file_name"]
    assert all(isinstance(a["iscrowd"], bool) for a in data["annotations"])
    assert any(a["segmentation"] == [] and a["bbox"] == [0, 0, 0, 0] and a["keypoints"] for a in data["annotations"])
    assert any(len(p) < 6 for a in data["annotations"] for p in a["segmentation"])
    assert any(x < 0 or y < 0 for a in data["annotations"] for p in a["segmentation"]
               for x, y in zip(p[0::2], p[1::2])) or any(
        max(p[0::2]) > im["width"] for a in data["annotations"] for p in a["segmentation"] if p
        for im in data["images"] if im["id"] == a["image_id"])
    formats = {p.name: Image.open(p).format for p in sample_dir.rglob("img_*")}
    assert any(name.endswith(".jpeg") and fmt == "WEBP" for name, fmt in formats.items())
    exif = [p for p in sample_dir.rglob("img_*.jpg") if Image.open(p).getexif().get(0x0112) == 6]
    assert len(exif) == 1
    assert any(Image.open(p).mode == "L" for p in sample_dir.rglob("img_*.jpg"))
    empty = {im["id"] for im in data["images"]} - {a["image_id"] for a in data["annotations"]}
    assert empty, "the sample must have images without objects"


def _expected_objects(data: dict):
    """Per image id: the annotations the data stage must keep, in export order, with their masks."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = {im["id"]: im for im in data["images"]}
    per_image = {iid: [] for iid in images}
    for ann in data["annotations"]:
        polygons = [p for p in ann["segmentation"] if len(p) >= 6]  # 2-point polygons are dropped
        if not polygons:
            continue  # keypoint-only
        im = images[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, im["height"], im["width"]))
        xs = [min(max(v, 0), im["width"]) for p in polygons for v in p[0::2]]
        ys = [min(max(v, 0), im["height"]) for p in polygons for v in p[1::2]]
        clipped = any(v < 0 or v > im["width"] for p in polygons for v in p[0::2]) or any(
            v < 0 or v > im["height"] for p in polygons for v in p[1::2])
        per_image[ann["image_id"]].append((names[ann["category_id"]], mask_utils.decode(rle),
                                           (min(xs), min(ys), max(xs), max(ys)), clipped))
    return images, per_image


@pytest.fixture(scope="module")
def converted(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "data"
    proc = run_cli("data", "--dataset", sample_dir, "--masks", "--task", "segmentation", "--out", out, check=True)
    return out, proc


def test_every_record_matches_the_export(sample_dir, converted):
    out, _ = converted
    data = json.loads(newest_export(sample_dir).read_text())
    images, expected = _expected_objects(data)
    by_key = {f"{im['path'].split('/')[-2]}/{im['file_name']}": im for im in images.values()}
    label_ids = {c["name"]: i + 1 for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    records = all_records(out)
    assert sorted(r["filename"] for r in records) == sorted(by_key)
    checked = 0
    for rec in records:
        im = by_key[rec["filename"]]
        assert (rec["width"], rec["height"]) == (im["width"], im["height"])
        assert rec["image"].shape == (im["height"], im["width"], 3)
        assert rec["source_id"] == str(im["id"])
        assert rec["sha256"] == hashlib.sha256(rec["encoded"]).hexdigest()
        assert rec["format"] in ("jpeg", "png")
        want = expected[im["id"]]
        assert rec["texts"] == [w[0] for w in want]
        assert rec["labels"] == [label_ids[w[0]] for w in want]
        assert rec["crowd"] == [0] * len(want)
        assert len(rec["masks"]) == len(want)
        for box, area, mask, (_, want_mask, clipped_extent, clipped) in zip(rec["boxes"], rec["area"], rec["masks"], want):
            np.testing.assert_array_equal(mask, want_mask)
            assert area == pytest.approx(want_mask.sum())
            ys, xs = np.nonzero(want_mask)
            # Every mask pixel lies in the box (pixel centres, with rounding of the edges).
            assert xs.min() >= box[0] - 1 and xs.max() + 1 <= box[2] + 1
            assert ys.min() >= box[1] - 1 and ys.max() + 1 <= box[3] + 1
            # The box is the polygon's extent; where the polygon runs over the border it lies
            # within the extent clipped to the image.
            assert box[0] >= clipped_extent[0] - 1e-2 and box[1] >= clipped_extent[1] - 1e-2
            assert box[2] <= clipped_extent[2] + 1e-2 and box[3] <= clipped_extent[3] + 1e-2
            if not clipped:
                np.testing.assert_allclose(box, clipped_extent, atol=1e-2)
            checked += 1
        # Class mask: 0 background; objects painted largest first so smaller ones stay on top.
        class_mask = np.zeros((im["height"], im["width"]), np.uint8)
        for name, mask, _, _ in sorted(want, key=lambda w: -int(w[1].sum())):
            class_mask[mask > 0] = label_ids[name]
        np.testing.assert_array_equal(rec["class_mask"], class_mask)
    assert checked > 50


def test_copies_jpeg_and_png_bytes_and_fixes_the_rest(sample_dir, converted):
    out, _ = converted
    records = {r["filename"]: r for r in all_records(out)}
    for key, rec in records.items():
        src = sample_dir / key
        img = Image.open(src)
        if img.format in ("JPEG", "PNG") and img.mode == "RGB" and not img.getexif().get(0x0112):
            assert rec["encoded"] == src.read_bytes(), key
        else:
            assert rec["encoded"] != src.read_bytes(), key
    webp = next(k for k in records if Image.open(sample_dir / k).format == "WEBP")
    assert records[webp]["format"] == "jpeg"
    rotated = next(k for k in records if Image.open(sample_dir / k).getexif().get(0x0112) == 6)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(sample_dir / rotated)).convert("RGB"), dtype=float)
    assert records[rotated]["image"].shape == shown.shape  # portrait, as the annotator saw it
    assert np.abs(records[rotated]["image"] - shown).mean() < 3.0
    summary = load_summary(out)
    assert summary["images"]["reencoded"] == 3  # WebP, grayscale, EXIF-rotated
    assert summary["images"]["copied"] == len(records) - 3


def test_summary_reports_and_counts(sample_dir, converted):
    out, proc = converted
    summary = load_summary(out)
    records = {s: read_records(out, s) for s in ("train", "val")}
    for cls in summary["classes"]:
        for split in ("train", "val"):
            assert cls["objects"][split] == sum(r["labels"].count(cls["id"]) for r in records[split])
    assert summary["images"]["train"] == len(records["train"]) and summary["images"]["val"] == len(records["val"])
    assert summary["images"]["without_objects"]["train"] + summary["images"]["without_objects"]["val"] == sum(
        1 for s in records.values() for r in s if not r["labels"])
    reasons = [d["reason"] for d in summary["dropped"]]
    assert sum("keypoint-only" in r for r in reasons) == 2
    repaired = [r["reason"] for r in summary["repaired"]]
    assert any("degenerate polygon" in r for r in repaired)
    assert any("EXIF orientation 6 applied" in r for r in repaired)
    assert "keypoint-only annotation" in proc.stdout and "triangle" in proc.stdout
    preview = Image.open(out / "preview.png")
    assert preview.width >= 800 and preview.height >= 200
    label_map = (out / "label_map.pbtxt").read_text()
    assert "item {\n  id: 1\n  name: 'circle'\n}" in label_map
    sidecar = json.loads((out / "label_map.json").read_text())
    assert [(c["id"], c["name"], c["source_id"]) for c in sidecar["classes"]] == [
        (1, "circle", 7), (2, "square", 12), (3, "triangle", 19), (4, "star", 23)]


def test_split_is_deterministic_and_stable_when_images_are_added():
    keys = [f"batch/{i:05d}.jpg" for i in range(2000)]
    first = assign_splits(keys, 0.2, seed=0)
    assert first == assign_splits(list(reversed(keys)), 0.2, seed=0)
    grown = assign_splits(keys + [f"new/{i}.jpg" for i in range(500)], 0.2, seed=0)
    assert all(grown[k] == first[k] for k in keys)
    assert 0.17 < sum(v == "val" for v in first.values()) / len(keys) < 0.23
    assert assign_splits(keys, 0.2, seed=1) != first
    assert sorted(assign_splits(["a.jpg", "b.jpg"], 0.01, seed=0).values()) == ["train", "val"]
    assert set(assign_splits(keys[:50], 0.0, seed=0).values()) == {"train"}


def test_output_is_byte_identical_across_runs_and_worker_counts(sample_dir, tmp_path):
    run_cli("data", "--dataset", sample_dir, "--masks", "--workers", "1", "--shards", "3", "--out", tmp_path / "one",
            check=True)
    run_cli("data", "--dataset", sample_dir, "--masks", "--workers", "2", "--shards", "3", "--out", tmp_path / "two",
            check=True)
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []
    shards = sorted(k for k in one if k.startswith("train-"))
    assert shards == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert all(len(read_records(tmp_path / "one", "train")) > 0 for _ in shards)


def test_make_data_target_writes_into_the_workspace(sample_dir, tmp_path):
    import os
    import subprocess

    from conftest import REPO

    env = dict(os.environ, PIPELINES_WORKSPACE=str(tmp_path / "ws"))
    proc = subprocess.run(["make", "--no-print-directory", "data", f"DATASET={sample_dir}", "VAL_RATIO=0.25", "SEED=7"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "ws" / sample_dir.name / "data"
    assert {"label_map.pbtxt", "label_map.json", "summary.json", "preview.png"} <= {p.name for p in out.iterdir()}
    summary = load_summary(out)
    assert summary["split"] == {"method": "hash of the image path", "val_ratio": 0.25, "seed": 7}
    keys = [r["filename"] for r in read_records(out, "val")]
    expected = assign_splits([r["filename"] for r in all_records(out)], 0.25, seed=7)
    assert sorted(keys) == sorted(k for k, v in expected.items() if v == "val")
    assert not list(out.parent.glob(".data.tmp-*"))


def test_help_for_the_data_stage():
    proc = run_cli("data", "--help", check=True)
    assert "--skip-invalid" in proc.stdout and "--val-ratio" in proc.stdout


def test_png_instance_masks_are_zero_one(converted):
    out, _ = converted
    rec = next(r for r in read_records(out, "train") if r["masks"])
    assert set(np.unique(rec["masks"][0])) <= {0, 1}
    raw = Image.open(io.BytesIO(rec["encoded"]))
    assert raw.size == (rec["width"], rec["height"])
