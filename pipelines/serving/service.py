"""The HTTP service of an export: `bentoml serve pipelines.serving.service:Service` (what `make serve` runs).

PIPELINES_MODEL names the model: an export folder (workspace/RUN/export, or its saved_model/) or a
BentoML model tag (`RUN` or `RUN:version`, from the store under $BENTOML_HOME). Its metadata.json
"task" picks the service, its task's `service` part: the detector (/detect, /detect/base64, /render,
/annotate; pipelines/detection/service.py) or the segmenter (/segment, /segment/mask, /render, /annotate;
pipelines/segmentation/service.py). What they share: pipelines/serving/app.py.
"""

from __future__ import annotations

import pipelines  # noqa: F401  (sets the TensorFlow environment before TF is imported)
from pipelines.serving.app import model_task


def service_of_task(name: str | None):
    """The service class of task `name`; for no task or one this version does not know, the first
    registered task's, which refuses the model when its worker starts, with one clear line."""
    from pipelines import tasks

    try:
        task = tasks.get(name or "")
    except ValueError:
        task = tasks.get(tasks.names()[0])
    return task.load("service")


# The service for PIPELINES_MODEL's task.
Service = service_of_task(model_task())
