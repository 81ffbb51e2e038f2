"""Decoding images and masks from bytes, with the limits applied before pixels are allocated.

Only PNG and JPEG are decoded (Pillow is told so, so no other of its many parsers sees
untrusted bytes), and ``.npy`` masks are loaded with ``allow_pickle=False`` after their header
has been checked: ``np.load`` would otherwise allocate whatever shape the header claims.

Channels: a grey image (modes ``1``, ``L``, ``LA``, ``I``, ``I;16``) keeps its single channel,
so an uploaded set of grey PNGs is ``[1, H, W]`` as an MNIST model expects; every other mode
becomes RGB as torchvision's ``convert("RGB")`` makes it (alpha is dropped). ``channels`` (1 or
3) converts explicitly: 1 to Pillow's ``L`` (ITU-R 601-2 luma), 3 to RGB (grey replicated).
16-bit grey, which Pillow would clip, is scaled to 8 bits instead.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
MASK_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".npy"})
#: Image formats we know of but refuse, named so a user learns why a file was not taken.
OTHER_IMAGE_SUFFIXES = frozenset({".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

#: JPEG masks are lossy: compression rings around a binary edge read as faint foreground
#: with "> 0", so JPEG masks are thresholded at half intensity instead.
JPEG_MASK_THRESHOLD = 128

_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)


class DecodeProblem(Exception):
    """A file that cannot become an image or a mask; the message is shown to the user."""


def _check_side(width: int, height: int, max_side: int, what: str) -> None:
    if width < 1 or height < 1:
        raise DecodeProblem(f"{what} has an empty size {width}x{height}")
    if max(width, height) > max_side:
        raise DecodeProblem(
            f"{what} is {width}x{height}; the largest side allowed is {max_side} px"
        )


GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L"})


def decode_image(data: bytes, max_side: int, channels: int | None = None) -> np.ndarray:
    """An HxWxC uint8 array: C = 1 for a grey image, 3 otherwise, or ``channels`` if given."""
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as im:
            _check_side(im.width, im.height, max_side, "image")
            grey_source = im.mode in GREY_MODES
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                grey = np.asarray(im).astype(np.uint32)
                arr = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)[:, :, None]
            elif channels == 1 or (channels is None and grey_source):
                arr = np.asarray(im if im.mode == "L" else im.convert("L"))[:, :, None]
            else:
                arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except _DECODE_ERRORS as exc:
        raise DecodeProblem(f"not a decodable PNG or JPEG image ({_short(exc)})") from exc
    if arr.shape[2:] == (1,) and channels == 3:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise DecodeProblem(f"decoded to an unexpected array {arr.dtype}{arr.shape}")
    return arr


def decode_mask(data: bytes, suffix: str, max_side: int) -> np.ndarray:
    """An HxW uint8 array of {0, 1}, 1 where the foreground is."""
    if suffix == ".npy":
        return _decode_npy_mask(data, max_side)
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as im:
            _check_side(im.width, im.height, max_side, "mask")
            lossy = im.format == "JPEG"
            if im.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
                values = np.asarray(im)
            else:
                # Palette and colour masks: luminance, so any non-black pixel is foreground.
                values = np.asarray(im.convert("L"))
    except _DECODE_ERRORS as exc:
        raise DecodeProblem(f"not a decodable PNG or JPEG mask ({_short(exc)})") from exc
    threshold = JPEG_MASK_THRESHOLD if lossy else 0
    fg = values >= threshold if lossy else values > threshold
    return fg.astype(np.uint8)


def _decode_npy_mask(data: bytes, max_side: int) -> np.ndarray:
    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise DecodeProblem(f"not a valid .npy file ({_short(exc)})") from exc
    if dtype.hasobject:
        raise DecodeProblem(".npy mask holds Python objects; only numeric arrays are loaded")
    if dtype.kind not in "biuf":
        raise DecodeProblem(f".npy mask has dtype {dtype}; a numeric or boolean array is needed")
    if len(shape) not in (2, 3) or any(int(s) < 1 for s in shape):
        raise DecodeProblem(f".npy mask has shape {tuple(shape)}; expected HxW (or with channels)")
    if len(shape) == 3:
        if shape[-1] in (1, 3, 4):
            height, width = shape[0], shape[1]
        elif shape[0] in (1, 3, 4):
            height, width = shape[1], shape[2]
        else:
            raise DecodeProblem(f".npy mask has shape {tuple(shape)}; expected HxW, HxWxC or CxHxW")
    else:
        height, width = shape
    _check_side(int(width), int(height), max_side, "mask")
    if int(np.prod(shape)) * dtype.itemsize > len(data):
        raise DecodeProblem(".npy mask is shorter than its header says")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DecodeProblem(f"not a valid .npy file ({_short(exc)})") from exc
    if arr.ndim == 3:
        axis = 2 if arr.shape[-1] in (1, 3, 4) else 0
        fg = (arr > 0).any(axis=axis)
    else:
        fg = arr > 0
    return np.ascontiguousarray(fg, dtype=np.uint8)


def resize_image(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased when shrinking) to ``size`` = (H, W); aspect is not kept."""
    height, width = size
    if arr.shape[:2] == (height, width):
        return arr
    grey = arr.ndim == 3 and arr.shape[2] == 1
    out = Image.fromarray(arr[:, :, 0] if grey else arr).resize((width, height),
                                                                 Image.Resampling.BILINEAR)
    return np.asarray(out)[:, :, None] if grey else np.asarray(out)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour, so a mask stays binary and aligned with its resized image."""
    height, width = size
    if mask.shape == (height, width):
        return mask
    out = Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(out)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def decoded_nbytes(data: bytes, suffix: str, is_mask: bool) -> int:
    """What decoding ``data`` will hold, from its header alone (no pixels are allocated), so
    the decoded-bytes budget is charged before decoding. An image counts as 3 bytes a pixel, a
    mask as 1; a ``.npy`` mask as its own length (its array is never larger, see
    ``_decode_npy_mask``). An unreadable header counts 0: the decoder reports that file."""
    if suffix == ".npy":
        return len(data)
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as im:
            width, height = im.size
    except _DECODE_ERRORS:
        return 0
    return width * height * (1 if is_mask else 3)
