"""`make eval`'s COCO metrics against the Object Detection API's own evaluator, on the same weights.

The demo's detector (the session's `make demo` on the small sample: data, config, train), `make eval`
measures its last checkpoint, and the same weights, written as an OD API checkpoint by `zoo.save_od_api`,
are measured by the OD API's `model_lib_v2.eval_continuously` (tests/odapi_trainer.py) on the same
pipeline.config's eval_input_reader: the same val TFRecords, its own decoding, resizing, postprocessing and
COCO evaluation (coco_evaluation.CocoDetectionEvaluator).

The two agree on every metric over all object sizes. They differ, by design, in the size buckets
(small / medium / large): `make eval` puts an object in a bucket by its annotated area
(image/object/area, the annotator's polygon or mask area, as COCO's own evaluation does), while the OD API's
eager evaluation passes only boxes, classes and crowd flags to its COCO evaluator
(CocoDetectionEvaluator.add_eval_dict), which then uses each box's area. With box areas instead, ours gives
the OD API's size metrics too (checked below).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli

STEPS = 150  # the demo fixture's --detector-steps
# Our names (metrics.json) and the OD API's (DetectionBoxes_...) of the COCO summary metrics.
OVERALL = {"AP": "Precision/mAP", "AP50": "Precision/mAP@.50IOU", "AP75": "Precision/mAP@.75IOU",
           "AR1": "Recall/AR@1", "AR10": "Recall/AR@10", "AR100": "Recall/AR@100"}
BY_SIZE = {"APs": "Precision/mAP (small)", "APm": "Precision/mAP (medium)", "APl": "Precision/mAP (large)",
           "ARs": "Recall/AR@100 (small)", "ARm": "Recall/AR@100 (medium)", "ARl": "Recall/AR@100 (large)"}
TOLERANCE = 0.005


@pytest.fixture(scope="module")
def both(demo, tmp_path_factory):
    """(run folder, checkpoint, make eval's metrics.json, the OD API's evaluation of the same weights), for a
    copy of the demo's detector."""
    from odapi_oracle import run_oracle
    from odapi_trainer import evaluate_odapi, trainer_env
    from pipelines import runs
    from pipelines.detection import zoo
    from pipelines.detection.model import build_model

    trainer_env()  # skips here when the OD API code cannot be fetched
    root = tmp_path_factory.mktemp("eval-parity")
    ws = root / "ws"
    # The demo's detector (its recipe for learning from scratch at 128x128, STEPS steps: AP50 about 0.26 on the
    # 9 val images), enough detections right and wrong for the comparison to mean something. A copy, so that
    # make eval here leaves the demo's own eval/ as the demo wrote it.
    shutil.copytree(demo[0] / "demo-detector", ws / "parity")
    shutil.rmtree(ws / "parity" / "eval")
    run = ws / "parity"
    evals = json.loads((run / "train" / "evals.json").read_text())  # make train evaluates 5 times a run by default
    assert [e["step"] for e in evals] == [30, 60, 90, 120, 150] and all("AP" in e for e in evals), evals
    checkpoint = tf.train.latest_checkpoint(str(run / "train"))
    assert checkpoint.endswith(f"ckpt-{STEPS}")
    run_cli("eval", "--run", "parity", "--checkpoint", checkpoint, workspace=ws, check=True)
    ours = json.loads((run / "eval" / "metrics.json").read_text())

    # Our weights in the OD API's layout; the template is an OD API checkpoint of the same pipeline.config.
    config = run / "pipeline.config"
    template = run_oracle(config, [np.zeros((64, 64, 3), np.uint8)], root / "template")["checkpoint"]
    model = build_model(runs.load_run(str(run)).params)
    assert zoo.restore(model, checkpoint, "full").restored == len(model.weights)
    zoo.save_od_api(model, template, root / "od_api" / f"ckpt-{STEPS}")
    theirs = evaluate_odapi(config, root / "od_api", root / "od_api_eval")
    return run, checkpoint, ours, theirs


def test_make_eval_equals_the_od_api_evaluation(both):
    _, _, ours, theirs = both
    assert theirs["checkpoint"].endswith(f"ckpt-{STEPS}")
    mine = ours["metrics"]
    od = {ours_name: theirs["metrics"]["DetectionBoxes_" + name] for ours_name, name in {**OVERALL, **BY_SIZE}.items()}
    print("make eval:", {k: round(v, 4) for k, v in mine.items()})
    print("OD API:   ", {k: round(v, 4) for k, v in od.items()})
    assert ours["images"] > 0 and ours["detections"] > 0
    assert mine["AP50"] > 0.02  # not two zeros agreeing
    for name in OVERALL:
        assert abs(mine[name] - od[name]) <= TOLERANCE, (name, mine[name], od[name])


def test_size_buckets_differ_only_by_the_area_used(both):
    """Ours with each object's box area (the OD API's choice) gives the OD API's small/medium/large metrics;
    with the annotated areas (ours, COCO's) they differ on this sample, whose shapes fill a fraction of their box."""
    from pipelines.data.label_map import read_label_map
    from pipelines.detection.evaluate import Evaluator
    from pipelines.engine.evaluate import score

    from pipelines import runs

    run, checkpoint, ours, theirs = both
    params = runs.load_run(str(run)).params
    evaluator = Evaluator(params, read_label_map(Path(params.label_map_path)))
    score(evaluator, evaluator.serving_function(checkpoint), params.eval_files)
    annotated = evaluator.evaluate()["metrics"]
    assert annotated == pytest.approx(ours["metrics"], abs=1e-9)  # the same evaluation as make eval's

    areas = [a["area"] for a in evaluator.gt_annotations]
    boxes = [a["bbox"][2] * a["bbox"][3] for a in evaluator.gt_annotations]
    assert sum(areas) < 0.9 * sum(boxes)  # annotated areas: the shapes', smaller than their boxes
    for annotation in evaluator.gt_annotations:
        annotation["area"] = annotation["bbox"][2] * annotation["bbox"][3]
    by_box = evaluator.evaluate()["metrics"]
    od = {name: theirs["metrics"]["DetectionBoxes_" + od_name] for name, od_name in BY_SIZE.items()}
    print("annotated areas:", {k: round(annotated[k], 4) for k in BY_SIZE}, "\nbox areas:      ",
          {k: round(by_box[k], 4) for k in BY_SIZE}, "\nOD API:         ", {k: round(v, 4) for k, v in od.items()})
    for name in BY_SIZE:
        assert abs(by_box[name] - od[name]) <= TOLERANCE, (name, by_box[name], od[name])
    assert any(abs(annotated[name] - od[name]) > TOLERANCE for name in BY_SIZE)
    for name in OVERALL:  # the area plays no part in the metrics over all sizes
        assert by_box[name] == pytest.approx(annotated[name], abs=1e-12)
