"""Background families: texture crops when GIMP's patterns are installed, else procedural.

A family is what the spurious feature means in these datasets ("water", "land", "sky"):
a classifier that takes a shortcut learns the family, not the particular image. Each family
therefore has several members (textures or pattern variants) and every image gets a random
crop, scale, flip and brightness, so that only the family is predictive.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from workers.engine.data.assets import read_gimp_pattern

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Family:
    """One background family: GIMP textures to use when installed, and a procedural stand-in.

    ``pattern`` is one of :data:`PATTERNS`; ``low``/``high`` span its palette.
    """

    name: str
    textures: tuple[str, ...]
    pattern: str
    low: RGB
    high: RGB


PATTERNS = ("waves", "blobs", "checker", "stripes", "grain", "dots")


def textures_available(families: tuple[Family, ...]) -> bool:
    """True when every family has at least one installed texture (all-or-nothing per dataset)."""
    return all(any(read_gimp_pattern(t) is not None for t in f.textures) for f in families)


def draw(family: Family, n: int, side: int, rng: np.random.Generator,
         use_textures: bool) -> np.ndarray:
    """``n`` backgrounds of one family as uint8 [n, side, side, 3]."""
    if n == 0:
        return np.zeros((0, side, side, 3), np.uint8)
    if use_textures:
        return _texture_crops(family, n, side, rng)
    return _procedural(family, n, side, rng)


# ---------------------------------------------------------------------------------------
# Texture crops


@functools.cache
def _scaled_texture(name: str, min_side: int) -> np.ndarray | None:
    tex = read_gimp_pattern(name)
    if tex is None:
        return None
    h, w = tex.shape[:2]
    scale = min_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(tex).resize(size, Image.Resampling.BICUBIC))


def _texture_crops(family: Family, n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    names = [t for t in family.textures if read_gimp_pattern(t) is not None]
    # The image shows between 60% and 100% of a texture's shorter side (textures are seamless,
    # so a crop may wrap around).
    scales = (side, round(side * 1.3), round(side * 1.7))
    which = rng.integers(0, len(names), n)
    scale = rng.integers(0, len(scales), n)
    flip = rng.random(n) < 0.5
    gain = rng.uniform(0.8, 1.2, n).astype(np.float32)
    out = np.empty((n, side, side, 3), np.uint8)
    ar = np.arange(side)
    for i in range(n):
        tex = _scaled_texture(names[which[i]], scales[scale[i]])
        assert tex is not None
        h, w = tex.shape[:2]
        rows = (int(rng.integers(0, h)) + ar) % h
        cols = (int(rng.integers(0, w)) + ar) % w
        crop = tex[rows[:, None], cols[None, :]]
        if flip[i]:
            crop = crop[:, ::-1]
        out[i] = np.clip(crop.astype(np.float32) * gain[i], 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------
# Procedural patterns, vectorised over the batch


def _smooth_noise(n: int, side: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Band-limited noise in [0, 1]: a coarse Gaussian grid upsampled bicubically."""
    coarse = torch.from_numpy(rng.standard_normal((n, 1, cells, cells)).astype(np.float32))
    fine = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)[:, 0]
    lo = fine.amin(dim=(1, 2), keepdim=True)
    hi = fine.amax(dim=(1, 2), keepdim=True)
    return ((fine - lo) / (hi - lo + 1e-6)).numpy()


def _procedural(family: Family, n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, side, endpoint=False, dtype=np.float32),
                         np.linspace(0, 1, side, endpoint=False, dtype=np.float32), indexing="ij")
    X, Y = xx[None], yy[None]

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)

    p = family.pattern
    if p == "waves":
        ang, f1, f2 = u(-0.5, 0.5), u(3.0, 7.0), u(9.0, 15.0)
        along = Y * np.cos(ang) + X * np.sin(ang)
        wobble = 0.04 * np.sin(2 * np.pi * (u(1, 3) * X + u(0, 1)))
        v = (0.5 + 0.3 * np.sin(2 * np.pi * (f1 * (along + wobble) + u(0, 1)))
             + 0.15 * np.sin(2 * np.pi * (f2 * along + u(0, 1))))
    elif p == "blobs":
        v = 0.75 * _smooth_noise(n, side, int(rng.integers(4, 7)), rng)
        v = v + 0.25 * rng.random((n, side, side), dtype=np.float32)
    elif p == "checker":
        k = u(3.0, 6.0)
        cell = (np.floor(X * k + u(0, 1)) + np.floor(Y * k + u(0, 1))) % 2
        v = 0.2 + 0.6 * cell + 0.15 * rng.random((n, side, side), dtype=np.float32)
    elif p == "stripes":
        f = u(4.0, 8.0)
        s = np.sin(2 * np.pi * (f * (X + Y * u(0.7, 1.3)) + u(0, 1)))
        v = 0.5 + 0.4 * np.tanh(3 * s)
    elif p == "grain":
        v = 0.3 * _smooth_noise(n, side, side // 2, rng) + 0.7 * rng.random(
            (n, side, side), dtype=np.float32)
    elif p == "dots":
        k = u(3.0, 5.0)
        fx, fy = (X * k + u(0, 1)) % 1 - 0.5, (Y * k + u(0, 1)) % 1 - 0.5
        v = np.where(fx**2 + fy**2 < u(0.06, 0.12), 0.9, 0.2).astype(np.float32)
        v = v + 0.1 * rng.random((n, side, side), dtype=np.float32)
    else:
        raise ValueError(f"unknown pattern {p!r}")
    v = np.clip(v, 0.0, 1.0)[..., None]
    low = np.asarray(family.low, np.float32) * rng.uniform(0.8, 1.2, (n, 1, 1, 3))
    high = np.asarray(family.high, np.float32) * rng.uniform(0.8, 1.2, (n, 1, 1, 3))
    img = low + (high - low) * v
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# The families the built-in datasets use

WATER = Family("water", ("water3", "waves", "ice2", "icechex", "clouds", "novaugh"),
               "waves", (20, 60, 130), (120, 190, 230))
LAND = Family("land", ("leaves3", "leaves4", "leaves6", "drymud", "dirt", "pebbles", "clovers"),
              "blobs", (60, 70, 20), (150, 130, 60))

SCENE_FAMILIES = (
    Family("foliage", ("leaves6", "clovers", "green_curtains"), "blobs", (20, 70, 20),
           (110, 180, 80)),
    Family("sky", ("clouds", "bluemars"), "waves", (90, 130, 200), (200, 220, 250)),
    Family("road", ("granite2", "greyweave", "torrents"), "grain", (60, 60, 60),
           (150, 150, 150)),
    Family("sand", ("sandytext", "dunes"), "stripes", (170, 140, 90), (240, 220, 160)),
    Family("soil", ("drymud", "dirt"), "blobs", (70, 45, 25), (160, 110, 60)),
    Family("autumn", ("leaves3", "leaves4"), "dots", (120, 60, 10), (240, 170, 40)),
    Family("wood", ("woodblind", "orangebrown"), "stripes", (90, 50, 20), (190, 120, 60)),
    Family("rock", ("pebbles", "colored_rock", "mhuerock"), "checker", (80, 70, 70),
           (170, 150, 140)),
    Family("water", ("water3", "waves", "ice2", "icechex"), "waves", (10, 50, 110),
           (60, 150, 200)),
)

SHAPE_FAMILIES = (
    Family("waves", (), "waves", (20, 60, 130), (120, 190, 230)),
    Family("blobs", (), "blobs", (40, 90, 30), (140, 170, 70)),
    Family("checker", (), "checker", (80, 60, 90), (170, 150, 180)),
    Family("stripes", (), "stripes", (120, 70, 30), (220, 170, 110)),
)
