"""A Bento of an export: `python -m pipelines.serving.bento --run NAME | --model TAG` (`make bento`).

The Bento (BentoML's deployable unit, in the bento store under $BENTOML_HOME/bentos) carries:
- the model, as a dependency on its entry in the BentoML model store (`make export` records it there);
- the `pipelines` package (pipelines/**/*.py), whose `pipelines.serving.service:Service` it serves;
- requirements.lock as its Python requirements, taken as they are: no locking step, nothing is
  downloaded while building (the image build installs them later, `bentoml containerize`);
- PIPELINES_MODEL=<model tag> in its environment, so the service finds its model in the container
  (docker/bento-setup.sh links the Bento's models/ as the image's model store, $BENTOML_HOME/models);
- its image's base: BentoML's python:3.11-slim (with Debian's build tools added), unless --base-image
  names another (the bentofile's docker.base_image: `make bento BASE_IMAGE=...`), which must have
  python3.11 and groupadd; docker/base-image.sh makes one from Debian packages (`make base-image`).

`bentoml serve BENTO_TAG` serves it here, `bentoml containerize BENTO_TAG` turns it into an image.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)

from pipelines import tasks
from pipelines.common import eprint
from pipelines.workspace import REPO_ROOT, UserError, display_path
from pipelines.model_store import tag_name

SERVICE = "pipelines.serving.service:Service"
MODEL_ENV = "PIPELINES_MODEL"
REQUIREMENTS = "requirements.lock"
INCLUDE = ["pipelines/**/*.py"]
EXCLUDE = ["**/__pycache__", "*.pyc"]
PYTHON_VERSION = "3.11"
SETUP_SCRIPT = "docker/bento-setup.sh"  # links the Bento's models/ as the image's model store


def bentoml_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("BENTOML_HOME", "~/bentoml")))


def _digest(export_dir: Path) -> str | None:
    pb = export_dir / "saved_model" / "saved_model.pb"
    return hashlib.sha256(pb.read_bytes()).hexdigest() if pb.is_file() else None


def model_of_run(run: str):
    """The model-store entry that `make export RUN=run` recorded: the newest one whose SavedModel is
    the one in workspace/RUN/export (models named after the run are looked at first)."""
    from pipelines.model_store import model_store
    from pipelines.runs import run_dir

    export_dir = run_dir(run) / "export"
    digest = _digest(export_dir)
    if digest is None:
        raise UserError(display_path(export_dir), f"no exported model here: run `make export RUN={run}` first")
    store = model_store()
    preferred = tag_name(Path(run).name, "")
    models = sorted(store.list(), key=lambda m: (m.tag.name != preferred, -m.creation_time.timestamp()))
    for model in models:
        if _digest(Path(model.path)) == digest:
            return model
    raise UserError(display_path(export_dir), "this export is not in the BentoML model store "
                    f"({bentoml_home() / 'models'}): run `make export RUN={run}` again, or give --model TAG "
                    "(`bentoml models list`)")


def model_of_tag(tag: str):
    from pipelines.model_store import model_store

    try:
        return model_store().get(tag)
    except Exception as e:  # noqa: BLE001  (NotFound, a malformed tag)
        raise UserError(tag, f"no such model in the BentoML store ({bentoml_home() / 'models'}): {e} "
                        "(`bentoml models list` shows what is there)") from None


def build(model_tag: str, name: str | None = None, version: str | None = None, build_ctx: Path = REPO_ROOT,
          base_image: str | None = None):
    """Build the Bento serving model `model_tag` (in the store under $BENTOML_HOME); returns the Bento.
    base_image: its image's base instead of BentoML's default (python:3.11-slim)."""
    import bentoml
    from bentoml._internal.bento.build_config import BentoEnvSchema

    model = model_of_tag(model_tag)
    tag = str(model.tag)
    name = tag_name(name or f"{model.tag.name}-service", "pipelines-service")
    if not (Path(build_ctx) / REQUIREMENTS).is_file():
        raise UserError(display_path(Path(build_ctx) / REQUIREMENTS), "missing: the Bento's pinned requirements")
    # The service picks Detector or Segmenter by the model's task when it is imported, and
    # bentoml imports it while building: it must see the model the Bento is for.
    previous = os.environ.get(MODEL_ENV)
    os.environ[MODEL_ENV] = tag
    try:
        return bentoml.bentos.build(
            SERVICE,
            name=name,
            version=version,
            description=(f"Serves the {tasks.name_in(model.info.metadata)} model {tag} with "
                         f"{SERVICE} (annotator-to-model pipeline)."),
            labels={"model": tag, "task": tasks.name_in(model.info.metadata)},
            include=INCLUDE,
            exclude=EXCLUDE,
            envs=[BentoEnvSchema(name=MODEL_ENV, value=tag)],
            python={"requirements_txt": REQUIREMENTS, "lock_packages": False},
            # with a base image of its own, BentoML takes the Python version from this interpreter (3.11)
            docker=({"base_image": base_image} if base_image else {"python_version": PYTHON_VERSION})
            | {"setup_script": SETUP_SCRIPT},
            models=[tag],
            build_ctx=str(build_ctx),
        )
    finally:
        if previous is None:
            os.environ.pop(MODEL_ENV, None)
        else:
            os.environ[MODEL_ENV] = previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.serving.bento",
        description="Build a Bento (model + pipelines package + requirements.lock) of an export, in the bento "
                    "store under $BENTOML_HOME (default ~/bentoml). Nothing is downloaded.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser) -> None:
    """The options of `python -m pipelines bento` (and of this module run as a script)."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="the run whose export to package (workspace/RUN/export, after `make export`)")
    which.add_argument("--model", help="a model-store tag, NAME or NAME:VERSION (`bentoml models list`)")
    parser.add_argument("--name", help="the Bento's name (default: MODEL-service)")
    parser.add_argument("--version", help="the Bento's version (default: a new one)")
    parser.add_argument("--base-image", help="the base of its container image instead of python:3.11-slim: an image "
                        "with python3.11 and groupadd (`make base-image` makes one from Debian packages)")


def run(args) -> int:
    """Build the Bento the parsed options name; prints how to serve it. Returns the exit status."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    try:
        model = model_of_run(args.run) if args.run else model_of_tag(args.model)
        print(f"model {model.tag} ({tasks.name_in(model.info.metadata)}) from {model.path}", flush=True)
        bento = build(str(model.tag), name=args.name, version=args.version,
                      base_image=getattr(args, "base_image", None))
    except UserError as e:
        eprint(f"error: {e}")
        return e.exit_code
    except Exception as e:  # noqa: BLE001  (bentoml's own errors: one line, not a traceback)
        if type(e).__module__.startswith("bentoml"):
            eprint(f"error: building the Bento failed: {e}")
            return 1
        raise
    print(f"built Bento {bento.tag} in {bento.path}")
    print(f"serve it:       PIPELINES_MODEL={model.tag} bentoml serve {bento.tag} --port 3000")
    print(f"make an image:  make containerize BENTO={bento.tag}   (podman or Docker: bentoml containerize)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
