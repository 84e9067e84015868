"""The Object Detection API's own trainer and evaluator (tests/odapi_trainer.py) run here, on TFRecords and a
pipeline.config that our `make data` and `make config` wrote: `model_lib_v2.train_loop` trains a few steps and
saves the last one, `eval_continuously` gives COCO metrics of that checkpoint. They are the references of the
training benchmark and of tests/test_eval_parity.py; this test keeps them working on our TensorFlow stack."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli

STEPS = 4


@pytest.fixture(scope="module")
def run_config(sample_dir, tmp_path_factory) -> Path:
    """workspace/tiny/pipeline.config for the 40-image sample: 128x128 input, batch 2, STEPS steps."""
    from odapi_trainer import trainer_env

    trainer_env()  # skips here, before any work, when the OD API code cannot be fetched
    ws = tmp_path_factory.mktemp("odapi-trainer") / "ws"
    run_cli("data", "--dataset", sample_dir, "--workers", "2", workspace=ws, check=True)
    run_cli("config", "--dataset", "shapes", "--run", "tiny", "--image-size", "128", "--batch-size", "2",
            "--num-steps", str(STEPS), "--optimizer", "adam", "--learning-rate", "0.003", workspace=ws, check=True)
    return ws / "tiny" / "pipeline.config"


@pytest.mark.slow
def test_odapi_train_loop_and_evaluation(run_config, tmp_path):
    from odapi_trainer import LOSS_KEYS, evaluate_odapi, train_odapi

    model_dir = tmp_path / "odapi"
    trained = train_odapi(run_config, model_dir, num_steps=STEPS, checkpoint_every=STEPS // 2)
    print({k: v for k, v in trained.items() if k != "losses"}, trained["losses"]["Loss/total_loss"])

    # A loss of every step, read back from train_loop's own TensorBoard events; the total is the sum of its parts.
    assert trained["steps"] == list(range(1, STEPS + 1))
    losses = trained["losses"]
    assert set(losses) == set(LOSS_KEYS)
    for key in LOSS_KEYS:
        assert len(losses[key]) == STEPS and all(math.isfinite(v) for v in losses[key]), (key, losses[key])
    parts = np.sum([losses[k] for k in LOSS_KEYS if k != "Loss/total_loss"], axis=0)
    np.testing.assert_allclose(parts, losses["Loss/total_loss"], rtol=1e-5)
    assert losses["Loss/total_loss"][0] > 0
    assert trained["batch_size"] == 2 and trained["images_per_sec"] > 0 and trained["first_iteration_s"] > 0

    # Checkpoints at step 0, every STEPS // 2 steps and so at the last step. Step 0's holds no weights (train_loop
    # saves it before the first step builds the model); training changed every kernel between the other two.
    assert trained["checkpoint_step"] == STEPS
    assert tf.train.latest_checkpoint(str(model_dir)) == trained["checkpoint"]
    saved = tf.train.get_checkpoint_state(str(model_dir)).all_model_checkpoint_paths
    readers = [tf.train.load_checkpoint(prefix) for prefix in saved]
    assert [int(r.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) for r in readers] == [0, STEPS // 2, STEPS]
    assert not any(name.startswith("model/") for name in readers[0].get_variable_to_shape_map())
    middle, last = readers[1:]
    kernels = [name for name in last.get_variable_to_shape_map()
               if name.startswith("model/") and name.endswith("kernel/.ATTRIBUTES/VARIABLE_VALUE")]
    changed = [name for name in kernels if np.any(middle.get_tensor(name) != last.get_tensor(name))]
    assert len(kernels) > 50 and len(changed) == len(kernels), (len(changed), len(kernels))
    assert Path(trained["log"]).is_file()

    evaluated = evaluate_odapi(run_config, model_dir, tmp_path / "odapi-eval")
    metrics = evaluated["metrics"]
    print(metrics)
    assert evaluated["checkpoint"] == trained["checkpoint"] and evaluated["evaluations"] == 1
    for key in ("DetectionBoxes_Precision/mAP", "DetectionBoxes_Precision/mAP@.50IOU", "DetectionBoxes_Recall/AR@100"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert math.isfinite(metrics["Loss/total_loss"])
    # Its TensorBoard summaries (metrics and the side-by-side pictures, drawn with the Pillow font shim).
    assert list((tmp_path / "odapi-eval" / "eval").glob("events.out.tfevents.*"))
