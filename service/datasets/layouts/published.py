"""The layouts of published benchmarks: Waterbirds (``metadata.csv``), the ImageNet-9
backgrounds challenge and RIVAL10 (see the package docstring for how RIVAL10 was established)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import PurePosixPath

from service.datasets.ingest_decode import (
    IMAGE_SUFFIXES,
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
    images_at_depth,
    parse_label,
    reject_other_formats,
    resolve_path,
)

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


_WNID_RE = re.compile(r"^(n\d{8})_")


_IN9_CLASS_RE = re.compile(r"^(\d+)_(.+)$")


_WATERBIRDS_COLUMNS = ("img_filename", "y", "split", "place")


def detect_waterbirds(level: Level, bad: BadRows) -> Plan | None:
    if not level.has("metadata.csv"):
        return None
    text = level.read_text("metadata.csv")
    first = text.splitlines()[0] if text else ""
    header = {h.strip().lower() for h in next(csv.reader([first]), [])}
    if not set(_WATERBIRDS_COLUMNS) <= header:
        return None
    _, records = csv_rows(text, level.full("metadata.csv"), _WATERBIRDS_COLUMNS)
    examples: list[Example] = []
    for line, rec in records:
        shown = as_text(rec.get("img_filename")) or ""
        path = resolve_path(level, as_text(rec.get("img_filename")), "image", line, bad)
        values: dict[str, int] = {}
        for column, allowed in (("y", 2), ("place", 2), ("split", 3)):
            value, problem = parse_label(rec.get(column))
            if value is None or not 0 <= value < allowed:
                got = as_text(rec.get(column))
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


def detect_imagenet9(level: Level, bad: BadRows) -> Plan | None:
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
    images, ignored = images_at_depth(originals, 3)
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
        reject_other_formats(rel, ex, bad)
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


def detect_rival10(level: Level, bad: BadRows) -> Plan | None:
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


def _rival10_mapping(level: Level) -> tuple[dict[str, int], list[str]]:
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
