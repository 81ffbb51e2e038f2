"""Common corruptions (Hendrycks & Dietterich 2019, ImageNet-C / CIFAR-10-C) in torch.

Written in torch so a batch is corrupted on the device it is evaluated on, with a local
generator for every random draw. Severity constants are the CIFAR-10-C ones (the built-ins
are 28-64 px, like CIFAR), ported from ``make_cifar_c.py``; ``pixelate`` reproduces Pillow's
BOX resampling exactly. ``elastic_transform`` keeps the idea (a smooth random displacement
field) with constants of our own, and ``jpeg_compression`` is a faithful in-torch JPEG
(YCbCr, 4:2:0, 8x8 DCT, IJG quantisation tables) rather than a call to libjpeg. ``frost``
needs the overlay photos shipped in the ``imagecorruptions`` wheel and is offered only when
that package is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contract.suite import Corruptions
from workers.engine.benchmarks import register
from workers.engine.benchmarks.natural.common import argmax_on_device, batches
from workers.engine.benchmarks.natural.metrics import mean
from workers.engine.types import BenchmarkError, BenchmarkResult, EvalData, MetricRow, RunContext

NAME = "corruptions"
Corruption = Callable[[Tensor, int, torch.Generator], Tensor]


def _randn(x: Tensor, g: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def _rand(x: Tensor, g: torch.Generator) -> Tensor:
    return torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)


# ------------------------------------------------------------------------------- noise


def gaussian_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return (x + c * _randn(x, g)).clamp(0, 1)


def shot_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = (500, 250, 100, 75, 50)[severity - 1]
    return (torch.poisson(x * c, generator=g) / c).clamp(0, 1)


def impulse_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Salt and pepper on each channel value independently (skimage ``s&p``, 50/50)."""
    c = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    u = _rand(x, g)
    return torch.where(u < c / 2, torch.zeros_like(x), torch.where(u < c, torch.ones_like(x), x))


def speckle_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = (0.06, 0.1, 0.12, 0.16, 0.2)[severity - 1]
    return (x + x * c * _randn(x, g)).clamp(0, 1)


# -------------------------------------------------------------------------------- blur


def _depthwise(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Convolve every channel with one 2-D kernel [kh, kw] (odd sizes), same-size output."""
    c = x.shape[1]
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    if mode == "reflect" and (ph >= x.shape[2] or pw >= x.shape[3]):
        mode = "replicate"
    padded = F.pad(x, (pw, pw, ph, ph), mode=mode)
    weight = kernel.to(x).expand(c, 1, kh, kw)
    return F.conv2d(padded, weight, groups=c)


def _gauss_1d(sigma: float, radius: int) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    k = _gauss_1d(sigma, max(1, math.ceil(4 * sigma)))
    return _depthwise(x, torch.outer(k, k), "replicate").clamp(0, 1)


def _disk(radius: float, alias_blur: float) -> Tensor:
    """ImageNet-C's aliased disk: a pixel disk, then a 3x3 Gaussian of ``alias_blur``."""
    r = max(1, math.ceil(radius)) + 1
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).double()
    disk /= disk.sum()
    g3 = _gauss_1d(alias_blur, 1).double()
    blurred = F.conv2d(F.pad(disk[None, None], (1, 1, 1, 1), mode="reflect"),
                       torch.outer(g3, g3)[None, None])[0, 0]
    return (blurred / blurred.sum()).float()


def defocus_blur(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[severity - 1]
    return _depthwise(x, _disk(radius, alias), "reflect").clamp(0, 1)


# ------------------------------------------------------------------------------ colour


def rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    minc = x.amin(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """The closed form ``v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6``."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = (n + h * 6.0) % 6.0
    return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _colour_only(x: Tensor) -> bool:
    return x.shape[1] == 3


def contrast(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    means = x.mean(dim=(2, 3), keepdim=True)
    return ((x - means) * c + means).clamp(0, 1)


def brightness(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    if not _colour_only(x):
        return (x + c).clamp(0, 1)
    hsv = rgb_to_hsv(x)
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


def saturate(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Severities 1-2 desaturate, 3-5 oversaturate: ImageNet-C's own (non-monotone) scale."""
    scale, shift = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))[severity - 1]
    if not _colour_only(x):
        raise BenchmarkError("saturate needs RGB images")
    hsv = rgb_to_hsv(x)
    hsv[:, 1] = (hsv[:, 1] * scale + shift).clamp(0, 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


# ------------------------------------------------------------------------------ digital


@functools.cache
def _box_matrix(n_in: int, n_out: int) -> Tensor:
    """Pillow's BOX resampling along one axis as an [n_out, n_in] matrix.

    Pillow weights input pixel ``j`` by ``box((j + 0.5 - centre) / filterscale)`` over the
    output pixel's support; reproducing that exactly (rather than torch's ``nearest``, which
    is shifted by half a pixel) is what keeps the CIFAR-C severities in order.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(0, int(centre - support + 0.5))
        hi = min(n_in, int(centre + support + 0.5))
        for j in range(lo, hi):
            t = (j - centre + 0.5) / filterscale
            if -0.5 <= t < 0.5:
                m[i, j] = 1.0
        m[i] /= m[i].sum()
    return m.float()


def box_resize(x: Tensor, h: int, w: int) -> Tensor:
    rh = _box_matrix(x.shape[2], h).to(x)
    rw = _box_matrix(x.shape[3], w).to(x)
    return rh @ x @ rw.T


def pixelate(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    h, w = x.shape[2:]
    small = box_resize(x, max(1, int(h * c)), max(1, int(w * c)))
    return box_resize(small, h, w)


_Q_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]],
    dtype=torch.float32)
_Q_CHROMA = torch.tensor([
    [17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99], [47, 66, 99, 99, 99, 99, 99, 99]]
    + [[99] * 8] * 4, dtype=torch.float32)


def _quant_table(base: Tensor, quality: int) -> Tensor:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return torch.clamp(torch.floor((base * scale + 50) / 100), 1, 255)


@functools.cache
def _dct2_matrix() -> Tensor:
    """The 8x8 2-D DCT-II as one 64x64 matrix, so a whole image is one matrix product."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return torch.kron(d, d).float()


def _jpeg_plane(p: Tensor, q: Tensor) -> Tensor:
    """DCT-quantise-IDCT one plane [B, H, W] (multiples of 8), values centred on 0."""
    b, h, w = p.shape
    d = _dct2_matrix().to(p)
    blocks = p.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(-1, 64)
    step = q.to(p).reshape(64)
    coef = torch.round((blocks @ d.T) / step) * step
    back = (coef @ d).reshape(b, h // 8, w // 8, 8, 8)
    return back.permute(0, 1, 3, 2, 4).reshape(b, h, w)


def jpeg(x: Tensor, quality: int) -> Tensor:
    h, w = x.shape[2:]
    ph, pw = (-h) % 16, (-w) % 16
    v = F.pad(x, (0, pw, 0, ph), mode="replicate") * 255
    if x.shape[1] == 1:
        return (_jpeg_plane(v[:, 0] - 128, _quant_table(_Q_LUMA, quality)) + 128)[
            :, None, :h, :w].div(255).clamp(0, 1)
    r, g, b = v.unbind(1)
    yy = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    yy = _jpeg_plane(yy - 128, _quant_table(_Q_LUMA, quality)) + 128
    qc = _quant_table(_Q_CHROMA, quality)
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # 4:2:0
    chroma = torch.stack([_jpeg_plane(chroma[:, i], qc) for i in range(2)], 1)
    cb, cr = F.interpolate(chroma, scale_factor=2, mode="bilinear",
                           align_corners=False).unbind(1)
    rgb = torch.stack([yy + 1.402 * cr, yy - 0.344136 * cb - 0.714136 * cr, yy + 1.772 * cb], 1)
    return (rgb[:, :, :h, :w] / 255).clamp(0, 1)


def jpeg_compression(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    return jpeg(x, (80, 65, 58, 50, 40)[severity - 1])


# ------------------------------------------------------------------------------ weather


def plasma_fractal(n: int, mapsize: int, wibbledecay: float, g: torch.Generator,
                   device: torch.device) -> Tensor:
    """ImageNet-C's diamond-square height map, batched: [n, mapsize, mapsize] in [0, 1]."""
    m = torch.zeros(n, mapsize, mapsize, device=device, dtype=torch.float64)
    step, wibble = mapsize, 100.0

    def wibbled_mean(a: Tensor) -> Tensor:
        u = torch.rand(a.shape, generator=g, device=device, dtype=a.dtype) * 2 - 1
        return a / 4 + wibble * u * wibble  # sic: ImageNet-C scales by wibble twice

    while step >= 2:
        half = step // 2
        corner = m[:, 0:mapsize:step, 0:mapsize:step]
        sq = corner + torch.roll(corner, -1, 1)
        sq = sq + torch.roll(sq, -1, 2)
        m[:, half:mapsize:step, half:mapsize:step] = wibbled_mean(sq)
        dr = m[:, half:mapsize:step, half:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = dr + torch.roll(dr, 1, 1) + ul + torch.roll(ul, -1, 2)
        m[:, 0:mapsize:step, half:mapsize:step] = wibbled_mean(lt)
        tt = dr + torch.roll(dr, 1, 2) + ul + torch.roll(ul, -1, 1)
        m[:, half:mapsize:step, 0:mapsize:step] = wibbled_mean(tt)
        step //= 2
        wibble /= wibbledecay
    m -= m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def fog(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    c, decay = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[severity - 1]
    b, _, h, w = x.shape
    size = 1 << (max(h, w, 2) - 1).bit_length()
    frac = plasma_fractal(b, size, decay, g, x.device)[:, None, :h, :w].to(x.dtype)
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x + c * frac) * max_val / (max_val + c)).clamp(0, 1)


def frost_overlays() -> list[Path]:
    """The frost photos inside an installed ``imagecorruptions`` (never imported, only read)."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations))) / "frost"
    return sorted(p for p in root.glob("frost*") if p.suffix in (".png", ".jpg", ".jpeg"))


@functools.cache
def _frost_images(paths: tuple[Path, ...]) -> tuple[Tensor, ...]:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
            rgb = rgb.resize((max(32, rgb.width // 5), max(32, rgb.height // 5)))  # CIFAR: 0.2x
            out.append(torch.from_numpy(np.asarray(rgb, np.float32) / 255).permute(2, 0, 1))
    return tuple(out)


def frost(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    a, b = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))[severity - 1]
    overlays = _frost_images(tuple(frost_overlays()))
    if not overlays:
        raise BenchmarkError("frost needs the overlay photos of the imagecorruptions package, "
                             "which is not installed on this worker")
    n, ch, h, w = x.shape
    pick = torch.randint(len(overlays), (n,), generator=g, device=x.device).tolist()
    crops = []
    for k in pick:
        img = overlays[k]
        if img.shape[1] < h or img.shape[2] < w:
            img = F.interpolate(img[None], size=(max(h, img.shape[1]), max(w, img.shape[2])),
                                mode="bilinear", align_corners=False)[0]
        top = int(torch.randint(img.shape[1] - h + 1, (1,), generator=g, device=x.device))
        left = int(torch.randint(img.shape[2] - w + 1, (1,), generator=g, device=x.device))
        crops.append(img[:, top:top + h, left:left + w])
    overlay = torch.stack(crops).to(x)
    if ch == 1:
        overlay = overlay.mean(1, keepdim=True)
    return (a * x + b * overlay).clamp(0, 1)


def elastic_transform(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """A smooth random displacement field (Gaussian-filtered noise) of std ``alpha`` pixels."""
    alpha = (0.02, 0.03, 0.04, 0.05, 0.06)[severity - 1]
    b, _, h, w = x.shape
    sigma = 0.1 * max(h, w)
    field = torch.rand((b, 2, h, w), generator=g, device=x.device, dtype=x.dtype) * 2 - 1
    k = _gauss_1d(sigma, min(math.ceil(3 * sigma), min(h, w) - 1))
    field = _depthwise(field, torch.outer(k, k), "reflect")
    field = field / field.flatten(1).std(dim=1).clamp_min(1e-12)[:, None, None, None]
    disp = field * alpha * 2  # std alpha * size pixels, in grid units (2 / size per pixel)
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype).expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False) + disp.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False).clamp(0, 1)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "defocus_blur": defocus_blur,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "saturate": saturate,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "fog": fog,
    "elastic_transform": elastic_transform,
    "frost": frost,
}


def available() -> list[str]:
    """The corruptions this worker can run (``frost`` only with its overlays installed)."""
    return [name for name in CORRUPTIONS if name != "frost" or frost_overlays()]


def _types(entry: Corruptions, channels: int) -> list[str]:
    """The entry's types, or every one this worker and the data allow; refuses what they do
    not (``frost`` without its overlays, ``saturate`` on grey images)."""
    if entry.types is None or entry.types == "all":
        return [t for t in available() if channels == 3 or t != "saturate"]
    types = list(entry.types)
    if "frost" in types and not frost_overlays():
        raise BenchmarkError("frost needs the overlay photos of the imagecorruptions package, "
                             "which is not installed on this worker; leave it out of types")
    if channels != 3 and "saturate" in types:
        raise BenchmarkError("saturate needs RGB images")
    return types


@register(NAME)
def corruptions(model: nn.Module, data: EvalData, entry: Corruptions,
                ctx: RunContext) -> BenchmarkResult:
    """Rows ``accuracy`` per (``type``, ``severity``), per type with ``severity: "mean"``,
    and ``mean_accuracy`` over every (type, severity) evaluated.

    Options: ``types`` ("all" or a list), ``severities`` (a list in 1..5, default all).
    """
    types = _types(entry, int(data.x.shape[1]))
    severities = sorted(set(entry.severities))
    gens = {(t, s): ctx.generator(salt=104_729 + 31 * i + s)
            for i, t in enumerate(types) for s in severities}
    correct = {key: torch.zeros(len(data), dtype=torch.bool) for key in gens}
    n = len(data)
    for sl, done in batches(data, ctx):
        x = data.x[sl].to(ctx.device)
        y = data.y[sl].to(ctx.device)
        for (t, s), g in gens.items():
            xc = CORRUPTIONS[t](x, s, g)
            correct[(t, s)][sl] = (argmax_on_device(model, xc, ctx) == y).cpu()
        ctx.progress(done, f"corruptions {sl.stop}/{n}")
    shares = {key: MetricRow.share(NAME, "accuracy", ok, {"type": key[0], "severity": key[1]})
              for key, ok in correct.items()}
    acc = {key: row.value for key, row in shares.items()}
    rows = []
    for t in types:
        per = [acc[(t, s)] for s in severities]
        rows += [shares[(t, s)] for s in severities]
        rows.append(MetricRow(NAME, "accuracy", mean(per), {"type": t, "severity": "mean"}))
    rows.append(MetricRow(NAME, "mean_accuracy", mean(list(acc.values())),
                          {"types": types, "severities": severities}))
    return BenchmarkResult(rows=rows)
