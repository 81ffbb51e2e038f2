"""What the reproduction needs from the engine: the seeded subset, class maps (ImageNet-1k onto
ImageNet-9), the degenerate-predictions check and FGSM-RS's guard against catastrophic
overfitting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from workers.engine import models
from workers.engine.benchmarks.clean import degenerate_check
from workers.engine.data import seeded_subset
from workers.engine.models import CheckpointError, ClassMapped, imagenet9_map
from workers.engine.threats import Norm
from workers.engine.training import Method, ThreatSpec, TrainSpec, loop, train
from workers.engine.types import EvalData


def _data(n: int) -> EvalData:
    return EvalData(x=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2),
                    y=torch.arange(n) % 2, class_names=["a", "b"])


def test_seeded_subset_is_fixed_by_seed_and_keeps_split_order() -> None:
    data = _data(100)
    a, b = seeded_subset(data, 10, seed=3), seeded_subset(data, 10, seed=3)
    ids = a.x[:, 0, 0, 0].long().tolist()
    assert ids == b.x[:, 0, 0, 0].long().tolist()
    assert ids == sorted(ids)
    assert len(set(ids)) == 10
    assert ids != seeded_subset(data, 10, seed=4).x[:, 0, 0, 0].long().tolist()
    assert a.y.tolist() == [i % 2 for i in ids]
    assert seeded_subset(data, None, 0) is data
    assert seeded_subset(data, 500, 0) is data


def test_imagenet9_map_matches_the_backgrounds_challenge() -> None:
    m = imagenet9_map()
    assert len(m) == 1000
    counts = [m.count(c) for c in range(9)]
    # Class sizes of in_to_in9.json: dog, bird, vehicle, reptile, carnivore, insect,
    # instrument, primate, fish; the remaining 578 classes are unmapped.
    assert counts == [116, 52, 42, 36, 35, 27, 26, 20, 16]
    assert m.count(-1) == 1000 - 370
    assert (m[151], m[171], m[172], m[0], m[389], m[407], m[889], m[999]) == (
        0, -1, -1, 8, 8, 2, 6, -1)


def test_class_mapped_takes_the_best_member_logit() -> None:
    logits = torch.zeros(2, 1000)
    logits[0, 300] = 5.0  # an insect
    logits[0, 500] = 9.0  # unmapped: ignored
    logits[1, 0] = 1.0  # a fish (tench)
    logits[1, 200] = 2.0  # a dog
    mapped = ClassMapped(nn.Identity(), imagenet9_map(), 9)
    out = mapped(logits)
    assert out.shape == (2, 9)
    assert out.argmax(1).tolist() == [5, 0]
    assert out[0, 5].item() == 5.0
    assert out[1, 8].item() == 1.0
    x = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mapped(x)[1, 0], x)
    assert g[1, 200].item() == 1.0
    assert g.sum().item() == 1.0


def test_class_map_must_cover_every_dataset_class() -> None:
    with pytest.raises(CheckpointError, match=r"dataset class\(es\) \[2\]"):
        ClassMapped(nn.Identity(), [0, 1, 1, -1], 3)
    with pytest.raises(CheckpointError, match="outside"):
        ClassMapped(nn.Identity(), [0, 3], 3)


def test_degenerate_check_flags_a_one_class_model() -> None:
    y = torch.tensor([0, 1] * 50)
    one_class = degenerate_check(torch.zeros(100, dtype=torch.long), y)
    assert not one_class.passed
    assert one_class.params == {"top_class": 0, "share": 1.0, "label_share": 0.5}
    almost = degenerate_check(torch.tensor([0] * 94 + [1] * 6), y)
    assert almost.passed  # 94% is below the 95% threshold
    assert not degenerate_check(torch.tensor([1] * 95 + [0] * 5), y).passed
    # A split that is 97% one class is not held against a model that says so.
    skewed = torch.tensor([0] * 97 + [1] * 3)
    assert degenerate_check(torch.zeros(100, dtype=torch.long), skewed).passed


def test_collapse_rule() -> None:
    assert loop.collapsed(0.40, 0.05)
    assert loop.collapsed(0.40, 0.20)
    assert not loop.collapsed(0.40, 0.21)  # above half the best
    assert not loop.collapsed(0.12, 0.05)  # half, but a drop of only 7 points


@pytest.fixture
def _tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.ENGINE_ARCHITECTURES, "tiny_guard",
                        lambda k, c: nn.Sequential(nn.Flatten(), nn.Linear(c * 16, k)))


@pytest.mark.usefixtures("_tiny")
@pytest.mark.slow
def test_fgsm_rs_guard_restores_the_best_epoch_and_stops(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """Held-out PGD accuracy 0.3, 0.5, then 0.1: the run stops after epoch 3 of 6 with the
    weights it had after epoch 2, and says so in the history."""
    robust = iter([0.3, 0.5, 0.1, 0.5, 0.5, 0.5])
    weights: list[torch.Tensor] = []

    def fake_measure(model: nn.Module, *args: Any, **kwargs: Any) -> tuple[float, float]:
        weights.append(next(iter(model.parameters())).detach().clone())
        return 0.9, next(robust)

    monkeypatch.setattr(loop, "measure", fake_measure)
    g = torch.Generator().manual_seed(0)
    data = EvalData(x=torch.rand(32, 3, 4, 4, generator=g), y=torch.arange(32) % 2,
                    class_names=["a", "b"])
    spec = TrainSpec(architecture="tiny_guard", method=Method.FGSM_RS,
                     threat=ThreatSpec(Norm.LINF, 0.03, steps=1), epochs=6, batch_size=8,
                     lr=0.1)
    out = train(spec, data, data, checkpoint_path=tmp_path / "c" / "checkpoint.safetensors")
    assert [h["epoch"] for h in out.history] == [1, 2, 3]
    assert out.history[2]["guard"]["stopped"] is True
    assert out.history[2]["guard"]["restored_epoch"] == 2
    assert "guard" not in out.history[1]
    assert torch.equal(next(iter(out.model.parameters())), weights[1])
    assert not torch.equal(weights[1], weights[2])
    # A resumed run does not train past the guard's decision.
    again = train(spec, data, data, checkpoint_path=tmp_path / "c" / "checkpoint.safetensors")
    assert again.resumed_epochs == 3
    assert len(again.history) == 3
    assert torch.equal(next(iter(again.model.parameters())), weights[1])


@pytest.mark.usefixtures("_tiny")
@pytest.mark.slow
def test_pgd_training_has_no_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    robust = iter([0.5, 0.1, 0.1])
    monkeypatch.setattr(loop, "measure", lambda *a, **k: (0.9, next(robust)))
    data = EvalData(x=torch.rand(16, 3, 4, 4), y=torch.arange(16) % 2, class_names=["a", "b"])
    spec = TrainSpec(architecture="tiny_guard", method=Method.PGD,
                     threat=ThreatSpec(Norm.LINF, 0.03, steps=2), epochs=3, batch_size=8,
                     lr=0.1)
    assert len(train(spec, data, data).history) == 3


@pytest.mark.slow
def test_feature_scales_of_the_waterbirds_set() -> None:
    """core_scale 1 paints every bird its class's tint; background_scale 0 leaves one grey
    background for all; the image outside the mask is still exactly the stored background."""
    from workers.engine.data import load_builtin
    from workers.engine.data.builtin import BIRD_TINTS

    d = load_builtin("waterbirds-32", "val", core_scale=1.0, background_scale=0.0,
                     assets="procedural")
    x, m, bg = d.x * 255, d.masks.bool(), d.backgrounds * 255
    assert torch.equal(bg.round(), torch.full_like(bg, 128.0))
    assert torch.equal((x * ~m).round(), (bg * ~m).round())
    for c, tint in enumerate(BIRD_TINTS):
        pixels = x[d.y == c].permute(1, 0, 2, 3)[:, m[d.y == c][:, 0]]
        assert torch.equal(pixels.round(), torch.tensor(tint, dtype=torch.float32)[:, None]
                           .expand_as(pixels))
    plain = load_builtin("waterbirds-32", "val", assets="procedural")
    half = load_builtin("waterbirds-32", "val", core_scale=0.5, assets="procedural")
    assert torch.equal(plain.masks, half.masks)
    assert torch.equal(plain.backgrounds, half.backgrounds)
    assert not torch.equal(plain.x, half.x)
