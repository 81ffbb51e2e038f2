"""The training loop: epochs over the train split, a held-out measurement after each, and a
checkpoint after each, so a restarted job resumes after the last finished epoch.

Deterministic from the seed: the weights are initialised under a forked, seeded global RNG
(torch's initialisers draw from it; the fork restores the caller's state), and the batch
order and the attacks' random starts of epoch ``e`` come from local generators seeded by
``(seed, e)``. A run resumed from epoch ``e``'s checkpoint therefore takes exactly the steps
the uninterrupted run took (tests/engine/test_training.py checks the weights bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from contract import training as contract
from contract.training import LrSchedule, Optimizer
from workers.engine.attacks import PGD, Forward
from workers.engine.models import build
from workers.engine.training import checkpoint
from workers.engine.training.methods import Method, ThreatSpec, batch_loss
from workers.engine.types import EvalData, ProgressFn, _no_progress

# FGSM-RS's guard against catastrophic overfitting (Wong et al., 2020, section 5.3): held-out
# PGD accuracy that falls to at most half its best, and by at least 10 points, ends the run,
# with the weights of the best epoch restored.
GUARD_RATIO = 0.5
GUARD_MIN_DROP = 0.10


def collapsed(best_robust: float, robust: float) -> bool:
    """Whether held-out robust accuracy ``robust`` is a collapse from ``best_robust``."""
    return robust <= GUARD_RATIO * best_robust and best_robust - robust >= GUARD_MIN_DROP


class TrainingError(ValueError):
    """The training cannot run as specified (a user error, reported as such)."""


@dataclass(frozen=True)
class TrainSpec:
    architecture: str
    method: Method
    threat: ThreatSpec  # the training threat; for ``standard``, only what is measured
    epochs: int
    batch_size: int
    lr: float
    seed: int = 0
    optimizer: Optimizer = Optimizer.SGD
    lr_schedule: LrSchedule = LrSchedule.COSINE
    momentum: float = 0.9
    weight_decay: float = 5e-4
    beta: float = 6.0  # TRADES' trade-off (Zhang et al. use 6 on CIFAR-10)
    eval_steps: int = 10  # PGD steps of the held-out robust accuracy

    @classmethod
    def of(cls, spec: contract.TrainingSpec) -> TrainSpec:
        """The contract's spec (every default filled in by the API) with the engine's own
        settings (momentum, weight decay, held-out PGD steps) at their defaults."""
        t = spec.threat
        return cls(architecture=spec.architecture, method=spec.method,
                   threat=ThreatSpec(t.norm, t.eps, t.steps, t.step_size), epochs=spec.epochs,
                   batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
                   optimizer=spec.optimizer, lr_schedule=spec.lr_schedule, beta=spec.beta)

    def fingerprint(self, num_classes: int, input_shape: tuple[int, ...], n_train: int) -> str:
        """Identifies the run a checkpoint belongs to: a checkpoint of another is ignored."""
        data = {**asdict(self), "num_classes": num_classes, "input_shape": list(input_shape),
                "n_train": n_train}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Trained:
    model: nn.Module  # eval mode, the architecture's own module (no normalising wrapper)
    history: list[dict[str, Any]]
    resumed_epochs: int = 0  # epochs restored from a checkpoint rather than run
    state: dict[str, Tensor] = field(default_factory=dict)  # CPU, contiguous: for safetensors


EpochFn = Callable[[list[dict[str, Any]]], None]


def _generator(device: torch.device, seed: int, epoch: int, salt: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + salt) % (2**63 - 1))
    return g


def build_model(spec: TrainSpec, num_classes: int, input_shape: tuple[int, int, int],
                device: torch.device) -> nn.Module:
    """The untrained network, initialised from the seed, checked on one batch of the inputs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = build(spec.architecture, num_classes, input_shape[0])
    model = model.to(device)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=device))
    except Exception as exc:  # an architecture that cannot take this input size
        raise TrainingError(f"{spec.architecture} cannot take inputs of shape "
                            f"{list(input_shape)}: {exc}") from exc
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_classes):
        raise TrainingError(f"{spec.architecture} returned {type(out).__name__} for inputs "
                            f"of shape {list(input_shape)}, not logits")
    return model


def _optimizer(spec: TrainSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer is Optimizer.ADAM:
        return torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=0.0)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                           weight_decay=spec.weight_decay)


def _lr_at(spec: TrainSpec, step: int, total: int) -> float:
    if spec.lr_schedule is LrSchedule.COSINE:
        return spec.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
    return spec.lr


@torch.no_grad()
def _clean_correct(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) == y[i:i + batch]
                      for i in range(0, x.shape[0], batch)])


def measure(model: nn.Module, data: EvalData, threat: ThreatSpec, steps: int, seed: int,
            epoch: int, device: torch.device, batch: int = 256) -> tuple[float, float]:
    """Clean and robust accuracy on ``data``; robust = correct and not broken by the engine's
    evaluation PGD (``steps`` steps of 2.5 * eps / steps, one random start) at ``threat``."""
    model.eval()
    x, y = data.x.to(device), data.y.to(device)
    n = x.shape[0]
    if n == 0:
        return 0.0, 0.0
    correct = _clean_correct(model, x, y, batch)
    attack = PGD(norm=threat.norm, steps=steps, restarts=1)
    fwd = Forward(model)
    g = _generator(device, seed, epoch, 2)
    robust = torch.zeros_like(correct)
    for i in range(0, n, batch):
        sl = slice(i, i + batch)
        keep = correct[sl].nonzero().squeeze(1)
        if keep.numel() == 0:
            continue
        out = attack.run(fwd, x[sl][keep], y[sl][keep], threat.eps, g)
        robust[sl][keep] = ~out.success
    return int(correct.sum()) / n, int(robust.sum()) / n


def train(spec: TrainSpec, train_data: EvalData, held_out: EvalData, *,
          device: torch.device | str = "cpu", progress: ProgressFn = _no_progress,
          checkpoint_path: Path | None = None, on_epoch: EpochFn | None = None) -> Trained:
    """Train ``spec.architecture`` on ``train_data`` with ``spec.method``.

    ``progress(fraction, message)`` is called between batches and may raise to stop the run
    (cancellation); ``on_epoch(history)`` after each epoch's checkpoint is written. With
    ``checkpoint_path``, a checkpoint of the same spec found there is resumed from.
    """
    device = torch.device(device)
    if len(train_data) < 2:
        raise TrainingError("the train split needs at least 2 examples")
    if spec.epochs < 1 or spec.batch_size < 1 or spec.lr <= 0:
        raise TrainingError("epochs, batch_size and lr must be positive")
    num_classes = len(train_data.class_names)
    if train_data.x.dim() != 4:
        raise TrainingError(f"images must be [N, C, H, W], got {list(train_data.x.shape)}")
    c, h, w = (int(d) for d in train_data.x.shape[1:])
    input_shape = (c, h, w)
    model = build_model(spec, num_classes, input_shape, device)
    optimizer = _optimizer(spec, model)
    fingerprint = spec.fingerprint(num_classes, input_shape, len(train_data))
    start, history = 0, []
    if checkpoint_path is not None:
        saved = checkpoint.load(checkpoint_path, model, optimizer, fingerprint)
        if saved is not None:
            start, history = saved.epoch, saved.history
    best = _Best.restore(checkpoint_path, history, device)
    first = start
    if history and history[-1].get("guard", {}).get("stopped"):
        first = spec.epochs  # the guard ended this run before it was interrupted
    x_all, y_all = train_data.x.to(device), train_data.y.to(device)
    n = x_all.shape[0]
    batches = [(i, min(i + spec.batch_size, n)) for i in range(0, n, spec.batch_size)]
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] < 2:
        batches.pop()  # BatchNorm cannot train on a batch of one
    total = spec.epochs * len(batches)
    for epoch in range(first, spec.epochs):
        began = time.perf_counter()
        order = torch.randperm(n, generator=_generator(torch.device("cpu"), spec.seed, epoch, 0))
        order = order.to(device)
        attack_gen = _generator(device, spec.seed, epoch, 1)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for b, (lo, hi) in enumerate(batches):
            step = epoch * len(batches) + b
            progress(step / total, f"epoch {epoch + 1}/{spec.epochs}, batch {b + 1}/"
                     f"{len(batches)}")
            lr = _lr_at(spec, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[lo:hi]
            x, y = x_all[idx], y_all[idx]
            loss, logits = batch_loss(spec.method, model, x, y, spec.threat, spec.beta,
                                      attack_gen)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {float(loss)} in epoch {epoch + 1}; "
                                    "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * (hi - lo)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += hi - lo
        progress((epoch + 1) * len(batches) / total,
                 f"epoch {epoch + 1}/{spec.epochs}: measuring on the held-out split")
        clean, robust = measure(model, held_out, spec.threat, spec.eval_steps, spec.seed, epoch,
                                device)
        history.append({
            "epoch": epoch + 1, "loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1), "clean_accuracy": clean,
            "robust_accuracy": robust, "lr": _lr_at(spec, (epoch + 1) * len(batches) - 1,
                                                     total),
            "seconds": round(time.perf_counter() - began, 3),
        })
        stop = False
        if spec.method is Method.FGSM_RS:
            stop = _guard(model, history, best, checkpoint_path)
        if checkpoint_path is not None:
            checkpoint.save(checkpoint_path, model, optimizer, epoch + 1, history, fingerprint)
        if on_epoch is not None:
            on_epoch(list(history))
        if stop:
            break
    model.eval()
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return Trained(model=model, history=history, resumed_epochs=start, state=state)


@dataclass
class _Best:
    """The epoch with the best held-out robust accuracy so far and its weights (kept beside
    the checkpoint as ``best.safetensors`` so a resumed run can still roll back to it)."""

    epoch: int = 0
    robust: float = -1.0
    state: dict[str, Tensor] | None = None

    @classmethod
    def restore(cls, path: Path | None, history: list[dict[str, Any]],
                device: torch.device) -> _Best:
        best = cls()
        for h in history:
            if h["robust_accuracy"] > best.robust:
                best.epoch, best.robust = int(h["epoch"]), float(h["robust_accuracy"])
        if path is not None and history and _best_path(path).exists():
            from safetensors.torch import load_file

            best.state = load_file(str(_best_path(path)), device=str(device))
        return best


def _best_path(path: Path) -> Path:
    return path.with_name("best.safetensors")


def _guard(model: nn.Module, history: list[dict[str, Any]], best: _Best,
           checkpoint_path: Path | None) -> bool:
    """FGSM-RS's guard: track the best epoch; on a collapse, restore its weights, record the
    decision in the epoch's history entry and tell the loop to stop."""
    h = history[-1]
    robust = float(h["robust_accuracy"])
    if robust > best.robust:
        best.epoch, best.robust = int(h["epoch"]), robust
        best.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if checkpoint_path is not None:
            from safetensors.torch import save_file

            checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.cpu().contiguous() for k, v in best.state.items()},
                      str(_best_path(checkpoint_path)))
        return False
    if not collapsed(best.robust, robust) or best.state is None:
        return False
    model.load_state_dict(best.state)
    h["guard"] = {"stopped": True, "restored_epoch": best.epoch,
                  "best_robust_accuracy": best.robust,
                  "reason": (f"held-out PGD accuracy fell from {best.robust:.3f} (epoch "
                             f"{best.epoch}) to {robust:.3f}: catastrophic overfitting; the "
                             f"weights of epoch {best.epoch} were restored")}
    return True
