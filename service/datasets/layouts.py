"""Recognising the layout of an uploaded dataset archive and turning it into a list of examples.

Detection looks only at member names and small metadata files, never at pixels. It runs at
the archive root and, if nothing matches there and everything sits in one top folder (how
"zip the folder" tools pack), again inside that folder, and so on down. At each level the
layouts are tried in a fixed order, most explicit first, so that one archive never matches
two of them:

1. ``manifest`` — ``manifest.csv`` or ``manifest.jsonl``: the user said exactly what they meant.
2. ``waterbirds`` — ``metadata.csv`` whose header has ``img_filename, y, split, place``.
3. ``imagenet9`` — ``original/val/<class>/<image>`` (the backgrounds-challenge release).
4. ``rival10`` — ``train/ordinary/`` or ``test/ordinary/`` holding ImageNet-named files
   (``n01531178_1234.JPEG``); an ImageFolder with a class called "ordinary" does not qualify,
   because its file names do not start with a WordNet id.
5. ``imagefolder`` — ``<class>/<image>`` or ``<split>/<class>/<image>``, last because it is
   the least specific: the ImageNet-9 and RIVAL10 trees are nested folders too.

RIVAL10, as established from the authors' loaders (github.com/mmoayeri/RIVAL10,
``rival10/local_rival10.py``, ``rival10/data/{label_mappings,wnid_to_class}.json`` and
``datasets/rival10.py``): the release unzips to ``RIVAL10/{train,test}/ordinary/`` with, per
image ``<wnid>_<n>.JPEG``, the siblings ``<stem>_attr_labels.npy`` (attribute vectors),
``<stem>_merged_mask.JPEG`` (union of the *attribute* masks, not the object) and
``<stem>_attr_dict.pkl`` (a pickle of base64 JPEG masks, the entire-object mask among them).
The class comes from the WordNet id in the file name, through ``wnid_to_class.json`` and
``label_mappings.json`` (20 ImageNet classes onto 10 RIVAL10 classes); those two files ship
with the code, not the data, so the mapping is built in here and a copy inside the archive,
if any, takes precedence. Pickles are never loaded, so the entire-object masks are taken
only from an ``{split}/entire_object_masks/`` folder (the layout of the authors' earlier
``RIVAL10`` loader: ``<wnid>_<imagenet file name>``; ``<stem>.<ext>`` is accepted too) holding
PNG, JPEG or ``.npy`` masks; without one the dataset is ingested without masks, with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from service.datasets.ingest_archive import SafeArchive, safe_relative_path
from service.datasets.ingest_decode import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    OTHER_IMAGE_SUFFIXES,
)
from service.datasets.ingest_errors import (
    BAD_MANIFEST,
    EMPTY,
    LAYOUT_UNKNOWN,
    BadRows,
    DatasetIngestError,
)

DEFAULT_SPLIT = "test"
LAYOUTS = ("manifest", "waterbirds", "imagenet9", "rival10", "imagefolder")

_SPLIT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_WNID_RE = re.compile(r"^(n\d{8})_")
_IN9_CLASS_RE = re.compile(r"^(\d+)_(.+)$")

IMAGENET9_VARIANTS = (
    "only_fg",
    "no_fg",
    "only_bg_b",
    "only_bg_t",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
)
IMAGENET9_CLASSES = (
    "dog",
    "bird",
    "wheeled vehicle",
    "reptile",
    "carnivore",
    "insect",
    "musical instrument",
    "primate",
    "fish",
)

RIVAL10_CLASSES = ("truck", "car", "plane", "ship", "cat", "dog", "equine", "deer", "frog", "bird")
#: WordNet id -> RIVAL10 label, composed from the authors' wnid_to_class.json and
#: label_mappings.json (only the 20 source classes RIVAL10 uses).
RIVAL10_WNIDS = {
    "n03796401": 0,  # moving van
    "n04467665": 0,  # semi
    "n02814533": 1,  # waggon
    "n03100240": 1,  # convertible
    "n02690373": 2,  # airliner
    "n04552348": 2,  # military plane
    "n03673027": 3,  # ocean liner
    "n03095699": 3,  # container vessel
    "n02123394": 4,  # Persian cat
    "n02124075": 4,  # Egyptian cat
    "n02099712": 5,  # Labrador retriever
    "n02099601": 5,  # golden retriever
    "n02389026": 6,  # sorrel
    "n02391049": 6,  # zebra
    "n02423022": 7,  # gazelle
    "n02422699": 7,  # impala (Aepyceros melampus)
    "n01644900": 8,  # tailed frog (Ascaphus trui)
    "n01644373": 8,  # tree frog
    "n01531178": 9,  # goldfinch (Carduelis carduelis)
    "n01532829": 9,  # house finch (Carpodacus mexicanus)
}

WATERBIRDS_CLASSES = ("landbird", "waterbird")
WATERBIRDS_PLACES = ("land", "water")
WATERBIRDS_SPLITS = ("train", "val", "test")
WATERBIRDS_GROUPS = tuple(
    f"{bird}_on_{place}" for bird in WATERBIRDS_CLASSES for place in WATERBIRDS_PLACES
)

_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


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


class _Level:
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


def detect(archive: SafeArchive, bad: BadRows, *, max_classes: int = 1000) -> Plan:
    """The plan for the first layout that matches; see the module docstring for the order."""
    root = ""
    while True:
        level = _Level(archive, root, max_classes)
        if not level.files:
            break
        for check in _DETECTORS:
            plan = check(level, bad)
            if plan is not None:
                return plan
        tops = {f.split("/", 1)[0] for f in level.files}
        if len(tops) == 1 and all("/" in f for f in level.files):
            root = level.full(tops.pop())
            continue
        break
    raise _unknown_layout(archive)


def _unknown_layout(archive: SafeArchive) -> DatasetIngestError:
    tops = sorted({p.split("/", 1)[0] + ("/" if "/" in p else "") for p in archive.members})
    seen = ", ".join(tops[:12]) + (" ..." if len(tops) > 12 else "") if tops else "no files"
    return DatasetIngestError(
        LAYOUT_UNKNOWN,
        "the archive matches none of the accepted layouts: manifest (manifest.csv or "
        "manifest.jsonl with path,label[,mask][,group][,split]); waterbirds (metadata.csv with "
        "img_filename,y,split,place); imagenet9 (original/val/<class>/ and optional "
        "fg_mask/val/<class>/); rival10 (train|test/ordinary/<wnid>_<n>.JPEG); imagefolder "
        f"(<class>/<image> or <split>/<class>/<image>). Top level of the archive: {seen}",
    )


# -- manifest --------------------------------------------------------------------------------

_MANIFEST_COLUMNS = ("path", "label", "mask", "group", "split")


def _detect_manifest(level: _Level, bad: BadRows) -> Plan | None:
    has_csv, has_jsonl = level.has("manifest.csv"), level.has("manifest.jsonl")
    if not (has_csv or has_jsonl):
        return None
    if has_csv and has_jsonl:
        raise DatasetIngestError(
            BAD_MANIFEST, "the archive has both manifest.csv and manifest.jsonl; keep one"
        )
    name = "manifest.csv" if has_csv else "manifest.jsonl"
    text = level.read_text(name)
    rows = _csv_rows(text, name) if has_csv else _jsonl_rows(text, bad, level.full(name))
    columns, records = rows
    warnings: list[str] = []
    extra = sorted(set(columns) - set(_MANIFEST_COLUMNS))
    if extra:
        warnings.append(f"{name}: ignored column(s) {', '.join(extra)}")
    for optional in ("mask", "group"):
        # An exported table often carries an optional column with nothing in it; that means
        # "none", not "every row is missing one".
        if optional in columns and all(_text(rec.get(optional)) is None for _, rec in records):
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


def _csv_rows(
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


def _text(value: Any) -> str | None:
    """A manifest cell as text; None for empty/absent (JSON null or "")."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value).strip()
    return text or None


def _parse_label(value: Any) -> tuple[int | None, str]:
    if isinstance(value, bool):
        return None, f"label {value!r} is not an integer"
    if isinstance(value, int):
        return value, ""
    if isinstance(value, float) and value.is_integer():
        return int(value), ""
    text = _text(value)
    if text is None:
        return None, "label is empty"
    if not _INT_RE.match(text):
        return None, f"label {text!r} is not an integer class index"
    return int(text), ""


def _manifest_example(
    level: _Level,
    line: int,
    rec: dict[str, Any],
    columns: set[str],
    class_names: list[str] | None,
    bad: BadRows,
) -> Example:
    raw_path = _text(rec.get("path"))
    shown = raw_path or ""
    if "__width__" in rec:
        bad.add(line, shown, str(rec["__width__"]))
    path = _resolve(level, raw_path, "image", line, bad)
    label, problem = _parse_label(rec.get("label"))
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
        raw_mask = _text(rec.get("mask"))
        if raw_mask is None:
            bad.add(line, shown, "mask is empty; every row needs one when the mask column exists")
        else:
            mask = _resolve(level, raw_mask, "mask", line, bad, shown=shown)
            if mask is not None and PurePosixPath(mask).suffix.lower() not in MASK_SUFFIXES:
                bad.add(line, shown, f"mask {raw_mask!r} is not a .png, .jpg or .npy file")
                mask = None
    group = None
    if "group" in columns:
        group = _text(rec.get("group"))
        if group is None:
            bad.add(line, shown, "group is empty; every row needs one when the group column exists")
    split = DEFAULT_SPLIT
    raw_split = _text(rec.get("split")) if "split" in columns else None
    if raw_split is not None:
        split = raw_split.lower()
        if not _SPLIT_RE.match(split):
            bad.add(line, shown, f"split {raw_split!r} is not a short name like train/val/test")
    return Example(row=line, path=path or "", label=label, split=split, mask=mask, group=group)


def _resolve(
    level: _Level,
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


def _read_class_names(level: _Level) -> list[str] | None:
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


# -- waterbirds ------------------------------------------------------------------------------

_WATERBIRDS_COLUMNS = ("img_filename", "y", "split", "place")


def _detect_waterbirds(level: _Level, bad: BadRows) -> Plan | None:
    if not level.has("metadata.csv"):
        return None
    text = level.read_text("metadata.csv")
    first = text.splitlines()[0] if text else ""
    header = {h.strip().lower() for h in next(csv.reader([first]), [])}
    if not set(_WATERBIRDS_COLUMNS) <= header:
        return None
    _, records = _csv_rows(text, level.full("metadata.csv"), _WATERBIRDS_COLUMNS)
    examples: list[Example] = []
    for line, rec in records:
        shown = _text(rec.get("img_filename")) or ""
        path = _resolve(level, _text(rec.get("img_filename")), "image", line, bad)
        values: dict[str, int] = {}
        for column, allowed in (("y", 2), ("place", 2), ("split", 3)):
            value, problem = _parse_label(rec.get(column))
            if value is None or not 0 <= value < allowed:
                got = _text(rec.get(column))
                bad.add(line, shown, f"{column} is {got!r}; expected one of 0..{allowed - 1}")
                values[column] = -1
            else:
                values[column] = value
        y, place, split = values["y"], values["place"], values["split"]
        group = WATERBIRDS_GROUPS[2 * y + place] if y >= 0 and place >= 0 else None
        examples.append(
            Example(
                row=line,
                path=path or "",
                label=y,
                split=WATERBIRDS_SPLITS[split] if split >= 0 else DEFAULT_SPLIT,
                group=group,
            )
        )
    if not examples:
        raise DatasetIngestError(EMPTY, "metadata.csv has no rows")
    warnings = []
    present = {e.group for e in examples}
    empty = [g for g in WATERBIRDS_GROUPS if g not in present]
    if empty:
        warnings.append(f"waterbirds: no examples in group(s) {', '.join(empty)}")
    return Plan(
        layout="waterbirds",
        root=level.root,
        examples=examples,
        class_names=list(WATERBIRDS_CLASSES),
        group_names=list(WATERBIRDS_GROUPS),
        has_groups=True,
        warnings=warnings,
    )


# -- ImageNet-9 ------------------------------------------------------------------------------


def _detect_imagenet9(level: _Level, bad: BadRows) -> Plan | None:
    originals = level.under("original/val")
    if not originals:
        return None
    warnings: list[str] = []
    tops = sorted({f.split("/", 1)[0] for f in level.files if "/" in f})
    variants = [t for t in tops if t in IMAGENET9_VARIANTS]
    if variants:
        warnings.append(
            "imagenet9: variant folder(s) "
            + ", ".join(variants)
            + " were not ingested; robustscope builds its own variants from the masks"
        )
    unknown = [t for t in tops if t not in IMAGENET9_VARIANTS and t not in ("original", "fg_mask")]
    if unknown:
        warnings.append(f"imagenet9: unrecognised folder(s) {', '.join(unknown)} were ignored")
    if level.under("original/train"):
        warnings.append(
            "imagenet9: original/train was ignored; only original/val has foreground masks"
        )
    images, ignored = _images_at_depth(originals, 3)
    if ignored:
        warnings.append(f"imagenet9: {ignored} file(s) under original/val were not images")
    class_dirs = sorted({p.split("/")[2] for p in images})
    labels, class_names = _imagenet9_labels(class_dirs)
    with_masks = bool(level.under("fg_mask"))
    if not with_masks:
        warnings.append("imagenet9: no fg_mask/ folder, so the dataset has no foreground masks")
    examples: list[Example] = []
    for number, rel in enumerate(images, start=1):
        class_dir = rel.split("/")[2]
        ex = Example(row=number, path=level.full(rel), label=labels[class_dir], split="test")
        _reject_other_formats(rel, ex, bad)
        if with_masks:
            stem = PurePosixPath(rel).stem
            candidates = [f"fg_mask/val/{class_dir}/{stem}{s}" for s in (".npy", ".png")]
            found = next((c for c in candidates if level.has(c)), None)
            if found is None:
                bad.add(number, level.full(rel), f"no foreground mask {candidates[0]} (or .png)")
            else:
                ex.mask = level.full(found)
        examples.append(ex)
    return Plan(
        layout="imagenet9",
        root=level.root,
        examples=examples,
        class_names=class_names,
        has_masks=with_masks,
        warnings=warnings,
    )


def _imagenet9_labels(class_dirs: list[str]) -> tuple[dict[str, int], list[str]]:
    """Labels from the ``NN_`` prefixes, so a subset upload keeps the 9-way model's indices."""
    matches = {d: _IN9_CLASS_RE.match(d) for d in class_dirs}
    if class_dirs and all(matches.values()):
        labels = {d: int(m.group(1)) for d, m in matches.items() if m}
        if len(set(labels.values())) == len(labels):
            count = max(max(labels.values()) + 1, len(IMAGENET9_CLASSES))
            names = [
                IMAGENET9_CLASSES[i] if i < len(IMAGENET9_CLASSES) else str(i) for i in range(count)
            ]
            for d, m in matches.items():
                if m:
                    names[labels[d]] = m.group(2)
            return labels, names
    return {d: i for i, d in enumerate(class_dirs)}, list(class_dirs)


# -- RIVAL10 ---------------------------------------------------------------------------------


def _detect_rival10(level: _Level, bad: BadRows) -> Plan | None:
    splits = [s for s in ("test", "train") if level.under(f"{s}/ordinary")]
    if not splits:
        return None
    per_split: dict[str, list[str]] = {}
    for split in splits:
        files = [
            f
            for f in level.under(f"{split}/ordinary")
            if f.count("/") == 2 and PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES
        ]
        images = [f for f in files if not PurePosixPath(f).stem.endswith("_merged_mask")]
        if not images or not all(_WNID_RE.match(PurePosixPath(f).name) for f in images):
            return None
        per_split[split] = images
    wnid_labels, warnings = _rival10_mapping(level)
    examples: list[Example] = []
    masks_found = False
    mask_index: dict[str, dict[str, str]] = {}
    for split in splits:
        folder = f"{split}/entire_object_masks"
        index: dict[str, str] = {}
        for f in level.under(folder):
            p = PurePosixPath(f)
            if p.suffix.lower() in MASK_SUFFIXES:
                index.setdefault(p.stem, f)
        mask_index[split] = index
        masks_found = masks_found or bool(index)
    number = 0
    for split in splits:
        for rel in per_split[split]:
            number += 1
            name = PurePosixPath(rel).name
            stem = PurePosixPath(rel).stem
            m = _WNID_RE.match(name)
            wnid = m.group(1) if m else ""
            label = wnid_labels.get(wnid, -1)
            if label < 0:
                bad.add(number, level.full(rel), f"{wnid} is not one of RIVAL10's source classes")
            ex = Example(row=number, path=level.full(rel), label=label, split=split)
            if masks_found:
                index = mask_index[split]
                found = index.get(f"{wnid}_{stem}") or index.get(stem)
                if found is None:
                    bad.add(
                        number,
                        level.full(rel),
                        f"no entire-object mask {split}/entire_object_masks/{wnid}_{stem}.<ext>",
                    )
                else:
                    ex.mask = level.full(found)
            examples.append(ex)
    if not masks_found:
        warnings.append(
            "rival10: no {train,test}/entire_object_masks/ folder, so the dataset has no "
            "foreground masks (the masks inside *_attr_dict.pkl are pickles and are never "
            "loaded; *_merged_mask.JPEG covers attributes, not the whole object)"
        )
    if any(level.under(f"{s}/{t}") for s in splits for t in ("superimposed", "removed")):
        warnings.append("rival10: the superimposed/ and removed/ augmentations were not ingested")
    if any(f.endswith("_attr_labels.npy") for f in level.files):
        warnings.append("rival10: per-image attribute labels (*_attr_labels.npy) were not ingested")
    return Plan(
        layout="rival10",
        root=level.root,
        examples=examples,
        class_names=list(RIVAL10_CLASSES),
        has_masks=masks_found,
        warnings=warnings,
    )


def _rival10_mapping(level: _Level) -> tuple[dict[str, int], list[str]]:
    """The archive's own label files when it carries both, else the authors' mapping."""
    found: dict[str, str] = {}
    for f in level.files:
        base = PurePosixPath(f).name
        if base in ("label_mappings.json", "wnid_to_class.json"):
            found.setdefault(base, f)
    if len(found) < 2:
        return dict(RIVAL10_WNIDS), []
    try:
        mappings = json.loads(level.read_text(found["label_mappings.json"]))
        wnid_to_class = json.loads(level.read_text(found["wnid_to_class.json"]))
        labels: dict[str, int] = {}
        for wnid, inet_name in wnid_to_class.items():
            entry = mappings.get(inet_name)
            if entry is not None:
                labels[str(wnid)] = int(entry[1])
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError, IndexError) as exc:
        raise DatasetIngestError(
            BAD_MANIFEST,
            "label_mappings.json / wnid_to_class.json are not in the RIVAL10 format "
            f"({type(exc).__name__})",
        ) from exc
    if set(labels.values()) - set(range(len(RIVAL10_CLASSES))):
        raise DatasetIngestError(
            BAD_MANIFEST, "label_mappings.json maps to labels outside RIVAL10's 0..9"
        )
    return labels, ["rival10: labels taken from the archive's label_mappings.json"]


# -- ImageFolder -----------------------------------------------------------------------------


def _detect_imagefolder(level: _Level, bad: BadRows) -> Plan | None:
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
        _reject_other_formats(rel, ex, bad)
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


def _images_at_depth(files: list[str], slashes: int) -> tuple[list[str], int]:
    """Image-named files exactly ``slashes`` folders deep, and how many others there were."""
    suffixes = IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES
    images = [
        f for f in files if f.count("/") == slashes and PurePosixPath(f).suffix.lower() in suffixes
    ]
    return images, len(files) - len(images)


def _reject_other_formats(rel: str, ex: Example, bad: BadRows) -> None:
    suffix = PurePosixPath(rel).suffix.lower()
    if suffix in OTHER_IMAGE_SUFFIXES:
        bad.add(ex.row, ex.path, f"{suffix} images are not accepted; convert to PNG or JPEG")
        ex.path = ""


_DETECTORS: tuple[Callable[[_Level, BadRows], Plan | None], ...] = (
    _detect_manifest,
    _detect_waterbirds,
    _detect_imagenet9,
    _detect_rival10,
    _detect_imagefolder,
)
