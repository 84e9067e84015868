"""Checks of a segmentation run that only the model builder can make."""

from __future__ import annotations

from pipelines.workspace import UserError
from pipelines.segmentation.params import SegmenterParams


def check_engine(params: SegmenterParams, source: str, restore: bool = False) -> str | None:
    """With `restore` (make config): encoder weights that cannot be loaded (a file of another backbone,
    'imagenet' weights missing from the Keras cache) are a user error naming the config, found by
    building the network with them. Without, nothing to check (the config reader checked that a weights
    file exists; training builds the network first thing)."""
    if params.encoder_weights is None or not restore:
        return None
    from pipelines.segmentation.model import EncoderWeightsError, build_model

    try:
        build_model(params)
    except (EncoderWeightsError, ValueError) as e:
        raise UserError(source, str(e)) from None
    return None
