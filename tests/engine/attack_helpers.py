"""Tiny models and data for the attack tests: trained in seconds on the CPU, never downloaded.

Also the exact answers for linear classifiers, and the strength assertion every attack test
uses (with a test of that assertion against deliberately weak attacks).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from workers.engine.attacks import Forward
from workers.engine.threats import Norm, threat_for

DUAL = {Norm.LINF: 1.0, Norm.L2: 2.0, Norm.L1: float("inf")}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The test machine is shared: OpenMP spin-waiting on busy cores makes 2 threads 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def template_data(n: int, classes: int = 10, shape: tuple[int, int, int] = (3, 16, 16),
                  noise: float = 0.18, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images = a smooth per-class template + noise, in [0, 1]; classes overlap a little."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.rand(classes, c, max(h // 4, 1), max(w // 4, 1), generator=g)
    templates = nn.functional.interpolate(coarse, size=(h, w), mode="bilinear",
                                          align_corners=False)
    gd = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, classes, (n,), generator=gd)
    x = templates[y] * 0.5 + 0.25 + noise * torch.randn(n, c, h, w, generator=gd)
    return x.clamp(0.0, 1.0), y


class TinyCNN(nn.Module):
    def __init__(self, in_channels: int = 3, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int = 150, lr: float = 3e-3,
          batch: int = 64, seed: int = 0, adv_eps: float = 0.0) -> nn.Module:
    """Adam on cross-entropy; with ``adv_eps`` > 0, FGSM-RS adversarial training (l_inf).

    Adam by hand: torch.optim's first step imports the compiler stack (seconds, per process).
    """
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    model.train()
    for t in range(1, steps + 1):
        i = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb, yb = x[i], y[i]
        if adv_eps > 0:
            delta = (torch.rand(xb.shape, generator=g) * 2 - 1) * adv_eps
            xa = (xb + delta).requires_grad_(True)
            loss = nn.functional.cross_entropy(model(xa), yb)
            (grad,) = torch.autograd.grad(loss, xa)
            xb = (xb + (delta + 1.25 * adv_eps * grad.sign()).clamp(-adv_eps, adv_eps))
            xb = xb.clamp(0, 1).detach()
        loss = nn.functional.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g1, a, b in zip(params, grads, m1, m2, strict=True):
                a.mul_(0.9).add_(g1, alpha=0.1)
                b.mul_(0.999).addcmul_(g1, g1, value=0.001)
                p.sub_(lr * (a / (1 - 0.9**t)) / ((b / (1 - 0.999**t)).sqrt() + 1e-8))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Linear(nn.Module):
    """A multi-class linear classifier on flattened images (exact answers are known)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.t() + self.bias


def linear_problem(n: int = 64, classes: int = 10, shape: tuple[int, int, int] = (1, 4, 5),
                   seed: int = 0) -> tuple[Linear, Tensor, Tensor]:
    """Inputs near 0.5 (in [0.35, 0.65]) labelled by the model itself (clean accuracy 1)."""
    g = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    model = Linear(torch.randn(classes, d, generator=g), 0.1 * torch.randn(classes, generator=g))
    x = (0.5 + 0.05 * torch.randn(n, *shape, generator=g)).clamp(0.35, 0.65)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def linear_min_norms(model: Linear, x: Tensor, y: Tensor, norm: Norm) -> Tensor:
    """min_j (z_y - z_j) / |w_y - w_j|_q: exact while the optimal step stays inside the box,
    which holds for every norm below 0.35 here (inputs in [0.35, 0.65], each coordinate of the
    optimal step is at most its norm)."""
    with torch.no_grad():
        z = model(x)
        w = model.weight
        dw = w[y][:, None, :] - w[None, :, :]  # [N, C, D]
        gap = z.gather(1, y[:, None]) - z
        q = DUAL[norm]
        dual = dw.abs().amax(-1) if q == float("inf") else dw.norm(p=q, dim=-1)
        ratio = gap / dual.clamp_min(1e-12)
        ratio[torch.arange(len(y)), y] = float("inf")
        return ratio.amin(1)


def broken(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, norm: Norm,
           eps: float) -> Tensor:
    """Independent of the attack's own claim: misclassified, in the box and in the ball."""
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    inside = threat_for(norm).norm_of(x_adv - x) <= eps * (1 + 1e-4) + 1e-6
    in_box = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(1)
    return wrong & inside & in_box


def assert_strong(success: Tensor, min_norm: Tensor, eps: float, slack: float = 0.03) -> None:
    """Every example whose exact minimal norm is below eps * (1 - slack) must be broken, and
    none whose minimal norm exceeds eps may be (that would be a perturbation outside the ball)."""
    must = min_norm < eps * (1 - slack)
    missed = int((must & ~success).sum())
    assert missed == 0, f"{missed}/{int(must.sum())} breakable examples were not broken"
    impossible = int((success & (min_norm > eps * (1 + 1e-4))).sum())
    assert impossible == 0, f"{impossible} examples broken beyond their minimal norm"
    assert int(must.sum()) > 0, "the problem has no breakable example: the test is vacuous"


class TrustingForward(Forward):
    """A low-precision search that takes its own word for what is and is not broken: what
    the engine must not do (tests of the tests use it)."""

    def confirmed(self, x: Tensor, claimed: Tensor, y: Tensor,
                  target: Tensor | None = None) -> Tensor:
        return claimed

    def wrong(self, x: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        return logits.argmax(1) != y
