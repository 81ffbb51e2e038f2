"""Errors raised while ingesting an uploaded dataset archive.

One exception class carries everything the API needs to write an RFC 9457 problem: a stable
``type`` slug, an HTTP ``status`` (413 for size limits, 422 for everything else) and, for
per-row problems, the rows themselves, so a user can fix every bad row in one round trip
instead of one per upload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.errors import problem_body

#: How many bad rows an error lists by name; the rest are only counted, so a broken
#: 100k-row manifest does not produce a 100k-item response body.
MAX_LISTED_ROWS = 50

BAD_ROW = "dataset-bad-row"
LAYOUT_UNKNOWN = "dataset-layout-unknown"
TOO_LARGE = "dataset-too-large"
UNSAFE_ARCHIVE = "dataset-unsafe-archive"
ARCHIVE_INVALID = "dataset-archive-invalid"
IMAGE_UNDECODABLE = "dataset-image-undecodable"
EMPTY = "dataset-empty"
BAD_MANIFEST = "dataset-bad-manifest"


@dataclass(frozen=True)
class BadRow:
    """One problem with one example; ``row`` is 1-based (a file line for manifests)."""

    row: int
    path: str
    problem: str

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "path": self.path, "problem": self.problem}


class DatasetIngestError(Exception):
    """An upload that cannot become a dataset, with what the user must change."""

    def __init__(
        self,
        type: str,
        detail: str,
        *,
        status: int = 422,
        rows: list[BadRow] | None = None,
        more_rows: int = 0,
    ) -> None:
        super().__init__(f"{type}: {detail}")
        self.type = type
        self.detail = detail
        self.status = status
        self.rows: list[BadRow] = list(rows or [])
        self.more_rows = more_rows

    @property
    def title(self) -> str:
        return self.type.removeprefix("dataset-").replace("-", " ").capitalize()

    def problem(self) -> dict[str, Any]:
        """The problem+json body (without ``instance``), ready for the API's handler."""
        if not self.rows:
            return problem_body(self.status, self.type, self.title, self.detail)
        return problem_body(self.status, self.type, self.title, self.detail,
                            errors=[r.as_dict() for r in self.rows], more_errors=self.more_rows)


def too_large(detail: str) -> DatasetIngestError:
    return DatasetIngestError(TOO_LARGE, detail, status=413)


def unsafe(detail: str) -> DatasetIngestError:
    return DatasetIngestError(UNSAFE_ARCHIVE, detail)


@dataclass
class BadRows:
    """Collects every bad row of an ingest so that all of them are reported at once."""

    items: list[BadRow] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)

    def add(self, row: int, path: str, problem: str, *, kind: str = BAD_ROW) -> None:
        self.kinds.add(kind)
        self.items.append(BadRow(row, path, problem))

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        # Undecodable images get their own slug only when they are the sole kind of problem,
        # so a client can tell "re-export your images" from "fix your manifest".
        kind = IMAGE_UNDECODABLE if self.kinds == {IMAGE_UNDECODABLE} else BAD_ROW
        ordered = sorted(self.items, key=lambda r: (r.row, r.path, r.problem))
        listed = ordered[:MAX_LISTED_ROWS]
        detail = f"{len(ordered)} bad row(s) in the dataset"
        if len(ordered) > len(listed):
            detail += f"; the first {len(listed)} are listed"
        raise DatasetIngestError(kind, detail, rows=listed, more_rows=len(ordered) - len(listed))
