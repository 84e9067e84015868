"""Semantic segmentation: segmentation_models U-Net/FPN/Linknet/PSPNet on the data stage's class masks."""

from pipelines.segmentation.params import SegmenterParams
from pipelines.tasks import Task, register

# Host memory figures: bench/RESULTS.md, "Training memory" (the templates' networks on a CPU).
TASK = register(Task(
    name="segmentation", package=__name__, params=SegmenterParams, config_block="segmentation",
    metric="mean_iou", path_fields=("encoder_weights",), not_paths=("imagenet",), train_memory=(1.2e9, 3700.0),
    class_masks=True, draft_options=("min_area",)))
