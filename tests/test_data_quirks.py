"""coco-annotator quirks, one hand-made export each, checked in the records and in summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import all_records, load_summary, run_cli


def make_dataset(root: Path, images: list[dict], annotations: list[dict], categories=None) -> Path:
    """A coco-annotator dataset folder: the images dicts carry a PIL image under 'pil' (and 'save' kwargs)."""
    folder = root / "quirks"
    out = []
    for im in images:
        path = folder / im["rel"]
        path.parent.mkdir(parents=True, exist_ok=True)
        im["pil"].save(path, **im.get("save", {"format": "JPEG", "quality": 95}))
        w, h = im.get("size", im["pil"].size)
        out.append({"id": im["id"], "path": f"/datasets/quirks/{im['rel']}", "file_name": Path(im["rel"]).name,
                    "width": w, "height": h, "dataset_id": 1, "annotated": True, "metadata": {}})
    (folder / ".exports").mkdir(parents=True)
    categories = categories or [{"id": 31, "name": "thing", "color": "#fff"}, {"id": 8, "name": "unused"}]
    (folder / ".exports" / "coco-1700000000.json").write_text(
        json.dumps({"images": out, "categories": categories, "annotations": annotations}))
    return folder


def ann(aid, image_id, segmentation, bbox, **extra):
    return {"id": aid, "image_id": image_id, "category_id": 31, "segmentation": segmentation, "bbox": bbox,
            "area": 0, "iscrowd": False, "isbbox": False, "color": "#fff", "metadata": {}, **extra}


def convert(folder, tmp_path, *extra):
    out = tmp_path / "out"
    run_cli("data", "--dataset", folder, "--val-ratio", "0", "--workers", "1", "--masks", "--out", out, *extra,
            check=True)
    return out, {r["filename"]: r for r in all_records(out)}, load_summary(out)


def _photo(w, h, seed=0):
    """A smooth picture (lossy codecs keep it close), different for each seed."""
    yy, xx = np.mgrid[0:h, 0:w]
    phase = seed * 0.7
    rgb = np.stack([128 + 100 * np.sin(xx / 7 + phase), 128 + 100 * np.cos(yy / 5 + phase),
                    128 + 100 * np.sin((xx + yy) / 11 + phase)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def test_exif_rotation_kept_when_the_export_has_the_stored_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = _photo(60, 40)
    folder = make_dataset(tmp_path, [
        {"id": 5, "rel": "a/stored.jpg", "pil": stored, "save": {"format": "JPEG", "exif": exif}},
        {"id": 6, "rel": "a/flipped.jpg", "pil": stored, "save": {"format": "JPEG", "exif": _exif(3)}},
    ], [ann(1, 5, [[10, 5, 50, 5, 50, 30, 10, 30]], [10, 5, 40, 25]),
        ann(2, 6, [[10, 5, 50, 5, 50, 30, 10, 30]], [10, 5, 40, 25])])
    _, records, summary = convert(folder, tmp_path)
    for key in ("a/stored.jpg", "a/flipped.jpg"):
        rec = records[key]
        assert (rec["width"], rec["height"]) == (60, 40)
        assert rec["encoded"] == (folder / key).read_bytes()  # the annotated pixels, untouched
        np.testing.assert_allclose(rec["boxes"][0], [10, 5, 50, 30], atol=1e-3)
    reasons = [r["reason"] for r in summary["repaired"]]
    assert sum("not applied: the annotations were made on the stored 60x40 pixels" in r for r in reasons) == 2


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_bbox_only_and_degenerate_and_outside_objects(tmp_path):
    folder = make_dataset(tmp_path, [{"id": 100, "rel": "x.jpg", "pil": _photo(100, 80)}], [
        # drawn with the bbox tool: a 4-corner polygon
        ann(11, 100, [[20, 10, 60, 10, 60, 50, 20, 50]], [20, 10, 40, 40], isbbox=True),
        # only stray 2-point polygons left: the bbox becomes the box
        ann(12, 100, [[5, 5, 9, 9]], [30, 30, 20, 10]),
        # entirely outside the image
        ann(13, 100, [[120, 10, 150, 10, 150, 40]], [120, 10, 30, 30]),
        # stale bbox, polygon runs over the left border
        ann(14, 100, [[-10, 60, 30, 60, 30, 75, -10, 75]], [0, 0, 5, 5]),
        # keypoint-only
        ann(15, 100, [], [0, 0, 0, 0], keypoints=[50, 40, 2]),
    ])
    _, records, summary = convert(folder, tmp_path)
    rec = records["x.jpg"]
    np.testing.assert_allclose(rec["boxes"], [[20, 10, 60, 50], [30, 30, 50, 40], [0, 60, 30, 75]], atol=1e-3)
    assert rec["labels"] == [2, 2, 2] and rec["texts"] == ["thing"] * 3
    box_mask = np.zeros((80, 100), np.uint8)
    box_mask[10:50, 20:60] = 1
    assert np.abs(rec["masks"][0].astype(int) - box_mask).sum() < 80 * 2  # the rectangle, edges aside
    assert rec["masks"][1][30:40, 30:50].mean() > 0.9  # the box's mask for the bbox-only object
    by_item = {}
    for kind in ("dropped", "repaired"):
        for r in summary[kind]:
            by_item.setdefault(r["item"].split(" of ")[0], []).append((kind, r["reason"]))
    assert ("repaired", "no valid polygon left: its bbox is used as the box") in by_item["annotation id 12"]
    assert any(k == "dropped" and "outside the image" in r for k, r in by_item["annotation id 13"])
    assert ("repaired", "polygon clipped to the image") in by_item["annotation id 14"]
    assert any(k == "repaired" and r.startswith("stored bbox differs") for k, r in by_item["annotation id 14"])
    assert by_item["annotation id 15"] == [("dropped", "keypoint-only annotation (no region, no box)")]
    classes = {c["name"]: c for c in summary["classes"]}
    assert classes["unused"]["objects"] == {"train": 0, "val": 0}  # kept in the label map, counted 0
    assert [c["id"] for c in summary["classes"]] == [1, 2] and classes["unused"]["id"] == 1  # by source id


def test_extension_does_not_decide_the_format(tmp_path):
    folder = make_dataset(tmp_path, [
        {"id": 1, "rel": "webp_named.jpeg", "pil": _photo(40, 30), "save": {"format": "WEBP", "lossless": True}},
        {"id": 2, "rel": "png_named.jpg", "pil": _photo(40, 30, 1), "save": {"format": "PNG"}},
        {"id": 3, "rel": "jpeg_named.png", "pil": _photo(40, 30, 2), "save": {"format": "JPEG"}},
    ], [])
    _, records, _ = convert(folder, tmp_path)
    assert records["webp_named.jpeg"]["format"] == "jpeg"
    np.testing.assert_allclose(records["webp_named.jpeg"]["image"].astype(float),
                               np.asarray(Image.open(folder / "webp_named.jpeg").convert("RGB"), dtype=float), atol=12)
    assert records["png_named.jpg"]["format"] == "png"
    assert records["png_named.jpg"]["encoded"] == (folder / "png_named.jpg").read_bytes()
    assert records["jpeg_named.png"]["format"] == "jpeg"


@pytest.mark.parametrize("path_kind", ["absolute-other-machine", "missing-path"])
def test_image_found_from_path_or_file_name(tmp_path, path_kind):
    folder = make_dataset(tmp_path, [{"id": 9, "rel": "deep/sub/dir/p.jpg", "pil": _photo(30, 20)}], [])
    export = next((folder / ".exports").iterdir())
    data = json.loads(export.read_text())
    if path_kind == "absolute-other-machine":
        data["images"][0]["path"] = "/mnt/storage/annotator/datasets/quirks/deep/sub/dir/p.jpg"
    else:
        del data["images"][0]["path"]
        data["images"][0]["file_name"] = "deep/sub/dir/p.jpg"
    export.write_text(json.dumps(data))
    _, records, _ = convert(folder, tmp_path)
    assert list(records) == ["deep/sub/dir/p.jpg"]
    assert records["deep/sub/dir/p.jpg"]["source_id"] == "9"
