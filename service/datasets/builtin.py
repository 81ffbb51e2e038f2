"""The built-in datasets as the API lists them, without importing torch or the engine.

The engine generates these sets (``workers/engine/data``); the API process must start without
torch, so this catalogue repeats their shape here as plain data, and
``tests/engine/test_builtin_catalogue.py`` keeps the two in agreement.
"""

from __future__ import annotations

from typing import Any, TypedDict


class BuiltinParameter(TypedDict):
    default: float | str
    description: str


class BuiltinDataset(TypedDict):
    name: str
    builtin: bool
    num_classes: int
    class_names: list[str]
    input_shape: list[int]  # [C, H, W]
    num_examples: dict[str, int]  # per split
    splits: list[str]
    has_masks: bool
    has_groups: bool
    has_backgrounds: bool
    group_names: list[str]
    default_eps: dict[str, float]  # per norm
    parameters: dict[str, BuiltinParameter]
    description: str


_CORRELATION = "P(spurious attribute matches the label) in the train split"
_TEST_CORRELATION = (
    "the same in the val and test splits (0.5 = balanced groups; BG-gap needs it near the "
    "train value)"
)
_ASSETS = (
    "'auto' uses installed Debian art (fonts-noto-color-emoji, gimp-data-extras) when "
    "present, 'procedural' never does"
)
_SPLITS = ["train", "val", "test"]
_EPS_32 = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}


def _own_other(classes: list[str], families: list[str]) -> list[str]:
    return [
        n for c, f in zip(classes, families, strict=True) for n in (f"{c} on {f}", f"{c} on other")
    ]


def _entry(
    name: str,
    classes: list[str],
    shape: list[int],
    sizes: list[int],
    groups: list[str],
    eps: dict[str, float],
    parameters: dict[str, BuiltinParameter],
    description: str,
) -> BuiltinDataset:
    return BuiltinDataset(
        name=name,
        builtin=True,
        num_classes=len(classes),
        class_names=classes,
        input_shape=shape,
        num_examples=dict(zip(_SPLITS, sizes, strict=True)),
        splits=list(_SPLITS),
        has_masks=True,
        has_groups=True,
        has_backgrounds=True,
        group_names=groups,
        default_eps=eps,
        parameters=parameters,
        description=description,
    )


def _scene_params(correlation: float, test: float = 0.5) -> dict[str, BuiltinParameter]:
    return {
        "correlation": {"default": correlation, "description": _CORRELATION},
        "test_correlation": {"default": test, "description": _TEST_CORRELATION},
        "assets": {"default": "auto", "description": _ASSETS},
    }


def _bird_params() -> dict[str, BuiltinParameter]:
    """The Waterbirds-style sets also set the strength of each feature (the linear theory's
    core and spurious scales)."""
    return {
        **_scene_params(0.95),
        "core_scale": {"default": 0.0, "description": (
            "in [0, 1]: blends each bird towards its class's tint (landbird magenta, waterbird "
            "yellow); 0 leaves the drawings, a shape-only core feature")},
        "background_scale": {"default": 1.0, "description": (
            "in [0, 1]: the backgrounds' contrast around mid-grey; 0 removes the spurious "
            "feature")},
    }


_SHAPES = ["circle", "square", "triangle", "cross"]
_BIRDS = ["landbird", "waterbird"]
_BIRD_GROUPS = [f"{c} on {p}" for c in _BIRDS for p in ("land", "water")]
_SCENES = [
    "dog",
    "bird",
    "vehicle",
    "reptile",
    "carnivore",
    "insect",
    "instrument",
    "primate",
    "fish",
]
_SCENE_FAMILIES = ["foliage", "sky", "road", "sand", "soil", "autumn", "wood", "rock", "water"]
_WATERBIRDS_DOC = (
    "Waterbirds-style: land birds and water birds on land or water backgrounds; "
    "the background matches the label with P = correlation in train, groups "
    "are balanced in val/test; exact masks and clean backgrounds."
)

BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d["name"]: d
    for d in (
        _entry(
            "shapes-32",
            _SHAPES,
            [3, 32, 32],
            [1200, 400, 400],
            _own_other(_SHAPES, ["waves", "blobs", "checker", "stripes"]),
            _EPS_32,
            _scene_params(0.9),
            "Tiny default: four coloured shapes, each with its own procedural background "
            "pattern; trains to high accuracy in seconds (the smoke-test dataset).",
        ),
        _entry(
            "waterbirds-32",
            _BIRDS,
            [3, 32, 32],
            [3000, 800, 800],
            _BIRD_GROUPS,
            _EPS_32,
            _bird_params(),
            _WATERBIRDS_DOC,
        ),
        _entry(
            "waterbirds-64",
            _BIRDS,
            [3, 64, 64],
            [3000, 800, 800],
            _BIRD_GROUPS,
            {"linf": 8 / 255, "l2": 1.0, "l1": 24.0},
            _bird_params(),
            _WATERBIRDS_DOC,
        ),
        _entry(
            "scenes-9",
            _SCENES,
            [3, 32, 32],
            [2700, 900, 900],
            _own_other(_SCENES, _SCENE_FAMILIES),
            _EPS_32,
            _scene_params(0.9, test=0.9),
            "ImageNet-9-style: nine super-classes, each with its own background family; as in "
            "ImageNet-9, test backgrounds keep the train correlation, so the backgrounds "
            "benchmark's mixed_same / mixed_rand differ (groups: own / other background).",
        ),
        _entry(
            "colored-mnist",
            ["0-4", "5-9"],
            [3, 28, 28],
            [6000, 2000, 2000],
            [f"{c} {col}" for c in ("0-4", "5-9") for col in ("red", "green")],
            {"linf": 0.1, "l2": 1.0, "l1": 10.0},
            {
                "correlation": {"default": 0.9, "description": _CORRELATION},
                "test_correlation": {"default": 0.5, "description": _TEST_CORRELATION},
                "label_noise": {
                    "default": 0.25,
                    "description": "fraction of labels flipped (Arjovsky et al.)",
                },
            },
            "Colored-MNIST (Arjovsky et al. 2019): label = digit >= 5 with 25% label noise; the "
            "digit's colour (red/green) agrees with the label with P = correlation.",
        ),
    )
}

DEFAULT_BUILTIN = "shapes-32"


def list_builtins() -> list[BuiltinDataset]:
    return [BUILTIN_DATASETS[name] for name in sorted(BUILTIN_DATASETS)]


def get_builtin(name: str) -> BuiltinDataset | None:
    return BUILTIN_DATASETS.get(name)


def validate_params(name: str, params: dict[str, Any]) -> list[str]:
    """Problems with ``params`` for built-in ``name`` (empty when valid), for the API to 422 on."""
    entry = BUILTIN_DATASETS.get(name)
    if entry is None:
        return [f"unknown built-in dataset {name!r}"]
    problems = []
    for key, value in params.items():
        spec = entry["parameters"].get(key)
        if spec is None:
            problems.append(f"unknown parameter {key!r}; supported: {sorted(entry['parameters'])}")
        elif isinstance(spec["default"], float):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0.0 <= float(value) <= 1.0
            ):
                problems.append(f"{key} must be a number in [0, 1]")
        elif key == "assets" and value not in ("auto", "procedural"):
            problems.append("assets must be 'auto' or 'procedural'")
    return problems
