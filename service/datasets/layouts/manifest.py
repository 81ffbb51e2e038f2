"""The ``manifest`` layout: ``manifest.csv`` or ``manifest.jsonl`` naming every image, its label
and optionally its mask, group and split."""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any

from service.datasets.ingest_decode import (
    MASK_SUFFIXES,
)
from service.datasets.ingest_errors import (
    BAD_MANIFEST,
    EMPTY,
    BadRows,
    DatasetIngestError,
)
from service.datasets.layouts.common import (
    DEFAULT_SPLIT,
    Example,
    Level,
    Plan,
    as_text,
    csv_rows,
    parse_label,
    resolve_path,
)

_SPLIT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


_MANIFEST_COLUMNS = ("path", "label", "mask", "group", "split")


def detect_manifest(level: Level, bad: BadRows) -> Plan | None:
    has_csv, has_jsonl = level.has("manifest.csv"), level.has("manifest.jsonl")
    if not (has_csv or has_jsonl):
        return None
    if has_csv and has_jsonl:
        raise DatasetIngestError(
            BAD_MANIFEST, "the archive has both manifest.csv and manifest.jsonl; keep one"
        )
    name = "manifest.csv" if has_csv else "manifest.jsonl"
    text = level.read_text(name)
    rows = csv_rows(text, name) if has_csv else _jsonl_rows(text, bad, level.full(name))
    columns, records = rows
    warnings: list[str] = []
    extra = sorted(set(columns) - set(_MANIFEST_COLUMNS))
    if extra:
        warnings.append(f"{name}: ignored column(s) {', '.join(extra)}")
    for optional in ("mask", "group"):
        # An exported table often carries an optional column with nothing in it; that means
        # "none", not "every row is missing one".
        if optional in columns and all(as_text(rec.get(optional)) is None for _, rec in records):
            columns = columns - {optional}
            warnings.append(f"{name}: the {optional} column is empty everywhere and was ignored")
    class_names = _read_class_names(level)
    examples: list[Example] = []
    for line, rec in records:
        ex = _manifest_example(level, line, rec, columns, class_names, bad)
        examples.append(ex)
    if not examples:
        raise DatasetIngestError(EMPTY, f"{name} has no rows")
    if class_names is None:
        top = max((e.label for e in examples), default=-1)
        class_names = [str(i) for i in range(top + 1)]
    plan = Plan(
        layout="manifest",
        root=level.root,
        examples=examples,
        class_names=class_names,
        has_masks="mask" in columns,
        has_groups="group" in columns,
        warnings=warnings,
    )
    return plan


def _jsonl_rows(
    text: str, bad: BadRows, name: str
) -> tuple[set[str], list[tuple[int, dict[str, Any]]]]:
    records: list[tuple[int, dict[str, Any]]] = []
    columns: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.add(number, name, f"line is not valid JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict):
            bad.add(number, name, "line is not a JSON object")
            continue
        rec = {str(k).strip().lower(): v for k, v in obj.items()}
        columns.update(rec)
        records.append((number, rec))
    if records and not {"path", "label"} <= columns:
        raise DatasetIngestError(
            BAD_MANIFEST,
            f"{name} objects need the keys path and label (optional mask, group, split)",
        )
    return columns, records


def _manifest_example(
    level: Level,
    line: int,
    rec: dict[str, Any],
    columns: set[str],
    class_names: list[str] | None,
    bad: BadRows,
) -> Example:
    raw_path = as_text(rec.get("path"))
    shown = raw_path or ""
    if "__width__" in rec:
        bad.add(line, shown, str(rec["__width__"]))
    path = resolve_path(level, raw_path, "image", line, bad)
    label, problem = parse_label(rec.get("label"))
    if label is None:
        bad.add(line, shown, problem)
        label = -1
    elif label < 0:
        bad.add(line, shown, f"label {label} is negative")
        label = -1
    elif class_names is None and label >= level.max_classes:
        bad.add(line, shown, f"label {label} is above the limit of {level.max_classes} classes")
        label = -1
    elif class_names is not None and label >= len(class_names):
        bad.add(
            line,
            shown,
            f"label {label} is out of range 0..{len(class_names) - 1} "
            f"({len(class_names)} class names given)",
        )
        label = -1
    mask = None
    if "mask" in columns:
        raw_mask = as_text(rec.get("mask"))
        if raw_mask is None:
            bad.add(line, shown, "mask is empty; every row needs one when the mask column exists")
        else:
            mask = resolve_path(level, raw_mask, "mask", line, bad, shown=shown)
            if mask is not None and PurePosixPath(mask).suffix.lower() not in MASK_SUFFIXES:
                bad.add(line, shown, f"mask {raw_mask!r} is not a .png, .jpg or .npy file")
                mask = None
    group = None
    if "group" in columns:
        group = as_text(rec.get("group"))
        if group is None:
            bad.add(line, shown, "group is empty; every row needs one when the group column exists")
    split = DEFAULT_SPLIT
    raw_split = as_text(rec.get("split")) if "split" in columns else None
    if raw_split is not None:
        split = raw_split.lower()
        if not _SPLIT_RE.match(split):
            bad.add(line, shown, f"split {raw_split!r} is not a short name like train/val/test")
    return Example(row=line, path=path or "", label=label, split=split, mask=mask, group=group)


def _read_class_names(level: Level) -> list[str] | None:
    names: list[str] | None = None
    source = ""
    for candidate in ("classes.txt", "class_names.txt"):
        if level.has(candidate):
            names = [ln.strip() for ln in level.read_text(candidate).splitlines() if ln.strip()]
            source = candidate
            break
    else:
        for candidate in ("classes.json", "class_names.json"):
            if level.has(candidate):
                source = candidate
                try:
                    loaded = json.loads(level.read_text(candidate))
                except json.JSONDecodeError as exc:
                    raise DatasetIngestError(
                        BAD_MANIFEST, f"{candidate} is not valid JSON ({exc.msg})"
                    ) from exc
                if not isinstance(loaded, list) or not all(isinstance(n, str) for n in loaded):
                    raise DatasetIngestError(
                        BAD_MANIFEST, f"{candidate} must be a JSON list of class-name strings"
                    )
                names = [n.strip() for n in loaded]
                break
    if names is None:
        return None
    if not names:
        raise DatasetIngestError(BAD_MANIFEST, f"{source} lists no class names")
    if len(set(names)) != len(names):
        raise DatasetIngestError(BAD_MANIFEST, f"{source} repeats a class name")
    return names
