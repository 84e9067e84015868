"""What every picture the product draws shares: the class colours, the font, region outlines, mask
overlays and palette PNGs, boxes with their labels. The data stage's preview, the evaluation sheets,
predict and the services all draw with these, so a class has one colour everywhere."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180)]
IGNORE_COLOR = (128, 128, 128)  # ignored (crowd) regions


def class_color(label_id: int) -> tuple[int, int, int]:
    """The colour of label-map id `label_id` (1..K)."""
    return PALETTE[(label_id - 1) % len(PALETTE)]


def font():
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def edges(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another value: the outlines of the regions."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= edge[:, :-1].copy()
    edge[1:, :] |= edge[:-1, :].copy()
    return edge


def overlay(image: np.ndarray, mask: np.ndarray, ignore_label: int | None = None, alpha: float = 0.5) -> np.ndarray:
    """The image with each class's pixels tinted in its colour and its outlines drawn solid;
    background (0) is left as it is, `ignore_label` pixels are tinted grey."""
    out = image.astype(np.float32)
    outline = edges(mask)
    for value in np.unique(mask):
        if value == 0:
            continue
        color = np.float32(IGNORE_COLOR if value == ignore_label else class_color(int(value)))
        region = mask == value
        out[region] = out[region] * (1 - alpha) + color * alpha
        out[region & outline] = color
    return out.astype(np.uint8)


WRONG_COLOR = (255, 255, 255)  # stripes and outline over wrongly predicted pixels


def mark_wrong(image: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """`image` with the pixels of `wrong` (bool, same height and width) striped and outlined in WRONG_COLOR,
    so that a region predicted as another class stands out whatever colours the classes have."""
    out = image.copy()
    rows, cols = np.indices(wrong.shape)
    stripes = wrong & (((rows + cols) // 3) % 3 == 0)
    out[stripes] = WRONG_COLOR
    out[wrong & edges(wrong.astype(np.uint8))] = WRONG_COLOR
    return out


def mask_palette() -> list[int]:
    """The PNG palette: index 0 (background) black, index i the colour of class i."""
    colors = [(0, 0, 0)] + [class_color(i) for i in range(1, 256)]
    return [channel for color in colors for channel in color]


def mask_image(mask: np.ndarray) -> Image.Image:
    """A class-id mask as a palette PNG whose pixel values are the class ids (16-bit grayscale in the
    unlikely case of more than 255 classes, which a palette cannot index)."""
    if mask.max(initial=0) > 255:
        return Image.fromarray(mask.astype(np.uint16))
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(mask_palette())
    return image


def draw_detections(image: np.ndarray, detections: list[dict]) -> Image.Image:
    """The image with each detection ({"box": {xmin, ymin, xmax, ymax}, "class_id", "label", "score"})
    outlined in its class colour and labelled with its name and score (a box without "score": its name)."""
    out = Image.fromarray(image)
    pen = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 250))
    for d in detections:
        b = d["box"]
        color = class_color(d["class_id"])
        pen.rectangle([b["xmin"], b["ymin"], b["xmax"], b["ymax"]], outline=color, width=width)
        text = f"{d['label']} {d['score']:.2f}" if "score" in d else d["label"]
        at = (b["xmin"], max(0, b["ymin"] - 15))
        box = pen.textbbox(at, text, font=font())
        pen.rectangle(box, fill=color)
        pen.text(at, text, fill=(0, 0, 0), font=font())
    return out
