"""Natural-robustness benchmarks on hand-built models whose answers are known in advance."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.factories import run_benchmark as run
from workers.engine.benchmarks.natural.backgrounds import choose_donors, tiled_background
from workers.engine.data import load_builtin
from workers.engine.types import (
    BenchmarkError,
    BenchmarkResult,
    Cancelled,
    EvalData,
    RunContext,
)

SIDE = 16
LO, HI = 4, 12  # the object is the central 8x8 square


def _mask() -> Tensor:
    m = torch.zeros(1, SIDE, SIDE)
    m[:, LO:HI, LO:HI] = 1
    return m


def toy_data(n: int = 160, with_backgrounds: bool = True, seed: int = 0) -> EvalData:
    """Two classes; the object's grey level and the background's level both encode the label.

    Object levels sit close to 0.5 so foreground noise can flip a foreground reader; the
    background is a textured field a little below (class 0) or above (class 1) 0.5.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    sign = y.float() * 2 - 1
    fg_level = 0.5 + sign * (0.04 + 0.1 * torch.rand(n, generator=g))
    bg_level = 0.5 + sign * (0.03 + 0.1 * torch.rand(n, generator=g))
    fg = fg_level.view(n, 1, 1, 1).expand(n, 3, SIDE, SIDE)
    bg = (bg_level.view(n, 1, 1, 1) + 0.15 * (torch.rand(n, 3, SIDE, SIDE, generator=g) - 0.5))
    m = _mask().expand(n, 1, SIDE, SIDE)
    x = m * fg + (1 - m) * bg
    return EvalData(x=x, y=y, class_names=["dark", "bright"], masks=m.clone(),
                    backgrounds=bg.clone() if with_backgrounds else None, name="toy")


class RegionReader(nn.Module):
    """Predicts 'bright' when the mean of one fixed region exceeds 0.5; reads nothing else."""

    def __init__(self, region: Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region)

    def forward(self, x: Tensor) -> Tensor:
        w = self.region.expand_as(x[:1])
        score = (x * w).sum(dim=(1, 2, 3)) / w.sum() - 0.5
        return torch.stack([-score, score], 1)


def fg_reader() -> RegionReader:
    return RegionReader(_mask())


def bg_reader() -> RegionReader:
    return RegionReader(1 - _mask())


def rows(result: BenchmarkResult, metric: str, **params: Any) -> list[float]:
    return [r.value for r in result.rows
            if r.metric == metric and all(r.params.get(k) == v for k, v in params.items())]


def one(result: BenchmarkResult, metric: str, **params: Any) -> float:
    found = rows(result, metric, **params)
    assert len(found) == 1, (metric, params, result.rows)
    return found[0]


CTX = RunContext(batch_size=64, seed=0)
SIGMAS = [0.25, 0.75]


def test_toy_models_are_perfect_on_clean_data() -> None:
    data = toy_data()
    for model in (fg_reader(), bg_reader()):
        assert one(run("clean", model, data, {}, CTX), "accuracy") == 1.0


# ------------------------------------------------------------------------- fg_bg_noise


@pytest.mark.slow
def test_foreground_reader_ignores_background_noise() -> None:
    res = run("fg_bg_noise", fg_reader(), toy_data(), {"sigmas": SIGMAS, "trials": 2}, CTX)
    for s in SIGMAS:
        assert one(res, "bg_noise_accuracy", sigma=s) == 1.0  # = clean accuracy
        assert one(res, "rfs", sigma=s) >= 0
    assert one(res, "fg_noise_accuracy", sigma=0.75) < 0.9
    assert one(res, "rfs", sigma=0.75) > 0.2
    mean_rfs = one(res, "rfs", sigma="mean")
    assert mean_rfs == pytest.approx(sum(one(res, "rfs", sigma=s) for s in SIGMAS) / 2)


@pytest.mark.slow
def test_background_reader_ignores_foreground_noise_and_has_negative_rfs() -> None:
    res = run("fg_bg_noise", bg_reader(), toy_data(), {"sigmas": SIGMAS, "trials": 2}, CTX)
    for s in SIGMAS:
        assert one(res, "fg_noise_accuracy", sigma=s) == 1.0  # unchanged
    assert one(res, "bg_noise_accuracy", sigma=0.75) < 1.0
    assert one(res, "rfs", sigma=0.75) < 0
    assert one(res, "rfs", sigma="mean") < 0


@pytest.mark.slow
def test_fg_bg_noise_is_deterministic_in_the_seed() -> None:
    params = {"sigmas": [0.75], "trials": 1}
    a = run("fg_bg_noise", fg_reader(), toy_data(), params, RunContext(batch_size=64, seed=1))
    b = run("fg_bg_noise", fg_reader(), toy_data(), params, RunContext(batch_size=64, seed=1))
    c = run("fg_bg_noise", fg_reader(), toy_data(), params, RunContext(batch_size=64, seed=2))
    assert [r.as_dict() for r in a.rows] == [r.as_dict() for r in b.rows]
    assert one(a, "fg_noise_accuracy", sigma=0.75) != one(c, "fg_noise_accuracy", sigma=0.75)


def test_fg_bg_noise_default_grid_and_row_layout() -> None:
    res = run("fg_bg_noise", fg_reader(), toy_data(n=20), {"trials": 1}, CTX)
    sigmas = [r.params["sigma"] for r in res.rows if r.metric == "rfs"]
    assert sigmas == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, "mean"]
    assert {r.metric for r in res.rows} == {"fg_noise_accuracy", "bg_noise_accuracy", "rfs"}


# ------------------------------------------------------------------------- backgrounds


@pytest.mark.parametrize("known_backgrounds", [True, False])
@pytest.mark.slow
def test_foreground_reader_has_no_bg_gap(known_backgrounds: bool) -> None:
    res = run("backgrounds", fg_reader(), toy_data(with_backgrounds=known_backgrounds), {}, CTX)
    for variant in ("original", "only_fg", "mixed_same", "mixed_rand"):
        assert one(res, "accuracy", variant=variant) == 1.0
    assert one(res, "accuracy", variant="no_fg") == 0.5  # a black object reads as "dark"
    assert one(res, "bg_gap") == 0.0
    assert ("exact" in res.checks[0].detail) == known_backgrounds


@pytest.mark.parametrize("known_backgrounds", [True, False])
@pytest.mark.slow
def test_background_reader_has_a_large_bg_gap(known_backgrounds: bool) -> None:
    res = run("backgrounds", bg_reader(), toy_data(with_backgrounds=known_backgrounds), {}, CTX)
    assert one(res, "accuracy", variant="mixed_same") == 1.0
    assert one(res, "accuracy", variant="no_fg") == 1.0
    assert one(res, "accuracy", variant="only_fg") == 0.5
    assert 0.3 < one(res, "accuracy", variant="mixed_rand") < 0.7
    assert one(res, "bg_gap") > 0.3


def test_donors_are_other_images_of_the_right_class_and_deterministic() -> None:
    y = torch.tensor([0, 1, 0, 1, 0, 2, 1, 0])
    same, rand = choose_donors(y, seed=5)
    assert (same != torch.arange(8).numpy())[y.numpy() != 2].all()
    assert (y.numpy()[same] == y.numpy()).all()
    assert same[5] == 5  # a class of one has no other donor
    assert (rand != torch.arange(8).numpy()).all()
    again = choose_donors(y, seed=5)
    assert (again[0] == same).all()
    assert (again[1] == rand).all()


def test_tiled_background_removes_the_object() -> None:
    x = torch.zeros(3, 16, 16)
    x[0] = torch.linspace(0, 0.5, 16).view(16, 1)  # a vertical ramp background
    m = torch.zeros(1, 16, 16)
    m[:, 9:13, 3:8] = 1
    x = torch.where(m.bool().expand(3, -1, -1), torch.tensor(1.0), x)  # white object
    out = tiled_background(x, m)
    assert out.max() <= 0.5  # no white object pixel survives
    box = torch.zeros(16, 16, dtype=torch.bool)
    box[9:13, 3:8] = True
    assert torch.equal(out[:, ~box], x[:, ~box])  # outside the box untouched
    full = tiled_background(x, torch.ones(1, 16, 16))
    assert full.abs().sum() == 0  # no background left: only_bg_b


# ------------------------------------------------------------------- groups and shifts


class PlaceReader(nn.Module):
    """Predicts the label from the background alone: blue-dominated means water bird.

    On procedural Waterbirds this reads the place perfectly, so it is the pure shortcut.
    """

    def forward(self, x: Tensor) -> Tensor:
        s = (x[:, 2] - x[:, 0]).mean(dim=(1, 2))
        return torch.stack([-s, s], 1)


def test_spurious_model_has_zero_worst_group_accuracy() -> None:
    data = load_builtin("waterbirds-32", "test", assets="procedural")
    res = run("groups", PlaceReader(), data, {}, CTX)
    assert one(res, "worst_group_accuracy") == 0.0
    assert one(res, "average_accuracy") == 0.5
    assert one(res, "accuracy", group="landbird on land") == 1.0
    assert one(res, "accuracy", group="waterbird on water") == 1.0
    assert one(res, "accuracy", group="waterbird on land") == 0.0
    assert one(res, "accuracy", group="landbird on water") == 0.0


@pytest.mark.slow
def test_spurious_shift_tracks_the_correlation_for_a_shortcut_model() -> None:
    data = load_builtin("waterbirds-32", "test", assets="procedural")
    res = run("spurious_shift", PlaceReader(), data, {}, CTX)
    # a place reader is right exactly when the place matches the label
    assert one(res, "accuracy", shift="kept") == pytest.approx(0.95)
    assert one(res, "accuracy", shift="removed") == pytest.approx(0.5)
    assert one(res, "accuracy", shift="reversed") == pytest.approx(0.05)
    assert one(res, "worst_group_accuracy", shift="removed") == 0.0


@pytest.mark.slow
def test_spurious_shift_keeps_labels_so_a_constant_model_is_unmoved() -> None:
    class Constant(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.tensor([[1.0, 0.0]]).expand(x.shape[0], 2)

    data = load_builtin("waterbirds-32", "test", assets="procedural")
    res = run("spurious_shift", Constant(), data, {"correlation": 0.8}, CTX)
    assert rows(res, "accuracy") == [0.5, 0.5, 0.5]
    assert [r.params["correlation"] for r in res.rows if r.metric == "accuracy"] == [
        0.8, 0.5, pytest.approx(0.2)]


# ----------------------------------------------------------------------- refusals etc.


@pytest.mark.parametrize(("benchmark", "field", "message"), [
    ("fg_bg_noise", "masks", "foreground masks"),
    ("backgrounds", "masks", "foreground masks"),
    ("groups", "groups", "group labels"),
    ("spurious_shift", "source", "redrawn"),
])
def test_refuses_data_without_what_it_needs(benchmark: str, field: str, message: str) -> None:
    data = toy_data(n=8)
    setattr(data, field, None)
    with pytest.raises(BenchmarkError, match=message):
        run(benchmark, fg_reader(), data, {}, CTX)


@pytest.mark.parametrize(("benchmark", "params"), [
    ("fg_bg_noise", {"sigmas": [-0.1]}),
    ("fg_bg_noise", {"trials": 0}),
    ("fg_bg_noise", {"sigmas": "lots"}),
    ("corruptions", {"severities": [6]}),
    ("corruptions", {"types": ["snow_storm"]}),
])
def test_refuses_bad_parameters(benchmark: str, params: dict[str, Any]) -> None:
    with pytest.raises(BenchmarkError):
        run(benchmark, fg_reader(), toy_data(n=8), params, CTX)


def test_progress_is_reported_and_cancellation_propagates() -> None:
    seen: list[float] = []

    def record(fraction: float, message: str) -> None:
        seen.append(fraction)

    ctx = RunContext(batch_size=32, progress=record)
    run("backgrounds", fg_reader(), toy_data(n=100), {}, ctx)
    assert seen == sorted(seen)
    assert len(seen) == 4
    assert seen[-1] == 1.0

    def cancel(fraction: float, message: str) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        run("fg_bg_noise", fg_reader(), toy_data(n=100), {"sigmas": [0.5], "trials": 1},
            RunContext(batch_size=32, progress=cancel))


@pytest.mark.slow
def test_backgrounds_flags_a_split_whose_backgrounds_ignore_the_class() -> None:
    balanced = load_builtin("waterbirds-32", "test", assets="procedural")
    natural = load_builtin("waterbirds-32", "test", assets="procedural", test_correlation=0.95)
    small = torch.arange(0, 800, 20)
    flags = {c.name: c.passed for c in run("backgrounds", PlaceReader(), balanced.subset(small),
                                           {}, CTX).checks}
    assert flags == {"donor_backgrounds": True, "bg_gap_informative": False}
    res = run("backgrounds", PlaceReader(), natural, {}, CTX)
    assert [c.name for c in res.checks] == ["donor_backgrounds"]
    assert one(res, "bg_gap") > 0.3  # the shortcut model's gap shows on natural backgrounds
