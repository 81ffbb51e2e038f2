"""The adversarial axis: ``adversarial`` (robust accuracy per eps) and ``robustness_curve``.

Both take the contract's typed entries (``contract.suite.Adversarial``, ``RobustnessCurve``),
which say what each option means and allows; the engine adds only what depends on the data
(the box's diameter bounds eps, targeted attacks need two classes).

``adversarial`` options: ``attack`` (fgsm, pgd, apgd-ce, apgd-dlr, apgd-t, fab-t, square, cw,
autoattack, fast, efficient), ``norm`` (linf, l2, l1), ``eps`` (a number or a list; one cascade
per eps), optional ``steps``, ``restarts``, ``targeted``, ``step_size`` (PGD), ``queries``
(Square), ``n_targets``, ``audit`` (re-run AutoAttack's standard protocol on that many examples,
drawn by the seed). Rows: ``clean_accuracy`` once, ``zero_gradient_fraction`` once (the
clean-correct examples a gradient attack cannot start from; not for Square, which needs no
gradient), ``robust_accuracy`` per eps, and for cascades ``robust_accuracy_after`` per stage
(params gain ``stage``).

Cost rows, per eps: ``forward_passes`` and ``backward_passes`` (example-forwards and
example-backwards of the model per evaluated example, fp32 re-checks included) and
``attack_seconds``, once with ``stage: "total"`` and once per stage; params also carry the
integer totals (``passes``) and the example count (``examples``). With ``audit``: a row
``audit_missed`` (examples of the sample the attack left robust and AutoAttack broke; params
``sample``) and a check ``autoattack_audit`` that fails when it is not zero.

``robustness_curve`` options: ``norm``, ``eps`` (the grid), optional ``steps``, ``n_targets``.
One minimal-perturbation run (FAB-T over the most likely wrong classes) gives each example
its smallest adversarial norm m_i (0 for a clean error; the box diameter when none was found).
Rows: ``robust_accuracy`` per grid eps (= fraction with m_i > eps), ``median_min_norm``, and
``curve_area`` = (1 / (e_max - e_min)) * integral from e_min to e_max of RA(e) de over the
exact step curve RA(e) = mean_i [m_i > e], i.e. the mean robust accuracy over the grid's range
(RA at the single point when the grid has one value).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from contract.attacks import Attack
from contract.suite import Adversarial, RobustnessCurve
from workers.engine.attacks import (
    APGD,
    FGSM,
    PGD,
    APGDTargeted,
    CarliniWagnerL2,
    FABTargeted,
    Forward,
    Loss,
    PGDTargeted,
    Square,
)
from workers.engine.benchmarks import register
from workers.engine.benchmarks.clean import degenerate_check
from workers.engine.layout import in_layout
from workers.engine.runner import (
    AUDIT_CONFIDENCE,
    AUDIT_TOLERANCE,
    Audit,
    CascadeResult,
    CleanPass,
    Stage,
    audit,
    autoattack_stages,
    clean_pass,
    efficient_stages,
    fast_stages,
    run_cascade,
)
from workers.engine.threats import Norm
from workers.engine.types import (
    BenchmarkError,
    BenchmarkResult,
    Check,
    EvalData,
    MetricRow,
    RunContext,
)

AttackName = Attack  # the contract's attacks (contract/attacks.py)


@dataclass(frozen=True)
class AttackParams:
    """An ``adversarial`` entry with what the engine derives from the data: the eps as a
    tuple (the dataset's default is filled in by the API) and the number of classes."""

    attack: AttackName
    norm: Norm
    eps: tuple[float, ...]
    num_classes: int
    steps: int | None = None
    restarts: int | None = None
    targeted: bool = False
    step_size: float | None = None
    queries: int | None = None
    n_targets: int | None = None  # None: each attack's default
    audit: int | None = None

    @classmethod
    def of(cls, entry: Adversarial, data: EvalData) -> AttackParams:
        """``entry`` on ``data``; refuses only what the data decides (see the module doc)."""
        eps = _eps_on(data, entry.norm, entry.eps_values(), "adversarial")
        num_classes = max(len(data.class_names), int(data.y.max()) + 1 if len(data) else 2)
        if (entry.attack in (AttackName.APGD_T, AttackName.FAB_T) or entry.targeted) \
                and num_classes < 2:
            raise BenchmarkError("adversarial: targeted attacks need at least 2 classes")
        return cls(attack=entry.attack, norm=entry.norm, eps=eps, num_classes=num_classes,
                   steps=entry.steps, restarts=entry.restarts, targeted=entry.targeted,
                   step_size=entry.step_size, queries=entry.queries,
                   n_targets=entry.n_targets, audit=entry.audit)


def _pgd(p: AttackParams) -> list[Stage]:
    base = PGD(p.norm, steps=p.steps or 10, restarts=p.restarts or 1, step_size=p.step_size)
    if p.targeted:
        return [Stage("pgd-t", PGDTargeted(base, n_targets=p.n_targets or 9))]
    return [Stage("pgd", base)]


def _apgd(loss: Loss) -> Callable[[AttackParams], list[Stage]]:
    def build(p: AttackParams) -> list[Stage]:
        steps, large = p.steps or 100, p.norm is Norm.L1
        restarts = p.restarts or (5 if large else 1)
        if p.targeted:
            return [Stage("apgd-t", APGDTargeted(p.norm, steps, n_targets=p.n_targets or 9,
                                                 restarts=p.restarts or 1, large_eps=large))]
        return [Stage(f"apgd-{loss.value}", APGD(p.norm, steps, restarts, loss, large_eps=large))]

    return build


def _apgd_t(p: AttackParams) -> list[Stage]:
    return [Stage("apgd-t", APGDTargeted(p.norm, p.steps or 100, n_targets=p.n_targets or 9,
                                         restarts=p.restarts or 1,
                                         large_eps=p.norm is Norm.L1))]


BUILDERS: dict[AttackName, Callable[[AttackParams], list[Stage]]] = {
    AttackName.FGSM: lambda p: [Stage("fgsm", FGSM(p.norm))],
    AttackName.PGD: _pgd,
    AttackName.APGD_CE: _apgd(Loss.CE),
    AttackName.APGD_DLR: _apgd(Loss.DLR),
    AttackName.APGD_T: _apgd_t,
    AttackName.FAB_T: lambda p: [Stage("fab-t", FABTargeted(
        p.norm, p.steps or 100, n_targets=p.n_targets or 9, restarts=p.restarts or 1))],
    AttackName.SQUARE: lambda p: [Stage("square", Square(p.norm, p.queries or 5000),
                                        white_box=False)],
    AttackName.CW: lambda p: [Stage("cw", CarliniWagnerL2(steps=p.steps or 100))],
    AttackName.AUTOATTACK: lambda p: autoattack_stages(
        p.norm, p.num_classes, p.steps or 100, p.n_targets or 9, p.queries or 5000),
    AttackName.FAST: lambda p: fast_stages(p.norm, p.num_classes, p.steps or 100,
                                           p.n_targets or 9),
    AttackName.EFFICIENT: lambda p: efficient_stages(p.norm, p.num_classes, p.steps or 100,
                                                     p.n_targets or 2),
}

@register("adversarial")
def adversarial(model: nn.Module, data: EvalData, entry: Adversarial,
                ctx: RunContext) -> BenchmarkResult:
    p = AttackParams.of(entry, data)
    stages = BUILDERS[p.attack](p)
    state_root = None if ctx.state_dir is None else ctx.state_dir / "adversarial"
    checks = sanity_checks(model, data, ctx)
    clean = clean_pass(model, data.x, data.y, ctx, state_root)
    checks.append(degenerate_check(clean.logits.argmax(1), data.y))
    base = {"attack": p.attack.value, "norm": p.norm.value}
    rows = [MetricRow.share("adversarial", "clean_accuracy", clean.correct, base)]
    if any(s.white_box for s in stages):
        ce_only = p.attack in CE_ONLY and not p.targeted
        rows.append(MetricRow("adversarial", "zero_gradient_fraction",
                              zero_gradient_fraction(model, data, clean, ctx, ce_only),
                              {**base, "loss": "ce" if ce_only else "logit differences"}))
    result = BenchmarkResult(rows=rows, checks=checks)
    accs: list[tuple[float, float]] = []
    fwd = Forward(model, amp=ctx.amp, channels_last=True, optimise=True)  # one search copy
    for j, eps in enumerate(p.eps):
        tag = f"{p.attack.value}-{p.norm.value}-{_eps_tag(eps)}"

        def progress(frac: float, msg: str, j: int = j) -> None:
            ctx.progress((j + frac) / len(p.eps), msg)

        res = run_cascade(model, data.x, data.y, p.norm, eps, stages, ctx, clean=clean,
                          state_dir=None if state_root is None else state_root / tag,
                          progress=progress, fwd=fwd)
        params_eps = {**base, "eps": eps}
        rows.append(MetricRow.share("adversarial", "robust_accuracy", res.robust, params_eps))
        if len(stages) > 1:
            for i, (name, _) in enumerate(res.stage_robust):
                # Robust after stage i: not a clean error and not broken by stages 0..i.
                after = (res.broken_by == -2) | (res.broken_by > i)
                rows.append(MetricRow.share("adversarial", "robust_accuracy_after", after,
                                            {**params_eps, "stage": name}))
        rows.extend(_cost_rows(res, params_eps, len(data)))
        if p.audit is not None:
            def audit_progress(frac: float, msg: str, j: int = j) -> None:
                ctx.progress((j + 1) / len(p.eps), f"audit: {msg}")

            found = audit(model, data.x, data.y, p.norm, eps, res, p.audit,
                          autoattack_stages(p.norm, p.num_classes), ctx, clean=clean, fwd=fwd,
                          progress=audit_progress)
            sample = int(found.sample.numel())
            audit_params = {**params_eps, "sample": sample, "plan": found.plan,
                            "reference": "autoattack", "tolerance": AUDIT_TOLERANCE,
                            "confidence": AUDIT_CONFIDENCE}
            rows.append(MetricRow("adversarial", "audit_missed", float(found.missed),
                                  audit_params))
            if found.bound is not None:
                rows.append(MetricRow("adversarial", "audit_bound", found.bound, audit_params))
            result.checks.append(Check(
                "autoattack_audit", found.passed, _audit_message(found, p.attack.value, eps),
                {"eps": eps, "sample": sample, "plan": found.plan, "missed": found.missed,
                 "bound": found.bound, "tolerance": AUDIT_TOLERANCE,
                 "confidence": AUDIT_CONFIDENCE,
                 "robust_accuracy_after_audit": found.reference.robust_accuracy}))
        accs.append((eps, res.robust_accuracy))
        result.checks.extend(_cascade_checks(stages, res, eps, len(data)))
        if ctx.artifact_dir is not None:
            ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
            path = res.save_flags(ctx.artifact_dir / f"adversarial-{tag}.npz")
            result.artifacts[f"adversarial-{tag}"] = path
    result.checks.append(_monotone_check(accs))
    return result


def _audit_message(found: Audit, attack: str, eps: float) -> str:
    if found.passed:
        return ""
    n = int(found.sample.numel())
    if found.missed:
        return (f"AutoAttack broke {found.missed} of {n} audited examples that {attack} left "
                f"robust at eps={eps:g}: its robust accuracy is an overestimate")
    return (f"the audit stopped at {n} examples (its limit), which bounds the overestimate at "
            f"{found.bound:.4f} with {AUDIT_CONFIDENCE:.0%} confidence, not "
            f"{AUDIT_TOLERANCE:g}: {found.plan} examples would")


@register("robustness_curve")
def robustness_curve(model: nn.Module, data: EvalData, entry: RobustnessCurve,
                     ctx: RunContext) -> BenchmarkResult:
    norm = entry.norm
    grid = sorted(_eps_on(data, norm, tuple(entry.eps or ()), "robustness_curve"))
    steps = entry.steps or 100
    n_targets = entry.n_targets or 9
    checks = sanity_checks(model, data, ctx)
    clean = clean_pass(model, data.x, data.y, ctx, None)
    norms = minimal_norms(model, data, norm, clean, ctx, steps, n_targets)
    method = "fab-t"
    rows = []
    accs = []
    for eps in grid:
        row = MetricRow.share("robustness_curve", "robust_accuracy", norms > eps,
                              {"norm": norm.value, "eps": eps, "method": method})
        accs.append((eps, row.value))
        rows.append(row)
    params_all = {"norm": norm.value, "method": method}
    rows.append(MetricRow("robustness_curve", "median_min_norm",
                          float(norms.median()) if norms.numel() else 0.0, params_all))
    rows.append(MetricRow("robustness_curve", "curve_area", curve_area(norms, grid),
                          {**params_all, "eps_min": grid[0], "eps_max": grid[-1]}))
    result = BenchmarkResult(rows=rows, checks=checks + [_monotone_check(accs)])
    if ctx.artifact_dir is not None:
        ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.artifact_dir / f"robustness_curve-{norm.value}.npz"
        np.savez(path, min_norm=norms.numpy(), clean_correct=clean.correct.numpy())
        result.artifacts[f"robustness_curve-{norm.value}"] = path
    return result


def minimal_norms(model: nn.Module, data: EvalData, norm: Norm, clean: CleanPass,
                  ctx: RunContext, steps: int = 100, n_targets: int = 9) -> Tensor:
    """Smallest adversarial norm found per example (CPU ``[N]``); see the module docstring."""
    attack = FABTargeted(norm, steps, n_targets=n_targets)
    fwd = Forward(model, amp=ctx.amp, channels_last=True, optimise=True)
    n = len(data)
    dims = data.x[0].numel()
    diameter = {Norm.LINF: 1.0, Norm.L2: math.sqrt(dims), Norm.L1: float(dims)}[norm]
    out = torch.zeros(n)
    todo = clean.correct.nonzero().squeeze(1)
    gen = ctx.generator(salt=17)
    for s in range(0, todo.numel(), ctx.batch_size):
        idx = todo[s:s + ctx.batch_size]
        xb, yb = data.x[idx].to(ctx.device), data.y[idx].to(ctx.device)
        x_adv, m = attack.minimal(fwd, xb, yb, gen, clean.logits[idx].to(ctx.device))
        with torch.inference_mode():
            real = fwd.fp32(x_adv).argmax(1) != yb  # fp32 re-check, as for every break
        m = torch.where(real & torch.isfinite(m), m, torch.full_like(m, diameter))
        out[idx] = m.float().cpu()
        ctx.progress(min(1.0, (s + idx.numel()) / max(todo.numel(), 1)),
                     f"robustness_curve {norm.value}: minimal perturbations")
    return out


def curve_area(norms: Tensor, grid: list[float]) -> float:
    """Mean of RA(e) = mean_i [m_i > e] over [grid[0], grid[-1]], integrated exactly."""
    if norms.numel() == 0:
        return 0.0
    lo, hi = grid[0], grid[-1]
    if hi <= lo:
        return _mean(norms > lo)
    return float(((norms.clamp(lo, hi) - lo) / (hi - lo)).mean())


CE_ONLY = frozenset({AttackName.FGSM, AttackName.PGD, AttackName.APGD_CE})
"""Attacks whose untargeted version follows the cross-entropy's gradient alone."""


def zero_gradient_fraction(model: nn.Module, data: EvalData, clean: CleanPass, ctx: RunContext,
                           ce_only: bool) -> float:
    """The fraction of clean-correct examples a gradient attack cannot take a first step from.

    Every loss the attacks follow (cross-entropy, DLR, targeted margins) depends on the logits
    only through their differences, so an attack can start from ``x`` unless the input
    gradient of every logit difference is zero or not finite there. That is tested with one
    backward pass of a random zero-sum combination of the logits, which vanishes (almost
    surely) only when all of them do. An attack that follows the cross-entropy alone
    (``ce_only``) is also stuck where its gradient underflows to zero (a saturated softmax),
    though the logits still move. Robust accuracy built on such examples measures the
    model's masking, not its robustness; a report shows the two side by side.
    """
    todo = clean.correct.nonzero().squeeze(1)
    if todo.numel() == 0:
        return 0.0
    gen = ctx.generator(salt=29)
    stuck = 0
    for s in range(0, todo.numel(), max(ctx.batch_size, 1)):
        idx = todo[s:s + max(ctx.batch_size, 1)]
        xb = in_layout(data.x[idx].to(ctx.device)).requires_grad_(True)
        yb = data.y[idx].to(ctx.device)
        with torch.enable_grad():
            logits = model(xb).float()
            c = torch.randn(logits.shape, generator=gen).to(logits.device)
            mix = ((c - c.mean(1, keepdim=True)) * logits).sum()
            grads = [torch.autograd.grad(mix, xb, retain_graph=ce_only)[0]]
            if ce_only:
                ce = nn.functional.cross_entropy(logits, yb, reduction="sum")
                grads.append(torch.autograd.grad(ce, xb)[0])
        dead = torch.zeros(idx.numel(), dtype=torch.bool, device=xb.device)
        for g in grads:
            flat = g.flatten(1)
            dead |= (flat.abs().amax(1) == 0) | ~torch.isfinite(flat).all(1)
        stuck += int(dead.sum())
    return stuck / todo.numel()


def sanity_checks(model: nn.Module, data: EvalData, ctx: RunContext,
                  n: int = 64) -> list[Check]:
    """AutoAttack-style pitfalls: logits (not probabilities), determinism, non-zero grads."""
    if len(data) == 0:
        return []
    x = in_layout(data.x[:n].to(ctx.device))
    y = data.y[:n].to(ctx.device)
    with torch.inference_mode():
        a, b = model(x).float(), model(x).float()
    checks = []
    probs = bool((a >= 0).all() and (a <= 1).all()
                 and torch.allclose(a.sum(1), torch.ones_like(a[:, 0]), atol=1e-3))
    checks.append(Check("logits_not_softmax", not probs,
                        "outputs look like probabilities (rows in [0,1] summing to 1); attacks "
                        "and DLR need logits" if probs else ""))
    diff = float((a - b).abs().max())
    scale = float(a.abs().max()) + 1e-12
    det = diff <= 1e-5 * scale
    checks.append(Check("deterministic_forward", det,
                        "" if det else f"two forwards of the same input differ by {diff:.3g}: "
                        "randomised defences need EOT; robust accuracy may be overestimated"))
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xg).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xg)
    zero = int((g.flatten(1).abs().amax(1) == 0).sum())
    checks.append(Check("nonzero_gradients", zero == 0,
                        "" if zero == 0 else f"{zero}/{x.shape[0]} examples have an all-zero "
                        "input gradient: gradient masking is likely",
                        {"zero_gradient_examples": zero}))
    return checks


def _cost_rows(res: CascadeResult, params: dict[str, Any], n: int) -> list[MetricRow]:
    """Passes per evaluated example and seconds, for the whole cascade and per stage (stages
    resumed from saved state spent nothing in this process and have no row)."""
    out = []
    per = max(n, 1)
    total = ("total", sum(c.forwards for c in res.cost), sum(c.backwards for c in res.cost),
             sum(c.seconds for c in res.cost))
    for name, fwd, bwd, sec in [total, *((c.name, c.forwards, c.backwards, c.seconds)
                                         for c in res.cost)]:
        base = {**params, "stage": name, "examples": n}
        out += [MetricRow("adversarial", "forward_passes", fwd / per, {**base, "passes": fwd}),
                MetricRow("adversarial", "backward_passes", bwd / per, {**base, "passes": bwd}),
                MetricRow("adversarial", "attack_seconds", sec, base)]
    return out


def _cascade_checks(stages: list[Stage], res: CascadeResult, eps: float, n: int) -> list[Check]:
    out = []
    white = [i for i, s in enumerate(stages) if s.white_box]
    for i, s in enumerate(stages):
        if s.white_box or not white or i < min(white):
            continue
        extra = int((res.broken_by == i).sum())
        out.append(Check("blackbox_not_stronger", extra == 0,
                         "" if extra == 0 else f"{s.name} broke {extra}/{n} examples the "
                         "white-box attacks could not: the gradients may be masked",
                         {"eps": eps, "stage": s.name, "examples": extra}))
    return out


def _monotone_check(accs: list[tuple[float, float]]) -> Check:
    ordered = sorted(accs)
    bad = [(e2, a2) for (e1, a1), (e2, a2) in zip(ordered, ordered[1:], strict=False)
           if a2 > a1 + 1e-12]
    return Check("monotone_in_eps", not bad,
                 "" if not bad else "robust accuracy rises with eps at "
                 + ", ".join(f"eps={e:g}" for e, _ in bad) + ": the attack is not converging",
                 {"eps": [e for e, _ in ordered]})


def _eps_on(data: EvalData, norm: Norm, eps: tuple[float, ...],
            benchmark: str) -> tuple[float, ...]:
    """``eps``, each within the ``norm`` diameter of ``data``'s [0, 1] box."""
    if not eps:
        raise BenchmarkError(f"{benchmark}: 'eps' is required (a number or a list of "
                             "numbers, pixel scale [0,1], e.g. 0.0314 for 8/255)")
    dims = data.x[0].numel() if len(data) else 1
    limit = {Norm.LINF: 1.0, Norm.L2: math.sqrt(dims), Norm.L1: float(dims)}[norm]
    for e in eps:
        if e > limit:
            raise BenchmarkError(f"{benchmark}: 'eps' {e} exceeds the {norm.value} diameter of "
                                 f"the [0,1] box ({limit:g}); eps is in pixel scale [0,1], "
                                 "not 0-255")
    return eps


def _mean(flags: Tensor) -> float:
    return float(flags.float().mean()) if flags.numel() else 0.0


def _eps_tag(eps: float) -> str:
    return f"eps{eps:.6g}"

