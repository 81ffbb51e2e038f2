"""Checks on client strings that every backend must refuse the same way.

PostgreSQL cannot store a NUL character in a text column (SQLite can), so a NUL that reached
the database would be a driver error on one backend and a stored value on the other. They are
refused at the edge instead, naming the field.
"""

from __future__ import annotations

from typing import Any

from service.errors import Invalid


def find_nul(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) in ``value`` holding a NUL, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and "\x00" in key:
                return where
            found = find_nul(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_nul(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


def reject_nul(value: Any, field: str) -> None:
    where = find_nul(value, field)
    if where is not None:
        raise Invalid(f"{where} contains a NUL character", field=where)
