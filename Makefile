# The user interface of the pipeline. Targets are thin: all logic lives in `python -m pipelines`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DATASET ?= sample
TASK    ?= detection
MASKS   ?= 0
VAL_RATIO ?= 0.2
SEED    ?=
WORKERS ?=
SHARDS  ?=
IMAGES  ?= 300
ANNOTATIONS ?=
SKIP_INVALID ?= 0
MAX_PIXELS ?=
ALLOW_OUTSIDE_IMAGES ?= 0
MODEL   ?= ssd_mobilenet_v2_fpnlite_320x320
RUN     ?=
BATCH   ?=
STEPS   ?=
CHECKPOINT ?=
CHECKPOINT_TYPE ?=
LR      ?=
SIZE    ?=
FREEZE  ?=
ZOO     ?=
LABEL_MAP ?=
FORMAT  ?=
QUANT   ?=
ONLY_UNLABELLED ?= 1
SCORE   ?=
MAX_DETECTIONS ?=
MIN_AREA ?=
UPLOAD  ?=
SUGGESTED ?=
COUNT   ?= 50
STRATEGY ?= hybrid
SKIP_DRAFTS ?= 0
FILES   ?=
EVAL_EVERY ?=
REPLICAS ?=
LAUNCHER ?=
OUT     ?=
OPTIMIZER ?=

# $(call q,VALUE): VALUE as one single-quoted shell word, whatever it holds (spaces, quotes, $, ;, parentheses).
# Every user variable reaches the shell through it; the $(if $(X),...) tests stay as they were.
q = '$(subst ','\'',$(1))'

.PHONY: help setup browser lock sample data config import train eval predict report export prelabel suggest serve bento containerize test test-recipes bench bench-data bench-train-detection \
        bench-train-segmentation bench-serve bench-export bench-prelabel bench-suggest bench-distribute serve-spectrogram demo clean test-slow \
        train-image podman-setup base-image test-containers ray-setup test-ray

help:
	@echo "make setup                         create .venv and install requirements.lock"
	@echo "make demo [TASK=detection|segmentation]   the whole job on the bundled sample (both tasks by default)"
	@echo "make test                          run the test suite (make test-slow: the slow tier, distribution and OD API trainer)"
	@echo "make test-recipes                  run README.md's and docs/' own-data recipes and check the models find objects"
	@echo "make sample [IMAGES=300]           (re)generate the bundled sample in datasets/sample"
	@echo "make data DATASET=NAME [TASK=detection|segmentation] [MASKS=0|1] [VAL_RATIO=0.2] [SEED=0]"
	@echo "          [ANNOTATIONS=file.json] [SHARDS=N] [WORKERS=N] [SKIP_INVALID=0|1] [MAX_PIXELS=N] [ALLOW_OUTSIDE_IMAGES=0|1]"
	@echo "          [SKIP_DRAFTS=0|1] (1: leave out images that still hold unreviewed model drafts)"
	@echo "make config DATASET=NAME [MODEL=ssd_mobilenet_v2_fpnlite_320x320] [RUN=NAME] [BATCH=N] [STEPS=N]"
	@echo "          [CHECKPOINT=path/ckpt-N] [CHECKPOINT_TYPE=detection|classification|full] [LR=peak] [OPTIMIZER=adam|momentum] [SIZE=N|HxW]"
	@echo "          [FREEZE=backbone|feature_extractor] [SEED=0]   (unset: the template's values, scaled to BATCH)"
	@echo "          segmentation: MODEL=unet_efficientnetb0_320x320 (or fpn_/linknet_..., pspnet_efficientnetb0_384x384),"
	@echo "          CHECKPOINT=backbone_notop.h5|imagenet (encoder weights)"
	@echo "make import ZOO=DIR [RUN=NAME] [LABEL_MAP=file]   an Object Detection API zoo model as a run"
	@echo "make train RUN=NAME [SEED=N] [EVAL_EVERY=N|0] [REPLICAS=N] [WORKERS=N]   train (resumes from the last checkpoint); evaluates on val"
	@echo "          every N steps (default: 5 times a run for a detector, 10 for a segmenter; 0: never) and keeps the best"
	@echo "          REPLICAS: GPUs to use (default all); on a CPU, N logical devices (a check of the multi-GPU path)"
	@echo "          WORKERS: training processes here, one multi-worker cluster (worker 0 writes the run; docs/training.md)"
	@echo "          LAUNCHER=ray: Ray Train starts the WORKERS (default 2; RAY_ADDRESS's cluster or a local one; make ray-setup)"
	@echo "make eval RUN=NAME [CHECKPOINT=path/ckpt-N] [MODEL=workspace/RUN/export/model_int8.tflite|model.onnx]"
	@echo "make export RUN=NAME [CHECKPOINT=path/ckpt-N] [FORMAT=savedmodel|tflite|onnx|all] [QUANT=none,float16,int8]"
	@echo "          device files measured beside the SavedModel"
	@echo "make predict RUN=NAME FILES='a.jpg b.png' [MODEL=workspace/RUN/export/model.tflite] [SCORE=T] [OUT=dir]"
	@echo "          JSON on stdout, drawn images in OUT (default workspace/RUN/predictions); SCORE: the export's threshold"
	@echo "make report RUN=NAME               workspace/RUN/report.html: data, config, curves, metrics, predictions"
	@echo "make prelabel RUN=NAME DATASET=NAME [ONLY_UNLABELLED=1|0] [SCORE=T] [MAX_DETECTIONS=N] [MIN_AREA=16]"
	@echo "          the model drafts labels -> workspace/RUN/prelabel/DATASET-TIME.json for coco-annotator's import;"
	@echo "          SCORE: the export's threshold unless given;"
	@echo "          ANNOTATOR_URL=http://localhost:5000 ANNOTATOR_USER=... ANNOTATOR_PASSWORD=... [ANNOTATOR_DATASET=id|name]"
	@echo "          also uploads it (UPLOAD=file uploads an earlier one); SUGGESTED=file drafts exactly make suggest's images"
	@echo "make suggest RUN=NAME DATASET=NAME [COUNT=50] [STRATEGY=hybrid|uncertainty|diversity|random] [SEED=0]"
	@echo "          the model picks the unlabelled images to label next -> workspace/RUN/suggest/DATASET-TIME.json"
	@echo "make serve RUN=NAME [PORT=3000] [HOST=127.0.0.1] | make serve MODEL=name:version (a BentoML model-store tag)"
	@echo "make serve-spectrogram [PORT=3000]  POST /spectrogram: WAV in, spectrogram PNG out (no model)"
	@echo "make bento RUN=NAME | make bento MODEL=name:version   a Bento (model + code + requirements.lock) in the bento store"
	@echo "          [BASE_IMAGE=image]: its image's base instead of python:3.11-slim (e.g. make base-image's)"
	@echo "make containerize BENTO=name:version [IMAGE=name:tag] [ENGINE=podman|docker]   the Bento's image (bentoml containerize)"
	@echo "make train-image [BASE_IMAGE=image] [TRAIN_IMAGE=annotator-pipelines-train] [ENGINE=podman|docker]"
	@echo "          docker/Dockerfile.train: TensorFlow with its CUDA libraries, the project, make as entrypoint"
	@echo "make podman-setup                  (root, Debian) install podman, runc, mmdebstrap and this project's podman settings"
	@echo "make base-image                    (root) localhost/annotator-pipelines-base:bookworm, Python 3.11 from Debian packages"
	@echo "make test-containers               build, run and test both images with podman (minutes; needs the two above)"
	@echo "make ray-setup                     the optional Ray extra (requirements-ray.lock) for LAUNCHER=ray"
	@echo "make test-ray                      install it and train through Ray Train (tests/test_ray.py; minutes)"
	@echo "make bench                         run the benchmarks in bench/ (bench-data, bench-train-detection,"
	@echo "                                   bench-train-segmentation, bench-serve, bench-export, bench-prelabel;"
	@echo "                                   bench-distribute: one device against 2 replicas and 2 workers;"
	@echo "                                   bench-suggest [DATASET=sample] (or a VOC folder such as BCCD): make suggest against random, simulated)"
	@echo "make lock                          re-resolve pyproject.toml's pins into requirements.lock (needs the registry)"
	@echo "make clean                         remove every run under workspace/ and bench/out (datasets/ is kept)"
	@echo "Every target runs python -m pipelines STAGE; .venv/bin/python -m pipelines STAGE --help lists its options."

$(STAMP): requirements.lock
	@$(call q,$(PYTHON)) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' \
	  || { echo "error: set PYTHON=/path/to/python3.11"; exit 2; }
	test -x $(PY) || $(call q,$(PYTHON)) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check pip==24.3.1
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -m pip check
	touch $@

setup: $(STAMP)

# Re-resolve the direct pins of pyproject.toml into requirements.lock (needs the registry).
lock:
	rm -rf /tmp/pipelines-lock && $(call q,$(PYTHON)) -m venv /tmp/pipelines-lock
	/tmp/pipelines-lock/bin/pip install --quiet pip==24.3.1
	/tmp/pipelines-lock/bin/pip install --quiet ".[test]"
	{ echo "# Exact, fully resolved dependency set for Python 3.11 (Linux). Installed with --no-deps by 'make setup'."; \
	  echo "# Regenerate with 'make lock' after changing the direct pins in pyproject.toml."; \
	  /tmp/pipelines-lock/bin/pip freeze --all --exclude-editable | grep -v -E '^(pip|setuptools|annotator-pipelines)[=@ ]'; } > requirements.lock

sample: $(STAMP)
	$(PY) -m pipelines sample --out datasets/sample --images $(call q,$(IMAGES))

data: $(STAMP)
	$(PY) -m pipelines data --dataset $(call q,$(DATASET)) --task $(call q,$(TASK)) --val-ratio $(call q,$(VAL_RATIO)) \
	  $(if $(SEED),--seed $(call q,$(SEED))) $(if $(filter 1,$(MASKS)),--masks) $(if $(filter 1,$(SKIP_INVALID)),--skip-invalid) \
	  $(if $(ANNOTATIONS),--annotations $(call q,$(ANNOTATIONS))) $(if $(SHARDS),--shards $(call q,$(SHARDS))) \
	  $(if $(WORKERS),--workers $(call q,$(WORKERS))) $(if $(MAX_PIXELS),--max-pixels $(call q,$(MAX_PIXELS))) \
	  $(if $(filter 1,$(ALLOW_OUTSIDE_IMAGES)),--allow-outside-images) $(if $(filter 1,$(SKIP_DRAFTS)),--skip-drafts)

config: $(STAMP)
	$(PY) -m pipelines config --dataset $(call q,$(DATASET)) --model $(call q,$(MODEL)) $(if $(RUN),--run $(call q,$(RUN))) \
	  $(if $(BATCH),--batch $(call q,$(BATCH))) $(if $(STEPS),--steps $(call q,$(STEPS))) \
	  $(if $(CHECKPOINT),--checkpoint $(call q,$(CHECKPOINT))) \
	  $(if $(CHECKPOINT_TYPE),--checkpoint-type $(call q,$(CHECKPOINT_TYPE))) \
	  $(if $(LR),--lr $(call q,$(LR))) $(if $(SIZE),--size $(call q,$(SIZE))) \
	  $(if $(FREEZE),--freeze $(call q,$(FREEZE))) $(if $(OPTIMIZER),--optimizer $(call q,$(OPTIMIZER))) \
	  $(if $(SEED),--seed $(call q,$(SEED)))

import: $(STAMP)
	@test -n $(call q,$(ZOO)) || { echo "error: give ZOO=path/to/extracted_zoo_model_folder"; exit 2; }
	$(PY) -m pipelines import --zoo $(call q,$(ZOO)) $(if $(RUN),--run $(call q,$(RUN))) \
	  $(if $(LABEL_MAP),--label-map $(call q,$(LABEL_MAP)))

RUN_OR_DATASET = $(if $(RUN),$(RUN),$(notdir $(DATASET)))
PORT ?= 3000
# make serve listens on this machine only; HOST=0.0.0.0 exposes it (set PIPELINES_API_TOKEN then).
HOST ?= 127.0.0.1
# make serve, bento, predict: MODEL given on the command line (or in the environment) is a BentoML model tag
# (predict: an export's folder or .tflite/.onnx file); else RUN's export.
SERVED = $(if $(filter command line environment,$(origin MODEL)),--model $(call q,$(MODEL)),--run $(call q,$(RUN_OR_DATASET)))
BENTO   ?=

train: $(STAMP)
	$(PY) -m pipelines train --run $(call q,$(RUN_OR_DATASET)) $(if $(SEED),--seed $(call q,$(SEED))) \
	  $(if $(EVAL_EVERY),--eval-every $(call q,$(EVAL_EVERY))) $(if $(REPLICAS),--replicas $(call q,$(REPLICAS))) \
	  $(if $(WORKERS),--workers $(call q,$(WORKERS))) $(if $(LAUNCHER),--launcher $(call q,$(LAUNCHER)))

eval: $(STAMP)
	$(PY) -m pipelines eval --run $(call q,$(RUN_OR_DATASET)) $(if $(CHECKPOINT),--checkpoint $(call q,$(CHECKPOINT))) \
	  $(if $(filter command line environment,$(origin MODEL)),--model $(call q,$(MODEL)))

predict: $(STAMP)
	@test -n $(call q,$(FILES)) || { echo "error: give FILES='photo1.jpg photo2.png' (and RUN=NAME)"; exit 2; }
	$(PY) -m pipelines predict $(SERVED) $(if $(SCORE),--score $(call q,$(SCORE))) \
	  $(if $(OUT),--out $(call q,$(OUT))) $(foreach f,$(FILES),$(call q,$(f)))

report: $(STAMP)
	$(PY) -m pipelines report --run $(call q,$(RUN_OR_DATASET))

export: $(STAMP)
	$(PY) -m pipelines export --run $(call q,$(RUN_OR_DATASET)) $(if $(CHECKPOINT),--checkpoint $(call q,$(CHECKPOINT))) \
	  $(if $(FORMAT),--format $(call q,$(FORMAT))) $(if $(QUANT),--quant $(call q,$(QUANT)))

prelabel: $(STAMP)
	@test -n $(call q,$(RUN)) || { echo "error: give RUN=NAME (a run with an export) and DATASET=NAME"; exit 2; }
	$(PY) -m pipelines prelabel --run $(call q,$(RUN)) --dataset $(call q,$(DATASET)) \
	  --only-unlabelled $(call q,$(ONLY_UNLABELLED)) $(if $(ANNOTATIONS),--annotations $(call q,$(ANNOTATIONS))) \
	  $(if $(SCORE),--score $(call q,$(SCORE))) $(if $(MAX_DETECTIONS),--max-detections $(call q,$(MAX_DETECTIONS))) \
	  $(if $(MIN_AREA),--min-area $(call q,$(MIN_AREA))) $(if $(SUGGESTED),--suggested $(call q,$(SUGGESTED))) \
	  $(if $(UPLOAD),--upload $(call q,$(UPLOAD)))

suggest: $(STAMP)
	@test -n $(call q,$(RUN)) || { echo "error: give RUN=NAME (a run with an export) and DATASET=NAME"; exit 2; }
	$(PY) -m pipelines suggest --run $(call q,$(RUN)) --dataset $(call q,$(DATASET)) --count $(call q,$(COUNT)) \
	  --strategy $(call q,$(STRATEGY)) $(if $(SEED),--seed $(call q,$(SEED))) \
	  $(if $(ANNOTATIONS),--annotations $(call q,$(ANNOTATIONS)))

serve: $(STAMP)
	$(PY) -m pipelines serve $(SERVED) --host $(call q,$(HOST)) --port $(call q,$(PORT))

serve-spectrogram: $(STAMP)
	$(PY) -m pipelines.serving.serve pipelines.serving.audio:Spectrogram --host $(call q,$(HOST)) --port $(call q,$(PORT))

bento: $(STAMP)
	$(PY) -m pipelines bento $(SERVED) $(if $(BASE_IMAGE),--base-image $(call q,$(BASE_IMAGE)))

# Images (docs/packaging.md, docker/README.md). ENGINE: podman when it is installed, else docker.
# BASE_IMAGE: the base image instead of python:3.11-slim (make bento: the Bento's docker.base_image) or
# python:3.11-slim-bookworm (make train-image), e.g. $(LOCAL_BASE_IMAGE) from make base-image.
ENGINE  ?= $(if $(shell command -v podman 2>/dev/null),podman,docker)
BASE_IMAGE ?=
LOCAL_BASE_IMAGE ?= localhost/annotator-pipelines-base:bookworm
IMAGE   ?=
TRAIN_IMAGE ?= annotator-pipelines-train

containerize: $(STAMP)
	@test -n $(call q,$(BENTO)) || { echo "error: give BENTO=name:version (printed by make bento; bentoml list)"; exit 2; }
	@command -v $(call q,$(ENGINE)) >/dev/null || { echo "error: bentoml containerize needs podman or Docker ($(ENGINE) not found; make podman-setup)"; exit 2; }
	@test -z $(call q,$(BASE_IMAGE)) || { echo "error: the base image is the Bento's: make bento RUN=NAME BASE_IMAGE=... then make containerize"; exit 2; }
	BENTOML_DO_NOT_TRACK=True $(VENV)/bin/bentoml containerize --backend $(call q,$(ENGINE)) \
	  $(if $(IMAGE),--image-tag $(call q,$(IMAGE))) $(call q,$(BENTO))

train-image:
	@command -v $(call q,$(ENGINE)) >/dev/null || { echo "error: building the image needs podman or Docker ($(ENGINE) not found; make podman-setup)"; exit 2; }
	$(call q,$(ENGINE)) build -f docker/Dockerfile.train -t $(call q,$(TRAIN_IMAGE)) \
	  $(if $(filter podman,$(ENGINE)),--ignorefile docker/Dockerfile.train.dockerignore) \
	  $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(call q,$(BASE_IMAGE))) .

# podman on a fresh Debian machine, as root: Debian's podman (4.3 on bookworm) with runc, cgroupfs and no
# default ulimits (docker/containers.conf, installed as a containers.conf.d drop-in), and mmdebstrap.
podman-setup:
	@[ "$$(id -u)" = 0 ] || { echo "error: run as root (apt-get install, /etc/containers)"; exit 2; }
	export DEBIAN_FRONTEND=noninteractive; pkgs="podman runc netavark aardvark-dns iptables uidmap mmdebstrap"; \
	  apt-get install -y -q --no-install-recommends $$pkgs >/dev/null || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$pkgs >/dev/null; }
	install -D -m 0644 docker/containers.conf /etc/containers/containers.conf.d/50-annotator-pipelines.conf
	podman info --format 'podman {{.Version.Version}}: runtime {{.Host.OCIRuntime.Name}}, cgroups {{.Host.CgroupManager}}, storage {{.Store.GraphDriverName}}'

# Python 3.11 from Debian bookworm's packages (mmdebstrap), imported into podman: docker/base-image.sh.
base-image: $(STAMP)
	BASE_IMAGE=$(call q,$(LOCAL_BASE_IMAGE)) PYTHON=$(PY) bash docker/base-image.sh

# The images built and run for real with podman (tests/test_containers.py): minutes; not part of make test.
test-containers: $(STAMP)
	PIPELINES_CONTAINER_TESTS=1 PIPELINES_TEST_BASE_IMAGE=$(call q,$(LOCAL_BASE_IMAGE)) $(PY) -m pytest tests/test_containers.py -v -s

# The optional Ray extra: Ray Train starts the training workers (make train WORKERS=N LAUNCHER=ray).
ray-setup: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-ray.lock
	$(PY) -m pip check

# Training through Ray Train on a local Ray cluster (tests/test_ray.py): minutes; not part of make test.
test-ray: ray-setup
	$(PY) -m pytest tests/test_ray.py -v -s

# make demo: both models; TASK=detection or TASK=segmentation (given on the command line) for one.
demo: $(STAMP)
	$(PY) -m pipelines demo $(if $(filter command line environment,$(origin TASK)),--task $(call q,$(TASK)))

test: $(STAMP) browser
	$(PY) -m pytest tests -m "not slow" --durations=25

# The slow tier (pytest -m slow): distribution strategies against one device, the OD API's own trainer; .ci/run
# runs it after make test.
test-slow: $(STAMP)
	$(PY) -m pytest tests -m slow --durations=10

# The own-data recipes of README.md and docs/, run as written on a copy of the sample (about an hour on 2 cores).
test-recipes: $(STAMP)
	PIPELINES_RECIPES=1 $(PY) -m pytest tests/test_recipes.py -s

# The run report's browser test needs Debian's chromium: installed here where apt-get can (as root);
# elsewhere that one test is skipped with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium (for the report's browser test)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } || \
	      echo "could not install chromium: the report's browser test will be skipped"; \
	  else echo "chromium not found (install Debian's chromium): the report's browser test will be skipped"; fi; }

bench: bench-data bench-train-detection bench-train-segmentation bench-serve bench-export bench-prelabel

bench-data: $(STAMP)
	$(PY) bench/bench_data.py

bench-train-detection: $(STAMP)
	$(PY) bench/bench_train_detection.py

bench-train-segmentation: $(STAMP)
	$(PY) bench/bench_train_segmentation.py

bench-serve: $(STAMP)
	$(PY) bench/bench_serve.py

# TFLite formats against the SavedModel, on the runs make demo leaves (exported with FORMAT=all first).
bench-export: $(STAMP)
	$(PY) bench/bench_export.py --export

# make prelabel's drafts against the sample's labels, on the runs make demo leaves.
bench-prelabel: $(STAMP)
	$(PY) bench/bench_prelabel.py --min-area 16 --min-area 200

# make suggest's strategies against random, by simulation on real labels (rounds of train, suggest, reveal).
bench-suggest: $(STAMP)
	$(PY) bench/bench_suggest.py --dataset $(call q,$(DATASET))

# One device against 2 replicas and 2 workers, both tasks (a generated 40-image sample).
bench-distribute: $(STAMP)
	$(PY) bench/bench_distribute.py

clean:
	rm -rf workspace/*/ bench/out
