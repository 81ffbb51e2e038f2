"""The evaluation suite's entries: what each benchmark takes, written once.

The API validates a submitted suite with these models (and then checks them against the
dataset, which only it can see: ``service/evaluations/suite.py``); the worker parses the
stored entries back with :func:`parse_entry` and hands the engine the typed entry. An entry
that :func:`parse_entry` accepts is one the API accepts, and the other way round.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from contract import attacks as limits
from contract.attacks import QUERY_ATTACKS, STEP_SIZE_ATTACKS, TARGETABLE, Attack, Norm, unsupported

# The engine's corruptions (CIFAR-10-C constants); ``frost`` runs only on workers that have
# the ImageNet-C frost overlays installed, and fails the entry with a clear error otherwise.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur",
               "gaussian_blur", "contrast", "brightness", "saturate", "pixelate",
               "jpeg_compression", "fog", "elastic_transform", "frost")

SEVERITIES = (1, 2, 3, 4, 5)
SIGMA_GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
"""``fg_bg_noise``'s default noise levels."""


class BaseEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Clean(BaseEntry):
    benchmark: Literal["clean"]


Eps = Annotated[float, Field(gt=0, le=1000)]


class Adversarial(BaseEntry):
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

    def eps_values(self) -> tuple[float, ...]:
        """The budgets, in the order given (empty while the dataset's default is unfilled)."""
        if self.eps is None:
            return ()
        return tuple(self.eps) if isinstance(self.eps, list) else (self.eps,)


CURVE_GRID = (0.25, 0.5, 1.0, 1.5, 2.0)
"""A robustness curve's default grid, in multiples of the dataset's default eps."""


class RobustnessCurve(BaseEntry):
    benchmark: Literal["robustness_curve"]
    norm: Norm = Norm.LINF
    # None: the API fills CURVE_GRID times the dataset's default eps for the norm
    eps: list[Eps] | None = Field(None, min_length=limits.CURVE_EPS_VALUES[0],
                                  max_length=limits.CURVE_EPS_VALUES[1])
    steps: int | None = Field(None, ge=limits.STEPS[0], le=limits.STEPS[1])
    n_targets: int | None = Field(None, ge=limits.N_TARGETS[0], le=limits.N_TARGETS[1])


class FgBgNoise(BaseEntry):
    benchmark: Literal["fg_bg_noise"]
    sigmas: list[Annotated[float, Field(ge=0, le=10)]] | None = Field(
        None, min_length=1, max_length=32)  # None: SIGMA_GRID
    trials: int = Field(3, ge=1, le=100)


class Backgrounds(BaseEntry):
    benchmark: Literal["backgrounds"]


class Groups(BaseEntry):
    benchmark: Literal["groups"]


class Corruptions(BaseEntry):
    benchmark: Literal["corruptions"]
    types: Literal["all"] | list[str] | None = None  # None, "all": every one the data allows
    severities: list[Annotated[int, Field(ge=1, le=5)]] = Field(
        default_factory=lambda: list(SEVERITIES), min_length=1, max_length=5)

    @field_validator("types")
    @classmethod
    def _known(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, str):
            return v
        if v is not None and not v:
            raise ValueError("types must name at least one corruption, or be 'all'")
        unknown = sorted(set(v or ()) - set(CORRUPTIONS))
        if unknown:
            raise ValueError(f"unknown corruption types {unknown}; known: {list(CORRUPTIONS)}")
        return v


Correlation = Annotated[float, Field(ge=0, le=1)]


class SpuriousShift(BaseEntry):
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
ENTRIES: TypeAdapter[list[Entry]] = TypeAdapter(list[Entry])
ENTRY: TypeAdapter[Entry] = TypeAdapter(Entry)


class SpecError(ValueError):
    """An entry the contract refuses; ``field`` names the offending field of the entry."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def problem(entry: BaseEntry) -> SpecError | None:
    """Why ``entry``'s fields do not go together (an attack with a norm it does not support, an
    option the attack does not take), or None when they do. Shape and bounds are the models'."""
    if not isinstance(entry, Adversarial):
        return None
    reason = unsupported(entry.attack, entry.norm)
    if reason:
        return SpecError(reason, "attack")
    if entry.targeted and entry.attack not in TARGETABLE:
        return SpecError(f"attack {entry.attack.value!r} has no targeted variant", "targeted")
    if entry.step_size is not None and entry.attack not in STEP_SIZE_ATTACKS:
        return SpecError("'step_size' applies to pgd only (the other attacks choose their own)",
                         "step_size")
    if entry.queries is not None and entry.attack not in QUERY_ATTACKS:
        return SpecError("'queries' applies to square and autoattack only", "queries")
    if entry.norm is Norm.LINF and any(e > 1 for e in entry.eps_values()):
        return SpecError("l_inf eps is in [0,1] pixel units (8/255 = 0.0314)", "eps")
    return None


def parse_entry(data: Any) -> Entry:
    """One suite entry (a JSON object) as its typed model, or :class:`SpecError`."""
    try:
        entry = ENTRY.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise SpecError(f"invalid suite entry: {where}: {first.get('msg', '')}"
                        if where else f"invalid suite entry: {first.get('msg', '')}",
                        where) from exc
    bad = problem(entry)
    if bad is not None:
        raise bad
    return entry


def dump_entry(entry: BaseEntry) -> dict[str, Any]:
    """An entry as the JSON the API stores and returns (fields left unset are left out)."""
    return entry.model_dump(exclude_none=True, mode="json")
