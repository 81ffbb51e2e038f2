"""robustscope's attack engine against torchattacks 3.5.1: one table, same run, same inputs.

For each model (a small CNN and a ResNet-18 at 32x32, adversarially trained for a few
hundred steps on a synthetic 10-class task so that robust accuracy is neither 0 nor 1) and
each attack (PGD-10 l_inf, APGD-CE l_inf, the AutoAttack cascade APGD-CE -> APGD-T -> FAB-T ->
Square), both libraries attack the same examples with the same eps and step/query budgets.
Ours runs through the evaluation runner (clean pass, cascade, fp32 re-check of every break),
so its time is the whole evaluation, not just the attack loop. Runs alternate ours/ref and
report the best of ``--repeats`` (the machine may be shared); wall time and process CPU time
are both measured, images/s uses wall time. "Broken by one only" counts the examples one
library broke and the other did not (summed over seeds): two equally strong attacks with
different random starts differ on a few examples either way, so a strength comparison wants
``--seeds`` > 1.

On a GPU it adds ResNet-50 at 224x224 (random weights: a throughput measurement only) in bf16
with channels_last: PGD image-steps/s and the fraction of the measured bf16 matmul peak.

    uv run python benchmarks/attacks.py                       # a few minutes on 2 CPU cores
    uv run python benchmarks/attacks.py --n 512 --aa-steps 100 --queries 5000   # AA standard
    uv run python benchmarks/attacks.py --stages --only alone   # APGD-T, FAB-T, Square alone
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from workers.engine.attacks import APGD, PGD
from workers.engine.attacks.base import Forward, ce_loss
from workers.engine.nets import resnet18_cifar, small_cnn
from workers.engine.runner import Stage, autoattack_stages, run_cascade
from workers.engine.threats import Norm
from workers.engine.types import RunContext, bf16_speedup, fast_bf16, strict_fp32


def synthetic(n: int, seed: int, size: int = 32) -> tuple[Tensor, Tensor]:
    """Smooth per-class colour templates plus noise: learnable in minutes, not trivially."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(1234))
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] * 0.3 + 0.35 + 0.25 * torch.randn(n, 3, size, size, generator=g)
    return x.clamp(0, 1), y


def train(model: nn.Module, steps: int, eps: float, batch: int = 64) -> nn.Module:
    """FGSM-RS adversarial training (Wong et al. 2020; eps = 0: standard training), Adam by
    hand (torch.optim's first step imports the compiler stack: seconds of start-up)."""
    x, y = synthetic(steps * batch, seed=1)
    params = [p for p in model.parameters()]
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
class Timed:
    wall: float
    cpu: float
    robust: Tensor  # bool per example


def timed(fn: Callable[[], Tensor], repeats: int) -> Timed:
    best: Timed | None = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        acc = fn()
        t = Timed(time.perf_counter() - w0, time.process_time() - c0, acc)
        best = t if best is None or t.wall < best.wall else best
    assert best is not None
    return best


def step_costs(model: nn.Module, x: Tensor, y: Tensor, amp: bool) -> str:
    """One gradient step and one forward on the whole batch, torchattacks' way (the model in
    fp32) and the search's way (:class:`Forward`: bf16 where native, channels_last, folded
    BatchNorm): the ratio is what precision and layout alone can gain, before any algorithmic
    saving (dropping broken examples, FAB's single forward per step)."""
    fwd = Forward(model, amp=amp, channels_last=True, optimise=True)

    def ref_step() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xg), y), xg)

    def ref_forward() -> None:
        with torch.inference_mode():
            model(x)

    def our_forward() -> None:
        with torch.inference_mode():
            fwd(x)

    def best_ms(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1000

    grad_ref, grad_ours = best_ms(ref_step), best_ms(lambda: fwd.loss_grad(x, y, ce_loss))
    fwd_ref, fwd_ours = best_ms(ref_forward), best_ms(our_forward)
    return (f"one gradient step on {len(y)} images: {grad_ref:.0f} ms fp32, {grad_ours:.0f} ms "
            f"search ({grad_ref / grad_ours:.2f}x); one forward: {fwd_ref:.0f} ms fp32, "
            f"{fwd_ours:.0f} ms search ({fwd_ref / fwd_ours:.2f}x)")


def robust_of(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(x_adv).argmax(1) == y


Case = tuple[str, Callable[[], Tensor], Callable[[], Tensor]]


def cases(model: nn.Module, x: Tensor, y: Tensor, eps: float, args: argparse.Namespace,
          seed: int) -> list[Case]:
    """(label, ours, reference) per attack; each returns the per-example robust flags."""
    ctx = RunContext(batch_size=len(y), seed=seed, amp=args.amp)
    s, q = args.aa_steps, args.queries

    def ours(stages: list[Stage]) -> Callable[[], Tensor]:
        return lambda: run_cascade(model, x, y, Norm.LINF, eps, stages, ctx).robust

    def ref(make: Callable[[], Callable[[Tensor, Tensor], Tensor]]) -> Callable[[], Tensor]:
        def go() -> Tensor:
            torch.manual_seed(seed)  # torchattacks' PGD draws its start from the global RNG
            return robust_of(model, make()(x, y), y)
        return go

    aa = autoattack_stages(Norm.LINF, 10, s, square_queries=q)
    rows: list[Case] = [
        ("PGD-10 linf", ours([Stage("pgd", PGD(Norm.LINF, 10, step_size=eps / 4))]),
         ref(lambda: torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=10,
                                      random_start=True))),
        (f"APGD-CE-{s} linf", ours([Stage("apgd-ce", APGD(Norm.LINF, s))]),
         ref(lambda: torchattacks.APGD(model, eps=eps, steps=s, loss="ce", seed=seed))),
        (f"AutoAttack ({s} it, {q} q)", ours(aa),
         ref(lambda: torchattacks.MultiAttack([
             torchattacks.APGD(model, eps=eps, steps=s, loss="ce", seed=seed),
             torchattacks.APGDT(model, eps=eps, steps=s, n_classes=10, seed=seed),
             torchattacks.FAB(model, eps=eps, steps=s, multi_targeted=True, n_classes=10,
                              seed=seed),
             torchattacks.Square(model, eps=eps, n_queries=q, seed=seed),
         ]))),
    ]
    if not args.stages:
        return rows
    # AutoAttack's later stages alone, on every example: the cascade's own Stage objects.
    refs: list[Callable[[], Callable[[Tensor, Tensor], Tensor]]] = [
        lambda: torchattacks.APGDT(model, eps=eps, steps=s, n_classes=10, seed=seed),
        lambda: torchattacks.FAB(model, eps=eps, steps=s, multi_targeted=True, n_classes=10,
                                 seed=seed),
        lambda: torchattacks.Square(model, eps=eps, n_queries=q, seed=seed),
    ]
    for stage, make in zip(aa[1:], refs, strict=True):
        budget = f"{q} q" if stage.name == "square" else f"{s} it"
        rows.append((f"{stage.name} alone ({budget})", ours([stage]), ref(make)))
    return rows


def compare(model: nn.Module, x: Tensor, y: Tensor, eps: float, args: argparse.Namespace,
            name: str) -> list[list[str]]:
    """Times seed 0 (best of ``--repeats``); with ``--seeds`` > 1 both libraries also attack
    with further seeds, untimed, and the robust accuracy is the mean over seeds."""
    per_seed = [cases(model, x, y, eps, args, seed) for seed in range(max(args.seeds, 1))]
    rows = []
    for k, (label, ours_fn, ref_fn) in enumerate(per_seed[0]):
        if args.only and args.only not in label.lower():
            continue
        ours = timed(ours_fn, args.repeats)
        ref = timed(ref_fn, args.repeats)
        robust_ours, robust_ref = [ours.robust], [ref.robust]
        for more in per_seed[1:]:
            robust_ours.append(more[k][1]())
            robust_ref.append(more[k][2]())
        a, b = torch.stack(robust_ours), torch.stack(robust_ref)
        n = len(y)
        rows.append([name, label, f"{n / ours.wall:,.1f}", f"{n / ref.wall:,.1f}",
                     f"{a.float().mean():.3f}", f"{b.float().mean():.3f}",
                     f"{int((~a & b).sum())} / {int((a & ~b).sum())}",
                     f"{ref.wall / ours.wall:.2f}x", f"{ref.cpu / max(ours.cpu, 1e-9):.2f}x"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def gpu_resnet50(args: argparse.Namespace) -> list[str]:
    """bf16 + channels_last PGD on ResNet-50 224x224: image-steps/s and fraction of peak."""
    import torchvision

    dev = torch.device("cuda")
    model = torchvision.models.resnet50(weights=None).to(dev).eval()
    model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    n, steps = args.gpu_batch, 10
    x = torch.rand(n, 3, 224, 224, device=dev)
    with torch.inference_mode():
        y = model(x).argmax(1)  # labels = clean predictions: every example starts robust
    ctx = RunContext(device=dev, amp=True, batch_size=n)
    # No early stop can help a random model's throughput number: eps = 0 keeps every example
    # robust, so every step runs on the full batch.
    stage = [Stage("pgd", PGD(Norm.LINF, steps, step_size=1e-3))]
    run_cascade(model, x.cpu(), y.cpu(), Norm.LINF, 0.0, stage, ctx)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_cascade(model, x.cpu(), y.cpu(), Norm.LINF, 0.0, stage, ctx)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    image_steps = n * steps / wall
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    peak = 20 * 2 * 8192**3 / (time.perf_counter() - t0)
    flops_per_step = 3 * 4.1e9  # forward + input-gradient backward (~2x forward) per image
    frac = image_steps * flops_per_step / peak
    return [f"ResNet-50 224 bf16 PGD-{steps}: {image_steps:,.0f} image-steps/s, "
            f"{frac:.1%} of measured bf16 matmul peak ({peak / 1e12:.0f} TFLOP/s)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="examples for the small CNN")
    ap.add_argument("--n-resnet", type=int, default=48, help="examples for ResNet-18")
    ap.add_argument("--eps", type=float, default=8 / 255, help="eps for the small CNN")
    ap.add_argument("--eps-resnet", type=float, default=4 / 255,
                    help="eps for ResNet-18 (trained without adversarial examples: CPU budget)")
    ap.add_argument("--aa-steps", type=int, default=20, help="APGD/APGD-T/FAB-T iterations")
    ap.add_argument("--queries", type=int, default=300, help="Square queries")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-steps-resnet", type=int, default=80)
    ap.add_argument("--models", default="small,resnet18")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: search under bf16 autocast where it is measurably faster, as "
                         "workers do (every break confirmed in fp32); bf16: always; fp32: never")
    ap.add_argument("--only", default="", help="run only attacks whose label contains this")
    ap.add_argument("--stages", action="store_true",
                    help="also compare AutoAttack's APGD-T, FAB-T and Square stages run alone")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=1,
                    help="attack with this many seeds (robust accuracy: the mean; time: seed 0)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--gpu-batch", type=int, default=128)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.amp = fast_bf16(device) if args.precision == "auto" else args.precision == "bf16"
    if device.type == "cuda":
        strict_fp32()  # as workers do: fp32 references are IEEE fp32, not TF32
    torch.manual_seed(0)  # a script, not library code: fixes the model initialisation
    header = ["model", "attack", "img/s ours", "img/s ref", "robust ours", "robust ref",
              "broken by one only (ours / ref)", "speed (wall)", "speed (cpu)"]
    print(f"torch {torch.__version__}, torchattacks {torchattacks.__version__}, "
          f"threads {torch.get_num_threads()}, eps {args.eps:.4f}, "
          f"search in {'bf16' if args.amp else 'fp32'} (torchattacks: fp32)"
          f"{f', probe bf16 speed-up {bf16_speedup():.2f}x' if device.type == 'cpu' else ''}",
          flush=True)
    print(" | ".join(header), flush=True)
    table: list[list[str]] = []
    builders = {"small": (small_cnn, args.n, args.train_steps, args.eps, args.eps, 64),
                "resnet18": (resnet18_cifar, args.n_resnet, args.train_steps_resnet, 0.0,
                             args.eps_resnet, 32)}
    for name in args.models.split(","):
        build, n, steps, train_eps, eps, batch = builders[name]
        t0 = time.perf_counter()
        model = train(build(10, 3), steps, train_eps, batch)
        x, y = synthetic(n, seed=99)
        with torch.inference_mode():
            clean = float((model(x).argmax(1) == y).float().mean())
        print(f"# {name}: trained {steps} steps in {time.perf_counter() - t0:.0f}s, "
              f"clean accuracy {clean:.3f} on {n} test examples", flush=True)
        print(f"# {name}: {step_costs(model, x, y, args.amp)}", flush=True)
        table += compare(model, x, y, eps, args, f"{name} (eps {eps * 255:.0f}/255)")
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print()
    for r in [header, ["-" * w for w in widths], *table]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if torch.cuda.is_available():
        for line in gpu_resnet50(args):
            print(line)


if __name__ == "__main__":
    main()
