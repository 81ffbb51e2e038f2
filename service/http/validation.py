"""Checks on client input that every backend must refuse the same way.

PostgreSQL cannot store a NUL character in a text column (SQLite can), so a NUL that reached
the database would be a driver error on one backend and a stored value on the other. They are
refused at the edge instead, naming the field.

JSON from a client is nested at most :data:`MAX_JSON_DEPTH` levels (objects and arrays): every
JSON the API parses goes through :func:`loads` (or :func:`check_depth` once parsed), so a
body nested 100 000 deep is a 422 that names the limit, never a ``RecursionError``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from core.errors import Invalid


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


#: Levels of objects and arrays a client's JSON may nest.
MAX_JSON_DEPTH = 64


def too_deep(field: str | None) -> Invalid:
    what = field or "the body"
    return Invalid(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels of objects and arrays",
                   field=field or "body", limit=MAX_JSON_DEPTH)


def json_depth(value: Any) -> int:
    """Levels of dicts and lists in ``value`` (0 for a scalar), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children
                     if isinstance(child, dict | list))
    return deepest


def may_be_deep(raw: str | bytes) -> bool:
    """Whether JSON text could nest past the limit (it has enough brackets): a count at C
    speed, so that most bodies are never walked twice."""
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{") > MAX_JSON_DEPTH
    return raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")


def text_depth(raw: str | bytes) -> int:
    """Levels of brackets outside strings in JSON text, well-formed or not."""
    data = raw.encode() if isinstance(raw, str) else raw
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    level = deepest = 0
    for c in brackets:
        level = level + 1 if c in b"[{" else max(level - 1, 0)
        deepest = max(deepest, level)
    return deepest


def check_depth(value: Any, field: str | None = None) -> None:
    if json_depth(value) > MAX_JSON_DEPTH:
        raise too_deep(field)


def loads(raw: str | bytes, field: str | None = None) -> Any:
    """``json.loads`` for a client's JSON: a ``ValueError`` if it is not JSON, :class:`Invalid`
    (naming ``field``, else the body, and the limit) if it nests past the limit."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise too_deep(field) from None
    except ValueError:
        # Not JSON; but another parser (at another stack depth) must not recurse on it either.
        if may_be_deep(raw) and text_depth(raw) > MAX_JSON_DEPTH:
            raise too_deep(field) from None
        raise
    if may_be_deep(raw):
        check_depth(value, field)
    return value
