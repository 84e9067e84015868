"""The segmenter's settings: the one interface between the user's pipeline.config (translated in
pipelines/segmentation/config.py) and the segmentation stages (pipelines/segmentation/).

The model predicts K + 1 classes per pixel: 0 is background and 1..K are the label map's ids.
Pixels labelled 255 in the masks (crowd regions, padding) are ignored by the loss and the
metrics. Every field below says which pipeline.config field it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ARCHITECTURES = ("unet", "fpn", "linknet", "pspnet")


@dataclass
class SegmenterParams:
    num_classes: int  # label-map classes K (segmentation.num_classes); the model outputs K + 1
    architecture: str = "unet"  # segmentation.architecture: unet | fpn | linknet | pspnet
    backbone: str = "efficientnetb0"  # segmentation.backbone: any segmentation_models backbone
    image_height: int = 320  # image_resizer.fixed_shape_resizer.height (multiple of 32; 48 for pspnet)
    image_width: int = 320  # image_resizer.fixed_shape_resizer.width
    # segmentation.encoder_weights: None (random init), "imagenet" (from the Keras cache,
    # ~/.keras/models/), or a path to a Keras .h5 weights file of the backbone without its top.
    encoder_weights: str | None = None
    encoder_freeze: bool = False  # segmentation.encoder_freeze
    decoder_filters: list[int] = field(default_factory=list)  # unet/linknet: empty = the library's default
    pyramid_filters: int = 256  # fpn: segmentation.pyramid_filters
    psp_filters: int = 512  # pspnet: segmentation.psp_filters
    dropout: float = 0.0  # fpn/pspnet: segmentation.dropout
    # segmentation.batch_norm_decay: the moving-average decay (Keras' momentum) of every batch-norm layer,
    # encoder and decoder; the moving mean and variance are what evaluation and serving use.
    batch_norm_decay: float = 0.99

    # segmentation.loss { dice { weight } categorical_focal { weight alpha gamma } categorical_crossentropy { weight } }
    dice_weight: float = 1.0
    focal_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cross_entropy_weight: float = 0.0

    # train_config
    batch_size: int = 8
    num_steps: int = 2000
    optimizer: str = "adam"  # optimizer { adam_optimizer | momentum_optimizer }
    learning_rate: float = 1e-3  # learning_rate { cosine_decay_learning_rate.learning_rate_base | constant_learning_rate.learning_rate }
    schedule: str = "cosine"  # "cosine" (cosine decay to 0 at num_steps, after warmup) or "constant"
    warmup_learning_rate: float = 1e-4
    warmup_steps: int = 0
    momentum: float = 0.9  # momentum_optimizer.momentum_optimizer_value
    random_horizontal_flip: bool = True  # data_augmentation_options { random_horizontal_flip {} }
    random_vertical_flip: bool = False  # data_augmentation_options { random_vertical_flip {} }
    # data_augmentation_options { random_image_scale { min_scale_ratio max_scale_ratio } }: the image and
    # its mask are scaled by one random factor, then cropped (or padded, mask with 255) to the input size.
    aug_scale_min: float = 1.0
    aug_scale_max: float = 1.0
    # Not a pipeline.config field: the run's seed (workspace/RUN/run.json; `make config/train SEED=N`):
    # initialisation, data order and augmentation.
    seed: int = 0

    # train_input_reader / eval_input_reader
    train_files: list[str] = field(default_factory=list)  # TFRecord paths or globs
    eval_files: list[str] = field(default_factory=list)
    eval_batch_size: int = 8
    label_map_path: str | None = None

    @property
    def output_classes(self) -> int:
        """Channels of the model's output: background + the label map's classes."""
        return self.num_classes + 1

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_height, self.image_width
