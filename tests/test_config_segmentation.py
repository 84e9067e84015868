"""Segmentation pipeline.config: templates, the shared rewrite rules, translation and validation."""

from __future__ import annotations

import os
import re

import pytest

from conftest import REPO, run_cli
from pipelines.workspace import UserError
from pipelines.segmentation import config as seg
from pipelines.config.textproto import TextProto
from pipelines.config.read import translate_any

UNET = REPO / "configs" / "unet_efficientnetb0_320x320.config"
COSINE = "train_config.optimizer.adam_optimizer.learning_rate.cosine_decay_learning_rate"


def params_of(text: str):
    return translate_any(TextProto(text), check_paths=False).params


def test_templates_translate():
    unet = params_of(UNET.read_text())
    assert (unet.architecture, unet.backbone, unet.image_height, unet.image_width) == ("unet", "efficientnetb0", 320, 320)
    assert unet.decoder_filters == [256, 128, 64, 32, 16] and unet.encoder_weights is None and not unet.encoder_freeze
    assert (unet.dice_weight, unet.focal_weight, unet.cross_entropy_weight) == (1.0, 1.0, 0.0)
    assert (unet.focal_alpha, unet.focal_gamma) == (0.25, 2.0)
    assert (unet.optimizer, unet.schedule, unet.learning_rate, unet.warmup_steps) == ("adam", "cosine", 0.001, 500)
    assert unet.random_horizontal_flip and not unet.random_vertical_flip
    assert (unet.aug_scale_min, unet.aug_scale_max) == (0.75, 1.5)
    assert (unet.batch_size, unet.num_steps, unet.eval_batch_size) == (16, 10000, 8)
    fpn = params_of((REPO / "configs" / "fpn_efficientnetb0_320x320.config").read_text())
    assert fpn.architecture == "fpn" and fpn.pyramid_filters == 256 and fpn.decoder_filters == []
    assert params_of((REPO / "configs" / "linknet_efficientnetb0_320x320.config").read_text()).architecture == "linknet"
    psp = params_of((REPO / "configs" / "pspnet_efficientnetb0_384x384.config").read_text())
    assert (psp.architecture, psp.image_height, psp.psp_filters) == ("pspnet", 384, 512)


def test_backbone_list_is_the_librarys():
    import segmentation_models as sm

    assert seg.BACKBONES == sm.Backbones.models_names()


@pytest.fixture(scope="module")
def workspace(sample_dir, tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    run_cli("data", "--dataset", sample_dir, "--task", "segmentation", "--workers", "1", workspace=ws, check=True)
    return ws


def make_config(workspace, *args, check=True):
    return run_cli("config", "--dataset", "shapes", "--model", "unet_efficientnetb0_320x320", *args,
                   workspace=workspace, check=check)


def test_rewrite_rules_are_the_detectors(workspace):
    # OPTIMIZER given: the template's learning rate, scaled with the batch (not the default LR=0.003 from scratch)
    proc = make_config(workspace, "--run", "s1", "--batch-size", "4", "--num-steps", "200", "--optimizer", "adam")
    doc = TextProto((workspace / "s1" / "pipeline.config").read_text())
    data = (workspace / "shapes" / "data").resolve()
    assert doc.get("model.segmentation.num_classes") == 4
    assert doc.get("train_input_reader.tf_record_input_reader.input_path") == str(data / "train-*.tfrecord")
    assert doc.get("eval_input_reader.tf_record_input_reader.input_path") == str(data / "val-*.tfrecord")
    assert doc.get("train_config.batch_size") == 4 and doc.get("train_config.num_steps") == 200
    assert doc.get(f"{COSINE}.total_steps") == 200 and doc.get(f"{COSINE}.warmup_steps") == 10  # 500 of 10000
    assert doc.get(f"{COSINE}.learning_rate_base") == pytest.approx(0.001 / 4)
    assert doc.get(f"{COSINE}.warmup_learning_rate") == pytest.approx(0.0001 / 4)
    assert "-    num_classes: 1\n+    num_classes: 4" in proc.stdout
    template = UNET.read_text().splitlines()
    changed = {line.strip().split(":")[0] for line in set(doc.text.splitlines()) ^ set(template)}
    assert changed == {"num_classes", "batch_size", "num_steps", "learning_rate_base", "total_steps",
                       "warmup_learning_rate", "warmup_steps", "label_map_path", "input_path", "batch_norm_decay"}
    # 200 steps: the batch-norm averages span 200 / 8 = 25 steps (decay 0.96), as the detector's rule.
    assert doc.get("model.segmentation.batch_norm_decay") == pytest.approx(0.96)
    assert "note: batch_norm_decay 0.99 -> 0.96: its moving averages span ~100 steps" in proc.stdout
    params = translate_any(TextProto(doc.text)).params  # valid, paths exist
    assert params.num_classes == 4 and params.learning_rate == pytest.approx(0.00025)
    assert params.batch_norm_decay == pytest.approx(0.96)


def test_batch_norm_decay_kept_for_long_runs_and_added_when_missing(workspace, tmp_path):
    make_config(workspace, "--run", "long", "--num-steps", "5000")
    doc = TextProto((workspace / "long" / "pipeline.config").read_text())
    assert doc.get("model.segmentation.batch_norm_decay") == pytest.approx(0.99)  # 1 - 8 / 5000 is slower
    bare = tmp_path / "bare.config"
    bare.write_text("\n".join(line for line in UNET.read_text().splitlines() if "batch_norm_decay" not in line))
    make_config(workspace, "--run", "bare", "--model", bare, "--num-steps", "100")
    doc = TextProto((workspace / "bare" / "pipeline.config").read_text())
    assert doc.get("model.segmentation.batch_norm_decay") == pytest.approx(0.92)
    bad = tmp_path / "bad.config"
    bad.write_text(UNET.read_text().replace("batch_norm_decay: 0.99", "batch_norm_decay: 1.5"))
    proc = make_config(workspace, "--run", "bad", "--model", bad, check=False)
    assert proc.returncode == 2 and "batch_norm_decay" in proc.stderr and "between 0 and 1" in proc.stderr


def test_constant_learning_rate_and_momentum(workspace, tmp_path):
    text = UNET.read_text().replace("adam_optimizer {", "momentum_optimizer {\n      momentum_optimizer_value: 0.8") \
        .replace("""cosine_decay_learning_rate {
          learning_rate_base: 0.001
          total_steps: 10000
          warmup_learning_rate: 0.0001
          warmup_steps: 500
        }""", "constant_learning_rate { learning_rate: 0.01 }")
    path = tmp_path / "constant.config"
    path.write_text(text)
    make_config(workspace, "--run", "s2", "--model", path, "--batch-size", "8", "--num-steps", "50")
    p = translate_any(TextProto((workspace / "s2" / "pipeline.config").read_text())).params
    assert (p.optimizer, p.momentum, p.schedule, p.learning_rate, p.num_steps) == ("momentum", 0.8, "constant", 0.005, 50)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace('architecture: "unet"', 'architecture: "deeplab"'),
     "model.segmentation.architecture: 'deeplab' is not supported; supported: unet, fpn, linknet, pspnet"),
    (lambda t: t.replace('backbone: "efficientnetb0"', 'backbone: "efficientnetv2"'),
     "model.segmentation.backbone: 'efficientnetv2' is not supported; supported: resnet18"),
    (lambda t: t.replace("height: 320", "height: 300"),
     "fixed_shape_resizer.height: 300 must be a positive multiple of 32"),
    (lambda t: t.replace('architecture: "unet"', 'architecture: "pspnet"').replace(
        "    decoder_filters: [256, 128, 64, 32, 16]\n", ""),
     "fixed_shape_resizer.height: 320 must be a positive multiple of 48 for pspnet"),
    (lambda t: t.replace("decoder_filters: [256, 128, 64, 32, 16]", "decoder_filters: [256, 128]"),
     "model.segmentation.decoder_filters: must be 5 positive numbers"),
    (lambda t: t.replace("dice {", "lovasz {"),
     "model.segmentation.loss.lovasz: unknown field in model.segmentation.loss; it has: dice, categorical_focal, categorical_crossentropy"),
    (lambda t: t.replace("adam_optimizer {", "rms_prop_optimizer {"),
     "train_config.optimizer.rms_prop_optimizer: not supported; supported: adam_optimizer, momentum_optimizer"),
    (lambda t: t.replace("random_horizontal_flip {", "random_adjust_hue {"),
     "data_augmentation_options.random_adjust_hue: not supported; supported: random_horizontal_flip, "
     "random_vertical_flip, random_image_scale"),
    (lambda t: t.replace("total_steps: 10000", "total_steps: 5000"),
     "total_steps: 5000 must equal train_config.num_steps (10000)"),
    (lambda t: t.replace("  num_steps: 10000", '  num_steps: 10000\n  fine_tune_checkpoint: "x/ckpt-1"'),
     "train_config.fine_tune_checkpoint: not used by segmentation models"),
    (lambda t: t.replace('encoder_weights: "none"', 'encoder_weights: "weights/missing.h5"'),
     "model.segmentation.encoder_weights: no such file: weights/missing.h5"),
])
def test_bad_fields_are_errors_naming_the_field(workspace, tmp_path, edit, message):
    bad = tmp_path / "bad.config"
    bad.write_text(edit(UNET.read_text()))
    proc = make_config(workspace, "--run", "bad", "--model", bad, check=False)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (workspace / "bad").exists()


def test_detection_data_is_refused_for_segmentation(sample_dir, tmp_path):
    ws = tmp_path / "ws"
    run_cli("data", "--dataset", sample_dir, "--workers", "1", workspace=ws, check=True)  # TASK=detection
    proc = run_cli("config", "--dataset", "shapes", "--model", "unet_efficientnetb0_320x320", workspace=ws)
    assert proc.returncode == 2
    assert "were written for detection and have no class masks: run `make data DATASET=... TASK=segmentation`" \
        in proc.stderr


def test_encoder_weights_file_and_imagenet(workspace, tmp_path):
    """CHECKPOINT=file.h5 sets encoder_weights and is checked by loading it into the backbone; 'imagenet'
    without the file in the Keras cache names the file and where it goes."""
    from efficientnet.tfkeras import EfficientNetB0

    weights = tmp_path / "b0_notop.h5"
    EfficientNetB0(include_top=False, weights=None, input_shape=(None, None, 3)).save_weights(str(weights))
    make_config(workspace, "--run", "enc", "--checkpoint", weights)
    doc = TextProto((workspace / "enc" / "pipeline.config").read_text())
    assert doc.get("model.segmentation.encoder_weights") == str(weights)

    other = tmp_path / "other.h5"
    from tf_keras import Input, Model
    from tf_keras.layers import Dense

    inp = Input((3,))
    Model(inp, Dense(2, name="not_in_backbone")(inp)).save_weights(str(other))
    proc = make_config(workspace, "--run", "enc2", "--checkpoint", other, check=False)
    assert proc.returncode == 2 and "no layer of" in proc.stderr and "matches the backbone" in proc.stderr

    env_home = tmp_path / "home"
    env_home.mkdir()
    proc = run_cli("config", "--dataset", "shapes", "--model", "unet_efficientnetb0_320x320", "--run", "enc3",
                   "--checkpoint", "imagenet", workspace=workspace, env={"HOME": str(env_home)})
    assert proc.returncode == 2, proc.stdout
    expected = os.path.join(env_home, ".keras", "models",
                            "efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5")
    assert re.search(r"encoder_weights 'imagenet': \S+ is not in the Keras cache; place it at " + re.escape(expected),
                     proc.stderr), proc.stderr
    assert not (workspace / "enc3").exists()


def test_seg_translation_errors_raise_user_error():
    with pytest.raises(UserError, match="model: expected one of ssd, segmentation; found nothing"):
        translate_any(TextProto("train_config { batch_size: 1 }"), check_paths=False)
