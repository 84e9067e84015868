"""`make demo` end to end on a reduced sample, and the run report in a real browser.

The demo runs every stage as the user would (separate processes, a real BentoML server on a free
port, one HTTP request per model); a few training steps only: what is checked is that the stages
connect and that what comes out is well formed, not how well the models learn (bench/RESULTS.md has
the full demo's numbers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

SECTIONS = ("dataset", "config", "training", "evaluation", "predictions")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo(sample_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    workspace = root / "ws"
    env = {"BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    # The detector trains enough to find shapes (150 steps at 128x128: AP50 about 0.26 on these 40 images,
    # its threshold chosen on their val images); the segmenter only a few steps.
    proc = run_cli("demo", "--dataset", sample_dir, "--detector-steps", "150", "--detector-size", "128",
                   "--segmenter-steps", "6", "--batch-size", "8", workspace=workspace, env=env, timeout=1500)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return workspace, proc.stdout


def test_demo_prints_every_stage_command(demo):
    _, out = demo
    for command in ("make data DATASET=", "make config DATASET=", "MODEL=ssd_mobilenet_v2_fpnlite_320x320",
                    "MODEL=unet_mobilenetv2_320x320", "make train RUN=demo-detector", "make eval RUN=demo-detector",
                    "make export RUN=demo-detector", "make serve RUN=demo-detector", "make train RUN=demo-segmenter",
                    "make serve RUN=demo-segmenter", "curl -F image=@"):
        assert command in out, command
    assert re.search(r"COCO AP \d\.\d{3}, AP50 \d\.\d{3}", out)
    assert re.search(r"mean IoU \d+\.\d%, foreground mean IoU \d+\.\d%", out)
    assert "server stopped" in out and "== done in" in out
    assert "OPTIMIZER=adam LR=0.003" in out
    assert re.search(r"matched \d+ of [1-9]\d* labelled objects \(IoU >= 0\.5\); missed: .+; extra: ", out)
    assert re.search(r"default score threshold 0\.\d\d \(precision \d\.\d\d, recall \d\.\d\d\)", out)


def test_answer_line_names_each_score():
    from pipelines.demo import answer_line

    found = [{"label": "star", "score": 0.8}, {"label": "square", "score": 0.53}, {"label": "square", "score": 0.5}]
    assert answer_line({"detections": found}) == "found: 2 square, 1 star (star 0.80, square 0.53, square 0.50)"
    assert answer_line({"detections": [], "score_threshold": 0.42}) == "found at score >= 0.42: nothing"


def test_compare_line_matches_boxes_by_class_and_overlap():
    from pipelines.demo import compare_line

    objects = [("star", (10, 10, 50, 50)), ("star", (100, 100, 140, 140)), ("circle", (0, 60, 30, 90))]

    def det(label, score, box):
        return {"label": label, "score": score, "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), box))}

    found = [det("star", 0.9, (12, 10, 50, 52)),  # the first star
             det("circle", 0.8, (100, 100, 140, 140)),  # right place, wrong class: extra
             det("star", 0.7, (11, 11, 49, 49)),  # the first star again: extra
             det("circle", 0.6, (2, 62, 30, 88))]  # the circle
    assert compare_line(objects, found) == ("matched 2 of 3 labelled objects (IoU >= 0.5); missed: 1 star; "
                                            "extra: circle (0.80), star (0.70)")
    assert compare_line(objects, []).startswith("matched 0 of 3 labelled objects (IoU >= 0.5); missed: 1 circle, 2 star;")


def test_demo_detector_answer_is_well_formed(demo):
    workspace, _ = demo
    saved = json.loads((workspace / "demo-detector" / "demo-answer.json").read_text())
    assert saved["route"] == "/detect" and saved["truth"] != "no objects"
    answer = saved["answer"]
    labels = {"circle", "square", "triangle", "star"}
    assert answer["model"]["name"] == "demo-detector" and answer["width"] > 0 and answer["height"] > 0
    # The answer lists what the model found at the threshold make eval chose on the val set.
    assert answer["detections"], saved
    threshold = json.loads((workspace / "demo-detector" / "export" / "metadata.json").read_text())["score_threshold"]
    assert answer["score_threshold"] == threshold and 0 < threshold < 1
    for d in answer["detections"]:
        assert d["label"] in labels and 1 <= d["class_id"] <= 4 and threshold <= d["score"] <= 1
        box = d["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= answer["width"] and 0 <= box["ymin"] <= box["ymax"] <= answer["height"]


def test_demo_segmenter_answer_is_well_formed(demo):
    workspace, _ = demo
    saved = json.loads((workspace / "demo-segmenter" / "demo-answer.json").read_text())
    answer = saved["answer"]
    assert saved["route"] == "/segment" and answer["model"]["name"] == "demo-segmenter"
    assert answer["classes"], answer
    assert sum(c["pixels"] for c in answer["classes"]) == answer["width"] * answer["height"]
    for c in answer["classes"]:
        assert c["label"] in {"background", "circle", "square", "triangle", "star"}
        for polygon in c["polygons"]:
            assert len(polygon) >= 3
            assert all(0 <= x <= answer["width"] and 0 <= y <= answer["height"] for x, y in polygon)


@pytest.mark.parametrize("run", ["demo-detector", "demo-segmenter"])
def test_report_has_every_section(demo, run):
    workspace, _ = demo
    page = (workspace / run / "report.html").read_text()
    for section in SECTIONS:
        body = re.search(rf'<section id="{section}">(.*?)</section>', page, re.DOTALL)
        assert body, f"no {section} section"
        assert 'class="missing"' not in body.group(1), f"{section}: {body.group(1)[:300]}"
    # Self-contained: every image is inlined, nothing is fetched.
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)
    evaluation = re.search(r'<section id="evaluation">(.*?)</section>', page, re.DOTALL).group(1)
    assert ("COCO metrics" in evaluation) if run == "demo-detector" else ("IoU per class" in evaluation)
    training = re.search(r'<section id="training">(.*?)</section>', page, re.DOTALL).group(1)
    assert "loss" in training and "learning_rate" in training


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it when it can)")
@pytest.mark.parametrize("run", ["demo-detector", "demo-segmenter"])
def test_report_renders_in_chromium(demo, run, tmp_path):
    """Headless Chromium loads the page from its file: every image decodes (the page's own check counts
    them after load) and the screenshot shows the plots (many colours, not a blank page)."""
    workspace, _ = demo
    url = (workspace / run / "report.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=10000", "--user-data-dir=" + str(tmp_path / "profile")]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120, env=env).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    images = int(re.search(r'data-images="(\d+)"', body.group(1)).group(1))
    broken = int(re.search(r'data-broken-images="(\d+)"', body.group(1)).group(1))
    assert images >= 4 and broken == 0, body.group(1)

    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1280,4000", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120, env=env)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (4000, 1280)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 2000, f"{colours} colours: the page looks blank"
    rows = np.flatnonzero((pixels != 255).any(axis=2).any(axis=1))
    assert rows.max() > 2000, "nothing drawn below the top of the page"


def test_report_of_a_run_not_yet_trained(sample_dir, tmp_path):
    """A config-only run still gets every section; those not run yet name the command that fills them."""
    run_cli("data", "--dataset", sample_dir, "--workers", "1", workspace=tmp_path, check=True)
    run_cli("config", "--dataset", "shapes", "--run", "fresh", workspace=tmp_path, check=True)
    proc = run_cli("report", "--run", "fresh", workspace=tmp_path, check=True)
    assert "report.html" in proc.stdout
    page = (tmp_path / "fresh" / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert "make train RUN=fresh" in page and "make eval RUN=fresh" in page
    assert "num_classes: 4" in page  # the diff of make config
    proc = run_cli("report", "--run", "nothing-here", workspace=tmp_path)
    assert proc.returncode == 2 and "nothing-here" in proc.stderr and not (tmp_path / "nothing-here").exists()
