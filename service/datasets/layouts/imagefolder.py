"""The ``imagefolder`` layout: ``<class>/<image>`` or ``<split>/<class>/<image>``."""

from __future__ import annotations

from pathlib import PurePosixPath

from service.datasets.ingest_decode import (
    IMAGE_SUFFIXES,
    OTHER_IMAGE_SUFFIXES,
)
from service.datasets.ingest_errors import (
    BadRows,
)
from service.datasets.layouts.common import (
    DEFAULT_SPLIT,
    Example,
    Level,
    Plan,
    reject_other_formats,
)

_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def detect_imagefolder(level: Level, bad: BadRows) -> Plan | None:
    candidates = [
        f
        for f in level.files
        if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES
    ]
    if not candidates:
        return None
    depths = {f.count("/") for f in candidates}
    if depths == {1}:
        with_split = False
    elif depths == {2} and all(f.split("/", 1)[0] in _SPLIT_DIRS for f in candidates):
        with_split = True
    else:
        return None
    warnings: list[str] = []
    ignored = len(level.files) - len(candidates)
    if ignored:
        warnings.append(f"imagefolder: {ignored} non-image file(s) were ignored")

    def class_of(f: str) -> str:
        return f.split("/")[-2]

    class_names = sorted({class_of(f) for f in candidates})
    labels = {name: i for i, name in enumerate(class_names)}
    examples: list[Example] = []
    for number, rel in enumerate(candidates, start=1):
        split = _SPLIT_DIRS[rel.split("/", 1)[0]] if with_split else DEFAULT_SPLIT
        ex = Example(row=number, path=level.full(rel), label=labels[class_of(rel)], split=split)
        reject_other_formats(rel, ex, bad)
        examples.append(ex)
    if with_split:
        for split in sorted({e.split for e in examples}):
            have = {e.label for e in examples if e.split == split}
            if len(have) < len(class_names):
                missing = [n for n in class_names if labels[n] not in have]
                warnings.append(f"imagefolder: split {split} has no images of {', '.join(missing)}")
    return Plan(
        layout="imagefolder",
        root=level.root,
        examples=examples,
        class_names=class_names,
        warnings=warnings,
    )
