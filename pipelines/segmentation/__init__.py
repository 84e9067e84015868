"""Semantic segmentation: segmentation_models U-Net/FPN/Linknet/PSPNet on the data stage's class masks."""
