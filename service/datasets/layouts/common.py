"""What every layout shares: the examples and the plan it produces, the archive seen from one
folder, and the helpers for cells, paths and image names."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from service.datasets.ingest_archive import SafeArchive, safe_relative_path
from service.datasets.ingest_decode import (
    IMAGE_SUFFIXES,
    OTHER_IMAGE_SUFFIXES,
)
from service.datasets.ingest_errors import (
    BAD_MANIFEST,
    EMPTY,
    BadRows,
    DatasetIngestError,
)

DEFAULT_SPLIT = "test"


_INT_RE = re.compile(r"^[+-]?\d+$")


@dataclass
class Example:
    """One image to decode; ``label`` is -1 when the row's label was bad (already reported)."""

    row: int
    path: str
    label: int
    split: str = DEFAULT_SPLIT
    mask: str | None = None
    group: str | None = None


@dataclass
class Plan:
    layout: str
    root: str
    examples: list[Example]
    class_names: list[str]
    has_masks: bool = False
    #: Fixed group names (index = group id); None means "the sorted distinct group strings".
    group_names: list[str] | None = None
    has_groups: bool = False
    warnings: list[str] = field(default_factory=list)


class Level:
    """The archive's files seen from one folder, with paths relative to it."""

    def __init__(self, archive: SafeArchive, root: str, max_classes: int) -> None:
        self.archive = archive
        self.root = root
        self.max_classes = max_classes
        prefix = f"{root}/" if root else ""
        self.files = sorted(p[len(prefix) :] for p in archive.members if p.startswith(prefix))
        self.fileset = set(self.files)

    def full(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def has(self, rel: str) -> bool:
        return rel in self.fileset

    def read_text(self, rel: str) -> str:
        data = self.archive.read(self.full(rel))
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DatasetIngestError(BAD_MANIFEST, f"{self.full(rel)} is not UTF-8 text") from exc

    def under(self, folder: str) -> list[str]:
        prefix = folder.rstrip("/") + "/"
        return [f for f in self.files if f.startswith(prefix)]


def as_text(value: Any) -> str | None:
    """A manifest cell as text; None for empty/absent (JSON null or "")."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value).strip()
    return text or None


def parse_label(value: Any) -> tuple[int | None, str]:
    if isinstance(value, bool):
        return None, f"label {value!r} is not an integer"
    if isinstance(value, int):
        return value, ""
    if isinstance(value, float) and value.is_integer():
        return int(value), ""
    text = as_text(value)
    if text is None:
        return None, "label is empty"
    if not _INT_RE.match(text):
        return None, f"label {text!r} is not an integer class index"
    return int(text), ""


def resolve_path(
    level: Level,
    raw: str | None,
    what: str,
    line: int,
    bad: BadRows,
    *,
    shown: str | None = None,
) -> str | None:
    shown = raw if shown is None else shown
    if raw is None:
        bad.add(line, "", f"{what} path is empty")
        return None
    rel = safe_relative_path(raw)
    if rel is None:
        bad.add(line, shown or raw, f"{what} path {raw!r} is absolute or leaves the archive root")
        return None
    if not level.has(rel):
        bad.add(line, shown or raw, f"{what} file {raw!r} is not in the archive")
        return None
    return level.full(rel)


def csv_rows(
    text: str, name: str, required: tuple[str, ...] = ("path", "label")
) -> tuple[set[str], list[tuple[int, dict[str, Any]]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetIngestError(EMPTY, f"{name} is empty") from None
    except csv.Error as exc:
        raise DatasetIngestError(BAD_MANIFEST, f"{name}: {exc}") from exc
    keys = [h.strip().lower() for h in header]
    missing = [c for c in required if c not in keys]
    if missing:
        raise DatasetIngestError(
            BAD_MANIFEST,
            f"{name} has no {' or '.join(missing)} column; its header is {header!r} and "
            f"must name {','.join(required)}"
            + ("[,mask][,group][,split]" if required == ("path", "label") else ""),
        )
    if len(set(keys)) != len(keys):
        raise DatasetIngestError(BAD_MANIFEST, f"{name} repeats a column name: {header!r}")
    records: list[tuple[int, dict[str, Any]]] = []
    try:
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            rec: dict[str, Any] = dict(zip(keys, values, strict=False))
            if len(values) != len(keys):
                rec["__width__"] = f"row has {len(values)} fields; the header has {len(keys)}"
            records.append((reader.line_num, rec))
    except csv.Error as exc:
        raise DatasetIngestError(BAD_MANIFEST, f"{name} line {reader.line_num}: {exc}") from exc
    return set(keys), records


def images_at_depth(files: list[str], slashes: int) -> tuple[list[str], int]:
    """Image-named files exactly ``slashes`` folders deep, and how many others there were."""
    suffixes = IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES
    images = [
        f for f in files if f.count("/") == slashes and PurePosixPath(f).suffix.lower() in suffixes
    ]
    return images, len(files) - len(images)


def reject_other_formats(rel: str, ex: Example, bad: BadRows) -> None:
    suffix = PurePosixPath(rel).suffix.lower()
    if suffix in OTHER_IMAGE_SUFFIXES:
        bad.add(ex.row, ex.path, f"{suffix} images are not accepted; convert to PNG or JPEG")
        ex.path = ""
