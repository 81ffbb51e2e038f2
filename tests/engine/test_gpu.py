"""The engine on a CUDA device: bf16 search as strong as fp32, results as on the CPU.

Marked ``gpu``: skipped where no CUDA device is present (CI has none).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from tests.engine.attack_helpers import TinyCNN, template_data, train
from workers.engine.attacks import APGD, PGD
from workers.engine.runner import Stage, autoattack_stages, run_cascade
from workers.engine.threats import Norm
from workers.engine.types import RunContext, native_bf16, strict_fp32

pytestmark = pytest.mark.gpu
EPS = 0.04


@pytest.fixture(autouse=True, scope="module")
def ieee_fp32() -> Iterator[None]:
    """As in a worker: fp32 means fp32 (no TF32 convolutions or matmuls)."""
    before = strict_fp32()
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor, Tensor]:
    x, y = template_data(1400, classes=10, shape=(3, 16, 16), noise=0.22, seed=3)
    torch.manual_seed(0)  # parameter init of the test model only
    model = train(TinyCNN(3, 10, 16), x[:1000], y[:1000], steps=250, adv_eps=EPS / 2)
    return model, x[1000:], y[1000:]


def _cuda(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cuda()


@pytest.mark.parametrize("stage", [Stage("pgd", PGD(Norm.LINF, steps=20)),
                                   Stage("apgd-ce", APGD(Norm.LINF, steps=30))],
                         ids=["pgd", "apgd"])
def test_bf16_search_is_as_strong_as_fp32(trained: tuple[nn.Module, Tensor, Tensor],
                                          stage: Stage) -> None:
    model, x, y = trained
    dev = torch.device("cuda")
    assert native_bf16(dev)
    gpu = _cuda(model)
    fp32 = run_cascade(gpu, x, y, Norm.LINF, EPS, [stage], RunContext(device=dev))
    bf16 = run_cascade(gpu, x, y, Norm.LINF, EPS, [stage], RunContext(device=dev, amp=True))
    assert 0.05 < fp32.robust_accuracy < float(fp32.clean_correct.float().mean()) - 0.05
    assert bf16.rejected <= 1  # the attacks confirmed their breaks before stopping on them
    assert bf16.robust_accuracy <= fp32.robust_accuracy + 2 / len(y)


def test_cuda_cascade_matches_the_cpu(trained: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = trained
    dev = torch.device("cuda")
    stages = autoattack_stages(Norm.LINF, 10, steps=20, square_queries=200)
    cpu = run_cascade(model, x, y, Norm.LINF, EPS, stages, RunContext(batch_size=128))
    gpu = run_cascade(_cuda(model), x, y, Norm.LINF, EPS, stages,
                      RunContext(device=dev, amp=True, batch_size=128))
    assert int((gpu.clean_correct != cpu.clean_correct).sum()) <= 1  # fp32 on both, not TF32
    # Different devices draw different random starts: equal strength, not equal examples.
    assert abs(gpu.robust_accuracy - cpu.robust_accuracy) <= 3 / len(y)
    assert gpu.robust.device.type == "cpu"


def test_out_of_memory_backs_off_on_a_real_card() -> None:
    """A batch far too large for the card: the runner halves it until it fits."""
    dev = torch.device("cuda")
    free, _ = torch.cuda.mem_get_info(dev)
    side = 512
    per_image = 3 * side * side * 4 * 64  # activations of a 64-channel conv, fp32, roughly
    n = int(free // per_image) * 4 + 8  # about four times what fits
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10)).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(n, 3, side, side)
    with torch.inference_mode():
        y = torch.cat([model(x[i:i + 8].to(dev)).argmax(1).cpu() for i in range(0, n, 8)])
    res = run_cascade(model, x, y, Norm.LINF, 1 / 255, [Stage("pgd", PGD(Norm.LINF, steps=1))],
                      RunContext(device=dev, batch_size=n))
    assert res.robust.shape == (n,)
