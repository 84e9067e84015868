"""The data stage on the annotation formats it claims to read, checked against the sources.

Every test runs the real CLI (`python -m pipelines data ...`) in a subprocess and decodes the
TFRecords it wrote with TensorFlow (tests/conftest.py). Expected values are computed here,
independently of pipelines/: VOC XML is parsed with xml.etree, COCO regions are rasterised with
pycocotools' own COCO API, and the datasets of the later tests are built in tmp_path.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conftest import all_records, load_summary, read_records, run_cli

BACKGROUND = "_background_"


# ---------------------------------------------------------------------------------------------
# helpers

def parse_label_map(folder: Path) -> dict[int, str]:
    """label_map.pbtxt as {id: name}, parsed here rather than with pipelines' own reader."""
    text = (Path(folder) / "label_map.pbtxt").read_text(encoding="utf-8")
    items = re.findall(r"item\s*\{(.*?)\}", text, re.S)
    out = {}
    for body in items:
        label_id = int(re.search(r"\bid\s*:\s*(-?\d+)", body).group(1))
        name = re.search(r"\bname\s*:\s*'((?:[^'\\]|\\.)*)'", body).group(1)
        assert label_id not in out, f"id {label_id} twice in label_map.pbtxt"
        out[label_id] = re.sub(r"\\(.)", r"\1", name)
    return out


def label_map_json(folder: Path) -> dict[int, dict]:
    data = json.loads((Path(folder) / "label_map.json").read_text(encoding="utf-8"))
    return {c["id"]: c for c in data["classes"]}


def coco_api(data: dict) -> COCO:
    """pycocotools' COCO index over an in-memory dataset (it wants an `info` key)."""
    data = copy.deepcopy(data)
    data.setdefault("info", {})
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return coco


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))


def mask_box(mask: np.ndarray) -> list[float]:
    """Pixel extent of a mask as [xmin, ymin, xmax, ymax] (xmax/ymax exclusive, as COCO's toBbox)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, computed by hand: column-major runs, starting with a run of 0s."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = int(pixel), 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def smooth_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth colourful picture (gradients survive JPEG with small errors)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 40 + 170 * xx / max(1, width - 1)
    g = 30 + 180 * yy / max(1, height - 1)
    b = 128 + 90 * np.sin((xx + yy + seed * 7) / 9.0)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def by_filename(records: list[dict]) -> dict[str, dict]:
    out = {r["filename"]: r for r in records}
    assert len(out) == len(records), "two records share a filename"
    return out


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# 1. labelme2coco export: polygons, `_background_` category, file_name with a subfolder

def test_labelme_coco_boxes_classes_and_masks_match_source(external, tmp_path):
    src = external / "labelme_coco_instance_seg"
    data = json.loads((src / "annotations.json").read_text(encoding="utf-8"))
    out = tmp_path / "out"
    run_cli("data", "--dataset", src, "--masks", "--workers", "1", "--out", out,
            workspace=tmp_path / "ws", check=True)

    # Label map: no background, ids 1..K in source-id order, label_map.json keeps the source id.
    categories = sorted((c for c in data["categories"] if c["name"] != BACKGROUND), key=lambda c: c["id"])
    assert len(categories) == 20
    pbtxt = parse_label_map(out)
    assert BACKGROUND not in pbtxt.values()
    assert sorted(pbtxt) == list(range(1, len(categories) + 1))
    assert [pbtxt[i] for i in sorted(pbtxt)] == [c["name"] for c in categories]
    sidecar = label_map_json(out)
    assert sorted(sidecar) == sorted(pbtxt)
    source_id_of = {c["name"]: c["id"] for c in categories}
    for label_id, entry in sidecar.items():
        assert entry["name"] == pbtxt[label_id]
        assert entry["source_id"] == source_id_of[entry["name"]]
    label_of = {source_id_of[name]: label_id for label_id, name in pbtxt.items()}

    coco = coco_api(data)
    records = all_records(out)
    assert len(records) == len(data["images"]) == 3
    seen_annotations = 0
    for rec in records:
        image_id = int(rec["source_id"])
        info = coco.imgs[image_id]
        assert rec["filename"] == info["file_name"]  # the subfolder is part of the key
        assert (rec["width"], rec["height"]) == (info["width"], info["height"])
        assert rec["image"].shape == (info["height"], info["width"], 3)
        assert rec["encoded"] == (src / info["file_name"]).read_bytes()  # RGB JPEG: copied as is
        anns = [a for a in coco.imgToAnns[image_id] if a["category_id"] in label_of]
        assert len(rec["labels"]) == len(anns) == len(rec["masks"]) == len(rec["texts"])
        seen_annotations += len(anns)
        for k, ann in enumerate(anns):
            name = coco.cats[ann["category_id"]]["name"]
            assert rec["labels"][k] == label_of[ann["category_id"]]
            assert rec["texts"][k] == name
            assert rec["crowd"][k] == 0
            expected_mask = coco.annToMask(ann)
            assert rec["masks"][k].shape == expected_mask.shape
            assert np.array_equal(rec["masks"][k], expected_mask), f"mask of annotation {ann['id']}"
            assert rec["area"][k] == pytest.approx(float(expected_mask.sum()), abs=0.5)
            xs = [v for poly in ann["segmentation"] for v in poly[0::2]]
            ys = [v for poly in ann["segmentation"] for v in poly[1::2]]
            extent = [min(max(min(xs), 0), info["width"]), min(max(min(ys), 0), info["height"]),
                      min(max(max(xs), 0), info["width"]), min(max(max(ys), 0), info["height"])]
            np.testing.assert_allclose(rec["boxes"][k], extent, atol=1.0,
                                       err_msg=f"box of annotation {ann['id']}")
    assert seen_annotations == len(data["annotations"]) == 12


# ---------------------------------------------------------------------------------------------
# 2. Pascal VOC XML from three tools

def _voc_expected(folder: Path):
    """{image file name: (width, height, [(class, xmin, ymin, xmax, ymax), ...])} from the XML."""
    xml_dir = next(folder / d for d in ("Annotations", "annotations") if (folder / d).is_dir())
    expected = {}
    for xml in sorted(xml_dir.glob("*.xml")):
        root = ET.parse(xml).getroot()
        width = int(float(root.findtext("size/width")))
        height = int(float(root.findtext("size/height")))
        objects = []
        for obj in root.findall("object"):
            box = obj.find("bndbox")
            objects.append((obj.findtext("name").strip(),
                            *(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
        expected[root.findtext("filename").strip()] = (width, height, objects)
    return expected


@pytest.mark.parametrize("name", ["labelme_voc_bbox", "icevision_fridge_voc", "icevision_voc"])
def test_voc_boxes_and_classes_match_xml(external, tmp_path, name):
    src = external / name
    expected = _voc_expected(src)
    out = tmp_path / "out"
    run_cli("data", "--dataset", src, "--workers", "1", "--out", out, workspace=tmp_path / "ws", check=True)

    names_in_xml = sorted({o[0] for _, _, objs in expected.values() for o in objs})
    class_file = src / "class_names.txt"
    if class_file.is_file():
        order = [n.strip() for n in class_file.read_text(encoding="utf-8").splitlines()
                 if n.strip() and n.strip() != BACKGROUND]
    else:
        order = names_in_xml
    pbtxt = parse_label_map(out)
    assert [pbtxt[i] for i in sorted(pbtxt)] == order
    assert sorted(pbtxt) == list(range(1, len(order) + 1))
    label_of = {n: i for i, n in pbtxt.items()}

    records = all_records(out)
    assert sorted(Path(r["filename"]).name for r in records) == sorted(expected)
    assert load_summary(out)["source"]["format"] == "voc"
    for rec in records:
        width, height, objects = expected[Path(rec["filename"]).name]
        assert (rec["width"], rec["height"]) == (width, height)
        assert rec["image"].shape == (height, width, 3)
        assert rec["texts"] == [o[0] for o in objects]
        assert rec["labels"] == [label_of[o[0]] for o in objects]
        assert rec["crowd"] == [0] * len(objects)
        want = np.array([o[1:] for o in objects], dtype=np.float64).reshape(-1, 4)
        # Stored normalised (float32): x / width * width must give back the XML number.
        np.testing.assert_allclose(rec["boxes"], want, atol=0.01, rtol=0,
                                   err_msg=f"{name}: {rec['filename']}")
        areas = (want[:, 2] - want[:, 0]) * (want[:, 3] - want[:, 1])
        np.testing.assert_allclose(rec["area"], areas, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. Plain COCO with crowd RLE (uncompressed and compressed), background category, subfolders

def _crowd_dataset(root: Path) -> dict:
    """Two images, polygons and crowd regions that overlap, as the real COCO files have them."""
    h1, w1 = 48, 64
    h2, w2 = 40, 56
    (root / "imgs" / "a").mkdir(parents=True)
    (root / "imgs" / "b").mkdir(parents=True)
    Image.fromarray(smooth_rgb(w1, h1, 1)).save(root / "imgs" / "a" / "one.png")
    Image.fromarray(smooth_rgb(w2, h2, 2)).save(root / "imgs" / "b" / "two.jpg", quality=90)

    crowd1 = np.zeros((h1, w1), np.uint8)
    crowd1[5:30, 30:60] = 1  # overlaps the big car polygon on its right side
    crowd1[35:45, 2:10] = 1  # a second, disjoint crowd blob
    crowd2 = np.zeros((h2, w2), np.uint8)
    crowd2[10:35, 5:40] = 1
    crowd2[12:20, 45:50] = 1

    big_car = [[4.0, 4.0, 44.0, 4.0, 44.0, 40.0, 4.0, 40.0]]
    small_person = [[20.5, 10.0, 34.0, 12.0, 30.0, 26.5, 18.0, 22.0]]  # inside big_car and crowd1
    person2 = [[20.0, 15.0, 30.0, 15.0, 25.0, 30.0]]  # over the crowd of image 2

    return {
        "info": {"description": "test"},
        "images": [
            {"id": 11, "file_name": "imgs/a/one.png", "width": w1, "height": h1},
            {"id": 12, "file_name": "imgs/b/two.jpg", "width": w2, "height": h2},
        ],
        "categories": [
            {"id": 0, "name": BACKGROUND},
            {"id": 3, "name": "person"},
            {"id": 7, "name": "car"},
        ],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "segmentation": big_car, "iscrowd": 0,
             "bbox": [4.0, 4.0, 40.0, 36.0], "area": 1440.0},
            {"id": 2, "image_id": 11, "category_id": 3, "segmentation": uncompressed_rle(crowd1),
             "iscrowd": 1, "bbox": mask_utils.toBbox(mask_utils.encode(np.asfortranarray(crowd1))).tolist(),
             "area": float(crowd1.sum())},
            {"id": 3, "image_id": 11, "category_id": 3, "segmentation": small_person, "iscrowd": 0,
             "bbox": [18.0, 10.0, 16.0, 16.5], "area": 150.0},
            {"id": 4, "image_id": 12, "category_id": 7, "segmentation": compressed_rle(crowd2),
             "iscrowd": 1, "bbox": mask_utils.toBbox(mask_utils.encode(np.asfortranarray(crowd2))).tolist(),
             "area": float(crowd2.sum())},
            {"id": 5, "image_id": 12, "category_id": 3, "segmentation": person2, "iscrowd": 0,
             "bbox": [20.0, 15.0, 10.0, 15.0], "area": 75.0},
            {"id": 6, "image_id": 12, "category_id": 0, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]],
             "iscrowd": 0, "bbox": [0, 0, 10, 10], "area": 100.0},
        ],
        "_masks": {2: crowd1, 4: crowd2},
    }


def test_coco_crowd_rle_masks_flags_and_class_mask(tmp_path):
    root = tmp_path / "crowd"
    data = _crowd_dataset(root)
    source_masks = data.pop("_masks")
    write_json(root / "annotations.json", data)
    # Sanity of the fixture itself: both RLE forms decode (with pycocotools) to the masks we drew.
    coco = coco_api(data)
    for aid, mask in source_masks.items():
        assert np.array_equal(coco.annToMask(coco.anns[aid]), mask)

    out = tmp_path / "out"
    run_cli("data", "--dataset", root, "--masks", "--task", "segmentation", "--workers", "1",
            "--out", out, workspace=tmp_path / "ws", check=True)

    pbtxt = parse_label_map(out)
    assert pbtxt == {1: "person", 2: "car"}  # background dropped, ids by source id (3, 7)
    assert {i: c["source_id"] for i, c in label_map_json(out).items()} == {1: 3, 2: 7}
    label_of = {3: 1, 7: 2}

    records = by_filename(all_records(out))
    assert sorted(records) == ["imgs/a/one.png", "imgs/b/two.jpg"]
    crowd_total = 0
    for info in data["images"]:
        rec = records[info["file_name"]]
        h, w = info["height"], info["width"]
        assert rec["source_id"] == str(info["id"])
        assert rec["image"].shape == (h, w, 3)
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"] and a["category_id"] != 0]
        assert len(rec["labels"]) == len(anns) == len(rec["masks"])
        want_masks = []
        for k, ann in enumerate(anns):
            if isinstance(ann["segmentation"], dict):
                want = source_masks[ann["id"]]
            else:
                want = polygon_mask(ann["segmentation"], h, w)
                assert np.array_equal(want, coco.annToMask(ann))
            want_masks.append(want)
            assert rec["crowd"][k] == ann["iscrowd"], f"is_crowd of annotation {ann['id']}"
            assert rec["labels"][k] == label_of[ann["category_id"]]
            assert rec["texts"][k] == pbtxt[label_of[ann["category_id"]]]
            assert rec["masks"][k].shape == (h, w)
            assert set(np.unique(rec["masks"][k])) <= {0, 1}
            assert np.array_equal(rec["masks"][k], want), f"mask of annotation {ann['id']}"
            assert rec["area"][k] == pytest.approx(float(want.sum()))
            if isinstance(ann["segmentation"], dict):
                np.testing.assert_allclose(rec["boxes"][k], mask_box(want), atol=1e-3)
            else:
                pts = np.array([v for p in ann["segmentation"] for v in p]).reshape(-1, 2)
                np.testing.assert_allclose(rec["boxes"][k], [*pts.min(axis=0), *pts.max(axis=0)], atol=1e-3)
            crowd_total += ann["iscrowd"]

        # Class mask: crowd first as 255, then objects from the largest area down (smaller wins).
        expected = np.zeros((h, w), np.uint8)
        for ann, mask in zip(anns, want_masks):
            if ann["iscrowd"]:
                expected[mask > 0] = 255
        plain = sorted((i for i, a in enumerate(anns) if not a["iscrowd"]), key=lambda i: -int(want_masks[i].sum()))
        for i in plain:
            expected[want_masks[i] > 0] = label_of[anns[i]["category_id"]]
        assert rec["class_mask"] is not None and rec["class_mask"].shape == (h, w)
        assert np.array_equal(rec["class_mask"], expected), info["file_name"]
        # The interesting pixels are really there: ignore, and objects over a crowd region.
        assert (rec["class_mask"] == 255).any()
        for i in plain:
            crowd_union = np.any([m for a, m in zip(anns, want_masks) if a["iscrowd"]], axis=0)
            overlap = (want_masks[i] > 0) & crowd_union
            if overlap.any():
                assert (rec["class_mask"][overlap] != 255).all()
    assert crowd_total == 2

    # Image 1: the small person lies on the big car, it must win where they overlap.
    rec = records["imgs/a/one.png"]
    assert rec["class_mask"][18, 25] == label_of[3]
    assert rec["class_mask"][35, 8] == label_of[7]  # car over the second crowd blob's corner
    assert rec["class_mask"][44, 5] == 255  # crowd outside every object
    summary = load_summary(out)
    assert {c["name"]: c["crowd"] for c in summary["classes"]} == {"person": 1, "car": 1}
    assert any(BACKGROUND in d["item"] for d in summary["dropped"])


# ---------------------------------------------------------------------------------------------
# 4. Image modes and file formats

IMAGE_CASES = {
    # file name: (how it is written, expected record format, copied byte for byte)
    "rgb.jpg": ("RGB JPEG", "jpeg", True),
    "rgb.png": ("RGB PNG", "png", True),
    "gray.jpg": ("L JPEG", "jpeg", False),
    "rgba.png": ("RGBA PNG", "png", False),
    "palette.png": ("P PNG", "png", False),
    "cmyk.jpg": ("CMYK JPEG", "jpeg", False),
    "gray16.png": ("I;16 PNG", "png", False),
    "photo.webp": ("WebP", "jpeg", False),
    "picture.bmp": ("BMP", "png", False),
    "scan.tif": ("TIFF", "png", False),
    "anim.gif": ("GIF", "png", False),
    "disguised.jpg": ("RGB PNG named .jpg", "png", True),  # the format comes from the content
}
LOSSLESS_EXACT = {"palette.png", "picture.bmp", "scan.tif", "anim.gif"}


def _write_mode_images(folder: Path) -> dict[str, tuple[int, int]]:
    folder.mkdir(parents=True)
    sizes = {}
    for n, name in enumerate(sorted(IMAGE_CASES)):
        w, h = 40 + 4 * n, 30 + 2 * n  # every image its own size: a mix-up cannot pass
        sizes[name] = (w, h)
        rgb = smooth_rgb(w, h, n)
        path = folder / name
        if name == "rgb.jpg":
            Image.fromarray(rgb).save(path, quality=92)
        elif name in ("rgb.png", "disguised.jpg"):
            Image.fromarray(rgb).save(path, format="PNG")
        elif name == "gray.jpg":
            Image.fromarray(rgb).convert("L").save(path, quality=95)
        elif name == "rgba.png":
            alpha = np.full((h, w), 255, np.uint8)
            alpha[: h // 3, : w // 3] = 0
            Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(path)
        elif name == "palette.png":
            Image.fromarray(rgb).quantize(colors=16).save(path)
        elif name == "cmyk.jpg":
            Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
        elif name == "gray16.png":
            ramp = np.zeros((h, w), np.uint16)
            ramp[:, : w // 3] = 65535
            ramp[:, w // 3: 2 * w // 3] = 257 * 100
            ramp[:, 2 * w // 3:] = 257 * 7
            Image.fromarray(ramp).save(path)
            assert Image.open(path).mode.startswith("I")
        elif name == "photo.webp":
            Image.fromarray(rgb).save(path, quality=95)
        elif name == "picture.bmp":
            Image.fromarray(rgb).save(path)
        elif name == "scan.tif":
            Image.fromarray(rgb).save(path)
        elif name == "anim.gif":
            Image.fromarray(rgb).quantize(colors=32).save(path)
        by_extension = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF",
                        "gif": "GIF"}[name.rsplit(".", 1)[1]]
        assert Image.open(path).format == ("PNG" if name == "disguised.jpg" else by_extension)
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert Image.open(folder / "palette.png").mode == "P"
    assert Image.open(folder / "gray.jpg").mode == "L"
    return sizes


def test_image_modes_and_formats_are_normalised(tmp_path):
    root = tmp_path / "modes"
    sizes = _write_mode_images(root / "images")
    names = sorted(IMAGE_CASES)
    data = {
        "images": [{"id": i + 1, "file_name": f"images/{name}", "width": sizes[name][0], "height": sizes[name][1]}
                   for i, name in enumerate(names)],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": [],
                         "bbox": [2.0, 3.0, 10.0, 8.0], "area": 80.0, "iscrowd": 0}
                        for i, _ in enumerate(names)],
    }
    write_json(root / "annotations.json", data)
    out = tmp_path / "out"
    run_cli("data", "--dataset", root, "--workers", "2", "--out", out, workspace=tmp_path / "ws", check=True)

    records = by_filename(all_records(out))
    assert sorted(records) == [f"images/{n}" for n in names]
    magic = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}
    for name, (what, fmt, copied) in IMAGE_CASES.items():
        rec = records[f"images/{name}"]
        w, h = sizes[name]
        source = root / "images" / name
        assert rec["format"] in ("jpeg", "png"), what
        assert rec["format"] == fmt, f"{what}: written as {rec['format']}, expected {fmt}"
        assert rec["encoded"].startswith(magic[fmt]), f"{what}: bytes are not {fmt}"
        assert (rec["width"], rec["height"]) == (w, h), what
        assert rec["image"].shape == (h, w, 3), what  # tf.io.decode_image(channels=3)
        assert rec["sha256"] == hashlib.sha256(rec["encoded"]).hexdigest(), what
        if copied:
            assert rec["encoded"] == source.read_bytes(), f"{what} should be copied byte for byte"
        else:
            assert rec["encoded"] != source.read_bytes(), what
            # Re-encoded means 8-bit RGB (3 channels), whatever the source mode was.
            written = Image.open(io.BytesIO(rec["encoded"]))
            assert written.mode == "RGB", f"{what}: re-encoded as {written.mode}"
        np.testing.assert_allclose(rec["boxes"], [[2.0, 3.0, 12.0, 11.0]], atol=1e-3)

        decoded = rec["image"].astype(np.int16)
        if name == "gray16.png":
            # 16-bit levels are scaled to 8 bits, not clipped: 65535 -> 255, 257*100 -> 100, 257*7 -> 7.
            assert np.all(decoded[:, : w // 3] >= 254), decoded[:, : w // 3].min()
            assert np.all(np.abs(decoded[:, w // 3: 2 * w // 3] - 100) <= 1)
            assert np.all(np.abs(decoded[:, 2 * w // 3:] - 7) <= 1)
            assert np.all(decoded[..., 0] == decoded[..., 1]) and np.all(decoded[..., 1] == decoded[..., 2])
            continue
        want = np.asarray(Image.open(source).convert("RGB")).astype(np.int16)
        if name in LOSSLESS_EXACT:
            assert np.array_equal(decoded, want), f"{what}: pixels changed on the way to PNG"
        elif name == "rgba.png":
            opaque = np.asarray(Image.open(source))[..., 3] == 255
            assert np.array_equal(decoded[opaque], want[opaque]), f"{what}: opaque pixels changed"
        else:  # JPEG-family: decoders and one re-encode differ a little
            diff = np.abs(decoded - want)
            assert diff.mean() < 3.0 and diff.max() <= 40, f"{what}: mean {diff.mean():.2f} max {diff.max()}"
        if name == "gray.jpg":
            assert np.abs(decoded[..., 0] - decoded[..., 2]).max() <= 3, "grey stays grey"

    summary = load_summary(out)
    assert summary["images"]["copied"] == sum(1 for _, _, c in IMAGE_CASES.values() if c) == 3
    assert summary["images"]["reencoded"] == len(IMAGE_CASES) - 3 == 9
    assert summary["images"]["train"] + summary["images"]["val"] == len(IMAGE_CASES)


# ---------------------------------------------------------------------------------------------
# 5. Separate train and val annotation files

def _simple_coco(root: Path, folder: str, names: list[str], categories: list[dict], objects) -> dict:
    """A COCO dict over new images root/folder/NAME; objects[i] = [(category id, x, y, w, h), ...]."""
    images, annotations = [], []
    (root / folder).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        w, h = 48 + 2 * i, 36 + i
        Image.fromarray(smooth_rgb(w, h, i)).save(root / folder / name, quality=90)
        image_id = 100 + i
        images.append({"id": image_id, "file_name": f"{folder}/{name}", "width": w, "height": h})
        for cid, x, y, bw, bh in objects[i]:
            annotations.append({"id": len(annotations) + 1 + 1000 * len(folder), "image_id": image_id,
                                "category_id": cid, "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]],
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    return {"images": images, "categories": categories, "annotations": annotations}


def test_separate_train_and_val_annotation_files(tmp_path):
    root = tmp_path / "split"
    train = _simple_coco(root, "train_imgs", [f"t{i}.jpg" for i in range(5)],
                         [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
                         [[(1, 2, 2, 10, 10)], [(2, 3, 3, 12, 9)], [(1, 1, 1, 5, 5), (2, 20, 10, 8, 8)],
                          [(2, 4, 4, 6, 6)], [(1, 6, 6, 9, 9)]])
    # Val numbers its categories differently (by source id, val alone would make dog 1 and cat 2),
    # lists them in another order and adds one.
    val = _simple_coco(root, "val_imgs", ["v0.jpg", "v1.jpg"],
                       [{"id": 5, "name": "cat"}, {"id": 11, "name": "bird"}, {"id": 4, "name": "dog"}],
                       [[(4, 2, 2, 10, 10), (5, 15, 5, 8, 8)], [(11, 3, 3, 7, 7), (5, 1, 1, 4, 4)]])
    train_file = write_json(root / "train.json", train)
    val_file = write_json(root / "val.json", val)
    out = tmp_path / "out"
    run_cli("data", "--dataset", root, "--annotations", train_file, "--val-annotations", val_file,
            "--workers", "1", "--out", out, workspace=tmp_path / "ws", check=True)

    summary = load_summary(out)
    assert summary["split"]["method"] == "separate annotation files"
    assert summary["images"]["train"] == 5 and summary["images"]["val"] == 2

    pbtxt = parse_label_map(out)
    assert pbtxt == {1: "cat", 2: "dog", 3: "bird"}
    assert label_map_json(out)[3]["source_id"] == 11
    train_recs = by_filename(read_records(out, "train"))
    val_recs = by_filename(read_records(out, "val"))
    assert sorted(train_recs) == sorted(im["file_name"] for im in train["images"])  # no random split
    assert sorted(val_recs) == sorted(im["file_name"] for im in val["images"])

    for data, recs in ((train, train_recs), (val, val_recs)):
        cat_name = {c["id"]: c["name"] for c in data["categories"]}
        label_of = {name: i for i, name in pbtxt.items()}
        for im in data["images"]:
            rec = recs[im["file_name"]]
            assert rec["source_id"] == str(im["id"])
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            assert rec["texts"] == [cat_name[a["category_id"]] for a in anns]
            assert rec["labels"] == [label_of[cat_name[a["category_id"]]] for a in anns]
            want = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                    for a in anns]
            np.testing.assert_allclose(rec["boxes"], want, atol=1e-3)
    # Per-class counts agree with the files: val's "dog" (source id 4) is counted as train's dog.
    classes = {c["name"]: c for c in summary["classes"]}
    assert classes["dog"]["objects"] == {"train": 3, "val": 1}
    assert classes["cat"]["objects"] == {"train": 3, "val": 2}
    assert classes["bird"]["objects"] == {"train": 0, "val": 1}


# ---------------------------------------------------------------------------------------------
# 6. Official COCO folder layout: annotations/instances_{train,val}2017.json

def _official_layout(root: Path, file_name_with_folder: bool) -> tuple[dict, dict]:
    """COCO 2017's layout: annotations/instances_*2017.json, images in train2017/ and val2017/."""
    cats = [{"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"}]
    splits = {}
    for split, count, first_id in (("train2017", 3, 9), ("val2017", 2, 139)):
        images, annotations = [], []
        (root / split).mkdir(parents=True)
        for i in range(count):
            image_id = first_id + i
            base = f"{image_id:012d}.jpg"  # COCO's own naming
            w, h = 50 + 3 * i, 40 + 2 * i
            Image.fromarray(smooth_rgb(w, h, image_id)).save(root / split / base, quality=90)
            images.append({"id": image_id, "width": w, "height": h, "license": 1,
                           "file_name": f"{split}/{base}" if file_name_with_folder else base,
                           "coco_url": f"http://images.cocodataset.org/{split}/{base}"})
            cid = 1 if i % 2 == 0 else 3
            annotations.append({"id": 1000 + image_id, "image_id": image_id, "category_id": cid,
                                "segmentation": [[2.0, 2.0, 20.0, 2.0, 20.0, 15.0, 2.0, 15.0]],
                                "area": 234.0, "bbox": [2.0, 2.0, 18.0, 13.0], "iscrowd": 0})
        splits[split] = {"info": {"year": 2017}, "licenses": [], "images": images,
                         "annotations": annotations, "categories": cats}
        write_json(root / "annotations" / f"instances_{split}.json", splits[split])
    # The real folder also holds other annotation kinds: they must not confuse the detection.
    write_json(root / "annotations" / "captions_train2017.json", {"images": [], "annotations": []})
    write_json(root / "annotations" / "person_keypoints_val2017.json",
               {"images": [], "annotations": [], "categories": cats})
    return splits["train2017"], splits["val2017"]


def _check_official(root: Path, out: Path, train: dict, val: dict):
    summary = load_summary(out)
    assert summary["split"]["method"] == "separate annotation files"
    assert [Path(f).name for f in summary["source"]["annotation_files"]] == \
        ["instances_train2017.json", "instances_val2017.json"]
    assert parse_label_map(out) == {1: "person", 2: "car"}
    for split, data in (("train", train), ("val", val)):
        recs = read_records(out, split)
        assert sorted(int(r["source_id"]) for r in recs) == sorted(im["id"] for im in data["images"])
        for rec in recs:
            im = next(i for i in data["images"] if i["id"] == int(rec["source_id"]))
            folder = "train2017" if split == "train" else "val2017"
            assert rec["encoded"] == (root / folder / Path(im["file_name"]).name).read_bytes()
            ann = next(a for a in data["annotations"] if a["image_id"] == im["id"])
            assert rec["texts"] == [{1: "person", 3: "car"}[ann["category_id"]]]
            np.testing.assert_allclose(rec["boxes"], [[2.0, 2.0, 20.0, 15.0]], atol=1e-3)


@pytest.mark.parametrize("file_name_with_folder", [True, False], ids=["file_name-with-folder", "bare-file_name"])
def test_official_coco_layout_is_detected(tmp_path, file_name_with_folder):
    """annotations/instances_train*.json + instances_val*.json are used as train/val without flags,
    with `file_name` either naming the split folder or bare, as COCO 2017 ships (images in
    train2017/ and val2017/)."""
    root = tmp_path / "coco"
    train, val = _official_layout(root, file_name_with_folder=file_name_with_folder)
    out = tmp_path / "out"
    run_cli("data", "--dataset", root, "--workers", "1", "--out", out, workspace=tmp_path / "ws", check=True)
    _check_official(root, out, train, val)
