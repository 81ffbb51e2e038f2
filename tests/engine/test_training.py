"""Adversarial training in the engine, on a tiny synthetic task (CPU, seconds).

The task has two features. A *robust* one: the left half of the image is brighter (class 1)
or darker (class 0) by 0.25, but it agrees with the label on only 85% of the images. A
*non-robust* one: the right half is offset by 0.03 in the label's direction, on every image.
Standard training reaches 100% clean accuracy through the tiny offset, which an l_inf
perturbation of 0.08 reverses (robust accuracy 0); adversarial training cannot use it and
learns the robust feature (clean = robust = 0.867 on the held-out set, the 85% ceiling).
Measured with the specs below, 5 epochs: standard 1.000 / 0.000 (clean / robust), PGD,
FGSM-RS and TRADES 0.867 / 0.867.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from workers.engine import models
from workers.engine.threats import Norm
from workers.engine.training import (
    LrSchedule,
    Method,
    Optimizer,
    ThreatSpec,
    TrainingError,
    TrainSpec,
    train,
)
from workers.engine.types import EvalData

LINF = ThreatSpec(Norm.LINF, 0.08, steps=5)


def tiny(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(),
                         nn.Linear(in_channels * 64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, num_classes))


@pytest.fixture(autouse=True)
def _tiny_architecture(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A registered tiny architecture, run on one thread (a net this small only loses time to
    thread synchronisation, badly so on a shared machine)."""
    monkeypatch.setitem(models.ENGINE_ARCHITECTURES, "tiny_test", tiny)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def two_features(n: int, seed: int) -> EvalData:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * y - 1).float()[:, None, None, None]
    agree = torch.where(torch.rand(n, generator=g) < 0.85, 1.0, -1.0)[:, None, None, None]
    x = torch.full((n, 1, 8, 8), 0.5)
    x[..., :4] += 0.25 * sign * agree + 0.1 * torch.randn(n, 1, 8, 4, generator=g)
    x[..., 4:] += 0.03 * sign
    return EvalData(x=x.clamp(0, 1), y=y, class_names=["dark", "bright"])


TRAIN, HELD_OUT = two_features(512, 0), two_features(256, 1)


def spec(method: str, **kw: Any) -> TrainSpec:
    base: dict[str, Any] = {"architecture": "tiny_test", "method": Method(method),
                            "threat": LINF, "epochs": 5, "batch_size": 32, "lr": 0.05}
    return TrainSpec(**{**base, **kw})


@pytest.mark.slow
def test_adversarial_training_trades_the_shortcut_for_robustness() -> None:
    final = {m: train(spec(m), TRAIN, HELD_OUT).history[-1]
             for m in ("standard", "pgd", "fgsm_rs", "trades")}
    assert final["standard"]["clean_accuracy"] == 1.0
    assert final["standard"]["robust_accuracy"] <= 0.05
    ceiling = 222 / 256  # the held-out images whose left half agrees with their label
    for method in ("pgd", "fgsm_rs", "trades"):
        assert final[method]["robust_accuracy"] == pytest.approx(ceiling), method
        assert final[method]["clean_accuracy"] == pytest.approx(ceiling), method


@pytest.mark.parametrize(("norm", "eps"), [(Norm.L2, 0.6), (Norm.L1, 2.0)])
@pytest.mark.slow
def test_l2_and_l1_training_also_buy_robustness(norm: Norm, eps: float) -> None:
    threat = ThreatSpec(norm, eps, steps=5)
    standard = train(spec("standard", threat=threat), TRAIN, HELD_OUT).history[-1]
    robust = train(spec("pgd", threat=threat), TRAIN, HELD_OUT).history[-1]
    assert standard["robust_accuracy"] <= 0.3
    assert robust["robust_accuracy"] >= standard["robust_accuracy"] + 0.5


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_training_is_deterministic_from_the_seed() -> None:
    s = spec("fgsm_rs", epochs=2)
    first, again = train(s, TRAIN, HELD_OUT), train(s, TRAIN, HELD_OUT)
    other = train(spec("fgsm_rs", epochs=2, seed=1), TRAIN, HELD_OUT)
    assert _states_equal(first.state, again.state)
    assert not _states_equal(first.state, other.state)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in first.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in again.history]


class Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", [Optimizer.SGD, Optimizer.ADAM])
@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_epoch_to_the_same_weights(
        tmp_path: Path, optimizer: Optimizer) -> None:
    s = spec("pgd", epochs=3, optimizer=optimizer,
             lr=0.05 if optimizer is Optimizer.SGD else 3e-3)
    whole = train(s, TRAIN, HELD_OUT, checkpoint_path=tmp_path / "whole.safetensors")
    ckpt = tmp_path / "killed.safetensors"

    def die_in_epoch_two(fraction: float, message: str) -> None:
        if message.startswith("epoch 2/3, batch 5/"):
            raise Killed

    epochs_seen: list[int] = []
    with pytest.raises(Killed):
        train(s, TRAIN, HELD_OUT, checkpoint_path=ckpt, progress=die_in_epoch_two,
              on_epoch=lambda h: epochs_seen.append(len(h)))
    assert epochs_seen == [1]
    messages: list[str] = []
    resumed = train(s, TRAIN, HELD_OUT, checkpoint_path=ckpt,
                    progress=lambda f, m: messages.append(m))
    assert resumed.resumed_epochs == 1
    assert not any(m.startswith("epoch 1/") for m in messages)  # epoch 1 was not run again
    assert _states_equal(whole.state, resumed.state)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in whole.history]


def test_the_checkpoint_is_safetensors_with_json_state(tmp_path: Path) -> None:
    from safetensors import safe_open

    ckpt = tmp_path / "c.safetensors"
    train(spec("standard", epochs=1), TRAIN, HELD_OUT, checkpoint_path=ckpt)
    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["robustscope.training"])
        keys = set(f.keys())
    assert meta["epoch"] == 1
    assert [h["epoch"] for h in meta["history"]] == [1]
    assert "model.2.weight" in keys
    assert "optim.0.momentum_buffer" in keys
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_of_another_spec_is_not_resumed(tmp_path: Path) -> None:
    ckpt = tmp_path / "c.safetensors"
    train(spec("standard", epochs=1), TRAIN, HELD_OUT, checkpoint_path=ckpt)
    other = train(spec("standard", epochs=1, lr=0.01), TRAIN, HELD_OUT, checkpoint_path=ckpt)
    assert other.resumed_epochs == 0


def test_constant_schedule_and_errors() -> None:
    out = train(spec("trades", epochs=1, lr_schedule=LrSchedule.CONSTANT), TRAIN, HELD_OUT)
    assert out.history[0]["lr"] == 0.05
    with pytest.raises(TrainingError, match="cannot take inputs of shape"):
        train(spec("standard", architecture="small_cnn"), EvalData(
            x=torch.rand(4, 1, 2, 2), y=torch.tensor([0, 1, 0, 1]), class_names=["a", "b"]),
            HELD_OUT)
