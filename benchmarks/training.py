"""Training throughput: the engine's loop against a plain PyTorch loop doing the same work.

Images per second of standard, FGSM-RS and PGD-7 training of PreAct-ResNet-18 at 32x32, both
in the same run: the engine's ``train`` (held-out measurement excluded: each batch timed
through its progress callback) and a plain loop with the same model,
batch, optimiser (SGD, momentum 0.9, weight decay 5e-4) and attack steps (random start in the
l_inf ball, steps on the cross-entropy in eval mode, loss in train mode). Each loop runs
``--repeats`` times, alternating which goes first; the rate is the batch size over the median
batch time (the first batch of each run is a warm-up and not timed), so a burst of load from
another process moves the figure little.

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
import statistics
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


def engine_batches(method: str, data: EvalData, batch: int, device: str) -> list[float]:
    """Seconds of each of the engine's batches after the first (a warm-up)."""
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
    # one call at the start of each batch, then one before the held-out measurement
    return [b - a for a, b in zip(marks[1:-1], marks[2:], strict=True)]


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


def plain_batches(method: str, data: EvalData, batch: int, device: str,
                  amp: bool) -> list[float]:
    """Seconds of each of the plain loop's batches after the first (a warm-up)."""
    torch.manual_seed(0)
    model = nets.preact_resnet18(10, 3).to(device)
    fmt = torch.channels_last if amp else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x_all = data.x.to(device).contiguous(memory_format=fmt)
    y_all = data.y.to(device)
    steps = STEPS[method]
    step_size = 1.25 * EPS if method == "fgsm_rs" else 2.5 * EPS / max(steps, 1)
    times: list[float] = []
    for lo in range(0, x_all.shape[0] - batch + 1, batch):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
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
        float(loss.detach())  # the engine reads the loss back each batch too
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return times[1:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--amp", action="store_true", help="plain loop in bf16 + channels_last")
    p.add_argument("--methods", default="standard,fgsm_rs,pgd")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each loop, alternating which goes first")
    args = p.parse_args(argv)
    if args.images < 2 * args.batch:
        p.error("--images must be at least two batches (the first one is a warm-up)")
    data = _data(args.images)
    rows: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        eng: list[float] = []
        plain: list[float] = []
        for r in range(args.repeats):
            for which in ("engine", "plain") if r % 2 == 0 else ("plain", "engine"):
                if which == "engine":
                    eng.extend(engine_batches(method, data, args.batch, args.device))
                else:
                    plain.extend(plain_batches(method, data, args.batch, args.device,
                                               args.amp))
        # the median batch: a burst of load from elsewhere moves it little
        e_rate, p_rate = args.batch / statistics.median(eng), args.batch / statistics.median(plain)
        rows.append({"method": "pgd-7" if method == "pgd" else method,
                     "engine_images_per_s": round(e_rate, 2),
                     "plain_images_per_s": round(p_rate, 2),
                     "engine_over_plain": round(e_rate / p_rate, 3),
                     "batches_timed": len(eng)})
        sys.stdout.write(json.dumps(rows[-1]) + "\n")
        sys.stdout.flush()
    sys.stdout.write(f"device {args.device}, {torch.get_num_threads()} threads, batch "
                     f"{args.batch}, {args.images} images, {args.repeats} runs of each loop "
                     "(alternating), median batch; plain loop "
                     f"{'bf16 + channels_last' if args.amp else 'fp32'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
