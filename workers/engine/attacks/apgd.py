"""APGD: step-size-free PGD with momentum and checkpoints (APGD-CE, APGD-DLR, APGD-T).

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (l_inf, l_2); Croce & Hein, "Mind the box: l1-APGD for
sparse adversarial attacks on image classifiers", ICML 2021 (l_1: sparse top-k steps whose
sparsity adapts, box-aware projection, and the 3eps/2eps/eps radius schedule AutoAttack uses).

The step size starts at 2 eps (eps for l_1) and is halved per example at checkpoints
w_j (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) when the loss went
up in at most rho = 75 % of the steps since the last checkpoint (the first step compared with
the point it started from, as in the paper), or when neither the step size nor the best loss
changed; the iterate then restarts from the best point. Examples leave
the batch as soon as they are misclassified (they are broken; more steps cannot unbreak them).
APGD-T runs the targeted DLR loss once per target, the most likely wrong classes first, each
time only on the examples still robust.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from workers.engine.attacks.base import (
    LOSSES,
    Attack,
    AttackOutput,
    Forward,
    Loss,
    Ranking,
    dlr_loss,
    margin,
    over_targets,
)
from workers.engine.threats import L1Threat, Norm, Radius, Threat, per_example, threat_for

LARGE_EPS_SCHEDULE = ((3.0, 0.3), (2.0, 0.3), (1.0, 0.4))
"""l1-APGD (as AutoAttack runs it): radius multipliers and the fraction of steps at each."""


@dataclass(frozen=True)
class APGD(Attack):
    norm: Norm = Norm.LINF
    steps: int = 100
    restarts: int = 1
    loss: Loss = Loss.CE
    rho: float = 0.75
    large_eps: bool = False  # l_1: start at 3 eps, then 2 eps, then eps
    discard: float | None = None  # see APGDTargeted
    name: str = "apgd-ce"

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        return run_restarts(self, fwd, x, y, per_example(eps, x), generator, None)


@dataclass(frozen=True)
class APGDTargeted(Attack):
    """APGD-T: targeted DLR over the ``n_targets`` most likely wrong classes."""

    norm: Norm = Norm.LINF
    steps: int = 100
    n_targets: int = 9
    restarts: int = 1
    rho: float = 0.75
    large_eps: bool = False
    loss: Loss = Loss.DLR
    # Discard hopeless examples (see :func:`hopeless`) with this safety factor. None:
    # AutoAttack's rule, every example takes every step.
    discard: float | None = None
    ranking: Ranking = Ranking.LOGITS
    skip_targets: int = 0  # leave out the first classes of the ranking (tried before)
    parallel: bool = False  # every target in one run (see over_targets)
    name: str = "apgd-t"

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        e = per_example(eps, x)
        return over_targets(fwd, x, y, clean_logits, self.n_targets, lambda i, t: run_restarts(
            self, fwd, x[i], y[i], e[i], generator, t), self.ranking, self.norm,
            self.skip_targets, self.parallel)


def too_few_increases(hist: Tensor, i: int, k: int, rho: float) -> Tensor:
    """Croce & Hein's condition 1 at the checkpoint after step ``i``: the loss went up in at
    most ``rho * k`` of the ``k`` steps since the previous checkpoint, the first of them
    compared with the point it started from. ``hist[:, 0]`` is the loss at the starting point
    and ``hist[:, j + 1]`` the loss after step ``j``."""
    lo = i + 1 - k
    ups = (hist[:, lo + 1:i + 2] > hist[:, lo:i + 1]).sum(1)
    return ups <= k * rho


DISCARD_AFTER = 10
"""Steps an example takes before it may be discarded: below that, budgets are cheap anyway and
a late step-size checkpoint too often turns a flat run into a break (measured at 10 steps)."""


def hopeless(best: Tensor, at_check: Tensor, interval: int, remaining: int,
             safety: float) -> Tensor:
    """Which examples cannot break in the ``remaining`` steps of this run even if they kept
    ``safety`` times the pace they had since the previous checkpoint.

    ``best`` is each example's smallest margin z_y - max_{j != y} z_j so far (positive: still
    robust), ``at_check`` that margin at the previous checkpoint, ``interval`` the steps since
    then. APGD halves its step size at checkpoints, so its pace only slows: an example whose
    margin would still be positive after ``safety`` times its recent progress per step over
    every remaining step has converged (A^3's online discarding of hopeless points, Liu et
    al. 2022, and the stop of an iterate that only cycles, Doldo et al. 2025, in one rule).
    """
    pace = (at_check - best).clamp_min(0) / max(interval, 1)
    return best > safety * pace * remaining


@dataclass
class APGDState:
    """One run's per-example state: row ``j`` of each tensor is the ``j``-th example still in
    the batch (:meth:`restrict` drops the examples that leave)."""

    idx: Tensor  # each example's row in the run's batch
    x: Tensor  # the clean inputs
    y: Tensor
    eps: Tensor
    x_adv: Tensor  # the iterate
    x_old: Tensor  # the previous iterate (momentum)
    grad: Tensor  # the loss's gradient at the iterate
    x_best: Tensor  # the highest-loss point so far, its gradient and loss
    grad_best: Tensor
    loss_best: Tensor
    step: Tensor  # the step size
    hist: Tensor  # losses: the starting point's, then one per step
    reduced: Tensor  # 1.0 where the step size was reduced at the last checkpoint
    loss_best_check: Tensor  # the best loss at the last checkpoint
    topk: Tensor  # l_1: the share of coordinates a step moves
    sp_old: Tensor  # l_1: the best point's number of changed coordinates at the last checkpoint
    margin_best: Tensor  # the smallest margin so far, and at the last checkpoint
    margin_check: Tensor
    target: Tensor | None  # APGD-T's target class

    def restrict(self, keep: Tensor) -> APGDState:
        """Keep the rows ``keep`` (a bool mask or an index) of every tensor."""
        tensors = ((f.name, getattr(self, f.name)) for f in fields(self))
        return replace(self, **{name: t[keep] for name, t in tensors if t is not None})


def run_restarts(cfg: APGD | APGDTargeted, fwd: Forward, x: Tensor, y: Tensor, eps: Tensor,
                 generator: torch.Generator, target: Tensor | None) -> AttackOutput:
    """Restarts run one after the other on the examples still robust (AutoAttack's order)."""
    out = x.clone()
    success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(max(cfg.restarts, 1)):
        todo = (~success).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        t = None if target is None else target[todo]
        res = _with_schedule(cfg, fwd, x[todo], y[todo], eps[todo], generator, t)
        out[todo] = res.x_adv
        success[todo] = res.success
    return AttackOutput(out, success)


def _with_schedule(cfg: APGD | APGDTargeted, fwd: Forward, x: Tensor, y: Tensor, eps: Tensor,
                   generator: torch.Generator, target: Tensor | None) -> AttackOutput:
    threat = threat_for(cfg.norm)
    if not (cfg.large_eps and cfg.norm is Norm.L1):
        return _single_run(cfg, threat, fwd, x, y, eps, cfg.steps, generator, target, None, True)
    iters = [math.ceil(f * cfg.steps) for _, f in LARGE_EPS_SCHEDULE]
    iters[-1] = cfg.steps - sum(iters[:-1])
    x_init: Tensor | None = None
    res = AttackOutput(x, torch.zeros_like(y, dtype=torch.bool))
    for (mult, _), n_it in zip(LARGE_EPS_SCHEDULE, iters, strict=True):
        final = mult == 1.0
        if x_init is not None:
            x_init = threat.project(x_init, x, eps * mult)
        res, x_init = _single_run_best(cfg, threat, fwd, x, y, eps * mult, max(n_it, 1),
                                       generator, target, x_init, final)
    return res


def _single_run(cfg: APGD | APGDTargeted, threat: Threat, fwd: Forward, x: Tensor, y: Tensor,
                eps: Tensor, steps: int, generator: torch.Generator, target: Tensor | None,
                x_init: Tensor | None, early_stop: bool) -> AttackOutput:
    return _single_run_best(cfg, threat, fwd, x, y, eps, steps, generator, target, x_init,
                            early_stop)[0]


def _single_run_best(cfg: APGD | APGDTargeted, threat: Threat, fwd: Forward, x: Tensor,
                     y: Tensor, eps: Tensor, steps: int, generator: torch.Generator,
                     target: Tensor | None, x_init: Tensor | None,
                     early_stop: bool) -> tuple[AttackOutput, Tensor]:
    """One APGD run; returns the adversarial output and the highest-loss points."""
    loss = dlr_loss if target is not None else LOSSES[cfg.loss]
    n = x.shape[0]
    dev = x.device
    l1 = cfg.norm is Norm.L1
    n_fts = x[0].numel()
    alpha = 1.0 if l1 else 2.0
    x_adv = threat.random_init(x, eps, generator) if x_init is None else x_init.clone()
    logits, values, grad = fwd.loss_grad(x_adv, y, loss, target)
    out = x_adv.clone()
    best_points = x_adv.clone()
    success = fwd.wrong(x_adv, logits, y)
    st = APGDState(
        idx=torch.arange(n, device=dev), x=x, y=y, eps=eps, x_adv=x_adv,
        x_best=x_adv.clone(), grad=grad, grad_best=grad.clone(),
        loss_best=values.clone(), step=alpha * eps, x_old=x_adv.clone(),
        hist=torch.cat((values[:, None], torch.zeros(n, steps, device=dev)), 1),
        reduced=torch.ones(n, device=dev),
        loss_best_check=values.clone(),
        topk=torch.full((n,), 0.2, device=dev),
        sp_old=torch.full((n,), float(n_fts), device=dev),
        margin_best=margin(logits, y),
        margin_check=margin(logits, y),
        target=target,
    )
    if x_init is not None and l1:
        sp = (x_adv - x).flatten(1).ne(0).sum(1).float()
        st.topk, st.sp_old = sp / n_fts / 1.5, sp
    if early_stop and bool(success.any()):
        st = st.restrict(~success)
    n_iter2 = max(int(0.22 * cfg.steps), 1)
    n_iter_min = max(int(0.06 * cfg.steps), 1)
    size_decr = max(int(0.03 * cfg.steps), 1)
    k = max(int(0.04 * steps), 1) if l1 else n_iter2
    counter = checks = 0
    for i in range(steps):
        if st.idx.numel() == 0:
            break
        xa, xs, e = st.x_adv, st.x, st.eps
        momentum = 0.75 if i > 0 else 1.0
        if isinstance(threat, L1Threat):
            z = threat.project(threat.step(xa, st.grad, st.step, st.topk), xs, e)
            x_new = z
        else:
            z = threat.project(threat.step(xa, st.grad, st.step), xs, e)
            x_new = threat.project(xa + (z - xa) * momentum + (xa - st.x_old) * (1 - momentum),
                                   xs, e)
        st.x_old = xa
        st.x_adv = x_new
        if i == steps - 1:  # the last iterate needs its loss, never its gradient
            with torch.no_grad():
                logits = fwd(x_new)
            values, grad = loss(logits, st.y, st.target), st.grad
        else:
            logits, values, grad = fwd.loss_grad(x_new, st.y, loss, st.target)
        st.grad = grad
        broke = fwd.wrong(x_new, logits, st.y)
        idx = st.idx
        out[idx[broke]] = x_new[broke]
        success[idx[broke]] = True
        st.hist[:, i + 1] = values
        improved = values > st.loss_best
        st.x_best = torch.where(improved[:, None, None, None], x_new, st.x_best)
        st.grad_best = torch.where(improved[:, None, None, None], grad, st.grad_best)
        st.loss_best = torch.where(improved, values, st.loss_best)
        st.margin_best = torch.minimum(st.margin_best, margin(logits, st.y))
        counter += 1
        leave = broke
        if counter == k:
            checks += 1
            if (cfg.discard is not None and early_stop and checks >= 2
                    and i + 1 >= DISCARD_AFTER):
                leave = broke | hopeless(st.margin_best, st.margin_check, k,
                                         steps - 1 - i, cfg.discard)
            st.margin_check = st.margin_best.clone()
            if l1:
                sp = (st.x_best - st.x).flatten(1).ne(0).sum(1).float()
                reduce = sp / st.sp_old < 0.95
                st.topk = sp / n_fts / 1.5
                step = torch.where(reduce, alpha * st.eps, st.step / 1.5)
                st.step = torch.minimum(torch.maximum(step, alpha * st.eps / 10.0),
                                        alpha * st.eps)
                st.sp_old = sp
            else:
                oscillating = too_few_increases(st.hist, i, k, cfg.rho)
                stalled = (st.reduced == 0) & (st.loss_best_check >= st.loss_best)
                reduce = oscillating | stalled
                st.reduced = reduce.float()
                st.loss_best_check = st.loss_best.clone()
                st.step = torch.where(reduce, st.step / 2.0, st.step)
                k = max(k - size_decr, n_iter_min)
            st.x_adv = torch.where(reduce[:, None, None, None], st.x_best, st.x_adv)
            st.grad = torch.where(reduce[:, None, None, None], st.grad_best, st.grad)
            counter = 0
        if early_stop and bool(leave.any()):
            best_points[idx[leave]] = st.x_best[leave]
            st = st.restrict(~leave)
    best_points[st.idx] = st.x_best
    # Examples never broken report their highest-loss point (useful as a warm start).
    out = torch.where(success[:, None, None, None], out, best_points)
    return AttackOutput(out, success), best_points
