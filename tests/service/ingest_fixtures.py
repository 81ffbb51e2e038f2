"""Small archive builders for the ingest tests: real PNG/JPEG/.npy bytes in exact layouts."""

from __future__ import annotations

import io
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def npy(arr: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def solid(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> np.ndarray:
    """An HxWx3 image of one colour; distinct colours let a test find each example."""
    return np.full((*size, 3), color, dtype=np.uint8)


def square_mask(size: tuple[int, int], top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    mask[top : top + side, left : left + side] = 1
    return mask


def with_foreground(
    mask: np.ndarray, fg: tuple[int, int, int], bg: tuple[int, int, int]
) -> np.ndarray:
    """An image whose pixels are ``fg`` exactly where ``mask`` is 1: alignment is checkable."""
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    out[:] = bg
    out[mask.astype(bool)] = fg
    return out


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            zf.writestr(info, data)
    return path


def write_tar(path: Path, files: dict[str, bytes], *, gz: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            tf.addfile(info, io.BytesIO(data))
    return path
