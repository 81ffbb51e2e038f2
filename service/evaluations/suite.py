"""The evaluation suite: the benchmark entries a job runs, validated before the job exists.

Validation happens here, in the API, so a suite the dataset cannot support is refused with a
422 at submission rather than failing on a worker an hour later. The worker receives the
expanded, validated entries as plain dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from contract import attacks as limits
from contract.attacks import QUERY_ATTACKS, STEP_SIZE_ATTACKS, TARGETABLE, Attack, Norm, unsupported
from service.errors import Invalid, invalid

# The engine's corruptions (CIFAR-10-C constants); ``frost`` runs only on workers that have
# the ImageNet-C frost overlays installed, and fails the entry with a clear error otherwise.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur",
               "gaussian_blur", "contrast", "brightness", "saturate", "pixelate",
               "jpeg_compression", "fog", "elastic_transform", "frost")


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Clean(_Entry):
    benchmark: Literal["clean"]


Eps = Annotated[float, Field(gt=0, le=1000)]


class Adversarial(_Entry):
    benchmark: Literal["adversarial"]
    attack: Attack = Attack.PGD
    norm: Norm = Norm.LINF
    eps: Eps | list[Eps] | None = None  # None: the dataset's default for the norm
    steps: int | None = Field(None, ge=limits.STEPS[0], le=limits.STEPS[1])
    restarts: int | None = Field(None, ge=limits.RESTARTS[0], le=limits.RESTARTS[1])
    targeted: bool = False
    step_size: float | None = Field(None, gt=0)
    queries: int | None = Field(None, ge=limits.QUERIES[0], le=limits.QUERIES[1])
    n_targets: int | None = Field(None, ge=limits.N_TARGETS[0], le=limits.N_TARGETS[1])
    # AutoAttack re-run on this many examples
    audit: int | None = Field(None, ge=limits.AUDIT[0], le=limits.AUDIT[1])

    @field_validator("eps")
    @classmethod
    def _eps_list(cls, v: float | list[float] | None) -> float | list[float] | None:
        lo, hi = limits.EPS_VALUES
        if isinstance(v, list) and not lo <= len(v) <= hi:
            raise ValueError(f"eps takes {lo} to {hi} values")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError("eps contains duplicates")
        return v


class RobustnessCurve(_Entry):
    benchmark: Literal["robustness_curve"]
    norm: Norm = Norm.LINF
    eps: list[Eps] | None = Field(None, min_length=limits.CURVE_EPS_VALUES[0],
                                  max_length=limits.CURVE_EPS_VALUES[1])
    steps: int | None = Field(None, ge=limits.STEPS[0], le=limits.STEPS[1])
    n_targets: int | None = Field(None, ge=limits.N_TARGETS[0], le=limits.N_TARGETS[1])


class FgBgNoise(_Entry):
    benchmark: Literal["fg_bg_noise"]
    sigmas: list[Annotated[float, Field(ge=0, le=10)]] | None = Field(
        None, min_length=1, max_length=32)
    trials: int = Field(3, ge=1, le=100)


class Backgrounds(_Entry):
    benchmark: Literal["backgrounds"]


class Groups(_Entry):
    benchmark: Literal["groups"]


class Corruptions(_Entry):
    benchmark: Literal["corruptions"]
    types: Literal["all"] | list[str] | None = None
    severities: list[Annotated[int, Field(ge=1, le=5)]] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5], min_length=1, max_length=5)

    @field_validator("types")
    @classmethod
    def _known(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, str):
            return v
        unknown = sorted(set(v or ()) - set(CORRUPTIONS))
        if unknown:
            raise ValueError(f"unknown corruption types {unknown}; known: {list(CORRUPTIONS)}")
        return v


Correlation = Annotated[float, Field(ge=0, le=1)]


class SpuriousShift(_Entry):
    """Levels default to the train correlation (kept), 1/K (removed), 1 - train (reversed)."""

    benchmark: Literal["spurious_shift"]
    correlation: Correlation | None = None
    removed: Correlation | None = None
    reversed: Correlation | None = None
    split: Literal["train", "val", "test"] | None = None


Entry = Annotated[
    Clean | Adversarial | RobustnessCurve | FgBgNoise | Backgrounds | Groups | Corruptions
    | SpuriousShift,
    Field(discriminator="benchmark"),
]
_ENTRIES: TypeAdapter[list[Entry]] = TypeAdapter(list[Entry])

PRESETS = ("standard",)


@dataclass(frozen=True)
class Capabilities:
    """What a dataset can support, as the suite needs to know it."""

    name: str
    has_masks: bool
    has_groups: bool
    regenerable: bool  # a generated dataset that can be redrawn under another correlation
    default_eps: dict[str, float]


def expand(suite: Any, caps: Capabilities) -> list[dict[str, Any]]:
    """Validate ``suite`` (a preset name or a list of entries) against the dataset."""
    if isinstance(suite, str):
        if suite != "standard":
            raise Invalid(f"unknown suite preset {suite!r}; presets: {', '.join(PRESETS)}",
                          field="suite")
        suite = _standard(caps)
    if not isinstance(suite, list) or not suite:
        raise Invalid("suite must be a preset name or a non-empty list of benchmark entries",
                      field="suite")
    if len(suite) > 64:
        raise Invalid("a suite holds at most 64 entries", field="suite")
    try:
        entries = _ENTRIES.validate_python(suite)
    except ValidationError as exc:
        raise invalid(exc, "suite", "invalid suite") from exc
    out = []
    for i, entry in enumerate(entries):
        _check_supported(i, entry, caps)
        data = entry.model_dump(exclude_none=True, mode="json")
        if isinstance(entry, Adversarial) and entry.eps is None:
            data["eps"] = caps.default_eps[entry.norm.value]
        if isinstance(entry, Adversarial | RobustnessCurve):
            _check_attack(i, entry)
        out.append(data)
    return out


def _standard(caps: Capabilities) -> list[dict[str, Any]]:
    suite: list[dict[str, Any]] = [
        {"benchmark": "clean"},
        {"benchmark": "adversarial", "attack": "autoattack", "norm": "linf",
         "eps": caps.default_eps["linf"]},
    ]
    if caps.has_masks:
        suite += [{"benchmark": "fg_bg_noise"}, {"benchmark": "backgrounds"}]
    if caps.has_groups:
        suite.append({"benchmark": "groups"})
    return suite


_NEEDS = {
    "fg_bg_noise": ("has_masks", "foreground masks"),
    "backgrounds": ("has_masks", "foreground masks"),
    "groups": ("has_groups", "group labels"),
    "spurious_shift": ("regenerable", "a generated dataset with a controllable correlation"),
}


def _check_supported(i: int, entry: BaseModel, caps: Capabilities) -> None:
    name = entry.benchmark  # type: ignore[attr-defined]
    if name in _NEEDS:
        attr, what = _NEEDS[name]
        if not getattr(caps, attr):
            raise Invalid(f"suite[{i}]: benchmark {name!r} needs {what}, and dataset "
                          f"{caps.name!r} has none", field=f"suite.{i}.benchmark")


def _check_attack(i: int, entry: Adversarial | RobustnessCurve) -> None:
    if isinstance(entry, Adversarial):
        reason = unsupported(entry.attack, entry.norm)
        if reason:
            raise Invalid(f"suite[{i}]: {reason}", field=f"suite.{i}.attack")
        if entry.targeted and entry.attack not in TARGETABLE:
            raise Invalid(f"suite[{i}]: attack {entry.attack.value!r} has no targeted variant",
                          field=f"suite.{i}.targeted")
        if entry.step_size is not None and entry.attack not in STEP_SIZE_ATTACKS:
            raise Invalid(f"suite[{i}]: 'step_size' applies to pgd only (the other attacks "
                          "choose their own)", field=f"suite.{i}.step_size")
        if entry.queries is not None and entry.attack not in QUERY_ATTACKS:
            raise Invalid(f"suite[{i}]: 'queries' applies to square and autoattack only",
                          field=f"suite.{i}.queries")
        eps = entry.eps if isinstance(entry.eps, list) else [entry.eps]
        if entry.norm is Norm.LINF and any(e is not None and e > 1 for e in eps):
            raise Invalid(f"suite[{i}]: l_inf eps is in [0,1] pixel units (8/255 = 0.0314)",
                          field=f"suite.{i}.eps")
