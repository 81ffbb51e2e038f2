"""Training throughput: the engine's loop against a plain PyTorch loop doing the same work.

Images per second of standard, FGSM-RS and PGD-7 training of PreAct-ResNet-18 at 32x32, both
in the same run: the engine's ``train`` (held-out measurement excluded: timed from the
second batch to the last through its progress callback) and a plain loop with the same model,
batch, optimiser (SGD, momentum 0.9, weight decay 5e-4) and attack steps (random start in the
l_inf ball, steps on the cross-entropy in eval mode, loss in train mode).

The engine trains in fp32 without autocast (docs/ARCHITECTURE.md); ``--amp`` runs the plain
loop under bf16 autocast with channels_last on CUDA, the precision the GPU anchor (Wong et al.
2020: FGSM-RS trained CIFAR-10 in 12 minutes on an RTX 2080 Ti, about 1 000 images/s) used
mixed precision for.

    uv run python benchmarks/training.py --images 64 --batch 32          # CPU, small
    uv run python benchmarks/training.py --device cuda --images 8192 --batch 512 --amp
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from workers.engine import nets
from workers.engine.threats import Norm
from workers.engine.training import Method, ThreatSpec, TrainSpec, train
from workers.engine.types import EvalData

EPS = 8 / 255
STEPS = {"standard": 0, "fgsm_rs": 1, "pgd": 7}


def _data(n: int, seed: int = 0) -> EvalData:
    g = torch.Generator().manual_seed(seed)
    return EvalData(x=torch.rand(n, 3, 32, 32, generator=g),
                    y=torch.randint(0, 10, (n,), generator=g),
                    class_names=[str(i) for i in range(10)])


def engine_rate(method: str, data: EvalData, batch: int, device: str) -> float:
    m = Method(method)
    steps = max(STEPS[method], 1)
    step_size = 1.25 * EPS if m is Method.FGSM_RS else 2.5 * EPS / steps
    spec = TrainSpec("preact_resnet18", m, ThreatSpec(Norm.LINF, EPS, steps, step_size),
                     epochs=1, batch_size=batch, lr=0.05, eval_steps=1)
    marks: list[float] = []

    def progress(fraction: float, message: str) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    train(spec, data, data.subset(torch.arange(2)), device=device, progress=progress)
    n_batches = len(marks) - 1  # one call per batch, then one before the measurement
    timed = (n_batches - 1) * batch  # from the start of batch 2 to the end of the last
    return timed / (marks[-1] - marks[1])


def _attack(model: nn.Module, x: Tensor, y: Tensor, steps: int, step_size: float,
            amp: bool) -> Tensor:
    delta = (torch.rand_like(x) * 2 - 1) * EPS
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = (x + (x_adv - x).clamp(-EPS, EPS)).clamp(0, 1)
    return x_adv.detach()


def plain_rate(method: str, data: EvalData, batch: int, device: str, amp: bool) -> float:
    torch.manual_seed(0)
    model = nets.preact_resnet18(10, 3).to(device)
    fmt = torch.channels_last if amp else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x_all = data.x.to(device).contiguous(memory_format=fmt)
    y_all = data.y.to(device)
    steps = STEPS[method]
    step_size = 1.25 * EPS if method == "fgsm_rs" else 2.5 * EPS / max(steps, 1)
    start, seen = 0.0, 0
    for i, lo in enumerate(range(0, x_all.shape[0] - batch + 1, batch)):
        if i == 1:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        x, y = x_all[lo:lo + batch], y_all[lo:lo + batch]
        if steps:
            model.eval()
            x = _attack(model, x, y, steps, step_size, amp)
            model.train()
        else:
            model.train()
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += x.shape[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--amp", action="store_true", help="plain loop in bf16 + channels_last")
    p.add_argument("--methods", default="standard,fgsm_rs,pgd")
    args = p.parse_args(argv)
    if args.images < 2 * args.batch:
        p.error("--images must be at least two batches (the first one is a warm-up)")
    data = _data(args.images)
    rows: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        eng = engine_rate(method, data, args.batch, args.device)
        plain = plain_rate(method, data, args.batch, args.device, args.amp)
        rows.append({"method": "pgd-7" if method == "pgd" else method,
                     "engine_images_per_s": round(eng, 2),
                     "plain_images_per_s": round(plain, 2),
                     "engine_over_plain": round(eng / plain, 3)})
        sys.stdout.write(json.dumps(rows[-1]) + "\n")
        sys.stdout.flush()
    sys.stdout.write(f"device {args.device}, {torch.get_num_threads()} threads, batch "
                     f"{args.batch}, {args.images} images, plain loop "
                     f"{'bf16 + channels_last' if args.amp else 'fp32'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
