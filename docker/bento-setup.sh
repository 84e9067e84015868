#!/bin/sh
# Run by `bentoml containerize` while it builds the serving image (as root, before the Bento is
# copied in; see pipelines/serving/bento.py). In that image BENTOML_HOME is /home/bentoml and the
# Bento, with the models it carries, is $BENTO_PATH (/home/bentoml/bento): link the Bento's models/
# as the model store, so that PIPELINES_MODEL=<tag> finds the model the Bento carries.
set -eu
home="${BENTOML_HOME:-/home/bentoml}"
mkdir -p "$home"
ln -sfn "${BENTO_PATH:-/home/bentoml/bento}/models" "${home%/}/models"
