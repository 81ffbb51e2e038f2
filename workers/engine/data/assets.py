"""Optional offline art for the built-in datasets, each with a procedural stand-in.

Two Debian packages make the synthetic sets look less synthetic: ``fonts-noto-color-emoji``
(objects whose alpha channel is an exact mask) and ``gimp-data-extras`` (seamless textures).
Neither may be required: a worker without them must still build every dataset with the same
shapes, labels and group structure, so each loader here returns ``None`` when its asset is
missing and the caller falls back to drawings made with Pillow alone. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

EMOJI_FONT_PATHS = (
    Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
    Path("/usr/share/fonts/noto/NotoColorEmoji.ttf"),
    Path("/usr/share/fonts/truetype/noto-color-emoji/NotoColorEmoji.ttf"),
)
GIMP_PATTERN_DIRS = (
    Path("/usr/share/gimp/2.0/patterns"),
    Path("/usr/share/gimp/3.0/patterns"),
)

# NotoColorEmoji is a bitmap font: FreeType only scales it at its native strike.
_EMOJI_STRIKE = 109

Sprite = tuple[np.ndarray, np.ndarray]  # (rgb uint8 [h, w, 3], mask bool [h, w])


def emoji_font_path() -> Path | None:
    for path in EMOJI_FONT_PATHS:
        if path.is_file():
            return path
    return None


def gimp_pattern_dir() -> Path | None:
    for path in GIMP_PATTERN_DIRS:
        if path.is_dir() and any(path.glob("*.pat")):
            return path
    return None


@functools.cache
def _emoji_font(path: Path) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), _EMOJI_STRIKE)


@functools.cache
def render_emoji(codepoint: str) -> np.ndarray | None:
    """One emoji as a tight RGBA array (about 120 px), or None if the font is missing."""
    path = emoji_font_path()
    if path is None:
        return None
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), codepoint, font=_emoji_font(path), embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    return np.asarray(canvas.crop(box)).copy()


@functools.cache
def read_gimp_pattern(name: str) -> np.ndarray | None:
    """A GIMP ``.pat`` texture as RGB uint8 [h, w, 3], or None if it is not installed.

    The format is a 20-byte big-endian header (header size, version, width, height,
    bytes per pixel), the magic ``GPAT`` and a name, then raw pixels.
    """
    root = gimp_pattern_dir()
    if root is None or not (root / f"{name}.pat").is_file():
        return None
    raw = (root / f"{name}.pat").read_bytes()
    header_size, _version, width, height, bpp = struct.unpack(">5I", raw[:20])
    if raw[20:24] != b"GPAT" or bpp not in (1, 2, 3, 4):
        return None
    pixels = np.frombuffer(raw[header_size:header_size + width * height * bpp], np.uint8)
    if pixels.size != width * height * bpp:
        return None
    img = pixels.reshape(height, width, bpp)
    if bpp in (1, 2):  # grey (+ alpha)
        img = np.repeat(img[..., :1], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def fit_sprite(rgba: np.ndarray, size: int, flip: bool) -> Sprite:
    """Scale an RGBA drawing so its longer side is ``size`` px; the mask is alpha >= 50%.

    The caller composites with the binary mask, so the mask is exact by construction: every
    pixel outside it is the untouched background.
    """
    img = Image.fromarray(rgba, "RGBA")
    h, w = rgba.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = img.resize(new, Image.Resampling.LANCZOS)  # Pillow resizes RGBA premultiplied
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img)
    mask = arr[..., 3] >= 128
    if not mask.any():  # a hairline drawing at a tiny size: keep its strongest pixel
        mask = arr[..., 3] == arr[..., 3].max()
    return np.ascontiguousarray(arr[..., :3]), mask


# ---------------------------------------------------------------------------------------
# Procedural objects (Pillow drawings): the fallback when the emoji font is missing.

_CANVAS = 128
RGB = tuple[int, int, int]


def _new_canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGBA", (_CANVAS, _CANVAS), (0, 0, 0, 0))
    return img, ImageDraw.Draw(img)


def _crop(img: Image.Image) -> np.ndarray:
    box = img.getbbox()
    return np.asarray(img.crop(box) if box else img).copy()


def draw_water_bird(body: RGB, accent: RGB, kind: str) -> np.ndarray:
    """A long-necked or upright bird in water colours: swan, duck, flamingo, penguin, goose."""
    img, d = _new_canvas()
    if kind == "penguin":
        d.ellipse((34, 20, 94, 120), fill=body + (255,))
        d.ellipse((46, 40, 82, 114), fill=(240, 240, 240, 255))
        d.ellipse((44, 6, 84, 44), fill=body + (255,))
        d.polygon([(82, 24), (100, 28), (82, 32)], fill=accent + (255,))
        return _crop(img)
    legs = kind == "flamingo"
    top = 30 if legs else 60
    d.ellipse((14, top, 104, top + 44), fill=body + (255,))
    neck = 10 if kind == "duck" else 16
    d.line([(90, top + 20), (98, top - 10), (92, top - 34)], fill=body + (255,), width=neck)
    d.ellipse((80, top - 50, 106, top - 26), fill=body + (255,))
    d.polygon([(104, top - 42), (124, top - 36), (104, top - 32)], fill=accent + (255,))
    if legs:
        d.line([(54, top + 42), (58, 126)], fill=accent + (255,), width=4)
        d.line([(66, top + 42), (72, 126)], fill=accent + (255,), width=4)
    return _crop(img)


def draw_land_bird(body: RGB, accent: RGB, kind: str) -> np.ndarray:
    """A round-bodied bird on legs in land colours: hen, rooster, turkey, owl, parrot, eagle."""
    img, d = _new_canvas()
    if kind == "turkey":
        for k in range(7):
            ang = math.pi * (0.15 + 0.7 * k / 6)
            d.ellipse((64 - 58 * math.cos(ang) - 14, 70 - 58 * math.sin(ang) - 14,
                       64 - 58 * math.cos(ang) + 14, 70 - 58 * math.sin(ang) + 14),
                      fill=accent + (255,))
    elif kind in ("rooster", "hen"):
        d.polygon([(22, 40), (8, 10), (40, 50)], fill=accent + (255,))
    d.ellipse((24, 36, 100, 106), fill=body + (255,))
    if kind == "owl":
        d.ellipse((30, 10, 98, 66), fill=body + (255,))
        for cx in (50, 78):
            d.ellipse((cx - 11, 24, cx + 11, 46), fill=(250, 240, 200, 255))
            d.ellipse((cx - 5, 30, cx + 5, 40), fill=(20, 20, 20, 255))
        d.polygon([(60, 44), (68, 44), (64, 56)], fill=accent + (255,))
    else:
        d.ellipse((70, 14, 104, 48), fill=body + (255,))
        d.polygon([(102, 26), (122, 32), (102, 38)], fill=(230, 170, 40, 255))
        if kind in ("rooster", "hen"):
            d.polygon([(76, 16), (84, 2), (92, 16)], fill=(220, 30, 30, 255))
    d.line([(52, 102), (48, 126)], fill=(200, 150, 40, 255), width=4)
    d.line([(72, 102), (76, 126)], fill=(200, 150, 40, 255), width=4)
    return _crop(img)


def draw_shape(kind: str, fill: RGB, edge: RGB) -> np.ndarray:
    """A filled geometric shape with an outline; the generic procedural object."""
    img, d = _new_canvas()
    c, r = _CANVAS / 2, _CANVAS / 2 - 6

    def ngon(n: int, radius: float, rot: float) -> list[tuple[float, float]]:
        return [(c + radius * math.cos(rot + 2 * math.pi * k / n),
                 c + radius * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]

    f, o = fill + (255,), edge + (255,)
    if kind == "circle":
        d.ellipse((c - r, c - r, c + r, c + r), fill=f, outline=o, width=8)
    elif kind == "square":
        d.rectangle((c - r * 0.85, c - r * 0.85, c + r * 0.85, c + r * 0.85), fill=f, outline=o,
                    width=8)
    elif kind == "triangle":
        d.polygon(ngon(3, r, -math.pi / 2), fill=f, outline=o, width=8)
    elif kind == "diamond":
        d.polygon(ngon(4, r, 0.0), fill=f, outline=o, width=8)
    elif kind == "hexagon":
        d.polygon(ngon(6, r, 0.0), fill=f, outline=o, width=8)
    elif kind == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + math.pi * k / 5
            pts.append((c + rad * math.cos(ang), c + rad * math.sin(ang)))
        d.polygon(pts, fill=f, outline=o, width=6)
    elif kind == "cross":
        t = r * 0.35
        d.rectangle((c - t, c - r, c + t, c + r), fill=f)
        d.rectangle((c - r, c - t, c + r, c + t), fill=f)
    elif kind == "ring":
        d.ellipse((c - r, c - r, c + r, c + r), fill=f)
        d.ellipse((c - r * 0.5, c - r * 0.5, c + r * 0.5, c + r * 0.5), fill=(0, 0, 0, 0))
    elif kind == "crescent":
        d.ellipse((c - r, c - r, c + r, c + r), fill=f)
        d.ellipse((c - r * 0.4, c - r * 1.1, c + r * 1.4, c + r * 0.7), fill=(0, 0, 0, 0))
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return _crop(img)


SHAPE_COLOURS: Sequence[tuple[RGB, RGB]] = (
    ((230, 60, 50), (120, 20, 20)),
    ((250, 210, 40), (140, 100, 0)),
    ((240, 240, 240), (60, 60, 60)),
    ((220, 80, 220), (90, 20, 90)),
)
