"""Grey datasets keep their single channel: an uploaded set of grey PNGs is [1, H, W], as an
MNIST model expects, and the engine evaluates a 1-channel model on it; ``channels`` converts
explicitly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.datasets.ingest import IngestLimits, ingest
from service.datasets.ingest_decode import decode_image
from tests.engine.attack_helpers import TinyCNN, one_thread, train  # noqa: F401
from tests.factories import run_benchmark as run
from tests.service.ingest_fixtures import png, write_zip
from workers.engine.data.npz import load_npz
from workers.engine.types import RunContext

pytestmark = pytest.mark.slow


def _grey_digits(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """28x28 grey images: a bright bar whose position is the class (4 classes), plus noise."""
    g = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % 4
        img = g.integers(0, 60, (28, 28)).astype(np.uint8)
        img[4 + 6 * label:8 + 6 * label, 4:24] = 230
        images.append(img)
        labels.append(label)
    return images, labels


def _archive(tmp_path: Path, images: list[np.ndarray], labels: list[int]) -> Path:
    files = {f"img/{i}.png": png(img) for i, img in enumerate(images)}
    rows = ["path,label"] + [f"img/{i}.png,{lab}" for i, lab in enumerate(labels)]
    files["manifest.csv"] = ("\n".join(rows) + "\n").encode()
    return write_zip(tmp_path / "grey.zip", files)


def test_grey_pngs_become_a_one_channel_dataset_and_a_one_channel_model_runs(
        tmp_path: Path) -> None:
    images, labels = _grey_digits(96)
    dest = tmp_path / "grey.npz"
    info = ingest(_archive(tmp_path, images, labels), dest, name="grey", limits=IngestLimits())
    assert info.input_shape == [1, 28, 28]
    data = load_npz(dest, "test")
    assert tuple(data.x.shape) == (96, 1, 28, 28)
    assert torch.equal(data.x[5, 0], torch.from_numpy(images[5]).float() / 255)  # exact pixels
    torch.manual_seed(0)
    model = train(TinyCNN(1, 4, 4), data.x, data.y, steps=60)
    res = run("adversarial", model, data, {"attack": "apgd-ce", "norm": "linf", "eps": 0.02,
                                           "steps": 5}, RunContext())
    clean = next(r.value for r in res.rows if r.metric == "clean_accuracy")
    assert clean > 0.9  # the model learned from the single channel it was given


@pytest.mark.parametrize(("channels", "shape"), [(None, [1, 28, 28]), (3, [3, 28, 28]),
                                                 (1, [1, 28, 28])])
def test_channels_converts_explicitly(tmp_path: Path, channels: int | None,
                                      shape: list[int]) -> None:
    images, labels = _grey_digits(4)
    info = ingest(_archive(tmp_path, images, labels), tmp_path / "o.npz", name="g",
                  limits=IngestLimits(), channels=channels)
    assert info.input_shape == shape
    with np.load(tmp_path / "o.npz", allow_pickle=False) as z:
        stored = z["images"]
    assert np.array_equal(stored[1][..., 0], images[1])
    if channels == 3:  # grey replicated, as RGB conversion does
        assert np.array_equal(stored[..., 0], stored[..., 2])


def test_colour_to_grey_uses_luma_and_mixed_sets_stay_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    grey = decode_image(png(rgb), 64, channels=1)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert grey.shape == (4, 4, 1)
    assert np.array_equal(grey[..., 0], expected)
    assert decode_image(png(rgb), 64).shape == (4, 4, 3)
    files = {"a.png": png(rgb), "b.png": png(np.full((4, 4), 99, dtype=np.uint8)),
             "manifest.csv": b"path,label\na.png,0\nb.png,1\n"}
    info = ingest(write_zip(tmp_path / "mix.zip", files), tmp_path / "mix.npz", name="mix",
                  limits=IngestLimits())
    assert info.input_shape == [3, 4, 4]
    with np.load(tmp_path / "mix.npz", allow_pickle=False) as z:
        assert np.array_equal(z["images"][1], np.full((4, 4, 3), 99, dtype=np.uint8))
