"""What a person sees in the terminal (issue 27): TensorFlow started quietly, each note said once, and
one name per setting between `make` and `python -m pipelines`."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

from pipelines.common import gpu_device_files


def start_in_child(**env) -> str:
    """stderr of a fresh process that starts TensorFlow the way every stage does."""
    import os

    code = "import pipelines; from pipelines.common import start_tensorflow; start_tensorflow(); print('started')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0 and proc.stdout.strip() == "started", proc.stderr
    return proc.stderr


NO_GPU = pytest.mark.skipif(bool(gpu_device_files()), reason="this machine has a GPU device: CUDA lines are news")


@NO_GPU
def test_no_cuda_complaints_without_a_gpu_but_other_lines_pass():
    """TensorFlow's CUDA build complains on every start where there is no driver; those lines go, the rest of what
    it prints stays (its INFO lines, shown when TF_CPP_MIN_LOG_LEVEL=0 asks for them)."""
    chatty = start_in_child(TF_CPP_MIN_LOG_LEVEL="0")
    assert "cuInit" not in chatty and "cuda drivers" not in chatty, chatty
    assert re.search(r"^\d{4}-\d\d-\d\d [\d:.]+: I ", chatty, re.M), chatty  # TensorFlow's own INFO lines pass
    assert start_in_child() == ""  # at the stages' level (warnings and errors): nothing at all here


@NO_GPU
def test_a_stage_without_a_gpu_prints_only_its_own_words(tmp_path):
    """A stage that starts TensorFlow and then stops on a user error: the error line, nothing else."""
    proc = run_cli("report", "--run", "nothing-here", workspace=tmp_path / "ws")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'ws' / 'nothing-here'}: no run here: `make config DATASET=... RUN=nothing-here` starts one"]


MAKEFILE = (REPO / "Makefile").read_text()


def test_make_variables_and_cli_options_have_one_name():
    """Every make variable that reaches `python -m pipelines` does so as the option of its own name (BATCH ->
    --batch, ONLY_UNLABELLED -> --only-unlabelled), and every stage the Makefile runs is in --help."""
    commands = [line for line in MAKEFILE.replace("\\\n", " ").splitlines() if "$(PY) -m pipelines " in line]
    ours = "\n".join(commands)  # other tools' options (bentoml containerize --backend) keep their own names
    passed = re.findall(r"--([a-z-]+) \$\(call q,\$\((\w+)\)\)", ours)
    passed += [(opt, var) for var, opt in re.findall(r"\$\(filter 1,\$\((\w+)\)\),--([a-z-]+)\)", ours)]
    assert len(passed) > 25
    odd = [(opt, var) for opt, var in passed if opt != var.lower().replace("_", "-") and var != "RUN_OR_DATASET"]
    assert not odd, odd
    stages = set(re.findall(r"\$\(PY\) -m pipelines (\w+)", MAKEFILE))
    assert {"train", "serve", "bento", "predict", "prelabel"} <= stages
    proc = subprocess.run([sys.executable, "-m", "pipelines", "--help"], cwd=REPO, capture_output=True, text=True)
    listed = set(re.findall(r"^    (\w+) ", proc.stdout, re.M))
    assert stages <= listed, stages - listed


def test_make_help_names_every_target_with_its_true_default():
    proc = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True)
    shown = proc.stdout
    phony = re.search(r"^\.PHONY: ((?:.*\\\n)*.*)$", MAKEFILE, re.M).group(1).replace("\\\n", " ").split()
    missing = [t for t in phony if t not in ("help", "browser") and f"make {t}" not in shown
               and not (t.startswith("bench-") and t in shown)]
    assert not missing, missing
    defaults = dict(re.findall(r"^(\w+)\s*\?=[ \t]*(\S+)[ \t]*$", MAKEFILE, re.M))
    for var, value in re.findall(r"\[(\w+)=([^\]|]+)\]", shown):
        if var in defaults and var not in ("MODEL",):
            assert value == defaults[var], (var, value, defaults[var])
    assert "SCORE=0.5" not in shown


def test_old_option_spellings_still_work():
    from pipelines.cli import build_parser

    parse = build_parser().parse_args
    old = parse(["config", "--dataset", "d", "--batch-size", "8", "--num-steps", "9", "--learning-rate", "0.1",
                 "--image-size", "256"])
    new = parse(["config", "--dataset", "d", "--batch", "8", "--steps", "9", "--lr", "0.1", "--size", "256"])
    assert vars(old) == vars(new) and new.batch_size == 8 and new.image_size == (256, 256)
    assert parse(["prelabel", "--run", "r", "--dataset", "d", "--all-images"]).all_images
    assert parse(["prelabel", "--run", "r", "--dataset", "d", "--only-unlabelled", "0"]).only_unlabelled == 0
    assert parse(["predict", "--model", "m", "--score", "0.3", "x.jpg"]).score_threshold == 0.3
