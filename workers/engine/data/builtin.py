"""The built-in datasets: names, sizes, parameters, and the in-process cache.

Every built-in is generated from ``(name, split, seed, params)`` alone, offline, in about
a second, so a worker never downloads or stores them. The cache keeps uint8 arrays and hands
out fresh float tensors per call, so a caller that edits its tensors cannot corrupt the next
job's data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workers.engine.data import assets, digits, scenes
from workers.engine.data import backgrounds as bgs
from workers.engine.data.scenes import SPLITS, Arrays, SceneSpec
from workers.engine.layout import in_layout
from workers.engine.types import EvalData


def _bird_drawings() -> tuple[tuple[np.ndarray, ...], ...]:
    land = tuple(assets.draw_land_bird(body, accent, kind) for body, accent, kind in (
        ((200, 120, 60), (120, 60, 20), "hen"), ((240, 240, 230), (200, 40, 30), "rooster"),
        ((120, 80, 40), (170, 110, 50), "turkey"), ((140, 100, 60), (230, 170, 40), "owl"),
        ((40, 160, 60), (220, 60, 40), "parrot")))
    water = tuple(assets.draw_water_bird(body, accent, kind) for body, accent, kind in (
        ((245, 245, 245), (240, 140, 20), "swan"), ((120, 90, 60), (230, 180, 30), "duck"),
        ((240, 130, 160), (30, 30, 30), "flamingo"), ((30, 30, 40), (240, 160, 20), "penguin"),
        ((150, 150, 150), (240, 160, 20), "goose")))
    return land, water


_SCENE_SHAPES = ("star", "triangle", "square", "diamond", "circle", "cross", "hexagon", "ring",
                 "crescent")


def _scene_drawings() -> tuple[tuple[np.ndarray, ...], ...]:
    return tuple(tuple(assets.draw_shape(kind, fill, edge) for fill, edge in assets.SHAPE_COLOURS)
                 for kind in _SCENE_SHAPES)


def _shape_drawings() -> tuple[tuple[np.ndarray, ...], ...]:
    return tuple(tuple(assets.draw_shape(kind, fill, edge) for fill, edge in assets.SHAPE_COLOURS)
                 for kind in ("circle", "square", "triangle", "cross"))


_WATERBIRD_EMOJI = (
    ("\U0001F414", "\U0001F413", "\U0001F983", "\U0001F985", "\U0001F989", "\U0001F99C",
     "\U0001F99A", "\U0001F9A4", "\U0001F426"),  # landbirds: hen ... bird
    ("\U0001F986", "\U0001F9A2", "\U0001F9A9", "\U0001F427", "\U0001FABF"),  # duck ... goose
)
_SCENE_EMOJI = (
    ("\U0001F415", "\U0001F429", "\U0001F436"),  # dog
    ("\U0001F426", "\U0001F985", "\U0001F989", "\U0001F99C", "\U0001F413"),  # bird
    ("\U0001F697", "\U0001F68C", "\U0001F6B2", "\U0001F69A", "\U0001F69C", "\U0001F695"),
    ("\U0001F98E", "\U0001F40D", "\U0001F40A", "\U0001F422", "\U0001F996", "\U0001F995"),
    ("\U0001F405", "\U0001F406", "\U0001F98A", "\U0001F408", "\U0001F981"),  # carnivore
    ("\U0001F41D", "\U0001F41E", "\U0001F98B", "\U0001F41C", "\U0001F997", "\U0001FAB2"),
    ("\U0001F3B8", "\U0001F3BB", "\U0001F3BA", "\U0001F3B7", "\U0001F941", "\U0001FA95"),
    ("\U0001F412", "\U0001F98D", "\U0001F9A7", "\U0001F435"),  # primate
    ("\U0001F41F", "\U0001F420", "\U0001F421", "\U0001F988"),  # fish
)
SCENE_CLASSES = ("dog", "bird", "vehicle", "reptile", "carnivore", "insect", "instrument",
                 "primate", "fish")


@dataclass(frozen=True)
class Builtin:
    """What the catalogue promises about a built-in; ``tests`` check it against the data."""

    name: str
    description: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    sizes: Mapping[str, int]
    correlation: float  # default P(spurious attribute matches label) in the train split
    test_correlation: float  # default in val/test: balanced groups
    make: Callable[[int, str, int, float, Mapping[str, Any]], Arrays]
    extra_params: Mapping[str, Any] = field(default_factory=dict)


def _scene(spec: SceneSpec) -> Callable[[int, str, int, float, Mapping[str, Any]], Arrays]:
    def make(n: int, split: str, seed: int, correlation: float,
             params: Mapping[str, Any]) -> Arrays:
        return scenes.generate(spec, n, split, seed, correlation, str(params["assets"]),
                               float(params.get("core_scale", 0.0)),
                               float(params.get("background_scale", 1.0)))

    return make


def _colored_mnist(n: int, split: str, seed: int, correlation: float,
                   params: Mapping[str, Any]) -> Arrays:
    return digits.generate(n, split, seed, correlation, float(params["label_noise"]))


# The Waterbirds-style sets' feature scales (scenes.generate): landbirds tinted magenta,
# waterbirds yellow, colours neither background family uses.
BIRD_TINTS = ((230, 40, 200), (240, 220, 30))
FEATURE_SCALES = {"core_scale": 0.0, "background_scale": 1.0}

_WATERBIRDS_DOC = ("Waterbirds-style: land birds and water birds on land or water backgrounds; "
                   "correlation = P(background matches label) in train, balanced groups in "
                   "val/test; exact masks and clean backgrounds.")

BUILTINS: dict[str, Builtin] = {b.name: b for b in (
    Builtin(
        "shapes-32",
        "Tiny default: four coloured shapes, each with its own procedural background pattern "
        "(correlation in train, balanced own/other in val/test); trains in seconds.",
        ("circle", "square", "triangle", "cross"), (3, 32, 32),
        {"train": 1200, "val": 400, "test": 400}, 0.9, 0.5,
        _scene(SceneSpec(32, ("circle", "square", "triangle", "cross"), bgs.SHAPE_FAMILIES,
                         None, _shape_drawings, (0.45, 0.7))),
        {"assets": "auto"}),
    Builtin(
        "waterbirds-32", _WATERBIRDS_DOC, ("landbird", "waterbird"), (3, 32, 32),
        {"train": 3000, "val": 800, "test": 800}, 0.95, 0.5,
        _scene(SceneSpec(32, ("landbird", "waterbird"), (bgs.LAND, bgs.WATER),
                         _WATERBIRD_EMOJI, _bird_drawings, (0.5, 0.75), BIRD_TINTS)),
        {"assets": "auto", **FEATURE_SCALES}),
    Builtin(
        "waterbirds-64", _WATERBIRDS_DOC, ("landbird", "waterbird"), (3, 64, 64),
        {"train": 3000, "val": 800, "test": 800}, 0.95, 0.5,
        _scene(SceneSpec(64, ("landbird", "waterbird"), (bgs.LAND, bgs.WATER),
                         _WATERBIRD_EMOJI, _bird_drawings, (0.4, 0.7), BIRD_TINTS)),
        {"assets": "auto", **FEATURE_SCALES}),
    Builtin(
        "scenes-9",
        "ImageNet-9-style: nine super-classes, each with its own background family "
        "(correlation in train and, as in ImageNet-9, in val/test too), so that mixed_same and "
        "mixed_rand differ.",
        SCENE_CLASSES, (3, 32, 32), {"train": 2700, "val": 900, "test": 900}, 0.9, 0.9,
        _scene(SceneSpec(32, SCENE_CLASSES, bgs.SCENE_FAMILIES, _SCENE_EMOJI, _scene_drawings,
                         (0.55, 0.8))),
        {"assets": "auto"}),
    Builtin(
        "colored-mnist",
        "Colored-MNIST (Arjovsky et al.): label = digit >= 5 with label noise, digit colour "
        "(red/green) agrees with the label with P = correlation; procedural digits.",
        digits.CLASS_NAMES, (3, 28, 28), {"train": 6000, "val": 2000, "test": 2000}, 0.9, 0.5,
        _colored_mnist, {"label_noise": 0.25}),
)}

DEFAULT_BUILTIN = "shapes-32"


def _check_params(spec: Builtin, params: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {"correlation", "test_correlation", *spec.extra_params}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"{spec.name}: unknown parameter(s) {sorted(unknown)}; "
                         f"supported: {sorted(allowed)}")
    out: dict[str, Any] = {"correlation": spec.correlation,
                           "test_correlation": spec.test_correlation, **spec.extra_params}
    out.update(params)
    for key in ("correlation", "test_correlation", "label_noise", *FEATURE_SCALES):
        if key in out and not 0.0 <= float(out[key]) <= 1.0:
            raise ValueError(f"{spec.name}: {key} must lie in [0, 1], got {out[key]!r}")
        if key in out:
            out[key] = float(out[key])
    if "assets" in out and out["assets"] not in ("auto", "procedural"):
        raise ValueError(f"{spec.name}: assets must be 'auto' or 'procedural'")
    return out


@functools.lru_cache(maxsize=8)
def _arrays(name: str, split: str, seed: int, key: tuple[tuple[str, Any], ...]) -> Arrays:
    spec = BUILTINS[name]
    params = dict(key)
    corr = params["correlation"] if split == "train" else params["test_correlation"]
    return spec.make(spec.sizes[split], split, seed, corr, params)


@dataclass(frozen=True)
class BuiltinSource:
    """Redraws a built-in at another spurious correlation (``spurious_shift``).

    ``train_correlation`` is the correlation the train split was drawn with, i.e. the one a
    model trained on this dataset has seen; ``correlation`` the one of the split at hand;
    ``assets`` says what drew the pictures.
    """

    name: str
    seed: int
    params: tuple[tuple[str, Any], ...]
    train_correlation: float
    num_classes: int
    assets: tuple[tuple[str, str], ...]
    correlation: float | None = None  # the one this split was drawn with

    def with_correlation(self, correlation: float, split: str) -> EvalData:
        key = "correlation" if split == "train" else "test_correlation"
        return load_builtin(self.name, split, self.seed, **{**dict(self.params), key: correlation})


def load_builtin(name: str, split: str = "test", seed: int = 0, **params: Any) -> EvalData:
    """A built-in split as :class:`EvalData` with masks, groups, backgrounds and a source.

    ``correlation`` sets the train split's P(spurious attribute matches label) and
    ``test_correlation`` that of val/test; ``assets="procedural"`` ignores installed art.
    """
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in dataset {name!r}; known: {sorted(BUILTINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; built-ins have {list(SPLITS)}")
    spec = BUILTINS[name]
    resolved = _check_params(spec, params)
    key = tuple(sorted(resolved.items()))
    arr = _arrays(name, split, int(seed), key)
    x = in_layout(torch.from_numpy(arr.images).permute(0, 3, 1, 2).float().div_(255.0))
    bg = in_layout(torch.from_numpy(arr.backgrounds).permute(0, 3, 1, 2).float().div_(255.0))
    corr = resolved["correlation"] if split == "train" else resolved["test_correlation"]
    source = BuiltinSource(name, int(seed), key, float(resolved["correlation"]),
                           len(spec.class_names), arr.assets, float(corr))
    return EvalData(
        x=x, y=torch.from_numpy(arr.labels.copy()), class_names=list(spec.class_names),
        masks=torch.from_numpy(arr.masks).float()[:, None].contiguous(),
        groups=torch.from_numpy(arr.groups.copy()), group_names=list(arr.group_names),
        backgrounds=bg, source=source, name=name,
    )


def builtin_names() -> list[str]:
    return sorted(BUILTINS)
