"""Common corruptions in torch: strength grows with severity, outputs stay images."""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.factories import run_benchmark as run
from workers.engine.benchmarks.natural import corruptions as C
from workers.engine.data import load_builtin
from workers.engine.types import BenchmarkError, RunContext


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_builtin("waterbirds-32", "test", assets="procedural").x[:48]


def _distance(name: str, x: torch.Tensor, severity: int) -> float:
    g = torch.Generator().manual_seed(0)  # the same draws at every severity
    return float((C.CORRUPTIONS[name](x, severity, g) - x).abs().mean())


MONOTONE = [n for n in C.CORRUPTIONS if n not in ("saturate", "frost")]


@pytest.mark.parametrize("name", MONOTONE)
@pytest.mark.slow
def test_severity_is_monotone_in_strength(name: str, images: torch.Tensor) -> None:
    d = [_distance(name, images, s) for s in range(1, 6)]
    assert all(b > a for a, b in zip(d, d[1:], strict=False)), d
    assert d[0] > 1e-3  # severity 1 already changes the images


@pytest.mark.parametrize("name", [n for n in C.CORRUPTIONS if n != "frost"])
@pytest.mark.slow
def test_outputs_are_images_and_deterministic(name: str, images: torch.Tensor) -> None:
    a = C.CORRUPTIONS[name](images, 3, torch.Generator().manual_seed(1))
    b = C.CORRUPTIONS[name](images, 3, torch.Generator().manual_seed(1))
    assert a.shape == images.shape
    assert a.dtype == images.dtype
    assert a.min() >= 0
    assert a.max() <= 1
    assert torch.equal(a, b)


@pytest.mark.slow
def test_saturate_follows_imagenet_c_scale(images: torch.Tensor) -> None:
    sat = [C.rgb_to_hsv(C.saturate(images, s, torch.Generator()))[:, 1].mean() for s in
           range(1, 6)]
    base = C.rgb_to_hsv(images)[:, 1].mean()
    assert sat[1] < sat[0] < base < sat[2] < sat[3] < sat[4]


def test_hsv_round_trip_matches_colorsys() -> None:
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    hsv = C.rgb_to_hsv(x)
    for i, j in ((0, 0), (2, 3), (4, 1)):
        ref = colorsys.rgb_to_hsv(*x[1, :, i, j].tolist())
        assert hsv[1, :, i, j].tolist() == pytest.approx(ref, abs=1e-6)
    assert torch.allclose(C.hsv_to_rgb(hsv), x, atol=1e-6)


@pytest.mark.slow
def test_jpeg_matches_libjpeg(images: torch.Tensor) -> None:
    """Our in-torch JPEG differs from Pillow's libjpeg far less than either from the input."""
    for quality in (80, 40):
        ours = C.jpeg(images, quality)
        pil = []
        for im in images:
            buf = io.BytesIO()
            arr = (im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(buf, "JPEG", quality=quality)
            pil.append(np.asarray(Image.open(buf), np.float32) / 255)
        ref = torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2)
        assert (ours - ref).abs().mean() < 0.25 * (ref - images).abs().mean()


def test_plasma_fractal_range() -> None:
    m = C.plasma_fractal(3, 32, 2.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert m.shape == (3, 32, 32)
    assert m.amin(dim=(1, 2)).tolist() == [0, 0, 0]
    assert m.amax(dim=(1, 2)).tolist() == [1, 1, 1]


def test_frost_uses_overlays_when_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          images: torch.Tensor) -> None:
    monkeypatch.setattr(C, "frost_overlays", lambda: [])
    with pytest.raises(BenchmarkError, match="imagecorruptions"):
        C.frost(images, 1, torch.Generator())
    overlay = tmp_path / "frost1.png"
    Image.fromarray(np.full((300, 300, 3), 255, np.uint8)).save(overlay)
    monkeypatch.setattr(C, "frost_overlays", lambda: [overlay])
    out = [C.frost(images, s, torch.Generator().manual_seed(0)) for s in (1, 5)]
    # a white overlay brightens: a * x + b with (a, b) = (1, 0.2) then (0.75, 0.45)
    assert torch.allclose(out[0], (images + 0.2).clamp(0, 1), atol=1e-6)
    assert torch.allclose(out[1], (0.75 * images + 0.45).clamp(0, 1), atol=1e-6)


def test_benchmark_rows() -> None:
    data = load_builtin("shapes-32", "test", assets="procedural").subset(torch.arange(40))

    class Blind(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 4).index_fill_(1, torch.tensor([2]), 1.0)

    res = run("corruptions", Blind(), data, {"types": ["fog", "contrast"], "severities": [1, 5]},
              RunContext(batch_size=16))
    acc = {(r.params["type"], r.params["severity"]): r.value for r in res.rows
           if r.metric == "accuracy"}
    expected = float((data.y == 2).float().mean())  # the blind model scores its class share
    assert set(acc) == {("fog", 1), ("fog", 5), ("fog", "mean"), ("contrast", 1),
                        ("contrast", 5), ("contrast", "mean")}
    assert all(v == pytest.approx(expected) for v in acc.values())
    mean_row = [r for r in res.rows if r.metric == "mean_accuracy"]
    assert len(mean_row) == 1
    assert mean_row[0].value == pytest.approx(expected)
    with pytest.raises(BenchmarkError, match="frost"):
        run("corruptions", Blind(), data, {"types": ["frost"]}, RunContext())


@pytest.mark.slow
def test_pixelate_matches_pillow_box(images: torch.Tensor) -> None:
    for severity, c in enumerate((0.95, 0.9, 0.85, 0.75, 0.65), start=1):
        ours = C.pixelate(images, severity, torch.Generator())
        ref = []
        for im in images:
            pic = Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            small = int(32 * c)
            pic = pic.resize((small, small), Image.Resampling.BOX).resize(
                (32, 32), Image.Resampling.BOX)
            ref.append(np.asarray(pic, np.float32) / 255)
        expected = torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2)
        assert (ours - expected).abs().max() <= 1.01 / 255  # Pillow rounds to uint8
