"""pipeline.config: lossless text format, every rewrite rule, translation and validation."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from pipelines.workspace import UserError
from pipelines.config.textproto import Enum, TextProto
from pipelines.detection.config import translate

TEMPLATES = sorted((REPO / "configs").glob("*.config"))

# The Object Detection API's own syntax habits: `name: {`, trailing commas, list values,
# single quotes, `.08`, comments everywhere, a `<...>` message, `;`, adjacent strings.
ZOO_STYLE = """# a zoo-style file
model {
  ssd {
    inplace_batchnorm_update: true
    num_classes: 90   # COCO
    box_coder { faster_rcnn_box_coder { y_scale: 10.0 x_scale: 10.0 height_scale: 5.0 width_scale: 5.0 } }
    anchor_generator {
      multiscale_anchor_generator {
        min_level: 3
        max_level: 7
        anchor_scale: 4.0
        aspect_ratios: [1.0, 2.0, 0.5]
        scales_per_octave: 2
      }
    }
    image_resizer { fixed_shape_resizer { height: 320 width: 320 } }
    box_predictor {
      weight_shared_convolutional_box_predictor {
        depth: 128
        class_prediction_bias_init: -4.6
        conv_hyperparams {
          activation: RELU_6,
          regularizer { l2_regularizer { weight: 0.00004 } }
          batch_norm { scale: true, decay: 0.997, epsilon: 0.001, }
        }
        num_layers_before_predictor: 4
        share_prediction_tower: true
        use_depthwise: true
        kernel_size: 3
      }
    }
    feature_extractor {
      type: 'ssd_mobilenet_v2_fpn_keras'
      use_depthwise: true
      fpn { min_level: 3 max_level: 7 additional_layer_depth: 128 }
      min_depth: 16
      depth_multiplier: 1.0
      conv_hyperparams <
        activation: RELU_6;
        regularizer { l2_regularizer { weight: 0.00004 } }
      >
      override_base_feature_extractor_hyperparams: true
    }
    matcher { argmax_matcher { matched_threshold: 0.5 unmatched_threshold: 0.5 ignore_thresholds: false
                               negatives_lower_than_unmatched: true force_match_for_each_row: true } }
    similarity_calculator { iou_similarity { } }
    encode_background_as_zeros: true
    normalize_loss_by_num_matches: true
    normalize_loc_loss_by_codesize: true
    loss {
      classification_loss { weighted_sigmoid_focal { alpha: 0.25 gamma: 2.0 } }
      localization_loss { weighted_smooth_l1 { } }
      classification_weight: 1.0
      localization_weight: 1.0
    }
    post_processing {
      batch_non_max_suppression {
        score_threshold: 1e-8
        iou_threshold: 0.6
        max_detections_per_class: 100
        max_total_detections: 100
      }
      score_converter: SIGMOID
    }
  }
}

train_config: {
  fine_tune_checkpoint_version: V2
  fine_tune_checkpoint: "PATH_TO_BE_CONFIGURED/" "mobilenet_v2.ckpt-1"
  fine_tune_checkpoint_type: "classification"
  batch_size: 128
  sync_replicas: true
  startup_delay_steps: 0
  replicas_to_aggregate: 8
  num_steps: 50000
  data_augmentation_options { random_horizontal_flip { } }
  data_augmentation_options {
    random_crop_image { min_object_covered: 0.0 min_aspect_ratio: 0.75 max_aspect_ratio: 3.0
                        min_area: 0.75 max_area: 1.0 overlap_thresh: 0.0 }
  }
  optimizer {
    momentum_optimizer: {
      learning_rate: {
        cosine_decay_learning_rate {
          learning_rate_base: .08
          total_steps: 50000
          warmup_learning_rate: .026666
          warmup_steps: 1000
        }
      }
      momentum_optimizer_value: 0.9
    }
    use_moving_average: false
  }
}

train_input_reader: {
  label_map_path: "PATH_TO_BE_CONFIGURED/label_map.txt"
  tf_record_input_reader {
    input_path: "PATH_TO_BE_CONFIGURED/train2017-?????-of-00256.tfrecord"
  }
}

eval_input_reader: {
  label_map_path: "PATH_TO_BE_CONFIGURED/label_map.txt"
  shuffle: false
  num_epochs: 1
  tf_record_input_reader {
    input_path: "PATH_TO_BE_CONFIGURED/val2017-?????-of-00032.tfrecord"
  }
}
"""


@pytest.mark.parametrize("text", [p.read_text() for p in TEMPLATES] + [ZOO_STYLE],
                         ids=[p.name for p in TEMPLATES] + ["zoo-style"])
def test_round_trip_is_byte_identical(text):
    assert TextProto(text).text == text
    doc = TextProto(text)
    doc.set("model.ssd.num_classes", 90)  # same value: same bytes
    assert doc.text == text


def test_values_are_typed():
    doc = TextProto(ZOO_STYLE)
    assert doc.get("model.ssd.num_classes") == 90
    assert doc.get("model.ssd.feature_extractor.type") == "ssd_mobilenet_v2_fpn_keras"
    assert doc.get("model.ssd.feature_extractor.conv_hyperparams.activation") == "RELU_6"
    assert doc.get("model.ssd.inplace_batchnorm_update") is True
    assert doc.get_all("model.ssd.anchor_generator.multiscale_anchor_generator.aspect_ratios") == [1.0, 2.0, 0.5]
    assert doc.get("train_config.optimizer.momentum_optimizer.learning_rate.cosine_decay_learning_rate"
                   ".learning_rate_base") == pytest.approx(0.08)
    assert doc.get("train_config.fine_tune_checkpoint") == "PATH_TO_BE_CONFIGURED/mobilenet_v2.ckpt-1"
    assert doc.get("model.ssd.post_processing.batch_non_max_suppression.score_threshold") == pytest.approx(1e-8)
    assert len(doc.find("train_config.data_augmentation_options")) == 2
    assert doc.message_names("model.ssd.loss.classification_loss") == ["weighted_sigmoid_focal"]


def _changed_span(a: str, b: str) -> tuple[str, str]:
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    return a[start:len(a) - end], b[start:len(b) - end]


def test_an_edit_touches_only_its_field():
    doc = TextProto(ZOO_STYLE)
    doc.set("model.ssd.num_classes", 4)
    assert _changed_span(ZOO_STYLE, doc.text) == ("90", "4")
    before = doc.text
    doc.set("model.ssd.feature_extractor.type", "other")  # keeps the single quotes
    assert _changed_span(before, doc.text) == ("ssd_mobilenet_v2_fpn_keras", "other")
    assert "type: 'other'" in doc.text
    before = doc.text
    doc.set("model.ssd.feature_extractor.conv_hyperparams.activation", Enum("SWISH"))
    assert _changed_span(before, doc.text) == ("RELU_6", "SWISH")
    before = doc.text
    assert doc.remove("train_config.sync_replicas") == 1
    assert doc.text == before.replace("  sync_replicas: true\n", "", 1)  # the whole line, nothing else
    doc.add("train_config", "fine_tune_checkpoint", "a/b", after="fine_tune_checkpoint_version")
    assert "  fine_tune_checkpoint_version: V2\n  fine_tune_checkpoint: \"a/b\"\n" in doc.text
    doc.add("train_input_reader", "num_readers", 2)
    assert re.search(r'input_path: "[^"]+"\n  }\n  num_readers: 2\n}', doc.text)


def test_parse_errors_name_line_and_column():
    with pytest.raises(UserError) as info:
        TextProto("model {\n  ssd {\n    num_classes 4\n  }\n}\n", "my.config")
    assert str(info.value).startswith("my.config: line 3 column 17: expected ':' or '{'")
    with pytest.raises(UserError, match="line 2 column 1: expected a field name, found 'end of file'"):
        TextProto("model {\n", "x")


def test_templates_have_the_zoo_fields_and_values():
    """Our templates translate to exactly what the zoo-style file (zoo syntax) translates to."""
    zoo = translate(TextProto(ZOO_STYLE), check_paths=False).params
    ours = translate(TextProto((REPO / "configs" / "ssd_mobilenet_v2_fpnlite_320x320.config").read_text()),
                     check_paths=False).params
    ignore = {"label_map_path", "train_files", "eval_files", "fine_tune_checkpoint"}
    for f in dataclasses.fields(zoo):
        if f.name not in ignore:
            assert getattr(ours, f.name) == getattr(zoo, f.name), f.name
    big = translate(TextProto((REPO / "configs" / "ssd_mobilenet_v2_fpnlite_640x640.config").read_text()),
                    check_paths=False).params
    assert (big.image_height, big.image_width) == (640, 640)
    assert dataclasses.replace(big, image_height=320, image_width=320) == ours
    assert ours.depth_multiplier == 1.0 and ours.fpn_num_filters == 128 and ours.head_num_convs == 4
    assert ours.aspect_ratios == [1.0, 2.0, 0.5] and ours.num_scales == 2 and ours.anchor_size == 4.0
    assert ours.box_coder_weights == [10.0, 10.0, 5.0, 5.0]
    assert (ours.focal_alpha, ours.focal_gamma) == (0.25, 2.0)
    assert [name for name, _ in ours.augmentations] == ["random_horizontal_flip", "random_crop_image"]
    assert ours.augmentations[1][1]["min_area"] == 0.75 and ours.augmentations[1][1]["min_object_covered"] == 0.0
    assert ours.fine_tune_checkpoint_type == "classification"


# --- make config -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(sample_dir, tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    run_cli("data", "--dataset", sample_dir, "--workers", "1", workspace=ws, check=True)
    return ws


def make_config(workspace, *args, check=True):
    return run_cli("config", "--dataset", "shapes", *args, workspace=workspace, check=check)


def test_rewrite_rules(workspace):
    proc = make_config(workspace, "--run", "r1", "--batch-size", "8", "--num-steps", "2000", "--optimizer", "momentum")
    out = workspace / "r1" / "pipeline.config"
    doc = TextProto(out.read_text())
    data = (workspace / "shapes" / "data").resolve()
    assert doc.get("model.ssd.num_classes") == 4
    for reader, split in (("train_input_reader", "train"), ("eval_input_reader", "val")):
        assert Path(doc.get(f"{reader}.label_map_path")) == data / "label_map.pbtxt"
        assert Path(doc.get(f"{reader}.tf_record_input_reader.input_path")) == data / f"{split}-*.tfrecord"
    cosine = "train_config.optimizer.momentum_optimizer.learning_rate.cosine_decay_learning_rate"
    assert doc.get("train_config.batch_size") == 8 and doc.get("train_config.num_steps") == 2000
    assert doc.get(f"{cosine}.total_steps") == 2000
    assert doc.get(f"{cosine}.warmup_steps") == 40  # 1000 of 50000, in proportion
    assert doc.get(f"{cosine}.learning_rate_base") == pytest.approx(0.08 * 8 / 128)
    assert doc.get(f"{cosine}.warmup_learning_rate") == pytest.approx(0.026666 * 8 / 128, rel=1e-4)
    assert not doc.has("train_config.fine_tune_checkpoint") and not doc.has("train_config.fine_tune_checkpoint_type")
    assert "-    num_classes: 90\n+    num_classes: 4" in proc.stdout  # the diff is printed
    assert "train_config.sync_replicas: synchronous TPU training setting, ignored" in proc.stdout
    # Only the rewritten fields differ from the template.
    template = (REPO / "configs" / "ssd_mobilenet_v2_fpnlite_320x320.config").read_text().splitlines()
    changed = {line.strip().split(":")[0] for line in set(doc.text.splitlines()) ^ set(template)}
    assert changed == {"num_classes", "batch_size", "num_steps", "learning_rate_base", "total_steps",
                       "warmup_learning_rate", "warmup_steps", "decay", "fine_tune_checkpoint", "fine_tune_checkpoint_type",
                       "fine_tune_checkpoint_version", "label_map_path", "input_path"}

    # Few steps: warmup never exceeds them. BATCH not given: 8; from random weights: Adam at 0.003.
    proc = make_config(workspace, "--run", "r2", "--num-steps", "10")
    doc = TextProto((workspace / "r2" / "pipeline.config").read_text())
    adam = cosine.replace("momentum_optimizer", "adam_optimizer")
    assert doc.get(f"{adam}.total_steps") == 10 and 1 <= doc.get(f"{adam}.warmup_steps") <= 10
    assert doc.get("train_config.batch_size") == 8 and doc.get(f"{adam}.learning_rate_base") == pytest.approx(0.003)
    assert "note: from random weights: OPTIMIZER=adam LR=0.003" in proc.stdout
    assert "note: defaults: BATCH=8 (the template's batch 128" in proc.stdout


def test_defaults_are_the_measured_recipes(workspace, tmp_path):
    """The shortest command is the right one: `make config DATASET=NAME` with one of our templates gives the
    from-scratch recipe the README measured (batch 8, 3,000 steps, Adam at 0.003); with CHECKPOINT=, the
    template's momentum at batch 8 for 2,000 steps; a user's own file keeps its values."""
    import shutil

    import tensorflow as tf

    from pipelines.config import read as tr
    from pipelines.detection.model import build_model

    cosine = "train_config.optimizer.{}.learning_rate.cosine_decay_learning_rate"
    make_config(workspace, "--run", "d1")
    doc = TextProto((workspace / "d1" / "pipeline.config").read_text())
    assert (doc.get("train_config.batch_size"), doc.get("train_config.num_steps")) == (8, 3000)
    assert doc.get(cosine.format("adam_optimizer") + ".learning_rate_base") == pytest.approx(0.003)
    model = build_model(tr.load(workspace / "d1" / "pipeline.config").params)
    prefix = tf.train.Checkpoint(model=model, **model.checkpoint_items).write(str(tmp_path / "ckpt-1"))
    proc = make_config(workspace, "--run", "d2", "--checkpoint", prefix)
    doc = TextProto((workspace / "d2" / "pipeline.config").read_text())
    assert (doc.get("train_config.batch_size"), doc.get("train_config.num_steps")) == (8, 2000)
    assert doc.get(cosine.format("momentum_optimizer") + ".learning_rate_base") == pytest.approx(0.005)
    assert "from random weights" not in proc.stdout and "note: defaults: BATCH=8 STEPS=2000" in proc.stdout
    own = tmp_path / "mine.config"
    shutil.copyfile(REPO / "configs" / "ssd_mobilenet_v2_fpnlite_320x320.config", own)
    proc = make_config(workspace, "--run", "d3", "--model", own)
    doc = TextProto((workspace / "d3" / "pipeline.config").read_text())
    assert (doc.get("train_config.batch_size"), doc.get("train_config.num_steps")) == (128, 50000)
    assert doc.has(cosine.format("momentum_optimizer")) and "note: defaults" not in proc.stdout


def test_learning_rate_and_image_size(workspace):
    """LR= sets the schedule's peak after the batch scaling (warmup start in proportion), SIZE= the fixed
    resizer; both recorded in pipeline.config.diff with the notes; bad values are refused by name."""
    proc = make_config(workspace, "--run", "lr", "--batch-size", "8", "--learning-rate", "0.04", "--image-size", "256x320")
    doc = TextProto((workspace / "lr" / "pipeline.config").read_text())
    cosine = "train_config.optimizer.momentum_optimizer.learning_rate.cosine_decay_learning_rate"
    assert doc.get(f"{cosine}.learning_rate_base") == pytest.approx(0.04)
    assert doc.get(f"{cosine}.warmup_learning_rate") == pytest.approx(0.04 * 0.026666 / 0.08, rel=1e-4)
    resizer = "model.ssd.image_resizer.fixed_shape_resizer"
    assert (doc.get(f"{resizer}.height"), doc.get(f"{resizer}.width")) == (256, 320)
    assert "note: learning rate 0.005 -> 0.04" in proc.stdout and "input size 320x320 -> 256x320" in proc.stdout
    diff = (workspace / "lr" / "pipeline.config.diff").read_text()
    assert "+          learning_rate_base: 0.04" in diff and "# note: input size 320x320 -> 256x320" in diff

    make_config(workspace, "--run", "square", "--image-size", "192")
    doc = TextProto((workspace / "square" / "pipeline.config").read_text())
    assert (doc.get(f"{resizer}.height"), doc.get(f"{resizer}.width")) == (192, 192)
    for bad in (["--image-size", "16"], ["--image-size", "256x"], ["--learning-rate", "0"], ["--learning-rate", "x"]):
        proc = make_config(workspace, "--run", "bad", *bad, check=False)
        assert proc.returncode == 2 and bad[0] in proc.stderr, proc.stderr
    assert not (workspace / "bad").exists()


def test_optimizer_switch(workspace):
    """OPTIMIZER=adam: the oneof member renamed, the schedule kept with Adam's default peak (or LR=), and
    Model Garden's optimizer follows; OPTIMIZER=momentum back on a file that has adam."""
    from pipelines.detection.experiment import build_experiment

    proc = make_config(workspace, "--run", "adam", "--batch-size", "8", "--num-steps", "100", "--optimizer", "adam")
    text = (workspace / "adam" / "pipeline.config").read_text()
    doc = TextProto(text)
    cosine = "train_config.optimizer.adam_optimizer.learning_rate.cosine_decay_learning_rate"
    assert doc.get(f"{cosine}.learning_rate_base") == pytest.approx(0.001)
    assert doc.get(f"{cosine}.total_steps") == 100
    assert "momentum_optimizer" not in text
    assert "note: optimizer momentum_optimizer -> adam_optimizer" in proc.stdout
    assert "learning rate 0.005 -> 0.001 (warmup_learning_rate in proportion) (adam's default peak" in proc.stdout
    params = translate(TextProto(text)).params
    assert params.optimizer == "adam" and params.learning_rate == pytest.approx(0.001)
    opt = build_experiment(params, gpus=0).trainer.optimizer_config
    assert opt.optimizer.type == "adam" and opt.optimizer.adam.epsilon == pytest.approx(1e-8)
    assert opt.learning_rate.cosine.initial_learning_rate == pytest.approx(0.001)

    make_config(workspace, "--run", "adam2", "--optimizer", "adam", "--learning-rate", "0.003")
    doc = TextProto((workspace / "adam2" / "pipeline.config").read_text())
    assert doc.get(f"{cosine}.learning_rate_base") == pytest.approx(0.003)

    back = workspace / "adam.config"
    back.write_text(text)
    make_config(workspace, "--run", "momentum", "--model", back, "--optimizer", "momentum")
    doc = TextProto((workspace / "momentum" / "pipeline.config").read_text())
    assert doc.get("train_config.optimizer.momentum_optimizer.momentum_optimizer_value") == 0.9
    assert doc.get("train_config.optimizer.momentum_optimizer.learning_rate.cosine_decay_learning_rate."
                   "learning_rate_base") == pytest.approx(0.01)
    assert translate(TextProto(doc.text)).params.optimizer == "sgd"


def test_fine_tune_checkpoint_set_and_checked(workspace, tmp_path):
    import tensorflow as tf

    from pipelines.config import read as tr
    from pipelines.detection.model import build_model

    # A checkpoint of this model, as training writes it (model plus backbone/decoder/head at the root).
    make_config(workspace, "--run", "ft0")
    params = tr.load(workspace / "ft0" / "pipeline.config").params
    model = build_model(params)
    prefix = tf.train.Checkpoint(model=model, **model.checkpoint_items).write(str(tmp_path / "ckpt-1"))
    plain = tf.train.Checkpoint(v=tf.Variable(1.0)).write(str(tmp_path / "plain" / "ckpt-1"))
    proc = make_config(workspace, "--run", "ft", "--checkpoint", prefix)
    doc = TextProto((workspace / "ft" / "pipeline.config").read_text())
    assert doc.get("train_config.fine_tune_checkpoint") == prefix
    assert doc.get("train_config.fine_tune_checkpoint_type") == "detection"  # a detector's checkpoint
    assert f"restored 290 variables from {prefix} (checkpoint, 'detection'); initialised fresh: box predictor " \
           "tower, box predictor, class predictor (4 classes)" in proc.stdout
    proc = make_config(workspace, "--run", "ft", "--checkpoint", prefix, "--checkpoint-type", "full")
    assert "restored 384 variables" in proc.stdout
    proc = make_config(workspace, "--run", "ft", "--checkpoint", prefix, "--checkpoint-type", "classification")
    doc = TextProto((workspace / "ft" / "pipeline.config").read_text())
    assert doc.get("train_config.fine_tune_checkpoint_type") == "classification"
    assert "restored 260 variables" in proc.stdout
    # A checkpoint that exists but is not one of this model's (here: a plain variable) is refused at config time.
    assert "neither an Object Detection API checkpoint" in make_config(
        workspace, "--run", "ft3", "--checkpoint", plain, "--checkpoint-type", "classification", check=False).stderr
    proc = make_config(workspace, "--run", "ft2", "--checkpoint", tmp_path / "nope" / "ckpt-3", check=False)
    assert proc.returncode == 2
    assert "train_config.fine_tune_checkpoint: no checkpoint at" in proc.stderr and "Traceback" not in proc.stderr
    assert not (workspace / "ft2" / "pipeline.config").exists()


def test_freeze_shortcut_writes_freeze_variables(workspace):
    make_config(workspace, "--run", "fr", "--freeze", "backbone")
    doc = TextProto((workspace / "fr" / "pipeline.config").read_text())
    assert doc.get_all("train_config.freeze_variables") == ["model/_feature_extractor/classification_backbone/.*"]
    params = tr_load(workspace / "fr" / "pipeline.config")
    assert params.freeze_variables == ["model/_feature_extractor/classification_backbone/.*"]
    text = (workspace / "fr" / "pipeline.config").read_text().replace(
        'freeze_variables: "model', 'freeze_variables: "(unclosed')
    (workspace / "fr" / "pipeline.config").write_text(text)
    with pytest.raises(UserError, match=r"train_config.freeze_variables: .* not a valid regular expression"):
        tr_load(workspace / "fr" / "pipeline.config")


def tr_load(path):
    from pipelines.config import read as tr

    return tr.load(path).params


def test_a_zoo_file_works_as_the_template(workspace, tmp_path):
    zoo = tmp_path / "downloaded.config"
    zoo.write_text(ZOO_STYLE)
    make_config(workspace, "--run", "zoo", "--model", zoo, "--batch-size", "4")
    text = (workspace / "zoo" / "pipeline.config").read_text()
    params = translate(TextProto(text)).params  # paths exist, fields valid
    assert params.num_classes == 4 and params.batch_size == 4
    assert "fine_tune_checkpoint" not in text
    assert "# a zoo-style file\n" in text and "aspect_ratios: [1.0, 2.0, 0.5]" in text  # kept as written


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("'ssd_mobilenet_v2_fpn_keras'", "'ssd_resnet50_v1_fpn_keras'"),
     "model.ssd.feature_extractor.type: 'ssd_resnet50_v1_fpn_keras' is not supported; supported: "
     "ssd_mobilenet_v2_fpn_keras"),
    (lambda t: t.replace("momentum_optimizer: {", "rms_prop_optimizer: {").replace("momentum_optimizer_value: 0.9", ""),
     "train_config.optimizer.rms_prop_optimizer: not supported; supported: momentum_optimizer, adam_optimizer"),
    (lambda t: re.sub(r"cosine_decay_learning_rate \{[^}]*\}", "exponential_decay_learning_rate { initial_learning_rate: .08 }",
                      t),
     "learning_rate.exponential_decay_learning_rate: not supported; supported: cosine_decay_learning_rate"),
    (lambda t: t.replace("random_horizontal_flip { }", "random_jpeg_quality { }"),
     "data_augmentation_options.random_jpeg_quality: not supported; supported: random_adjust_brightness, "
     "random_adjust_contrast"),
    (lambda t: t.replace("height: 320", "height: 300"),
     "fixed_shape_resizer.height: 300 must be a positive multiple of 32"),
    (lambda t: t.replace("force_match_for_each_row: true", ""),
     "model.ssd.matcher.argmax_matcher.force_match_for_each_row: false (the OD API's value when the field is "
     "absent) is not supported: training here implements true; set `force_match_for_each_row: true`"),
])
def test_unsupported_fields_are_errors_naming_the_field(workspace, tmp_path, edit, message):
    bad = tmp_path / "bad.config"
    bad.write_text(edit(ZOO_STYLE))
    proc = make_config(workspace, "--run", "bad", "--model", bad, check=False)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr and proc.stderr.count("\n") == 1
    assert not (workspace / "bad").exists()


def test_missing_inputs_are_errors(workspace, tmp_path):
    proc = run_cli("config", "--dataset", "never-converted", workspace=workspace)
    assert proc.returncode == 2 and "run `make data DATASET=never-converted` first" in proc.stderr
    proc = make_config(workspace, "--model", "no_such_model", check=False)
    assert proc.returncode == 2 and "ssd_mobilenet_v2_fpnlite_320x320" in proc.stderr
    make_config(workspace, "--run", "paths")
    text = (workspace / "paths" / "pipeline.config").read_text()
    translate(TextProto(text))  # valid as written
    for field, value in (("train_input_reader.label_map_path", "nowhere/label_map.pbtxt"),
                         ("train_input_reader.tf_record_input_reader.input_path", "nowhere/train-*.tfrecord"),
                         ("eval_input_reader.tf_record_input_reader.input_path", "nowhere/val-*.tfrecord"),
                         ("train_config.fine_tune_checkpoint", "nowhere/ckpt-7")):
        doc = TextProto(text)
        if not doc.set(field, value):
            doc.add("train_config", "fine_tune_checkpoint", value)
        with pytest.raises(UserError, match=re.escape(field) + ": no (such file|file matches|checkpoint at)"):
            translate(doc)
    template = TextProto((REPO / "configs" / "ssd_mobilenet_v2_fpnlite_320x320.config").read_text())
    for field in ("train_input_reader.label_map_path", "train_input_reader.tf_record_input_reader.input_path",
                  "eval_input_reader.tf_record_input_reader.input_path", "eval_input_reader.label_map_path"):
        template.set(field, TextProto(text).get(field))
    with pytest.raises(UserError, match="fine_tune_checkpoint: still 'PATH_TO_BE_CONFIGURED"):
        translate(template)


def test_short_schedules_get_a_faster_batch_norm_decay(workspace):
    """0.997 (the zoo's) keeps 9% of the initial moving averages after 800 steps: lowered, with a note."""
    proc = make_config(workspace, "--run", "bn", "--num-steps", "800")
    doc = TextProto((workspace / "bn" / "pipeline.config").read_text())
    for path in ("model.ssd.feature_extractor.conv_hyperparams.batch_norm.decay",
                 "model.ssd.box_predictor.weight_shared_convolutional_box_predictor.conv_hyperparams.batch_norm.decay"):
        assert doc.get(path) == 0.99
    assert "feature_extractor batch_norm.decay 0.997 -> 0.99: its moving averages span ~333 steps, too many for a " \
           "800-step run (they would keep 9% of their initial values)" in proc.stdout
    make_config(workspace, "--run", "bn", "--num-steps", "5000")
    doc = TextProto((workspace / "bn" / "pipeline.config").read_text())
    assert doc.get("model.ssd.feature_extractor.conv_hyperparams.batch_norm.decay") == 0.997


def test_a_few_step_run_keeps_a_sane_batch_norm_decay(workspace, tmp_path):
    make_config(workspace, "--run", "bn6", "--num-steps", "6")
    doc = TextProto((workspace / "bn6" / "pipeline.config").read_text())
    assert doc.get("model.ssd.feature_extractor.conv_hyperparams.batch_norm.decay") == 0.9
    text = (workspace / "bn6" / "pipeline.config").read_text().replace("decay: 0.9\n", "decay: 1.5\n", 1)
    bad = tmp_path / "bad.config"
    bad.write_text(text)
    with pytest.raises(UserError, match=r"feature_extractor.conv_hyperparams.batch_norm.decay: 1.5 must be in \[0, 1\)"):
        translate(TextProto(text, str(bad)), check_paths=False)


@pytest.mark.parametrize("before,after,message", [
    ("normalize_loss_by_num_matches: true", "normalize_loss_by_num_matches: false",
     "model.ssd.normalize_loss_by_num_matches: false is not supported: training here implements true"),
    ("encode_background_as_zeros: true", "", "model.ssd.encode_background_as_zeros: false (the OD API's value"),
    ("ignore_thresholds: false", "ignore_thresholds: true", "argmax_matcher.ignore_thresholds: true is not supported"),
    ("loss {", "loss { hard_example_miner { num_hard_examples: 3000 }",
     "model.ssd.loss.hard_example_miner: not supported: the training loss here has no such part"),
    ("alpha: 0.25 ", "", "weighted_sigmoid_focal.alpha: missing"),
    ("argmax_matcher {", "bipartite_matcher { } argmax_matcher {", "model.ssd.matcher.bipartite_matcher: not supported"),
    ("unmatched_threshold: 0.5", "unmatched_threshold: 0.7",
     "argmax_matcher.unmatched_threshold: 0.7 is above matched_threshold (0.5)"),
    ("activation: RELU_6,\n          regularizer { l2_regularizer { weight: 0.00004 } }",
     "activation: RELU_6,\n          regularizer { l2_regularizer { weight: 0.0004 } }",
     "weight_shared_convolutional_box_predictor.conv_hyperparams.regularizer.l2_regularizer.weight: 0.0004 differs"),
])
def test_loss_fields_other_than_ours_are_refused(before, after, message):
    """Fields that change the OD API's training loss: a value our loss does not implement is an error
    naming the field (the values it does implement: tests/test_detection_loss_parity.py)."""
    assert before in ZOO_STYLE
    with pytest.raises(UserError, match=re.escape(message)):
        translate(TextProto(ZOO_STYLE.replace(before, after, 1)), check_paths=False)


def test_loss_fields_read():
    params = translate(TextProto(ZOO_STYLE.replace("unmatched_threshold: 0.5", "unmatched_threshold: 0.4")
                                 .replace("normalize_loc_loss_by_codesize: true", "")
                                 .replace("weighted_smooth_l1 { }", "weighted_smooth_l1 { delta: 0.25 }")),
                       check_paths=False).params
    assert (params.match_threshold, params.unmatched_threshold) == (0.5, 0.4)
    assert params.normalize_loc_loss_by_codesize is False  # the OD API's default when absent
    assert params.smooth_l1_delta == 0.25
