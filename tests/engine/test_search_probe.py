"""The search's layout and precision are probed per model: nothing that runs in plain fp32
may fail (or change its answer) because the search runs it in channels_last or bf16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tests.engine.attack_helpers import TinyCNN, one_thread  # noqa: F401
from tests.factories import export_bytes, grey_view_net, torchscript_bytes
from workers.engine import benchmarks
from workers.engine.attacks import APGD, Forward
from workers.engine.attacks.base import ce_loss
from workers.engine.data.npz import load_npz
from workers.engine.models import Format, ModelSpec, load
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


def _grey(n: int = 12) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _hwc_strided(x: Tensor) -> Tensor:
    """``x`` as loading an [N, H, W, 1] array and permuting it gives it: the same values,
    channel stride 1."""
    out = torch.from_numpy(x.permute(0, 2, 3, 1).numpy().copy()).permute(0, 3, 1, 2)
    assert out.stride() == (784, 1, 28, 1)
    return out


def test_a_grey_batch_permuted_from_hwc_really_breaks_a_view_model() -> None:
    net = grey_view_net()
    x, _ = _grey()
    hwc = _hwc_strided(x)
    assert hwc.is_contiguous()  # what made .contiguous() a no-op
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        net(hwc)


@pytest.mark.parametrize("bn", [False, True])
def test_the_probe_runs_a_grey_view_model_in_the_search_layout_and_falls_back(bn: bool) -> None:
    net = grey_view_net(bn)
    x, y = _grey()
    fwd = Forward(net, channels_last=True, optimise=True)
    fwd.loss_grad(x, y, ce_loss)  # the probe, on contiguous rows
    assert not fwd.channels_last
    assert fwd.search is net
    assert fwd.fallback is not None
    assert "view size is not compatible" in fwd.fallback
    # every later batch, whatever its strides, runs as the probe decided
    logits, _, grad = fwd.loss_grad(_hwc_strided(x), y, ce_loss)
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x), rtol=0, atol=1e-5)
    assert float(grad.abs().sum()) > 0


def test_a_grey_model_that_takes_channels_last_is_searched_in_real_channels_last() -> None:
    net = TinyCNN(1, 10, 4).eval()
    seen: list[tuple[int, ...]] = []
    net.net[0].register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].stride())))
    x, y = _grey()
    fwd = Forward(net, channels_last=True, optimise=True)
    fwd.loss_grad(x, y, ce_loss)
    assert fwd.channels_last
    assert fwd.fallback is None
    assert seen[-1] == (28 * 28, 1, 28, 1)  # NHWC, not the contiguous strides it came in
    fwd.fp32(_hwc_strided(x))
    assert seen[-1] == (28 * 28, 28 * 28, 28, 1)  # the reference: plain NCHW


def _grey_npz(path: Path, x: Tensor, y: Tensor) -> Path:
    images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [N, H, W, 1]
    np.savez(path, images=images, labels=y.numpy(), splits=np.array(["test"] * len(y)),
             class_names=np.array([str(i) for i in range(10)]))
    return path


@pytest.mark.parametrize("fmt", [Format.TORCHSCRIPT, Format.EXPORT])
def test_a_grey_view_model_uploaded_in_either_format_runs_every_stage(
        tmp_path: Path, fmt: Format) -> None:
    """The uploaded dataset is stored as [N, H, W, C] bytes: its grey batches once reached the
    model with channels_last strides and the clean stage crashed."""
    net = grey_view_net()
    x, y = _grey(16)
    data = load_npz(_grey_npz(tmp_path / "grey.npz", x, y), "test")
    assert data.x.stride() == (784, 784, 28, 1)
    ckpt = tmp_path / "model"
    ckpt.write_bytes(torchscript_bytes(net) if fmt is Format.TORCHSCRIPT
                     else export_bytes(net, (1, 28, 28)))
    model = load(ckpt, ModelSpec.from_metadata(fmt.value, {"num_classes": 10,
                                                           "input_shape": [1, 28, 28]}))
    with torch.no_grad():
        expected = (net(x.mul(255).round().div(255)).argmax(1) == y).float().mean().item()
    ctx = RunContext()
    clean = benchmarks.run(model, data, benchmarks.parse({"benchmark": "clean"}), ctx)
    assert clean.rows[0].value == pytest.approx(expected, abs=1e-6)
    adv = benchmarks.run(model, data, benchmarks.parse(
        {"benchmark": "adversarial", "attack": "pgd", "norm": "linf", "eps": [0.1],
         "steps": 3}), ctx)
    rows = {r.metric: r.value for r in adv.rows}
    assert rows["clean_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= rows["robust_accuracy"] <= expected


def test_an_export_with_a_static_batch_runs_in_chunks_of_it(tmp_path: Path) -> None:
    """torch.export.export(model, (x,)) without dynamic_shapes fixes the batch size ("Guard
    failed: x.size()[0] == 2" on any other): such a graph runs in chunks of its batch, the last
    one padded, with the network's own logits and input gradients on every row."""
    net = grey_view_net()
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(2, 1, 28, 28),)), path)
    model = load(path, ModelSpec.from_metadata("torch_export", {"num_classes": 10,
                                                                "input_shape": [1, 28, 28]}))
    x, y = _grey(5)
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), xg)
    xr = x.clone().requires_grad_(True)
    ref = net(xr)
    (ref_grad,) = torch.autograd.grad(nn.functional.cross_entropy(ref, y), xr)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert model(x[:0]).shape == (0, 10)
    res = run_cascade(model, x, y, Norm.LINF, 0.1, [Stage("apgd", APGD(Norm.LINF, 3))],
                      RunContext())
    assert res.robust.shape == (5,)
