"""Hostile and mistaken pipeline.config files: each is one clear error line naming the file, the line
and the field, a non-zero exit, and nothing written. The Object Detection API's own schema is the
reference: protobuf's text_format.Parse on its TrainEvalPipelineConfig (tests/odapi_oracle.py)
refuses the same files."""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import subprocess

import pytest

from conftest import REPO, run_cli
from odapi_oracle import field_schema, text_format_verdicts
from pipelines.workspace import UserError
from pipelines.config import schema
from pipelines.config.rewrite import _LineDiff, unified_diff
from pipelines.config.textproto import MAX_BYTES, TextProto
from pipelines.config.read import translate_any
from pipelines.detection.config import translate

TEMPLATE = (REPO / "configs" / "ssd_mobilenet_v2_fpnlite_320x320.config").read_text()
TEMPLATES = sorted((REPO / "configs").glob("*.config"))

# (name, edit of the detection template, what the error says). Every one is also refused by
# protobuf's own parser with the OD API's schema, except where `odapi` says it accepts it.
SCHEMA_CASES = [
    ("typo", ("num_steps: 50000", "num_step: 50000"),
     "line 146: train_config.num_step: unknown field in train_config (did you mean 'num_steps'?)"),
    ("typo-in-message", ("random_horizontal_flip {", "random_horizontal_flp {"),
     "train_config.data_augmentation_options.random_horizontal_flp: unknown field in "
     "train_config.data_augmentation_options (did you mean 'random_horizontal_flip'?)"),
    ("unknown-top-level", ("train_config {", "train_confg {"),
     "train_confg: unknown field at the top level (did you mean 'train_config'?)"),
    ("duplicate", ("batch_size: 128", "batch_size: 128\n  batch_size: 4"),
     "line 146: train_config.batch_size: given twice (first on line 145); it takes one value"),
    ("enum", ("activation: RELU_6", "activation: RELU6"),
     "activation: RELU6 is not one of NONE, RELU, RELU_6, SWISH (did you mean RELU_6?)"),
    ("float-for-int", ("height: 320", "height: 320.5"),
     "fixed_shape_resizer.height: 320.5 must be an integer"),
    ("bad-bool", ("use_depthwise: true", "use_depthwise: yes"), "use_depthwise: yes must be true or false"),
    ("string-for-number", ("momentum_optimizer_value: 0.9", "momentum_optimizer_value: \"0.9\""),
     "momentum_optimizer_value: \"0.9\" must be a float, not a string"),
    ("message-for-value", ("num_steps: 50000", "num_steps { }"), "train_config.num_steps: takes a value (int)"),
    ("value-for-message", ("random_horizontal_flip {\n    }", "random_horizontal_flip: 1"),
     "random_horizontal_flip: is a message"),
]

# Valid for the schema, out of range for training: ours refuses, protobuf's parser cannot know.
RANGE_CASES = [
    (("num_steps: 50000", "num_steps: -1"), "train_config.num_steps: -1 must be at least 1"),
    (("batch_size: 128", "batch_size: 0"), "train_config.batch_size: 0 must be at least 1"),
    (("iou_threshold: 0.6", "iou_threshold: 1.5"), "batch_non_max_suppression.iou_threshold: 1.5 must be in [0, 1]"),
    (("learning_rate_base: 0.08", "learning_rate_base: 0"), "learning_rate_base: 0.0 must be above 0"),
    (("anchor_scale: 4.0", "anchor_scale: nan"), "anchor_scale: nan is not a finite number"),
    (("warmup_steps: 1000", "warmup_steps: 60000"), "warmup_steps: 60000 is more than train_config.num_steps (50000)"),
    (("{\n        depth: 128", "{\n        depth: 0"), "weight_shared_convolutional_box_predictor.depth: 0 must be at least 1"),
]


def _edit(old: str, new: str) -> str:
    assert old in TEMPLATE, old
    return TEMPLATE.replace(old, new, 1)


@pytest.mark.parametrize("name,edit,message", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_schema_errors_name_line_and_field(name, edit, message):
    with pytest.raises(UserError) as info:
        translate_any(TextProto(_edit(*edit), "bad.config"), check_paths=False)
    assert str(info.value).startswith("bad.config: ") and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("edit,message", RANGE_CASES, ids=[c[1].split(":")[0] for c in RANGE_CASES])
def test_out_of_range_values_are_errors(edit, message):
    with pytest.raises(UserError, match=re.escape(message)):
        translate(TextProto(_edit(*edit), "bad.config"), check_paths=False)


def test_protobuf_refuses_what_we_refuse_and_accepts_the_templates(tmp_path):
    """The reference: protobuf's own text-format parser with the OD API's schema, on the same files."""
    files = []
    for name, edit, _ in SCHEMA_CASES:
        files.append(tmp_path / f"{name}.config")
        files[-1].write_text(_edit(*edit))
    detection = [p for p in TEMPLATES if "ssd_" in p.name]
    zoo = REPO.parent / "shared" / "external" / "od_zoo" / "ssd_mobilenet_v2_fpnlite_320x320_coco17_tpu-8" / \
        "pipeline.config"
    detection += [zoo] if zoo.is_file() else []
    verdicts = text_format_verdicts(files + detection)
    for path, verdict in zip(files, verdicts):
        assert verdict is not None, f"protobuf accepts {path.name}, which we refuse"
    for path, verdict in zip(detection, verdicts[len(files):]):
        assert verdict is None, f"protobuf refuses {path}: {verdict}"
        translate_any(TextProto(path.read_text(), str(path)), check_paths=False)  # and so do we not


def test_the_shipped_schema_is_the_odapi_protos():
    """pipelines/config/odapi_fields.json, regenerated from the OD API's protos, is unchanged."""
    assert json.loads(schema.SCHEMA_FILE.read_text()) == field_schema()


def test_every_template_passes_the_schema():
    for path in TEMPLATES:
        schema.check(TextProto(path.read_text(), str(path)))


def _workspace_with_data(tmp_path):
    """A workspace whose dataset 'shapes' has a label map and (empty) shards: enough for make config."""
    ws = tmp_path / "ws"
    data = ws / "shapes" / "data"
    data.mkdir(parents=True)
    (data / "label_map.pbtxt").write_text('item {\n  id: 1\n  name: "a"\n}\n')
    for split in ("train", "val"):
        (data / f"{split}-00000-of-00001.tfrecord").write_bytes(b"")
    return ws


def test_make_config_refuses_a_mistaken_template_and_writes_nothing(tmp_path):
    ws = _workspace_with_data(tmp_path)
    bad = tmp_path / "bad.config"
    bad.write_text(_edit("num_steps: 50000", "num_stepz: 50000"))
    proc = run_cli("config", "--dataset", "shapes", "--model", bad, "--run", "typo", workspace=ws)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "bad.config: line 146: train_config.num_stepz: unknown field" in proc.stderr
    assert not (ws / "typo").exists()
    deep = tmp_path / "deep.config"
    deep.write_text("model { " * 150 + "}" * 150)
    proc = run_cli("config", "--dataset", "shapes", "--model", deep, "--run", "deep", workspace=ws)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "messages nested more than 100 deep" in proc.stderr and "RecursionError" not in proc.stderr
    assert not (ws / "deep").exists()


def test_huge_configs_are_refused_and_large_ones_parse():
    with pytest.raises(UserError, match=r"1\.2 MB: larger than any pipeline.config \(limit 1 MB\)"):
        TextProto(TEMPLATE + "# " + "x" * 1_200_000 + "\n", "huge.config")
    pad = "  data_augmentation_options { random_horizontal_flip { } }\n" * ((MAX_BYTES - len(TEMPLATE)) // 60)
    text = TEMPLATE.replace("train_config {", "train_config {\n" + pad, 1)
    doc = TextProto(text, "large.config")
    assert len(doc.find("train_config.data_augmentation_options")) == text.count("data_augmentation_options {")
    doc.set("train_config.num_steps", 10)
    diff = unified_diff(text, doc.text, "a", "b")
    assert [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")] == \
        ["-  num_steps: 50000", "+  num_steps: 10"]


def test_line_diff_is_a_minimal_edit_script():
    """Myers' diff against difflib's: it rebuilds the new text and changes no more lines."""
    rng = random.Random(1)
    for _ in range(2000):
        a = [rng.choice("abc}") for _ in range(rng.randint(0, 12))]
        b = list(a)
        for _ in range(rng.randint(0, 4)):
            op = rng.random()
            if op < 0.33 and b:
                del b[rng.randrange(len(b))]
            elif op < 0.66:
                b.insert(rng.randint(0, len(b)), rng.choice("abxy}"))
            elif b:
                b[rng.randrange(len(b))] = rng.choice("xyz")
        ops = _LineDiff(None, a, b, autojunk=False).get_opcodes()
        rebuilt = []
        for tag, i1, i2, j1, j2 in ops:
            if tag == "equal":
                assert a[i1:i2] == b[j1:j2]
            rebuilt += a[i1:i2] if tag == "equal" else b[j1:j2]
        assert rebuilt == b
        assert all(o1[2] == o2[1] and o1[4] == o2[3] for o1, o2 in zip(ops, ops[1:]))

        def cost(opcodes):
            return sum(i2 - i1 + j2 - j1 for tag, i1, i2, j1, j2 in opcodes if tag != "equal")

        assert cost(ops) <= cost(difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes())


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_training(tmp_path):
    """The template's batch on a CPU grew to 23 GB; a batch no machine holds is refused at once, with the
    BATCH= that fits, and `make config` says so first."""
    from pipelines.config.base import available_memory, training_memory
    from pipelines.detection.params import DetectorParams

    ws = _workspace_with_data(tmp_path)
    available = available_memory()
    assert available and available > 1e8
    batch = int(2 * available / (1600 * 320 * 320)) + 1  # twice the memory this machine has
    from pipelines import tasks

    assert training_memory(tasks.get("detection"), DetectorParams(num_classes=1, batch_size=batch)) > 2 * available
    proc = run_cli("config", "--dataset", "shapes", "--run", "huge", "--batch-size", batch, workspace=ws)
    assert proc.returncode == 0, proc.stderr
    assert f"training batch {batch} at 320x320 on a CPU takes about" in proc.stdout
    assert "`make train` will refuse it without a GPU" in proc.stdout
    proc = run_cli("train", "--run", "huge", workspace=ws, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"training batch {batch} at 320x320" in line
    assert re.search(r"\(BATCH=\d+ fits\)", line) and "PIPELINES_SKIP_MEMORY_CHECK=1" in line
    assert not (ws / "huge" / "train").exists()


# --- numbers that are not numbers, and make variables that are not shell words --------------------

@pytest.mark.parametrize("args, says", [
    (["config", "--dataset", "x", "--learning-rate", "nan"], "--learning-rate: must be a finite number above 0, got nan"),
    (["config", "--dataset", "x", "--learning-rate", "inf"], "--learning-rate: must be a finite number above 0, got inf"),
    (["config", "--dataset", "x", "--learning-rate", "1e400"], "must be a finite number above 0, got 1e400"),
    (["config", "--dataset", "x", "--learning-rate", "0"], "must be a finite number above 0, got 0"),
    (["config", "--dataset", "x", "--num-steps", "nan"], "--num-steps: must be a whole number at least 1, got nan"),
    (["config", "--dataset", "x", "--batch-size", "inf"], "--batch-size: must be a whole number at least 1, got inf"),
    (["data", "--dataset", "x", "--val-ratio", "nan"], "--val-ratio: must be a finite number at least 0 and below 1"),
    (["predict", "a.jpg", "--model", "m", "--score-threshold", "nan"],
     "--score-threshold: must be a finite number from 0 to 1, got nan"),
    (["prelabel", "--run", "r", "--dataset", "d", "--score-threshold=-inf"], "from 0 to 1, got -inf"),
    (["prelabel", "--run", "r", "--dataset", "d", "--annotator-timeout", "NaN"],
     "--annotator-timeout: must be a finite number above 0, got NaN"),
    (["prelabel", "--run", "r", "--dataset", "d", "--min-area", "-1"], "--min-area: must be a whole number at least 0"),
    (["sample", "--seed", "-1"], "--seed: must be a whole number at least 0, got -1"),
])
def test_numeric_options_refuse_nan_and_inf_by_name(args, says, capsys):
    from pipelines.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(args)
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err.strip().splitlines()[-1]


def test_numeric_options_still_take_numbers():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["config", "--dataset", "x", "--learning-rate", "3e-3", "--num-steps", "800"])
    assert (args.learning_rate, args.num_steps) == (0.003, 800)
    args = build_parser().parse_args(["predict", "a.jpg", "--model", "m", "--score-threshold", "0"])
    assert args.score_threshold == 0.0


def test_make_passes_variables_to_the_cli_as_single_words(tmp_path):
    """`make config FREEZE='(a+)+$'` was a bash syntax error; a backquote in RUN= ran a command. Every make
    variable reaches the CLI as one word, so the CLI's own message comes out (and nothing runs)."""
    ws = _workspace_with_data(tmp_path)
    marker = tmp_path / "ran"
    proc = subprocess.run(["make", "--no-print-directory", "config", "DATASET=shapes", "FREEZE=(a+)+$",
                           f"RUN=`touch {marker}`"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PIPELINES_WORKSPACE": str(ws)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "syntax error" not in proc.stderr
    assert "argument --freeze: invalid choice: '(a+)+$'" in proc.stderr
    assert not marker.exists()
    # make -n: each value one quoted word; the optional flags still come and go with their variables.
    proc = subprocess.run(["make", "--no-print-directory", "-n", "config", "export", "prelabel", "DATASET=my data",
                           "RUN=it's", "LR=nan", "QUANT=none,float16", "FORMAT=all", "SCORE=0.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    text = " ".join(proc.stdout.replace("\\\n", " ").split())
    assert "pipelines config --dataset 'my data' --model 'ssd_mobilenet_v2_fpnlite_320x320' --run 'it'\\''s' " \
           "--lr 'nan'" in text
    assert "pipelines export --run 'it'\\''s' --format 'all' --quant 'none,float16'" in text
    assert "pipelines prelabel --run 'it'\\''s' --dataset 'my data' --only-unlabelled '1' --score '0.5'" in text
    for unset in ("--freeze", "--checkpoint", "--all-images", "--seed", "--annotations"):
        assert unset not in text, unset
