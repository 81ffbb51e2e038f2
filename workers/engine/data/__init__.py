"""Datasets the engine evaluates on: generated built-ins and uploaded npz files.

Built-ins are generated deterministically from a seed, offline; see :mod:`.builtin` for
names and parameters. Uploads arrive in the canonical npz format (:mod:`.npz`).
"""

from workers.engine.data.builtin import (
    BUILTINS,
    DEFAULT_BUILTIN,
    BuiltinSource,
    builtin_names,
    load_builtin,
)
from workers.engine.data.npz import DatasetFormatError, load_npz
from workers.engine.data.subset import seeded_subset

__all__ = [
    "BUILTINS",
    "DEFAULT_BUILTIN",
    "BuiltinSource",
    "DatasetFormatError",
    "builtin_names",
    "load_builtin",
    "load_npz",
    "seeded_subset",
]
