"""Deterministic train/val split that stays put when images are added.

Each image is placed by a hash of (seed, its path relative to the dataset folder), not by its
position in a list: adding or removing other images never moves it to the other split.
"""

from __future__ import annotations

import hashlib


def split_score(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(keys: list[str], val_ratio: float, seed: int) -> dict[str, str]:
    """Map each key to "train" or "val"; with two or more images, neither split is empty."""
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError("val_ratio must be in [0, 1)")
    scores = {key: split_score(key, seed) for key in keys}
    splits = {key: "val" if score < val_ratio else "train" for key, score in scores.items()}
    if val_ratio > 0 and len(keys) >= 2:
        if "val" not in splits.values():
            splits[min(keys, key=scores.__getitem__)] = "val"
        if "train" not in splits.values():
            splits[max(keys, key=scores.__getitem__)] = "train"
    return splits
