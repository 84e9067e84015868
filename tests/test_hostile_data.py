"""Hostile input to the data stage, from a probe campaign: every case ends as one line naming the file
and the item (exit 2, nothing written), or with --skip-invalid the item dropped and listed in
summary.json. Cases that once exhausted memory run `python -m pipelines data` under an address-space
cap (RLIMIT_AS), so that a regression fails the test instead of taking the machine down."""

from __future__ import annotations

import fcntl
import json
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from pipelines.data import tfrecords
from pipelines.data.items import Category

CAP = 3 << 30  # address space of the stage and of each of its workers
EXPORT = "coco-1700000000.json"


# --- helpers ------------------------------------------------------------------------------------

def run_data(*args, cap: int | None = CAP, env: dict | None = None, timeout: int = 300):
    """`python -m pipelines data ARGS` under an address-space cap (inherited by the workers)."""

    def limit():
        if cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return subprocess.run([sys.executable, "-m", "pipelines", "data", *map(str, args)], cwd=REPO,
                          env={**os.environ, **(env or {})}, preexec_fn=limit, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc, *fragments) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([128 + 100 * np.sin(xx / 7 + seed), 128 + 100 * np.cos(yy / 5 + seed),
                    128 + 100 * np.sin((xx + yy) / 11 + seed)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def make_dataset(root: Path, annotations: list[dict], images: list[dict] | None = None,
                 categories: list[dict] | None = None, name: str = "hostile") -> Path:
    """A coco-annotator folder: JPEG files for `images` ({id, file_name, w, h}) that do not exist yet.

    The export is written with Python's json, which writes NaN and Infinity as such; a string value
    "@raw:TEXT" is written as the bare TEXT (1e400, a 5000-digit integer).
    """
    folder = root / name
    images = images if images is not None else [{"id": 1, "file_name": "a.jpg", "w": 64, "h": 48},
                                                 {"id": 2, "file_name": "b.jpg", "w": 64, "h": 48}]
    for n, im in enumerate(images):
        path = folder / im["file_name"]
        if not path.exists() and ".." not in im["file_name"]:
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(im["w"] if isinstance(im["w"], int) else 64, im["h"] if isinstance(im["h"], int) else 48,
                  n).save(path, format="JPEG", quality=95)
    export = {"images": [{"id": im["id"], "file_name": im["file_name"], "width": im["w"], "height": im["h"]}
                         for im in images],
              "categories": categories or [{"id": 1, "name": "thing"}],
              "annotations": annotations}
    text = json.dumps(export)
    while '"@raw:' in text:
        start = text.index('"@raw:')
        end = text.index('"', start + 1)
        text = text[:start] + text[start + 6:end] + text[end + 1:]
    (folder / ".exports").mkdir(parents=True, exist_ok=True)
    (folder / ".exports" / EXPORT).write_text(text)
    return folder


def ann(aid, image_id=1, segmentation=None, bbox=None, **extra):
    return {"id": aid, "image_id": image_id, "category_id": 1, "iscrowd": False,
            "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]] if segmentation is None else segmentation,
            "bbox": bbox or [10, 10, 30, 20], "area": 600, **extra}


def records(out: Path) -> list[dict]:
    """Every example written, decoded without TensorFlow."""
    found = []
    for path in sorted(out.glob("*.tfrecord")):
        found += [tfrecords.parse_example(r) for r in tfrecords.read_records(path)]
    return found


def assert_all_finite(examples: list[dict]) -> None:
    for ex in examples:
        for key, values in ex.items():
            if values and isinstance(values[0], float):
                assert all(math.isfinite(v) for v in values), (key, values)


def convert(folder: Path, tmp_path: Path, *extra, **kwargs):
    out = tmp_path / "out"
    return run_data("--dataset", folder, "--workers", "2", "--val-ratio", "0", "--out", out, *extra, **kwargs), out


# --- 1, 3, 7: numbers that are not numbers ------------------------------------------------------

@pytest.mark.parametrize("value, says", [
    ("NaN", "is NaN, not a finite number"),
    ("Infinity", "is Infinity, not a finite number"),
    ("-Infinity", "is -Infinity, not a finite number"),
    ("@raw:1e400", "is Infinity, not a finite number"),  # json reads it as infinity
    (1e300, "image widths outside the 64x48 image"),  # once a segfault inside pycocotools
    (-5000.0, "image widths outside the 64x48 image"),
])
def test_polygon_coordinates_that_once_exhausted_memory(tmp_path, value, says):
    if value in ("NaN", "Infinity", "-Infinity"):
        value = float(value)
    folder = make_dataset(tmp_path, [ann(7, segmentation=[[10, 10, value, 10, 30, 30]]), ann(8)])
    proc, out = convert(folder, tmp_path)
    one_error_line(proc, EXPORT, "annotation id 7", "polygon 0 value 2", says)
    assert not out.exists()

    proc, out = convert(folder, tmp_path, "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [s["item"].split(" of ")[0] for s in summary["skipped_invalid"]] == ["annotation id 7"]
    examples = records(out)
    assert sorted(len(ex["image/object/class/label"]) for ex in examples) == [0, 1]  # ann 8 kept
    assert_all_finite(examples)


@pytest.mark.parametrize("case", ["bbox-nan", "bbox-huge-int", "bbox-1e300", "area-nan", "keypoints-inf",
                                  "rle-size-nan", "rle-counts-1e12", "rle-counts-float", "rle-string-garbage",
                                  "rle-string-overrun", "outline-too-long"])
def test_annotation_numbers(tmp_path, case):
    rle = {"size": [48, 64], "counts": [100, 50, 48 * 64 - 150]}
    bad = {
        # box-only (no region): its box went into the TFRecords as NaN
        "bbox-nan": ann(7, segmentation=[], bbox=[float("nan"), 5, 20, 20]),
        "bbox-huge-int": ann(7, segmentation=[], bbox=["@raw:" + "9" * 400, 5, 20, 20]),
        "bbox-1e300": ann(7, segmentation=[], bbox=[1e300, 5, 20, 20]),
        "area-nan": ann(7, area=float("nan")),
        "keypoints-inf": ann(7, keypoints=[10, 10, 2, float("inf"), 3, 2]),
        "rle-size-nan": ann(7, segmentation={**rle, "size": [float("nan"), 64]}, iscrowd=True),
        "rle-counts-1e12": ann(7, segmentation={**rle, "counts": [10 ** 12, 5]}, iscrowd=True),
        "rle-counts-float": ann(7, segmentation={**rle, "counts": [1.5, 10]}, iscrowd=True),
        "rle-string-garbage": ann(7, segmentation={**rle, "counts": "\u00ff\u00fe~~"}, iscrowd=True),
        # a valid compressed string whose runs cover far more than 48x64 pixels: pycocotools would
        # write them past its buffer
        "rle-string-overrun": ann(7, segmentation={**rle, "counts": "0" + "k" * 5 + "0"}, iscrowd=True),
        "outline-too-long": ann(7, segmentation=[[-600, -400, 600, -400] * 2500]),
    }[case]
    says = {"bbox-nan": "bbox value 0 is NaN", "bbox-huge-int": "bbox value 0 is", "bbox-1e300": "bbox corner",
            "area-nan": "area is NaN", "keypoints-inf": "keypoints hold Infinity",
            "rle-size-nan": "RLE size value 0 is NaN", "rle-counts-1e12": "RLE counts cover 1000000000005 pixels",
            "rle-counts-float": "RLE counts hold 1.5", "rle-string-garbage": "not a valid compressed COCO RLE",
            "rle-string-overrun": "RLE counts cover", "outline-too-long": "outline"}[case]
    folder = make_dataset(tmp_path, [bad, ann(8)])
    proc, out = convert(folder, tmp_path, "--masks", "--task", "segmentation")
    one_error_line(proc, EXPORT, "annotation id 7", says)
    proc, out = convert(folder, tmp_path, "--masks", "--task", "segmentation", "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [s["item"].split(" of ")[0] for s in summary["skipped_invalid"]] == ["annotation id 7"]
    assert_all_finite(records(out))


@pytest.mark.parametrize("field, value", [("width", float("inf")), ("height", float("nan")),
                                          ("width", "@raw:1e400")])
def test_image_size_not_finite(tmp_path, field, value):
    images = [{"id": 1, "file_name": "a.jpg", "w": 64, "h": 48}, {"id": 2, "file_name": "b.jpg", "w": 64, "h": 48}]
    images[0]["w" if field == "width" else "h"] = value
    folder = make_dataset(tmp_path, [ann(7), ann(8, image_id=2)], images=images)
    proc, out = convert(folder, tmp_path)
    one_error_line(proc, EXPORT, "image id 1 ('a.jpg')", f"{field} is", "not a finite number")
    proc, out = convert(folder, tmp_path, "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    assert [ex["image/filename"][0] for ex in records(out)] == [b"b.jpg"]


def test_json_that_python_reads_but_cannot_hold(tmp_path):
    folder = make_dataset(tmp_path, [ann(7, bbox=["@raw:" + "1" * 5000, 1, 2, 3])])
    proc, _ = convert(folder, tmp_path)
    one_error_line(proc, EXPORT, "invalid JSON")
    (folder / ".exports" / EXPORT).write_text("[" * 100_000 + "]" * 100_000)
    proc, _ = convert(folder, tmp_path)
    one_error_line(proc, EXPORT, "invalid JSON")


def test_ids_that_are_not_ids(tmp_path):
    folder = make_dataset(tmp_path, [ann(7, image_id=[1]), ann(8)])
    proc, _ = convert(folder, tmp_path)
    one_error_line(proc, EXPORT, "annotation id 7", "must be integers or strings")


def test_the_writer_refuses_non_finite_floats():
    for bad in (float("nan"), float("inf"), -float("inf"), 1e39):
        with pytest.raises(ValueError, match="non-finite"):
            tfrecords.float_feature([0.5, bad])
    assert tfrecords.float_feature([0.5, 3e38])


# --- 2: a small file of many pixels ---------------------------------------------------------------

def zero_png(path: Path, width: int, height: int) -> None:
    """A grey PNG of zeros, written row by row: 30000x30000 is 875 KB on disk, 900 MB decoded."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_png_is_refused_from_its_header(tmp_path):
    folder = tmp_path / "hostile"
    zero_png(folder / "huge.png", 30000, 30000)
    assert (folder / "huge.png").stat().st_size < 1_000_000
    images = [{"id": 1, "file_name": "huge.png", "w": 30000, "h": 30000},
              {"id": 2, "file_name": "b.jpg", "w": 64, "h": 48}]
    folder = make_dataset(tmp_path, [ann(7), ann(8, image_id=2)], images=images)
    proc, out = convert(folder, tmp_path, "--masks")
    one_error_line(proc, "huge.png", "image id 1", "30000x30000 = 900000000 pixels", "over the limit of 40000000")
    proc, out = convert(folder, tmp_path, "--masks", "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    assert [ex["image/filename"][0] for ex in records(out)] == [b"b.jpg"]
    assert "over the limit" in json.loads((out / "summary.json").read_text())["skipped_invalid"][0]["reason"]


def test_pixel_limit_is_configurable(tmp_path):
    folder = make_dataset(tmp_path, [ann(7), ann(8, image_id=2)])
    proc, _ = convert(folder, tmp_path, env={"PIPELINES_MAX_PIXELS": "3000"})
    one_error_line(proc, "a.jpg", "64x48 = 3072 pixels", "over the limit of 3000")
    proc, _ = convert(folder, tmp_path, env={"PIPELINES_MAX_PIXELS": "lots"})
    one_error_line(proc, "PIPELINES_MAX_PIXELS")
    proc, out = convert(folder, tmp_path, env={"PIPELINES_MAX_PIXELS": "3072"})
    assert proc.returncode == 0, proc.stderr


def test_large_image_preview_is_drawn_small(tmp_path):
    """36 megapixels (under the limit) with masks and a class mask, under a 2 GB cap: the preview
    decodes and draws at tile size, and masks are decoded one at a time."""
    folder = tmp_path / "hostile"
    zero_png(folder / "big.png", 6000, 6000)
    images = [{"id": 1, "file_name": "big.png", "w": 6000, "h": 6000}]
    objects = [ann(10 + i, segmentation=[[100 + i * 500, 100, 5900, 100 + i * 400, 3000, 5900]],
                   bbox=[100 + i * 500, 100, 5800 - i * 500, 5800]) for i in range(8)]
    folder = make_dataset(tmp_path, objects, images=images)
    proc = run_data("--dataset", folder, "--workers", "1", "--val-ratio", "0", "--out", tmp_path / "out",
                    "--masks", "--task", "segmentation", cap=2 << 30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preview = Image.open(tmp_path / "out" / "preview.png")
    assert preview.size[0] <= 4 * 280
    ex = records(tmp_path / "out")[0]
    assert len(ex["image/object/mask"]) == 8


# --- 4: paths that lead out of the dataset folder -------------------------------------------------

def test_image_path_outside_the_dataset_is_refused(tmp_path):
    photo(40, 30).save(tmp_path / "secret.jpg")
    images = [{"id": 1, "file_name": "../secret.jpg", "w": 40, "h": 30},
              {"id": 2, "file_name": "../" * 30 + "etc/passwd", "w": 40, "h": 30},
              {"id": 3, "file_name": "b.jpg", "w": 64, "h": 48}]
    folder = make_dataset(tmp_path, [ann(7), ann(8, image_id=3)], images=images)
    proc, out = convert(folder, tmp_path)
    line = one_error_line(proc, EXPORT, "image id 1", "leads outside", "--allow-outside-images")
    assert "more problem" in line  # /etc/passwd is the other one
    proc, out = convert(folder, tmp_path, "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(s["item"].split(" (")[0] for s in summary["skipped_invalid"]) == ["image id 1", "image id 2"]
    assert all("leads outside" in s["reason"] for s in summary["skipped_invalid"])
    assert [ex["image/filename"][0] for ex in records(out)] == [b"b.jpg"]


def test_outside_images_when_the_user_allows_them(tmp_path, monkeypatch):
    from pipelines.data.convert import DataOptions, run

    photo(40, 30).save(tmp_path / "secret.jpg")
    images = [{"id": 1, "file_name": "../secret.jpg", "w": 40, "h": 30}]
    folder = make_dataset(tmp_path, [ann(7, bbox=[1, 1, 20, 20], segmentation=[])], images=images)
    monkeypatch.chdir(tmp_path)
    out = run(DataOptions(dataset=str(folder), workers=1, val_ratio=0.0, out=str(tmp_path / "out"),
                          allow_outside_images=True))
    assert [ex["image/filename"][0] for ex in records(out)] == [b"../secret.jpg"]


def test_symlinks_inside_the_dataset_are_followed(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    photo(40, 30).save(tmp_path / "elsewhere" / "real.jpg")
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "linked.jpg").symlink_to(tmp_path / "elsewhere" / "real.jpg")
    (folder / "photos").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    images = [{"id": 1, "file_name": "linked.jpg", "w": 40, "h": 30},
              {"id": 2, "file_name": "photos/real.jpg", "w": 40, "h": 30}]
    make_dataset(tmp_path, [ann(7, bbox=[1, 1, 20, 20], segmentation=[])], images=images)
    proc, out = convert(folder, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(ex["image/filename"][0] for ex in records(out)) == [b"linked.jpg", b"photos/real.jpg"]


def test_voc_filename_outside_the_dataset_is_refused(tmp_path):
    photo(40, 30).save(tmp_path / "secret.jpg")
    folder = tmp_path / "voc"
    (folder / "Annotations").mkdir(parents=True)
    (folder / "Annotations" / "a.xml").write_text(
        "<annotation><filename>../secret.jpg</filename><object><name>cat</name>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    proc, _ = convert(folder, tmp_path)
    one_error_line(proc, "Annotations", "image '../secret.jpg'", "leads outside")


# --- 5: label maps with hostile class names -------------------------------------------------------

HOSTILE_NAMES = ["it's", 'say "hi"', "back\\slash", "a # not a comment", "x } y {", "new\nline", "tab\there",
                 "café ☃ 猫", "item { id: 99 }", "'", "\\'", "name: 'x'", "\x00", "\\n"]


def test_label_map_round_trip_of_hostile_names(tmp_path):
    from pipelines.data.label_map import format_label_map, read_label_map, write_label_map

    categories = [Category(label_id=i + 1, name=n, source_id=i) for i, n in enumerate(HOSTILE_NAMES)]
    write_label_map(tmp_path, categories)
    assert read_label_map(tmp_path / "label_map.pbtxt") == {c.label_id: c.name for c in categories}
    # protobuf's own parser reads it as the OD API would
    from google.protobuf import text_format
    from pipelines.data.label_map import _label_map_class

    parsed = text_format.Parse(format_label_map(categories), _label_map_class()())
    assert [(i.id, i.name) for i in parsed.item] == [(c.label_id, c.name) for c in categories]


def test_hostile_category_names_through_the_data_stage(tmp_path):
    from pipelines.data.label_map import read_label_map

    names = [n for n in HOSTILE_NAMES if n.strip() == n and n != "\x00"]  # the reader strips names
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    folder = make_dataset(tmp_path, [ann(7)], categories=categories)
    proc, out = convert(folder, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_label_map(out / "label_map.pbtxt") == {i + 1: n for i, n in enumerate(names)}
    assert records(out)[0]["image/object/class/text"] in ([names[0].encode()], [])


def test_users_label_maps_still_read(tmp_path):
    from pipelines.workspace import UserError
    from pipelines.data.label_map import read_label_map

    path = tmp_path / "label_map.pbtxt"
    path.write_text("""# the OD API's mscoco_label_map.pbtxt style
item {
  name: "/m/01g317"   # a comment with } and 'quotes'
  id: 1
  display_name: "person"
}
item { id: 2 display_name: 'bicycle' }
item <
  id: 3, name: 'car'; keypoints { id: 0 label: "front" } frequency: RARE
>
item { id: 4 name: "split " 'string' }
""")
    assert read_label_map(path) == {1: "/m/01g317", 2: "bicycle", 3: "car", 4: "split string"}
    for text, says in (("item { id: 1 }", "needs an id and a name"), ("item { id: 0 name: 'x' }", "background"),
                       ("item { id: 1 name: 'x' } item { id: 1 name: 'y' }", "used twice"),
                       ("item { id: 1 name: 'x' ", "not a valid label map"), ("# nothing\n", "no items")):
        path.write_text(text)
        with pytest.raises(UserError, match=says):
            read_label_map(path)


@pytest.mark.parametrize("name, says", [("", "empty name"), ("   ", "blank name '   '"),
                                         ("\u200b", "blank name '\\u200b'"), (" \ufeff\t", "blank name")])
def test_a_category_without_a_name_is_refused(tmp_path, name, says):
    """Once a class named '' (or ' ') went through make data into the label map. Raw names are checked:
    '   ' is refused before the reader strips it."""
    categories = [{"id": 1, "name": "thing"}, {"id": 2, "name": name}]
    folder = make_dataset(tmp_path, [ann(7), {**ann(8), "category_id": 2}], categories=categories)
    proc, out = convert(folder, tmp_path)
    one_error_line(proc, EXPORT, "category id 2:", says, "every class needs a name")
    assert not out.exists()

    proc, out = convert(folder, tmp_path, "--skip-invalid")  # the category and its annotations dropped, listed
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [c["name"] for c in summary["classes"]] == ["thing"]
    assert any(d["item"] == "annotation id 8" and "has no name" in d["reason"] for d in summary["dropped"])


@pytest.mark.parametrize("name, says", [("  ", "object has no <name>"), ("\u200b\u200b", "blank name")])
def test_a_voc_object_without_a_name_is_refused(tmp_path, name, says):
    folder = _voc(tmp_path, f"""<annotation><filename>a.jpg</filename>
<object><name>{name}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
</annotation>""")
    proc, out = convert(folder, tmp_path)
    one_error_line(proc, "a.xml", "object 1", "image 'a.jpg'", says)
    assert not out.exists()


@pytest.mark.parametrize("item", ["item { id: 2 name: '' }", "item { id: 2 name: ' \\t ' }",
                                  "item { id: 2 display_name: '' }"])
def test_a_users_label_map_without_a_name_is_refused(tmp_path, item):
    from pipelines.workspace import UserError
    from pipelines.data.label_map import read_label_map

    path = tmp_path / "label_map.pbtxt"
    path.write_text("item { id: 1 name: 'cat' }\n" + item + "\n")
    with pytest.raises(UserError, match=r"label_map.pbtxt: item 2 \(id 2\): (empty|blank) name"):
        read_label_map(path)


# --- 6: a run killed mid-way -----------------------------------------------------------------------

def _slow_dataset(tmp_path: Path, count: int) -> Path:
    """Images that each take a worker about a second: noisy greyscale PNGs, re-encoded as RGB."""
    folder = tmp_path / "slow"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500), dtype=np.uint8)
    Image.fromarray(noise, mode="L").save(folder / "0.png")
    data = (folder / "0.png").read_bytes()
    for i in range(1, count):
        (folder / f"{i}.png").write_bytes(data)
    images = [{"id": i + 1, "file_name": f"{i}.png", "w": 1500, "h": 1500} for i in range(count)]
    return make_dataset(tmp_path, [], images=images, name="slow")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killed_run_takes_its_workers_along_and_the_rerun_cleans_up(tmp_path):
    import psutil

    folder = _slow_dataset(tmp_path, 60)
    workspace = tmp_path / "ws"
    env = {**os.environ, "PIPELINES_WORKSPACE": str(workspace)}
    parent = subprocess.Popen([sys.executable, "-m", "pipelines", "data", "--dataset", str(folder), "--workers", "2"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers = []
        while time.monotonic() < deadline:
            workers = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)
                       if "resource_tracker" not in " ".join(p.cmdline())]
            if len(workers) >= 2 and list((workspace / "slow").glob(".data.tmp-*")):
                break
            assert parent.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        assert len(workers) >= 2, "no workers seen"
        time.sleep(1.5)  # the workers are busy with images now
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "workers outlived the killed data stage"
    finally:
        if parent.poll() is None:
            parent.kill()
    stale = list((workspace / "slow").glob(".data.tmp-*"))
    assert stale, "the killed run left no temporary folder (nothing to test)"
    assert not (workspace / "slow" / "data").exists()

    # another output's temporary folder, and something that is not ours, are left alone
    (workspace / "slow" / ".other.tmp-keep").mkdir()
    (tmp_path / "few").mkdir()
    proc = run_data("--dataset", make_dataset(tmp_path / "few", [ann(7)], name="slow"), "--workers", "1",
                    env={"PIPELINES_WORKSPACE": str(workspace)})
    assert proc.returncode == 0, proc.stderr
    assert "removed 1 temporary folder(s)" in proc.stdout
    assert sorted(p.name for p in (workspace / "slow").iterdir()) == [".other.tmp-keep", "data"]


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    folder = make_dataset(tmp_path, [ann(7)])
    out = tmp_path / "out"
    out.parent.mkdir(exist_ok=True)
    with open(tmp_path / ".out.lock", "w") as lock:
        lock.write("4242\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = run_data("--dataset", folder, "--workers", "1", "--out", out)
        one_error_line(proc, "another data run (pid 4242)")
    assert not out.exists()
    proc = run_data("--dataset", folder, "--workers", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / ".out.lock").exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_the_next_run_removes_what_killed_runs_left_and_nothing_else(tmp_path):
    """atomic_output_dir (every stage's output: data, eval, export, import, sample) first removes the
    temporary folders of dead runs of the same output: by the PID@HOST in the name, else by age."""
    from pipelines.workspace import LEFTOVER_AGE_S, atomic_output_dir, owner_tag

    final = tmp_path / "export"
    final.mkdir()
    (final / "kept.txt").write_text("the previous output")
    dead, alive = _dead_pid(), os.getppid()  # (our parent runs as long as we do)
    names = {"dead": f".export.tmp-{owner_tag(dead)}-k3j2", "alive": f".export.tmp-{owner_tag(alive)}-x9y8",
             "old": f".export.old-{owner_tag(dead)}", "legacy": ".export.tmp-a1b2c3d4",
             "legacy_stale": ".export.tmp-e5f6g7h8", "other_host": f".export.tmp-{dead}@elsewhere-q1w2",
             "other_output": f".eval.tmp-{owner_tag(dead)}-z0z0"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "saved_model.pb").write_bytes(b"x" * 2048)
    stale = time.time() - LEFTOVER_AGE_S - 60
    for path in (tmp_path / names["legacy_stale"], tmp_path / names["legacy_stale"] / "saved_model.pb"):
        os.utime(path, (stale, stale))
    lines = []
    with atomic_output_dir(final, log=lines.append) as tmp:
        assert tmp.name.startswith(f".export.tmp-{owner_tag()}-")
        (tmp / "new.txt").write_text("new")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["export", names["alive"], names["legacy"], names["other_host"], names["other_output"]])
    assert (final / "new.txt").is_file() and not (final / "kept.txt").exists()
    assert len(lines) == 1 and lines[0].startswith("removed 3 temporary folder(s) left in "), lines
    for key in ("dead", "old", "legacy_stale"):
        assert names[key] in lines[0]

    # Killed between its two renames: the output is missing and the previous one is put back.
    final.rename(tmp_path / f".export.old-{owner_tag(dead)}")
    lines = []
    with pytest.raises(RuntimeError):
        with atomic_output_dir(final, log=lines.append):
            raise RuntimeError("a failed run")
    assert (final / "new.txt").is_file() and lines == [f"put back {final}: a run was killed while it replaced it"]


def test_the_data_stage_imports_no_tensorflow():
    code = ("import sys, pipelines.data.convert, pipelines.data.report, pipelines.data.label_map\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# --- 7: VOC text with entities, VOC sizes that are not numbers ------------------------------------

def _voc(tmp_path: Path, xml: str) -> Path:
    folder = tmp_path / "voc"
    (folder / "Annotations").mkdir(parents=True)
    (folder / "JPEGImages").mkdir()
    photo(40, 30).save(folder / "JPEGImages" / "a.jpg")
    (folder / "Annotations" / "a.xml").write_text(xml)
    return folder


def test_voc_names_with_entities_are_whole(tmp_path):
    from pipelines.data.label_map import read_label_map

    folder = _voc(tmp_path, """<!DOCTYPE annotation [<!ENTITY sp "spotted">]>
<annotation><filename>a.jpg</filename>
<object><name>cat &amp; dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
<object><name>&sp; <!-- a comment --> owl</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
</annotation>""")
    proc, out = convert(folder, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(read_label_map(out / "label_map.pbtxt").values()) == ["cat & dog", "spotted  owl"]


def test_voc_external_entities_are_not_loaded(tmp_path):
    (tmp_path / "secret.txt").write_text("TOPSECRET")
    folder = _voc(tmp_path, f"""<!DOCTYPE annotation [<!ENTITY x SYSTEM "file://{tmp_path}/secret.txt">]>
<annotation><filename>a.jpg</filename>
<object><name>&x;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
</annotation>""")
    proc, out = convert(folder, tmp_path)
    assert "TOPSECRET" not in proc.stdout + proc.stderr
    if proc.returncode == 0:
        assert "TOPSECRET" not in (out / "label_map.pbtxt").read_text()
    else:
        one_error_line(proc, "a.xml")


@pytest.mark.parametrize("value", ["inf", "nan", "1e400"])
def test_voc_numbers_not_finite(tmp_path, value):
    folder = _voc(tmp_path, f"""<annotation><filename>a.jpg</filename><size><width>{value}</width><height>30</height></size>
<object><name>cat</name><bndbox><xmin>{value}</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
</annotation>""")
    proc, _ = convert(folder, tmp_path)
    one_error_line(proc, "a.xml", "image 'a.jpg'", "not a finite number")
