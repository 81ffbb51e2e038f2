"""Owners are scoped only through the repositories.

Every query or check that narrows by owner (the owner's row or rows, what a reader may see,
whether a row is the reader's own) is a function of ``core/repository.py`` or of a domain's
``repository.py``, so the rule "another owner's row is not found" is written in those few
places. This test reads the source of every module of ``service``, ``core``, ``workers`` and
``robustscope`` and fails, naming file and line, on an owner comparison written anywhere else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "core", "workers", "robustscope")

#: The only modules where an owner comparison may be written.
ALLOWED = {
    # The generic narrowing every domain builds on: owned_by, owned, owned_rows, count_owned,
    # visible_to (own or public) and is_owner (the "mine" flag of a page).
    "core/repository.py",
    # Where an evaluation came from: the owner's training that queued it and its sweep.
    "service/evaluations/repository.py",
    # The owner's uploaded dataset by id or name, and whether a name is already taken.
    "service/datasets/repository.py",
}

#: Attributes (and ``table.c["..."]`` keys) that name a row's owner.
OWNER_NAMES = {"owner", "owner_id"}

#: SQLAlchemy's comparison methods, ``X.owner.in_(...)`` and the like.
COMPARING_METHODS = {
    "__eq__", "__ne__", "in_", "not_in", "notin_", "is_", "is_not", "isnot",
    "is_distinct_from", "is_not_distinct_from", "isnot_distinct_from", "like", "ilike",
    "not_like", "not_ilike", "notlike", "notilike", "startswith", "endswith", "contains",
    "between", "op", "regexp_match",
}


def _names_owner(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr in OWNER_NAMES
    return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
            and node.slice.value in OWNER_NAMES)


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def owner_comparisons(source: str) -> list[int]:
    """The lines of ``source`` that compare an owner by hand: ``a.owner == b`` (any comparison
    operator, either side), ``A.owner.in_(...)`` and SQLAlchemy's other comparison methods
    (``f(x.owner)`` for ``f`` one of them too), and ``filter_by(owner=...)``. Asking whether a
    reader has an owner at all (``viewer.owner is None``) narrows nothing and passes."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, operands[:-1], operands[1:], strict=True):
                if not (_names_owner(left) or _names_owner(right)):
                    continue
                if isinstance(op, ast.Is | ast.IsNot) and (_is_none(left) or _is_none(right)):
                    continue
                lines.append(node.lineno)
                break
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            if method in COMPARING_METHODS and (
                    _names_owner(node.func.value) or any(_names_owner(a) for a in node.args)):
                lines.append(node.lineno)
            elif method == "filter_by" and any(k.arg in OWNER_NAMES for k in node.keywords):
                lines.append(node.lineno)
    return sorted(lines)


def _sources() -> list[Path]:
    return sorted(p for top in PACKAGES for p in (ROOT / top).rglob("*.py"))


def test_no_owner_comparison_outside_the_repositories() -> None:
    sources = _sources()
    assert ROOT / "service/http/polling.py" in sources
    assert ROOT / "core/quotas.py" in sources
    offenders = [f"{path.relative_to(ROOT)}:{line}"
                 for path in sources if path.relative_to(ROOT).as_posix() not in ALLOWED
                 for line in owner_comparisons(path.read_text())]
    assert offenders == [], (
        "compare owners through core/repository.py or the domain's repository.py: "
        + ", ".join(offenders))


def test_every_allowed_module_is_a_repository_that_compares_owners() -> None:
    """A stale entry (a module renamed, or one that no longer narrows by owner) leaves the
    list, so the list stays the map of where owners are scoped."""
    for name in sorted(ALLOWED):
        path = ROOT / name
        assert path.name == "repository.py", name
        assert owner_comparisons(path.read_text()), name


@pytest.mark.parametrize(("snippet", "lines"), [
    ("q = select(Model).where(Model.owner == owner)", [1]),
    ("mine = viewer.owner != row.owner", [1]),
    ("ok = owner == row.owner", [1]),
    ("ok = row.owner in owners", [1]),
    ("ok = 'me' not in row.owner_id", [1]),
    ("ok = row.owner is viewer", [1]),
    ("q = select(Model).where(\n    Model.id == i,\n    Model.owner.in_(names))", [3]),
    ("q = select(Model).where(Model.owner.is_(None))", [1]),
    ("q = select(Model).where(Model.owner.like('a%'))", [1]),
    ("q = select(job).where(job.c['owner'] == keys.c.owner)", [1]),
    ("q = session.query(Model).filter_by(owner=owner)", [1]),
    ("def f():\n    return 0 < x.owner_id < 9", [2]),
])
def test_the_detector_flags_a_hand_written_comparison(snippet: str, lines: list[int]) -> None:
    assert owner_comparisons(snippet) == lines


@pytest.mark.parametrize("snippet", [
    "q = owned_rows(Model, owner)",
    "row = owned(session, Model, owner, model_id, 'model')",
    "q = select(Model).where(owned_by(Model, owner), Model.name == name)",
    "mine = is_owner(row, viewer.owner)",
    "q = select(Evaluation).where(visible_to(Evaluation, viewer.owner))",
    "if viewer.owner is None:\n    raise viewer.refusal()",
    "row = Dataset(owner=owner, name=name)",
    "print(f'revoked key {row.prefix} of {row.owner}')",
    "q = select(BrowserSession.owner).where(BrowserSession.token_hash == digest)",
])
def test_the_detector_passes_what_narrows_through_a_repository(snippet: str) -> None:
    assert owner_comparisons(snippet) == []
