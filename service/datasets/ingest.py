"""Turning an uploaded dataset archive into robustscope's canonical ``.npz``, without torch.

A worker calls :func:`ingest` for each ``POST /datasets`` (the ``robustscope.ingest`` job),
telling it how far it has come through a :data:`Progress` callback, which stops it by raising.
It stays importable by the API (which never calls it): numpy, Pillow and the standard library
only, never executes or unpickles anything from the
upload, and never writes archive paths to disk (see :mod:`service.datasets.ingest_archive`).

The canonical file (``np.load(dest, allow_pickle=False)``) holds:

- ``images`` uint8 [N, H, W, 3] RGB; ``labels`` int64 [N]; ``splits`` str [N];
  ``class_names`` str [K];
- when the layout has them: ``masks`` uint8 [N, H, W] in {0, 1} (1 = foreground), and
  ``groups`` int64 [N] with ``group_names`` str [G].

Every image is resized to one size so the workers can batch without padding: the most
common size in the archive (ties go to the larger area), shrunk so its longer side is at
most ``IngestLimits.target_size`` when that is set (never enlarged). Images of another size
are stretched to it with bilinear filtering (aspect ratio is not kept: cropping would cut
foregrounds out of their masks), masks with nearest neighbour so they stay binary and aligned.

All problems with individual examples are collected and reported together (see
:class:`~service.datasets.ingest_errors.BadRows`), so a user fixes an upload in one round.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from service.datasets.ingest_archive import ArchiveLimits, SafeArchive
from service.datasets.ingest_decode import (
    DecodeProblem,
    decode_image,
    decode_mask,
    decoded_nbytes,
    resize_image,
    resize_mask,
)
from service.datasets.ingest_errors import (
    EMPTY,
    IMAGE_UNDECODABLE,
    BadRows,
    DatasetIngestError,
    too_large,
)
from service.datasets.layouts import LAYOUTS, Plan, detect

__all__ = [
    "LAYOUTS",
    "DatasetInfo",
    "DatasetIngestError",
    "IngestLimits",
    "Progress",
    "ingest",
]

#: Told how far an ingest has come: ``(fraction, stage, message)``, the fraction 0 to
#: :data:`WRITTEN`. Raising from it (the job was cancelled, or ran out of time) stops the
#: ingest: its threads are joined and no output file is left.
Progress = Callable[[float, str, str], None]

#: The share of an ingest's progress its decoding fills; the canonical file is written by
#: ``WRITTEN`` (the rest is the worker's: storing the file).
DECODED, WRITTEN = 0.8, 0.9


def _quiet(fraction: float, stage: str, message: str) -> None:
    return None


@dataclass(frozen=True)
class IngestLimits:
    """Upper bounds on what one upload may cost the worker that ingests it.

    ``max_decoded_bytes`` bounds memory: decoded pixels are held until all sizes are known,
    and each file is charged from its header before it is decoded. The assembled array is
    built while they are freed, so the peak is about twice this.
    """

    max_archive_bytes: int = 2 * 1024**3
    max_uncompressed_bytes: int = 4 * 1024**3
    max_member_bytes: int = 64 * 1024**2
    max_files: int = 1_000_000
    max_images: int = 100_000
    max_side: int = 1024
    target_size: int | None = None
    max_classes: int = 1000
    max_decoded_bytes: int = 4 * 1024**3
    #: Threads that decode while the archive is read (capped by the machine's cores).
    decode_threads: int = 4

    def __post_init__(self) -> None:
        if self.target_size is not None and self.target_size < 1:
            raise ValueError("target_size must be a positive number of pixels or None")


@dataclass
class DatasetInfo:
    """What the API stores and returns about an ingested dataset (JSON-able via ``as_dict``)."""

    name: str
    layout: str
    num_examples: int
    num_classes: int
    input_shape: list[int]
    splits: dict[str, int]
    has_masks: bool
    has_groups: bool
    class_names: list[str]
    group_names: list[str]
    sha256: str
    #: Hash of the canonical arrays: equal for equal content, whatever the archive's packing
    #: (the npz file itself carries timestamps and is not byte-stable).
    content_sha256: str
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ingest(archive: Path, dest: Path, *, name: str, limits: IngestLimits,
           channels: int | None = None, progress: Progress | None = None) -> DatasetInfo:
    """Reads ``archive``, writes the canonical npz to ``dest`` (atomically) and describes it.

    ``channels``: None keeps a grey dataset grey (``[1, H, W]`` when every image is grey; a
    mix is stored as RGB); 1 or 3 converts every image (see ``ingest_decode``).
    ``progress`` is told each stage (``reading``, ``decoding`` file by file, ``assembling``,
    ``writing``); whatever it raises ends the ingest.

    Raises :class:`DatasetIngestError` (``status`` 413 for size limits, else 422).
    """
    archive = Path(archive)
    dest = Path(dest)
    size = archive.stat().st_size
    if size > limits.max_archive_bytes:
        raise too_large(f"the archive is {size} bytes; the limit is {limits.max_archive_bytes}")
    report = progress or _quiet
    report(0.0, "reading", "reading the archive")
    digest = _sha256_file(archive)
    bad = BadRows()
    archive_limits = ArchiveLimits(
        max_uncompressed_bytes=limits.max_uncompressed_bytes,
        max_member_bytes=limits.max_member_bytes,
        max_members=limits.max_files,
    )
    with SafeArchive(archive, archive_limits) as reader:
        plan = detect(reader, bad, max_classes=limits.max_classes)
        _check_counts(plan, limits)
        decoded = _decode_all(reader, plan, limits, bad, channels, report)
    bad.raise_if_any()
    report(DECODED, "assembling", f"resizing {len(plan.examples)} images to one size")
    arrays, warnings = _assemble(plan, decoded, limits)
    report(DECODED + (WRITTEN - DECODED) / 2, "writing", "writing the canonical array file")
    _write_npz(dest, arrays)
    report(WRITTEN, "writing", "the canonical array file is written")
    return _describe(name, plan, arrays, digest, warnings)


def _check_counts(plan: Plan, limits: IngestLimits) -> None:
    count = len(plan.examples)
    if count == 0:
        raise DatasetIngestError(EMPTY, f"the {plan.layout} layout was found but holds no images")
    if count > limits.max_images:
        raise too_large(f"the dataset has {count} images; the limit is {limits.max_images}")
    if len(plan.class_names) > limits.max_classes:
        raise too_large(
            f"the dataset has {len(plan.class_names)} classes; the limit is {limits.max_classes}"
        )


@dataclass
class _Decoded:
    images: list[np.ndarray | None]
    masks: list[np.ndarray | None]


_Result = np.ndarray | DecodeProblem
#: Files handed to a decoding thread at once, and the raw bytes that may wait in a batch:
#: batching amortises the pool's overhead on tiny PNGs; the byte cap bounds memory.
_BATCH_FILES = 64
_BATCH_BYTES = 16 * 1024 * 1024


def _decode_file(path: str, data: bytes, kinds: set[bool], max_side: int,
                 channels: int | None = None) -> dict[bool, _Result]:
    """Decodes one file as an image and/or a mask (a file may be both, for odd manifests)."""
    results: dict[bool, _Result] = {}
    for is_mask in kinds:
        try:
            if is_mask:
                suffix = PurePosixPath(path).suffix.lower()
                results[is_mask] = decode_mask(data, suffix, max_side)
            else:
                results[is_mask] = decode_image(data, max_side, channels)
        except DecodeProblem as exc:
            results[is_mask] = exc
    return results


def _decode_all(reader: SafeArchive, plan: Plan, limits: IngestLimits, bad: BadRows,
                channels: int | None = None, report: Progress = _quiet) -> _Decoded:
    """Decodes every referenced file once into per-example slots, telling ``report`` the
    share of files decoded as each is read.

    The archive is read in order on this thread while a few threads decode: Pillow releases
    the GIL inside its PNG/JPEG decoders, which is where large images spend their time.
    """
    examples = plan.examples
    wanted: dict[str, list[tuple[int, bool]]] = {}
    for index, ex in enumerate(examples):
        if ex.path:
            wanted.setdefault(ex.path, []).append((index, False))
        if ex.mask:
            wanted.setdefault(ex.mask, []).append((index, True))
    out = _Decoded(images=[None] * len(examples), masks=[None] * len(examples))
    budget = limits.max_decoded_bytes

    def decode_batch(batch: list[tuple[str, bytes]]) -> list[tuple[str, dict[bool, _Result]]]:
        return [
            (path, _decode_file(path, data, {k for _, k in wanted[path]}, limits.max_side,
                                channels))
            for path, data in batch
        ]

    def charge(path: str, data: bytes) -> None:
        """Charges a file's decoded size, read from its header, before it is decoded."""
        nonlocal budget
        suffix = PurePosixPath(path).suffix.lower()
        budget -= sum(decoded_nbytes(data, suffix, is_mask)
                      for is_mask in {k for _, k in wanted[path]})
        if budget < 0:
            raise too_large(
                f"the decoded images exceed {limits.max_decoded_bytes} bytes; "
                "upload fewer or smaller images"
            )

    total, finished = len(wanted), 0

    def tell() -> None:
        report(DECODED * (finished / max(total, 1)), "decoding",
               f"decoded {finished} of {total} files")

    def take(done: list[tuple[str, dict[bool, _Result]]]) -> None:
        nonlocal finished
        finished += len(done)
        for path, results in done:
            for index, is_mask in wanted[path]:
                result = results[is_mask]
                ex = examples[index]
                if isinstance(result, DecodeProblem):
                    shown = f"{ex.path} (mask {path})" if is_mask else ex.path
                    what = "mask" if is_mask else "image"
                    bad.add(ex.row, shown, f"{what}: {result}", kind=IMAGE_UNDECODABLE)
                elif is_mask:
                    out.masks[index] = result
                else:
                    out.images[index] = result

    workers = max(1, min(limits.decode_threads, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        pending: deque[Future[list[tuple[str, dict[bool, _Result]]]]] = deque()
        batch: list[tuple[str, bytes]] = []
        batch_bytes = 0
        try:
            tell()
            for path, data in reader.iter_read(wanted):
                tell()
                charge(path, data)
                batch.append((path, data))
                batch_bytes += len(data)
                if len(batch) >= _BATCH_FILES or batch_bytes >= _BATCH_BYTES:
                    pending.append(pool.submit(decode_batch, batch))
                    batch, batch_bytes = [], 0
                    while len(pending) > 2 * workers:
                        take(pending.popleft().result())
            if batch:
                pending.append(pool.submit(decode_batch, batch))
            while pending:
                take(pending.popleft().result())
                tell()
        finally:
            for future in pending:
                future.cancel()
    for index, ex in enumerate(examples):
        image, mask = out.images[index], out.masks[index]
        if image is not None and mask is not None and mask.shape != image.shape[:2]:
            bad.add(
                ex.row,
                ex.path,
                f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                f"{image.shape[1]}x{image.shape[0]}",
            )
    return out


def _target_size(decoded: _Decoded, limits: IngestLimits) -> tuple[int, int]:
    sizes = Counter(img.shape[:2] for img in decoded.images if img is not None)
    (height, width), _ = max(sizes.items(), key=lambda kv: (kv[1], kv[0][0] * kv[0][1], kv[0]))
    if limits.target_size is not None and max(height, width) > limits.target_size:
        scale = limits.target_size / max(height, width)
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
    return int(height), int(width)


def _assemble(
    plan: Plan, decoded: _Decoded, limits: IngestLimits
) -> tuple[dict[str, np.ndarray], list[str]]:
    examples = plan.examples
    count = len(examples)
    height, width = _target_size(decoded, limits)
    warnings = list(plan.warnings)
    grey = all(img is None or img.shape[2] == 1 for img in decoded.images)
    images = np.empty((count, height, width, 1 if grey else 3), dtype=np.uint8)
    masks = np.empty((count, height, width), dtype=np.uint8) if plan.has_masks else None
    resized = 0
    for index in range(count):
        image = decoded.images[index]
        assert image is not None  # every missing image was reported as a bad row
        if image.shape[:2] != (height, width):
            resized += 1
        if not grey and image.shape[2] == 1:  # grey among colour: replicated, as RGB does
            image = np.repeat(image, 3, axis=2)
        images[index] = resize_image(image, (height, width))
        decoded.images[index] = None  # free as we go: peak memory stays near one copy
        if masks is not None:
            mask = decoded.masks[index]
            assert mask is not None
            masks[index] = resize_mask(mask, (height, width))
            decoded.masks[index] = None
    if resized:
        warnings.append(
            f"{resized} image(s) were resized to {width}x{height} (bilinear, aspect not kept)"
        )
    arrays: dict[str, np.ndarray] = {
        "images": images,
        "labels": np.array([e.label for e in examples], dtype=np.int64),
        "splits": np.array([e.split for e in examples], dtype=np.str_),
        "class_names": np.array(plan.class_names, dtype=np.str_),
    }
    if masks is not None:
        arrays["masks"] = masks
    if plan.has_groups:
        group_names = plan.group_names or sorted({str(e.group) for e in examples})
        index_of = {g: i for i, g in enumerate(group_names)}
        arrays["groups"] = np.array([index_of[str(e.group)] for e in examples], dtype=np.int64)
        arrays["group_names"] = np.array(group_names, dtype=np.str_)
    empty = sorted(set(range(len(plan.class_names))) - set(arrays["labels"].tolist()))
    if empty:
        names = ", ".join(plan.class_names[i] for i in empty[:20])
        warnings.append(f"{len(empty)} class(es) have no examples: {names}")
    return arrays, warnings


def _write_npz(dest: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes next to ``dest`` and renames, so a reader never sees a half-written file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    try:
        with tmp.open("wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _content_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _describe(
    name: str, plan: Plan, arrays: dict[str, np.ndarray], digest: str, warnings: list[str]
) -> DatasetInfo:
    images = arrays["images"]
    splits = Counter(arrays["splits"].tolist())
    return DatasetInfo(
        name=name,
        layout=plan.layout,
        num_examples=int(images.shape[0]),
        num_classes=len(plan.class_names),
        input_shape=[int(images.shape[3]), int(images.shape[1]), int(images.shape[2])],
        splits={str(k): int(v) for k, v in sorted(splits.items())},
        has_masks="masks" in arrays,
        has_groups="groups" in arrays,
        class_names=[str(n) for n in plan.class_names],
        group_names=[str(g) for g in arrays.get("group_names", np.array([], dtype=np.str_))],
        sha256=digest,
        content_sha256=_content_sha256(arrays),
        warnings=warnings,
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
