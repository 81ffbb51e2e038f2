"""Uploaded datasets in the canonical npz format written by the upload service.

Arrays: ``images`` uint8 [N, H, W, C]; ``labels`` int64 [N]; ``splits`` unicode [N];
``class_names`` unicode [K]; optional ``masks`` uint8 [N, H, W] (1 = foreground); optional
``groups`` int64 [N] with ``group_names`` unicode [G]. Read with ``allow_pickle=False``: an
object array in an upload must fail, never execute. The checks below repeat the service's on
purpose: a file on disk may be older than the service's validation or written by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from workers.engine.layout import in_layout
from workers.engine.types import EvalData


class DatasetFormatError(ValueError):
    """The npz file does not follow the canonical format."""


def load_npz(path: str | Path, split: str) -> EvalData:
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        missing = {"images", "labels", "splits", "class_names"} - files
        if missing:
            raise DatasetFormatError(f"{path.name}: missing array(s) {sorted(missing)}")
        images, labels = z["images"], z["labels"]
        splits, class_names = z["splits"], z["class_names"]
        masks = z["masks"] if "masks" in files else None
        groups = z["groups"] if "groups" in files else None
        group_names = z["group_names"] if "group_names" in files else None

    if images.ndim == 3:
        images = images[..., None]
    n = images.shape[0]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetFormatError(f"images must be uint8 [N, H, W, C], got {images.dtype} "
                                 f"{list(images.shape)}")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(f"labels must be integer [{n}], got {labels.dtype} "
                                 f"{list(labels.shape)}")
    if splits.shape != (n,) or splits.dtype.kind != "U":
        raise DatasetFormatError(f"splits must be unicode [{n}]")
    k = int(class_names.shape[0])
    if n and (labels.min() < 0 or labels.max() >= k):
        raise DatasetFormatError(f"labels must index class_names (0..{k - 1})")
    if masks is not None and masks.shape != images.shape[:3]:
        raise DatasetFormatError(f"masks must be [N, H, W] = {list(images.shape[:3])}, got "
                                 f"{list(masks.shape)}")
    if groups is not None:
        if group_names is None:
            raise DatasetFormatError("groups given without group_names")
        if groups.shape != (n,) or (n and (groups.min() < 0 or groups.max() >= len(group_names))):
            raise DatasetFormatError("groups must be [N] indices into group_names")

    available = sorted(set(splits.tolist()))
    if split not in available:
        raise DatasetFormatError(f"{path.name}: no split {split!r}; available: {available}")
    keep = np.flatnonzero(splits == split)
    # in_layout, not .contiguous(): a grey [N, 1, H, W] permuted from HWC counts as contiguous
    # but keeps channels_last strides, which a model's .view after its convolutions rejects.
    x = in_layout(torch.from_numpy(images[keep]).permute(0, 3, 1, 2).float().div_(255.0))
    return EvalData(
        x=x,
        y=torch.from_numpy(labels[keep].astype(np.int64)),
        class_names=[str(c) for c in class_names],
        masks=None if masks is None else torch.from_numpy(
            (masks[keep] > 0).astype(np.float32))[:, None].contiguous(),
        groups=None if groups is None else torch.from_numpy(groups[keep].astype(np.int64)),
        group_names=None if group_names is None else [str(g) for g in group_names],
        name=path.stem,
    )
