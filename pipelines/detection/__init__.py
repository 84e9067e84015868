"""Detection: SSD MobileNet V2 FPNLite built, trained and exported with Model Garden."""

from pipelines.detection.params import DetectorParams
from pipelines.tasks import Task, register

# Host memory figures: bench/RESULTS.md, "Training memory" (the templates' networks on a CPU).
TASK = register(Task(
    name="detection", package=__name__, params=DetectorParams, config_block="ssd", metric="AP",
    init_fields=("fine_tune_checkpoint", "fine_tune_checkpoint_type"), path_fields=("fine_tune_checkpoint",),
    train_memory=(1.2e9, 1600.0), predict_options=("score_threshold",),
    draft_options=("score_threshold", "max_detections")))
