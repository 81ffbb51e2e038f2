"""The evaluation suite, checked against the dataset before the job exists.

The entries' models are the contract's (``contract/suite.py``); this module adds what only the
API can check, because only it sees the dataset: whether the dataset has the masks, groups or
generator a benchmark needs, and each norm's default eps. A suite the dataset cannot support is
refused with a 422 at submission rather than failing on a worker an hour later. The worker
stores the expanded entries as JSON and parses them back with the contract.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from contract.attacks import Attack, Norm
from contract.suite import (
    CORRUPTIONS,
    CURVE_GRID,
    ENTRIES,
    Adversarial,
    Backgrounds,
    Clean,
    Corruptions,
    Entry,
    FgBgNoise,
    Groups,
    RobustnessCurve,
    SpuriousShift,
    dump_entry,
    problem,
)
from core.errors import Invalid, invalid
from service.datasets.schemas import Capabilities

__all__ = ["CORRUPTIONS", "PRESETS", "Adversarial", "Attack", "Backgrounds", "Capabilities",
           "Clean", "Corruptions", "Entry", "FgBgNoise", "Groups", "Norm", "RobustnessCurve",
           "SpuriousShift", "expand"]

PRESETS = ("standard",)


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
        entries = ENTRIES.validate_python(suite)
    except ValidationError as exc:
        raise invalid(exc, "suite", "invalid suite") from exc
    out = []
    for i, entry in enumerate(entries):
        _check_supported(i, entry, caps)
        bad = problem(entry)
        if bad is not None:
            raise Invalid(f"suite[{i}]: {bad}", field=f"suite.{i}.{bad.field}")
        data = dump_entry(entry)
        if isinstance(entry, Adversarial) and entry.eps is None:
            data["eps"] = caps.default_eps[entry.norm.value]
        if isinstance(entry, RobustnessCurve) and entry.eps is None:
            default = caps.default_eps[entry.norm.value]
            data["eps"] = [float(f"{m * default:.6g}") for m in CURVE_GRID]
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
