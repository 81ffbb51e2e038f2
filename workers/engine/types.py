"""The engine's vocabulary: what a benchmark receives and what it returns.

The engine is a plain PyTorch library. A benchmark is a function
``(model, data, entry, ctx) -> BenchmarkResult`` where ``entry`` is the contract's typed suite
entry (``contract/suite.py``); the Celery task that calls it owns the database, the broker and
the files, and hands the engine only tensors, typed entries and callbacks. Nothing here imports
web, Celery or database code.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from contract.stats import encode_outcomes
from contract.suite import BaseEntry


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded as described; the message says why, for the user."""


class Cancelled(Exception):
    """Raised by a progress callback when the job was cancelled; benchmarks let it propagate."""


class BenchmarkError(ValueError):
    """A benchmark cannot run with these parameters on this data (a user error, not a crash)."""


class DatasetSource(Protocol):
    """A generated dataset that can be drawn again under other settings (for ``spurious_shift``)."""

    def with_correlation(self, correlation: float, split: str) -> EvalData: ...


@dataclass
class EvalData:
    """A labelled image set held in memory, pixels in [0, 1].

    ``masks`` are binary foreground masks (1 = object); ``groups`` index ``group_names``.
    ``source`` is set for generated datasets that can be redrawn with another spurious
    correlation; ``backgrounds`` optionally holds each image's clean background (the same
    shape as ``x``) when the generator knows it exactly.
    """

    x: Tensor  # [N, C, H, W] float32 in [0, 1]
    y: Tensor  # [N] int64
    class_names: list[str]
    masks: Tensor | None = None  # [N, 1, H, W] float32 in {0, 1}
    groups: Tensor | None = None  # [N] int64
    group_names: list[str] | None = None
    backgrounds: Tensor | None = None  # [N, C, H, W], the image without its object
    source: DatasetSource | None = None
    name: str = ""

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: Tensor) -> EvalData:
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return EvalData(
            x=self.x[index], y=self.y[index], class_names=self.class_names,
            masks=pick(self.masks), groups=pick(self.groups), group_names=self.group_names,
            backgrounds=pick(self.backgrounds), source=self.source, name=self.name,
        )


ProgressFn = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    return None


@dataclass
class RunContext:
    """Where and how a benchmark runs.

    ``progress(fraction, message)`` reports the fraction of *this benchmark* done and may
    raise :class:`Cancelled`; call it between batches. ``state_dir`` survives a worker
    restart for the same job: save resumable state (per-example flags) there.
    ``artifact_dir`` receives files worth keeping with the results.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    batch_size: int = 256
    amp: bool = False  # bf16 autocast for the attack search; accuracies are measured in fp32
    progress: ProgressFn = _no_progress
    state_dir: Path | None = None
    artifact_dir: Path | None = None
    # Where the examples given start in the whole evaluation set (a shard's slice): attacks
    # batch and seed by blocks of the whole set (workers/engine/runner.py).
    offset: int = 0

    def generator(self, salt: int = 0) -> torch.Generator:
        """A fresh local generator; library code never seeds the global RNG."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + salt)
        return g


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA, or a CPU with AMX / AVX512-BF16);
    elsewhere autocast would emulate it. Native is not the same as fast: see
    :func:`fast_bf16`."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


BF16_MIN_SPEEDUP = 1.5
"""A CPU searches in bf16 only when the probe step runs at least this much faster in bf16
than in fp32: a bf16 search pays for fp32 confirmations of its breaks, which only a clear gain
covers."""


def fast_bf16(device: torch.device) -> bool:
    """Whether the attack search should run under bf16 autocast on ``device``: on CUDA
    wherever bf16 is native (tensor cores); on a CPU only where :func:`bf16_speedup` is at
    least :data:`BF16_MIN_SPEEDUP`. Native bf16 alone does not say that: an AMD EPYC with
    AVX512-BF16 ran a ResNet-18 gradient step 2.2x faster in bf16, while on a 2-core Xeon with
    AVX512-BF16 and no AMX the probe ran at 0.56 to 0.81x fp32's speed."""
    if not native_bf16(device):
        return False
    if device.type != "cpu":
        return True
    return bf16_speedup() >= BF16_MIN_SPEEDUP


@functools.lru_cache(maxsize=1)
def bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of a search step through two 3x3 convolutions (forward
    and input gradient, channels_last, 64 channels at 16x16, batch 32) on this CPU, the best
    of four runs each (the first warms oneDNN's kernel cache up). Measured once per process,
    in about a tenth of a second, with a private generator (the global RNG is not touched)."""
    def step_seconds(x: Tensor, weight: Tensor, amp: bool) -> float:
        best = float("inf")
        for _ in range(4):
            t0 = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                xg = x.detach().requires_grad_(True)
                y = torch.nn.functional.conv2d(xg, weight, padding=1)
                y = torch.nn.functional.conv2d(y, weight, padding=1)
                torch.autograd.grad(y.float().square().sum(), xg)
            best = min(best, time.perf_counter() - t0)
        return best

    with torch.inference_mode(False), torch.enable_grad():  # callers may be in inference mode
        gen = torch.Generator().manual_seed(0)
        cl = torch.channels_last
        weight = (torch.randn(64, 64, 3, 3, generator=gen) * 0.05).contiguous(memory_format=cl)
        x = torch.rand(32, 64, 16, 16, generator=gen).contiguous(memory_format=cl)
        return step_seconds(x, weight, False) / step_seconds(x, weight, True)


def strict_fp32() -> tuple[bool, bool]:
    """Make CUDA's fp32 convolutions and matmuls IEEE fp32, not TF32 (cuDNN allows TF32 by
    default): the engine's fp32 forwards are the references that confirm every break and
    measure every accuracy. Process-wide; returns the previous (cudnn, matmul) settings."""
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return before


def float32_decimal(value: float) -> float:
    """The shortest decimal that rounds to the same float32 as ``value``."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class MetricRow:
    """One reported number. Metrics are measured in float32, so the value is the shortest
    decimal that reads back as the same float32 (0.49, not 0.49000000953674316)."""

    benchmark: str
    metric: str
    value: float
    params: dict[str, Any] = field(default_factory=dict)
    outcomes: Tensor | None = field(default=None, compare=False, repr=False)
    """For an accuracy (a share of examples): per example, in the data's order, whether it
    counted (correct, robust). Reported with the row, so the API can give the value's
    interval and compare two evaluations on the same examples one by one."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", float32_decimal(self.value))

    @classmethod
    def share(cls, benchmark: str, metric: str, outcomes: Tensor,
              params: dict[str, Any] | None = None) -> MetricRow:
        """The row of an accuracy: the share of ``outcomes`` (one bool per example) that
        hold, kept with the outcomes themselves."""
        flags = outcomes.detach().to("cpu", torch.bool).flatten()
        n = int(flags.numel())
        value = int(flags.sum()) / n if n else 0.0
        return cls(benchmark, metric, value, dict(params or {}), flags)

    def packed_outcomes(self) -> tuple[int, str] | None:
        """The outcomes as reported: their number and the flags packed as text."""
        if self.outcomes is None:
            return None
        return (int(self.outcomes.numel()),
                encode_outcomes(self.outcomes.to(torch.uint8).numpy().tobytes()))

    def as_dict(self) -> dict[str, Any]:
        out = {"benchmark": self.benchmark, "metric": self.metric,
               "value": float(self.value), "params": dict(self.params)}
        packed = self.packed_outcomes()
        if packed is not None:
            out["n"], out["outcomes"] = packed
        return out


@dataclass(frozen=True)
class Check:
    """A sanity check in the AutoAttack sense: a flag reported with the results."""

    name: str
    passed: bool
    detail: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail,
                "params": dict(self.params)}


@dataclass
class BenchmarkResult:
    rows: list[MetricRow] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)

    def extend(self, other: BenchmarkResult) -> None:
        self.rows.extend(other.rows)
        self.checks.extend(other.checks)
        self.artifacts.update(other.artifacts)


EntryT = TypeVar("EntryT", bound=BaseEntry)
BenchmarkFn = Callable[[nn.Module, EvalData, EntryT, RunContext], BenchmarkResult]
"""A benchmark: the model, the data, its typed suite entry (``contract.suite``), the context."""
