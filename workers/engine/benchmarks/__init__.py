"""The benchmark registry: a name from the evaluation suite to the function that runs it.

Each module registers its benchmarks with :func:`register`; :func:`run` dispatches on the typed
entry's ``benchmark``. Entries are the contract's models (``contract/suite.py``): the API
validates them before a job exists and the worker parses them back with
``contract.suite.parse_entry``, so a benchmark checks only what depends on the data (masks,
groups, a regenerable source, the box's diameter) and refuses that with a clear
:class:`BenchmarkError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from contract.suite import Entry, SpecError, parse_entry
from workers.engine.types import (
    BenchmarkError,
    BenchmarkFn,
    BenchmarkResult,
    EntryT,
    EvalData,
    RunContext,
)

_REGISTRY: dict[str, BenchmarkFn[Any]] = {}


def register(name: str) -> Callable[[BenchmarkFn[EntryT]], BenchmarkFn[EntryT]]:
    def deco(fn: BenchmarkFn[EntryT]) -> BenchmarkFn[EntryT]:
        if name in _REGISTRY:
            raise RuntimeError(f"benchmark {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def parse(raw: Any) -> Entry:
    """A suite entry as the job carries it (JSON) as the contract's typed entry: the same
    models the API validated it with. What the contract refuses is a :class:`BenchmarkError`."""
    try:
        return parse_entry(raw)
    except SpecError as exc:
        raise BenchmarkError(str(exc)) from exc


def run(model: nn.Module, data: EvalData, entry: Entry, ctx: RunContext) -> BenchmarkResult:
    """Run the benchmark ``entry`` names (a model of ``contract.suite``)."""
    _load_all()
    name: str = entry.benchmark
    try:
        fn = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {known}") from None
    return fn(model, data, entry, ctx)


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
