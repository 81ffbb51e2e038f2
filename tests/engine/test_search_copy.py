"""The attack search's private copy of a model: BatchNorm folded, same function, safe fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from workers.engine.attacks.base import Forward, search_copy
from workers.engine.models import Normalized
from workers.engine.nets import resnet18_cifar

pytestmark = pytest.mark.slow


def _resnet() -> nn.Module:
    torch.manual_seed(0)  # parameter init of the test model only
    model = Normalized(resnet18_cifar(10, 3), [0.5] * 3, [0.25] * 3, 3)
    for m in model.modules():  # running statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_folds_every_batchnorm_and_keeps_the_function() -> None:
    model = _resnet()
    x = torch.rand(4, 3, 32, 32)
    twin = search_copy(model, x, channels_last=True)
    assert twin is not model
    assert _batchnorms(twin) == 0
    assert _batchnorms(model) == 20  # the model is left as it was
    with torch.no_grad():
        ref, got = model(x), twin(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # Gradients with respect to the input agree too (the search ascends them).
    ce = nn.functional.cross_entropy
    y = ref.argmax(1)
    _, _, g_ref = Forward(model).loss_grad(x, y, lambda z, t, _: ce(z, t, reduction="none"))
    _, _, g = Forward(model, channels_last=True, optimise=True).loss_grad(
        x, y, lambda z, t, _: ce(z, t, reduction="none"))
    assert torch.allclose(g, g_ref, rtol=1e-3, atol=1e-4 * float(g_ref.abs().max()))


def test_built_inside_inference_mode_the_copy_still_gives_gradients() -> None:
    model = _resnet()
    fwd = Forward(model, channels_last=True, optimise=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        fwd(x)  # the first search forward builds the copy
    assert fwd.search is not model
    _, _, g = fwd.loss_grad(x, torch.tensor([0, 1]),
                            lambda z, t, _: nn.functional.cross_entropy(z, t, reduction="none"))
    assert float(g.abs().sum()) > 0


class ValueBranch(nn.Module):
    """Control flow on a value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        z = self.bn(self.conv(x)).flatten(1)
        return z[:, :10] if bool(x.mean() > 0.5) else -z[:, :10]


def test_falls_back_to_the_model_where_folding_does_not_apply() -> None:
    x = torch.rand(2, 3, 32, 32)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    plain(x)
    training = _resnet().train()
    scripted = torch.jit.trace(_resnet(), x)
    untraceable = ValueBranch().eval()
    for model in (plain.eval(), training, scripted, untraceable):
        assert search_copy(model, x, channels_last=True) is model
