"""Checks of a segmentation run that only the model builder can make."""

from __future__ import annotations

from pipelines.common import UserError
from pipelines.segmentation.params import SegmenterParams


def check_engine(params: SegmenterParams, source: str) -> None:
    """Encoder weights that cannot be loaded (missing from the Keras cache, a file of another
    backbone) are a user error naming the config, before any stage starts. Builds the network
    only when there are weights to load."""
    if params.encoder_weights is None:
        return
    from pipelines.segmentation.model import EncoderWeightsError, build_model

    try:
        build_model(params)
    except (EncoderWeightsError, ValueError) as e:
        raise UserError(source, str(e)) from None
