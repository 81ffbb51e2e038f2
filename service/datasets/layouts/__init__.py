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

from collections.abc import Callable

from service.datasets.ingest_archive import SafeArchive
from service.datasets.ingest_errors import LAYOUT_UNKNOWN, BadRows, DatasetIngestError
from service.datasets.layouts.common import Level, Plan
from service.datasets.layouts.imagefolder import detect_imagefolder
from service.datasets.layouts.manifest import detect_manifest
from service.datasets.layouts.published import (
    detect_imagenet9,
    detect_rival10,
    detect_waterbirds,
)

LAYOUTS = ("manifest", "waterbirds", "imagenet9", "rival10", "imagefolder")


def detect(archive: SafeArchive, bad: BadRows, *, max_classes: int = 1000) -> Plan:
    """The plan for the first layout that matches; see the module docstring for the order."""
    root = ""
    while True:
        level = Level(archive, root, max_classes)
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


_DETECTORS: tuple[Callable[[Level, BadRows], Plan | None], ...] = (
    detect_manifest,
    detect_waterbirds,
    detect_imagenet9,
    detect_rival10,
    detect_imagefolder,
)

__all__ = ["LAYOUTS", "Plan", "detect"]
