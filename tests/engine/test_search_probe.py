"""The search's layout and precision are probed per model: nothing that runs in plain fp32
may fail (or change its answer) because the search runs it in channels_last or bf16."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.engine.attack_helpers import TinyCNN, one_thread  # noqa: F401
from workers.engine.attacks import APGD, Forward
from workers.engine.attacks.base import ce_loss
from workers.engine.runner import Stage, run_cascade
from workers.engine.threats import Norm
from workers.engine.types import RunContext


class ViewsAfterConvs(nn.Module):
    """Flattens with ``.view`` after its convolutions, as many published models do: a
    channels_last activation is not viewable that way."""

    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.relu(self.bn(self.conv(x)))
        return self.fc(z.view(z.size(0), -1))


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def test_the_view_model_really_fails_under_channels_last() -> None:
    model = ViewsAfterConvs(bn=False).eval()
    x, _ = _data()
    with pytest.raises(RuntimeError, match="view"):  # else the test below would be vacuous
        model(x.contiguous(memory_format=torch.channels_last))


@pytest.mark.slow
def test_a_model_that_views_after_its_convolutions_is_searched_in_its_own_layout() -> None:
    for bn in (False, True):
        model = ViewsAfterConvs(bn).eval()
        x, y = _data()
        fwd = Forward(model, channels_last=True, optimise=True)
        logits, _, grad = fwd.loss_grad(x, y, ce_loss)
        assert not fwd.channels_last
        assert fwd.search is model
        assert fwd.fallback is not None
        assert "channels_last" in fwd.fallback
        with torch.no_grad():
            assert torch.allclose(logits, model(x), atol=1e-6)
        assert float(grad.abs().sum()) > 0
        res = run_cascade(model, x, y, Norm.LINF, 0.05, [Stage("apgd", APGD(Norm.LINF, 5))],
                          RunContext())
        assert res.robust.shape == (6,)


def test_a_model_that_takes_channels_last_keeps_it() -> None:
    model = TinyCNN(3, 10, 4).eval()
    x, y = _data()
    fwd = Forward(model, channels_last=True, optimise=True)
    fwd.loss_grad(x, y, ce_loss)
    assert fwd.channels_last
    assert fwd.fallback is None
