"""Objects pasted on backgrounds, with a controlled object-background correlation.

This is the common recipe behind the Waterbirds-style, ImageNet-9-style and shapes sets:
class ``k`` has its own background family ``k``; in a split drawn with correlation ``c``
exactly ``round(c * n_k)`` images of each class sit on their own family and the rest on a
uniformly chosen other family. Which images match is decided by a permutation that does
not depend on ``c``, so redrawing a split at another correlation keeps every object, its
pose and its place and only swaps backgrounds: the shift is the only thing that changes.

The composite uses a binary mask, so the mask is exact and every pixel outside it equals the
stored clean background.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from workers.engine.data import backgrounds as bgs
from workers.engine.data.assets import Sprite, fit_sprite, render_emoji

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Arrays:
    """A generated split, uint8/int64 numpy arrays; the cache holds these, not tensors."""

    images: np.ndarray  # [N, H, W, C] uint8
    labels: np.ndarray  # [N] int64
    masks: np.ndarray  # [N, H, W] uint8, 1 = object
    backgrounds: np.ndarray  # [N, H, W, C] uint8
    groups: np.ndarray  # [N] int64
    group_names: tuple[str, ...]
    assets: tuple[tuple[str, str], ...]  # what drew the objects and the backgrounds


@dataclass(frozen=True)
class SceneSpec:
    side: int
    class_names: tuple[str, ...]
    families: tuple[bgs.Family, ...]  # families[k] is class k's own background
    emoji: tuple[tuple[str, ...], ...] | None  # per class; None = always procedural
    drawings: Callable[[], tuple[tuple[np.ndarray, ...], ...]]  # per class RGBA fallbacks
    object_frac: tuple[float, float] = (0.5, 0.8)  # longer side of the object / image side
    tints: tuple[tuple[int, int, int], ...] | None = None  # per class, for ``core_scale``


def split_seed(seed: int, split: str, stream: int) -> np.random.Generator:
    """Independent streams per (seed, split, purpose), so splits never share draws."""
    return np.random.default_rng([seed, SPLITS.index(split), stream])


def balanced_labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def matching(labels: np.ndarray, correlation: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``round(correlation * n_k)`` True per class, nested as correlation grows."""
    match = np.zeros(labels.shape[0], bool)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        order = rng.permutation(idx.shape[0])
        match[idx[order[:round(correlation * idx.shape[0])]]] = True
    return match


def group_structure(labels: np.ndarray, places: np.ndarray, match: np.ndarray,
                    class_names: tuple[str, ...],
                    place_names: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Groups are label x place for two classes (Waterbirds' four groups) and
    label x {own, other} place beyond that, which keeps groups large enough to measure."""
    k = len(class_names)
    if k == 2:
        names = tuple(f"{c} on {p}" for c in class_names for p in place_names)
        return (labels * 2 + places).astype(np.int64), names
    names = tuple(n for i, c in enumerate(class_names)
                  for n in (f"{c} on {place_names[i]}", f"{c} on other"))
    return (labels * 2 + (~match)).astype(np.int64), names


def generate(spec: SceneSpec, n: int, split: str, seed: int, correlation: float,
             assets: str, core_scale: float = 0.0, background_scale: float = 1.0) -> Arrays:
    """A split of ``n`` images. The two scales set how strong each feature is, the knobs of the
    linear theory (docs/METRICS.md): ``core_scale`` in [0, 1] blends every object's pixels
    towards its class's tint (0 = the drawings as they are, a shape-only core feature; higher
    = a core feature a small network learns in a few epochs), ``background_scale`` in [0, 1]
    scales each background's contrast around mid-grey (1 = as drawn; 0 = every background the
    same grey, no spurious feature at all)."""
    k = len(spec.class_names)
    side = spec.side
    layout = split_seed(seed, split, 0)
    labels = balanced_labels(n, k, layout)
    match = matching(labels, correlation, split_seed(seed, split, 1))
    offset = split_seed(seed, split, 2).integers(1, k, n)
    places = np.where(match, labels, (labels + offset) % k)

    use_emoji = assets == "auto" and spec.emoji is not None and all(
        render_emoji(c) is not None for cls in spec.emoji for c in cls)
    exemplars: tuple[tuple[np.ndarray, ...], ...]
    if use_emoji:
        assert spec.emoji is not None
        exemplars = tuple(tuple(_not_none(render_emoji(c)) for c in cls) for cls in spec.emoji)
    else:
        exemplars = spec.drawings()
    use_textures = assets == "auto" and bgs.textures_available(spec.families)

    # Object pose: exemplar, size (three levels, so sprites are fitted once), flip, position.
    lo, hi = spec.object_frac
    sizes = tuple(max(4, round(side * f)) for f in np.linspace(lo, hi, 3))
    which = np.array([layout.integers(0, len(exemplars[y])) for y in labels])
    size_ix = layout.integers(0, len(sizes), n)
    flip = layout.random(n) < 0.5
    pos = layout.random((n, 2))

    bg_rng = split_seed(seed, split, 3)
    background = np.empty((n, side, side, 3), np.uint8)
    for f in range(k):
        idx = np.flatnonzero(places == f)
        background[idx] = bgs.draw(spec.families[f], idx.size, side, bg_rng, use_textures)
    if background_scale != 1.0:
        background = np.clip(np.rint(127.5 + background_scale * (
            background.astype(np.float32) - 127.5)), 0, 255).astype(np.uint8)
    tints = np.asarray(spec.tints if spec.tints is not None else [(0, 0, 0)] * k, np.float32)

    fitted: dict[tuple[int, int, int, bool], Sprite] = {}
    images = background.copy()
    masks = np.zeros((n, side, side), np.uint8)
    for i in range(n):
        key = (int(labels[i]), int(which[i]), sizes[size_ix[i]], bool(flip[i]))
        if key not in fitted:
            fitted[key] = fit_sprite(exemplars[key[0]][key[1]], key[2], key[3])
        rgb, mask = fitted[key]
        h, w = mask.shape
        top = int(pos[i, 0] * (side - h + 1))
        left = int(pos[i, 1] * (side - w + 1))
        region = images[i, top:top + h, left:left + w]
        pixels = rgb[mask]
        if core_scale:
            pixels = np.rint((1 - core_scale) * pixels.astype(np.float32)
                             + core_scale * tints[labels[i]]).astype(np.uint8)
        region[mask] = pixels
        masks[i, top:top + h, left:left + w] = mask

    groups, group_names = group_structure(labels, places, match, spec.class_names,
                                          tuple(f.name for f in spec.families))
    used = (("objects", "noto-color-emoji" if use_emoji else "procedural"),
            ("backgrounds", "gimp-data-extras" if use_textures else "procedural"))
    return Arrays(images, labels, masks, background, groups, group_names, used)


def _not_none(a: np.ndarray | None) -> np.ndarray:
    assert a is not None
    return a
