"""Annotator exports to trained, served detection and segmentation models.

Importing this package sets the environment TensorFlow, Keras 2 and segmentation_models read at
import time, so that no user has to: Keras 2 (`tf-keras`) instead of Keras 3, and the `tf.keras`
framework for segmentation_models. It must run before anything imports TensorFlow, which is why
it lives here and every entry point goes through this package.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
# TensorFlow's C++ INFO lines (CUDA probing, oneDNN notices) drown the stage's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
