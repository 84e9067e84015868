"""`make suggest` for real: the demo's exported models rank a dataset copy's unlabelled images through the
export's suggest signature; the file written drives `make prelabel SUGGESTED=`. The ranking's parts (k-center,
the detector's uncertainty) are checked on inputs whose answer is known.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from pipelines.annotator.suggest import SAME, SHORTLIST, k_center, project
from pipelines.data.sources import newest_export

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_paths(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


@pytest.fixture(scope="module")
def shapes(sample_dir, tmp_path_factory):
    """A copy of the sample (40 images) whose newest export keeps the annotations of 16 only: (folder, names of the
    labelled images)."""
    folder = tmp_path_factory.mktemp("suggest") / "shapes"
    shutil.copytree(sample_dir, folder)
    export = newest_export(folder)
    coco = json.loads(export.read_text())
    annotated = sorted({a["image_id"] for a in coco["annotations"]})
    kept = set(annotated[:16])
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    export.write_text(json.dumps(coco))
    labelled = {Path(im["file_name"]).name for im in coco["images"] if im["id"] in kept}
    return folder, labelled


def _suggest(demo, folder: Path, run: str, *options, env=None):
    workspace, _ = demo
    proc = run_cli("suggest", "--run", run, "--dataset", folder, *options, workspace=workspace, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    written = re.search(r"^wrote (.+\.json)$", proc.stdout, re.M)
    assert written, proc.stdout
    path = Path(written.group(1))
    path = path if path.is_absolute() else REPO / path
    return json.loads(path.read_text()), path, proc.stdout


@pytest.fixture(scope="module")
def hybrid(demo, shapes):
    return _suggest(demo, shapes[0], "demo-detector", "--count", "12")


# ------------------------------------------------------------------------------------------ the command


def test_random_is_a_seeded_permutation_of_the_unlabelled_images(demo, shapes):
    folder, labelled = shapes
    unlabelled = [p for p in image_paths(folder) if Path(p).name not in labelled]
    first, _, first_out = _suggest(demo, folder, "demo-detector", "--strategy", "random", "--count", "1000", "--seed", "3")
    ranked = [item["path"] for item in first["images"]]
    assert sorted(ranked) == unlabelled and len(set(ranked)) == len(ranked)
    assert ranked != unlabelled  # shuffled, not the folder's order
    again, _, _ = _suggest(demo, folder, "demo-detector", "--strategy", "random", "--count", "1000", "--seed", "3")
    other, _, out = _suggest(demo, folder, "demo-detector", "--strategy", "random", "--count", "1000", "--seed", "4",
                             env={"ANNOTATOR_URL": "http://annotator:5000/", "ANNOTATOR_DATASET": "7"})
    assert f"in coco-annotator, these images alone: http://annotator:5000/#/dataset/7?{other['coco_annotator_query']}" in out
    assert [item["path"] for item in again["images"]] == ranked
    assert [item["path"] for item in other["images"]] != ranked
    assert f"suggested {len(unlabelled)} of {len(unlabelled)} unlabelled image(s) ({len(labelled)} labelled)" in first_out


def test_hybrid_ranks_only_unlabelled_images_deterministically_with_reasons(demo, shapes, hybrid):
    folder, labelled = shapes
    document, path, out = hybrid
    assert path.parent == demo[0] / "demo-detector" / "suggest" and re.fullmatch(r"shapes-\d{8}-\d{6}\.json", path.name)
    assert document["strategy"] == "hybrid" and document["count"] == 12 and len(document["images"]) == 12
    assert document["labelled"] == len(labelled)
    names = [item["file_name"] for item in document["images"]]
    assert not set(names) & labelled and len(set(names)) == 12
    assert [item["rank"] for item in document["images"]] == list(range(1, 13))
    for item in document["images"]:
        assert item["uncertainty"] is not None and item["uncertainty"] >= 0
        assert item["distance"] is not None and item["distance"] > SAME
        assert re.match(r"uncertainty \d+\.\d\d: .*; \d\.\d\d from the nearest labelled or earlier suggested image$",
                        item["reason"]), item["reason"]
        assert re.search(rf"^\s+{item['rank']}\s+{re.escape(item['path'])}\s+uncertainty ", out, re.M)
    # Each pick is at least as far from the ones before it as any later pick (greedy k-center).
    distances = [item["distance"] for item in document["images"]]
    assert all(a >= b - 1e-9 for a, b in zip(distances, distances[1:])), distances
    # coco-annotator's dataset page filters by the query's regular expression on the base name: exactly these.
    key, pattern = document["coco_annotator_query"].split("=", 1)
    assert key == "file_name__regex"
    matching = {Path(p).name for p in image_paths(folder) if re.search(unquote(pattern), Path(p).name)}
    assert matching == set(names)
    again, _, _ = _suggest(demo, folder, "demo-detector", "--count", "12")
    assert [item["path"] for item in again["images"]] == [item["path"] for item in document["images"]]
    assert f"next: make prelabel RUN=demo-detector DATASET={folder} SUGGESTED=" in out


def test_uncertainty_order_follows_the_score(demo, shapes):
    document, _, out = _suggest(demo, shapes[0], "demo-detector", "--strategy", "uncertainty", "--count", "3")
    scores = [item["uncertainty"] for item in document["images"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    # The mirror image is run for the SHORTLIST x COUNT most doubtful images alone, not for the whole folder.
    assert document["unlabelled"] > SHORTLIST * 3
    assert f"second view (the mirror image) of the {SHORTLIST * 3} most uncertain" in out


def test_diversity_never_suggests_a_copy_twice(demo, sample_dir, tmp_path):
    """A folder of 3 different images and 5 byte-for-byte copies of each (no export: all unlabelled)."""
    folder = tmp_path / "copies"
    folder.mkdir()
    sources = [sample_dir / p for p in image_paths(sample_dir)[:3]]
    for n, source in enumerate(sources):
        for copy in range(6):
            shutil.copyfile(source, folder / f"frame_{n}_{copy}.jpg")
    document, _, out = _suggest(demo, folder, "demo-detector", "--strategy", "diversity", "--count", "10")
    picked = [item["file_name"] for item in document["images"]]
    assert sorted(name.split("_")[1] for name in picked) == ["0", "1", "2"], picked
    assert "note: 7 fewer than asked: the images left have the features of labelled or suggested ones" in out


def test_segmenter_ranks_by_pixel_entropy(demo, shapes):
    folder, labelled = shapes
    document, _, _ = _suggest(demo, folder, "demo-segmenter", "--strategy", "uncertainty", "--count", "5")
    assert len(document["images"]) == 5 and not {i["file_name"] for i in document["images"]} & labelled
    for item in document["images"]:
        assert 0 <= item["uncertainty"] <= 1
        assert re.match(r"uncertainty \d\.\d\d: (mean pixel entropy \d\.\d\d over \d+% of the image|no foreground)",
                        item["reason"]), item["reason"]


def test_suggested_file_drives_prelabel(demo, shapes, hybrid):
    folder, _ = shapes
    document, path, _ = hybrid
    workspace, _ = demo
    proc = run_cli("prelabel", "--run", "demo-detector", "--dataset", folder, "--suggested", path,
                   "--score-threshold", "0.01", workspace=workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: drafting the 12 image(s) suggested in " in proc.stdout
    written = Path(re.search(r"^wrote (.+\.json)$", proc.stdout, re.M).group(1))
    coco = json.loads((written if written.is_absolute() else REPO / written).read_text())
    assert {im["file_name"] for im in coco["images"]} == {item["file_name"] for item in document["images"]}


def test_suggest_and_prelabel_errors_are_one_line(demo, shapes, tmp_path):
    import tensorflow as tf

    folder, _ = shapes
    workspace, _ = demo
    # An export saved before the suggest signature existed: its serving signature only.
    old = workspace / "old-export"
    shutil.copytree(workspace / "demo-detector" / "export", old / "export", dirs_exist_ok=True)
    loaded = tf.saved_model.load(str(old / "export" / "saved_model"))
    shutil.rmtree(old / "export" / "saved_model")
    tf.saved_model.save(loaded, str(old / "export" / "saved_model"),
                        signatures={"serving_default": loaded.signatures["serving_default"]})
    proc = run_cli("suggest", "--run", "old-export", "--dataset", folder, workspace=workspace)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no 'suggest' signature" in proc.stderr and "make export RUN=old-export again" in proc.stderr
    # A suggest file of another dataset.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"dataset": "birds", "strategy": "hybrid", "images": []}))
    proc = run_cli("prelabel", "--run", "demo-detector", "--dataset", folder, "--suggested", other, workspace=workspace)
    assert proc.returncode == 2 and "suggests images of dataset 'birds', not of 'shapes'" in proc.stderr
    proc = run_cli("suggest", "--run", "no-such-run", "--dataset", folder, workspace=workspace)
    assert proc.returncode == 2 and "no export here" in proc.stderr and proc.stderr.count("\n") == 1


def test_suggest_signature_gives_the_served_detections(demo, sample_dir):
    import tensorflow as tf

    workspace, _ = demo
    loaded = tf.saved_model.load(str(workspace / "demo-detector" / "export" / "saved_model"))
    image = np.asarray(Image.open(sample_dir / image_paths(sample_dir)[0]).convert("RGB"))
    served = {k: v.numpy() for k, v in loaded.signatures["serving_default"](input_tensor=tf.constant(image[None])).items()}
    ranked = {k: v.numpy() for k, v in loaded.signatures["suggest"](input_tensor=tf.constant(image[None])).items()}
    n = int(served["num_detections"][0])
    assert int(ranked["num_detections"][0]) == n
    np.testing.assert_allclose(ranked["detection_scores"][0][:n], served["detection_scores"][0][:n], atol=1e-5)
    np.testing.assert_allclose(ranked["detection_boxes"][0][:n], served["detection_boxes"][0][:n], atol=1e-4)
    assert ranked["image_features"].shape[0] == 1 and np.isfinite(ranked["image_features"]).all()


# ------------------------------------------------------------------------------------------ the parts


def test_k_center_picks_the_farthest_and_stops_at_copies():
    rng = np.random.default_rng(0)
    distinct = project(rng.standard_normal((5, 300)))
    features = np.concatenate([distinct, distinct[[1, 1, 3]]])  # rows 5, 6, 7 copy rows 1, 1, 3
    picks, distances = k_center(features, np.zeros((0, features.shape[1]), np.float32), count=8, first=2)
    assert picks[0] == 2 and sorted(picks) == [0, 1, 2, 3, 4] and distances[0] == np.inf
    # Greedy: each pick is the row farthest from those before it.
    for k in range(1, len(picks)):
        gaps = np.linalg.norm(features[:, None] - features[picks[:k]][None], axis=-1).min(axis=1)
        assert np.isclose(gaps[picks[k]], gaps.max()) and np.isclose(distances[k], gaps.max())
    # Labelled rows are centres from the start: their copies are never picked.
    picks, _ = k_center(features, distinct[[0, 1]], count=8, first=0)
    assert sorted(picks) == [2, 3, 4]


def test_detector_uncertainty_of_known_detections():
    from pipelines.detection.suggest import Uncertainty

    part = Uncertainty({"score_threshold": 0.5})

    def view(found, mirror=False):
        boxes = np.zeros((1, 10, 4), np.float32)
        scores, classes = np.zeros((1, 10), np.float32), np.zeros((1, 10), np.float32)
        for i, (box, score, cls) in enumerate(found):
            boxes[0, i], scores[0, i], classes[0, i] = box, score, cls
        return part.view({"num_detections": np.array([len(found)], np.float32), "detection_boxes": boxes,
                          "detection_scores": scores, "detection_classes": classes}, mirror=mirror)

    def score(image, mirror=None):
        return part(view(image), None if mirror is None else view(mirror, mirror=True))

    box, flipped = [0.1, 0.1, 0.4, 0.4], [0.1, 0.6, 0.4, 0.9]  # the same box seen in the mirror image
    np.testing.assert_allclose(view([(flipped, 0.9, 1)], mirror=True).boxes, [box], atol=1e-6)
    assert view([(box, 0.1, 1)]).scores.size == 0  # below a quarter of the threshold: not kept
    # The first view alone: nearness to the threshold.
    assert score([]) == (0.0, "nothing scored 0.25 or more")
    assert score([(box, 0.98, 1)])[0] == pytest.approx(0.04)  # 1 - |0.98 - 0.5| / 0.5
    assert score([(box, 0.5, 1), (box, 0.98, 2)])[0] == pytest.approx(1.04)
    # Both views.
    assert score([], []) == (0.0, "nothing scored 0.25 or more")
    sure, _ = score([(box, 0.98, 1)], [(flipped, 0.98, 1)])
    assert sure == pytest.approx(0.04)
    doubtful, reason = score([(box, 0.5, 1)], [(flipped, 0.5, 1)])
    assert doubtful == pytest.approx(1.0) and "1 near the threshold 0.50" in reason
    alone, reason = score([(box, 0.9, 1)], [])
    assert alone == pytest.approx(1.0) and "1 seen in only one of the image and its mirror image" in reason
    unmapped, _ = score([(box, 0.9, 1)], [(box, 0.9, 1)])  # not where the mirror image's box lands: no pair
    assert unmapped == pytest.approx(2.0)
    other_class, _ = score([(box, 0.9, 1)], [(flipped, 0.9, 2)])
    assert other_class == pytest.approx(2.0)  # two boxes, each seen in one view only
    assert score([(box, 0.98, 1), (box, 0.5, 2)], [(flipped, 0.98, 1), (flipped, 0.5, 2)])[0] > doubtful


def test_detector_uncertainty_weighs_boxes_by_labelled_class_frequency():
    from pipelines.detection.suggest import MAX_WEIGHT, Uncertainty, class_weights

    labels = {"1": "cell", "2": "platelet", "3": "other"}
    # 90 cells, 10 platelets, no 'other': the mean count 33.3 over each class's count; none labelled: the cap.
    weights = class_weights(labels, {"cell": 90, "platelet": 10, "unknown": 5})
    assert weights == pytest.approx({1: 100 / 3 / 90, 2: 100 / 3 / 10, 3: MAX_WEIGHT})
    assert class_weights(labels, {}) == {} and class_weights(labels, {"unknown": 3}) == {}
    part = Uncertainty({"score_threshold": 0.5, "label_map": labels}, {"cell": 90, "platelet": 10})
    box = np.array([[0.1, 0.1, 0.4, 0.4]])
    one = lambda cls: part.view({"num_detections": np.array([1.0]), "detection_boxes": box[None],  # noqa: E731
                                 "detection_scores": np.array([[0.5]]), "detection_classes": np.array([[cls]])})
    # The same doubtful box: a platelet counts 9 times a cell; both views weighted alike.
    assert part(one(2))[0] == pytest.approx(9 * part(one(1))[0])
    assert part(one(2), one(2))[0] == pytest.approx(weights[2])  # the mirror image's box, mapped back: a pair
    assert part(one(2), one(1))[0] == pytest.approx(0.75 * (weights[1] + weights[2]))  # two one-view boxes
    # Unweighted without labelled boxes.
    assert Uncertainty({"score_threshold": 0.5, "label_map": labels})(one(2))[0] == pytest.approx(1.0)
