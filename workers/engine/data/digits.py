"""Colored-MNIST in the recipe of Arjovsky et al. (2019), with procedural digits.

No MNIST ships offline with the Python environment, so the digits are glyphs of Pillow's
built-in font (the same on every machine) under random affine warps and stroke widths. The
recipe: label = digit >= 5, then a fraction ``label_noise`` of labels is flipped, so shape
predicts the label at most ``1 - label_noise``; the digit is drawn in red or green, and the
colour agrees with the (noisy) label in exactly ``correlation`` of each class. With the
default 0.9 > 0.75 colour is the easier, more predictive feature: the textbook shortcut.
The background is black, so the stroke mask is exact.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from workers.engine.data.scenes import Arrays, balanced_labels, matching, split_seed

SIDE = 28
CLASS_NAMES = ("0-4", "5-9")
COLOUR_NAMES = ("red", "green")
_COLOURS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
_CANVAS = 64
_STROKES = (0, 1, 2)


@functools.cache
def glyph_bank() -> torch.Tensor:
    """[10 * len(_STROKES), 1, 64, 64] float glyphs of 0-9, centred."""
    font = ImageFont.load_default(size=44)
    out = []
    for digit in range(10):
        for stroke in _STROKES:
            img = Image.new("L", (_CANVAS, _CANVAS), 0)
            d = ImageDraw.Draw(img)
            box = d.textbbox((0, 0), str(digit), font=font, stroke_width=stroke)
            x = (_CANVAS - (box[2] - box[0])) / 2 - box[0]
            y = (_CANVAS - (box[3] - box[1])) / 2 - box[1]
            d.text((x, y), str(digit), fill=255, font=font, stroke_width=stroke, stroke_fill=255)
            out.append(np.asarray(img, np.float32) / 255.0)
    return torch.from_numpy(np.stack(out))[:, None]


def render_digits(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Randomly warped digit glyphs, float [N, 28, 28] in [0, 1] (0 = background)."""
    n = digits.shape[0]
    bank = glyph_bank()
    src = bank[torch.from_numpy(digits * len(_STROKES) + rng.integers(0, len(_STROKES), n))]
    rot = rng.uniform(-0.3, 0.3, n)
    shear = rng.uniform(-0.25, 0.25, n)
    zoom = rng.uniform(0.95, 1.3, n)
    shift = rng.uniform(-0.1, 0.1, (n, 2))
    c, s = np.cos(rot), np.sin(rot)
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0] = c / zoom
    theta[:, 0, 1] = (c * shear - s) / zoom
    theta[:, 1, 0] = s / zoom
    theta[:, 1, 1] = (s * shear + c) / zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(torch.from_numpy(theta), [n, 1, SIDE, SIDE], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    g = out[:, 0].numpy()
    g[g < 0.1] = 0.0
    return g


def generate(n: int, split: str, seed: int, correlation: float, label_noise: float) -> Arrays:
    layout = split_seed(seed, split, 0)
    digits = balanced_labels(n, 10, layout)
    ink = render_digits(digits, layout)
    labels = (digits >= 5).astype(np.int64)
    flip = np.zeros(n, bool)
    flip[layout.permutation(n)[:round(label_noise * n)]] = True
    labels = np.where(flip, 1 - labels, labels)
    match = matching(labels, correlation, split_seed(seed, split, 1))
    colour = np.where(match, labels, 1 - labels)
    images = np.rint(ink[..., None] * _COLOURS[colour][:, None, None, :] * 255).astype(np.uint8)
    masks = (ink > 0).astype(np.uint8)
    groups = labels * 2 + colour
    names = tuple(f"{c} {col}" for c in CLASS_NAMES for col in COLOUR_NAMES)
    return Arrays(images, labels, masks, np.zeros_like(images), groups.astype(np.int64), names,
                  (("objects", "pillow-default-font"), ("backgrounds", "black")))
