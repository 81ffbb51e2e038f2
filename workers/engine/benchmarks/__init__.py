"""The benchmark registry: a name from the evaluation suite to the function that runs it.

Each module registers its benchmarks with :func:`register`; :func:`run` dispatches. The
service validates the suite's shape before a job exists; ``requires`` lets the engine refuse
a benchmark the data cannot support with a clear :class:`BenchmarkError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from workers.engine.types import BenchmarkError, BenchmarkFn, BenchmarkResult, EvalData, RunContext

_REGISTRY: dict[str, BenchmarkFn] = {}


def register(name: str) -> Callable[[BenchmarkFn], BenchmarkFn]:
    def deco(fn: BenchmarkFn) -> BenchmarkFn:
        if name in _REGISTRY:
            raise RuntimeError(f"benchmark {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def run(name: str, model: nn.Module, data: EvalData, params: dict[str, Any],
        ctx: RunContext) -> BenchmarkResult:
    _load_all()
    try:
        fn = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {known}") from None
    return fn(model, data, params, ctx)


def _load_all() -> None:
    # Importing a module registers its benchmarks.
    import importlib

    for module in _MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


_MODULES = (
    "workers.engine.benchmarks.clean",
    "workers.engine.benchmarks.adversarial",
    "workers.engine.benchmarks.natural",
)
