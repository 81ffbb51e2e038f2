"""What every attack shares: the model as attacks see it, the losses, and the result type.

Attacks are written for speed on batches: one forward and one backward per step for the
whole batch (all restarts concatenated where that is how the attack runs), gradients with
``torch.autograd.grad`` w.r.t. the input only, and examples that are already misclassified
dropped from the batch ("compaction") so the remaining steps cost only what is still robust.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.engine.layout import in_layout
from workers.engine.threats import Norm, Radius

LossFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""``(logits, labels, targets) -> per-example loss [N]`` to be *maximised* by the attack."""


class Forward:
    """The model as attacks call it.

    The search forward (``fwd(x)``) may run under bf16 autocast and in channels_last (faster
    convolutions on GPUs and, through oneDNN, on CPUs) and, with ``optimise``, on a private
    copy of the model with eval-mode BatchNorm folded into the convolutions (see
    :func:`search_copy`); logits always come back as float32. ``fp32`` is the reference: the
    model itself, without autocast, used to confirm a break before it counts.

    The first search forward probes the optimised form (see :meth:`_probe`): a model that
    rejects channels_last (a ``.view`` after its convolutions) or bf16, or whose logits differ
    from plain fp32 in that form, is searched without it, so nothing that runs in plain fp32
    fails here. ``fallback`` says what was given up and why.

    Cost is data: ``calls`` counts batched forwards, ``examples`` the example-forwards (the
    probe's included) and ``gradients`` the example-backwards (input gradients), so results
    can report passes per example the way the AutoAttack and A^3 papers count them.
    """

    def __init__(self, model: nn.Module, amp: bool = False, channels_last: bool = False,
                 optimise: bool = False, probe: bool = True) -> None:
        self.model = model
        self.search: nn.Module | None = None if optimise else model
        self.amp = amp
        self.channels_last = channels_last
        self.calls = 0
        self.examples = 0
        self.gradients = 0
        self.probed = not probe  # probe=False: tests of the re-checks behind the probe
        self.fallback: str | None = None
        self.margin_error: float | None = None  # largest |search - reference| margin seen

    @property
    def exact(self) -> bool:
        """Whether the search forward is the reference forward, kernel for kernel, so that its
        claims need no second look (no bf16, no folded copy, no other memory layout)."""
        return not self.amp and not self.channels_last and self.search is self.model

    def __call__(self, x: Tensor) -> Tensor:
        if self.search is None:
            self.search = search_copy(self.model, x, self.channels_last)
        if not self.probed:
            self._probe(x)
        self.calls += 1
        self.examples += int(x.shape[0])
        return self._search(x)

    def _search(self, x: Tensor) -> Tensor:
        assert self.search is not None
        # Exact strides, whatever the channel count: with one channel, x.contiguous() in
        # either format keeps whichever strides x came with (see workers.engine.layout), so
        # the probe and the search would not run the same kernels.
        x = in_layout(x, self.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.search(x)
        return out.float()

    def _probe(self, x: Tensor) -> None:
        """One forward and input gradient in the optimised form on a few rows of ``x``,
        compared with the model in plain fp32; on an error or a mismatch, drop channels_last
        (and the folded copy that carries it), then bf16, until the search runs and agrees.

        Tolerances: fp32 layouts agree to 1e-3 of the logits' scale; bf16 (8 bits of
        mantissa) only has to stay finite and within a quarter of it, because the margin
        checks of :meth:`wrong` and :meth:`confirmed` already absorb its ordinary error.
        """
        self.probed = True
        if self.exact:
            return
        with torch.inference_mode(False):  # the probe takes a gradient, wherever it is called
            self._probe_rows(x[:4].detach().float().clone())

    def _probe_rows(self, sample: Tensor) -> None:
        with torch.autocast(sample.device.type, enabled=False), torch.no_grad():
            ref = self.model(in_layout(sample)).float()
        self.calls += 1
        self.examples += int(sample.shape[0])
        scale = float(ref.abs().max()) + 1e-6
        reasons = []
        while True:
            try:
                with torch.enable_grad():
                    xg = sample.clone().requires_grad_(True)
                    got = self._search(xg)
                    torch.autograd.grad(got.sum(), xg)
                self.calls += 1
                self.examples += int(sample.shape[0])
                self.gradients += int(sample.shape[0])
                got = got.detach()
                tol = (0.25 if self.amp else 1e-3) * scale
                agree = got.shape == ref.shape and bool((got - ref).abs().max() <= tol)
                problem = None if agree else "logits differ from plain fp32"
            except Exception as err:  # the model's own code rejected the form
                problem = f"{type(err).__name__}: {str(err)[:120]}"
            if problem is None:
                break
            if self.channels_last or self.search is not self.model:
                reasons.append(f"channels_last/folded copy off ({problem})")
                self.channels_last, self.search = False, self.model
            elif self.amp:
                reasons.append(f"bf16 off ({problem})")
                self.amp = False
            else:  # plain fp32 is the reference itself: nothing left to give up
                break
        self.fallback = "; ".join(reasons) or None

    def fp32(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.examples += int(x.shape[0])
        with torch.autocast(x.device.type, enabled=False):
            return self.model(in_layout(x)).float()

    def confirmed(self, x: Tensor, claimed: Tensor, y: Tensor,
                  target: Tensor | None = None) -> Tensor:
        """``claimed`` (rows of ``x`` the search forward misclassifies; with ``target``:
        classifies as the target) with every claim re-checked by the reference forward when
        the search differs from it (bf16, a folded copy).

        An attack drops an example from its batch once it is broken; a bf16 rounding error
        that only looks like a break would end the search on an example the runner's fp32
        check then counts as robust. Checking the few claims of each step in fp32 costs a
        forward on those rows only; where the search is the reference itself
        (:attr:`exact`), the claim stands as it is.
        """
        if self.exact or not bool(claimed.any()):
            return claimed
        rows = claimed.nonzero().squeeze(1)
        with torch.no_grad():
            pred = self.fp32(x[rows].detach()).argmax(1)
        holds = pred == target[rows] if target is not None else pred != y[rows]
        out = claimed.clone()
        out[rows] = holds
        return out

    def wrong(self, x: Tensor, logits: Tensor, y: Tensor) -> Tensor:
        """Which rows of ``x`` (with the search forward's ``logits``) the reference forward
        misclassifies.

        Where the search is not the reference (:attr:`exact`), a rounding error can go either
        way: a claimed break is confirmed before it counts (see :meth:`confirmed`), and a row
        the search calls correct by less than :meth:`slack` is checked as well, because near
        the boundary bf16 misses breaks that fp32 sees (APGD-CE-20 searched in bf16 left 7 of
        2048 example-attacks more robust than in fp32 until these rows were checked). Both
        cost one reference forward on those rows only.
        """
        claimed = logits.argmax(1) != y
        if self.exact:
            return claimed
        m = margin(logits, y)
        doubt = claimed | (m < self.slack(x, m, y))
        if not bool(doubt.any()):
            return claimed
        rows = doubt.nonzero().squeeze(1)
        with torch.no_grad():
            ref = self.fp32(x[rows].detach())
        self._observe(m[rows], margin(ref, y[rows]))
        out = torch.zeros_like(claimed)
        out[rows] = ref.argmax(1) != y[rows]
        return out

    def new_block(self) -> None:
        """Forget the margin differences seen: what a block's rows are judged by then depends
        on that block alone, not on the blocks this process ran before (the runner calls it
        per block, so that a shard judges an example as the whole run does)."""
        self.margin_error = None

    def slack(self, x: Tensor, m: Tensor, y: Tensor) -> float:
        """How far from the boundary a search margin must be to be trusted: three times the
        largest difference between search and reference margins seen so far, measured on
        the first rows this forward judges and then on every row it re-checks."""
        if self.margin_error is None:
            rows = slice(0, min(32, x.shape[0]))
            with torch.no_grad():
                ref = self.fp32(x[rows].detach())
            self._observe(m[rows], margin(ref, y[rows]))
        assert self.margin_error is not None
        return 3.0 * self.margin_error

    def _observe(self, search: Tensor, reference: Tensor) -> None:
        gap = float((search - reference).abs().max()) if search.numel() else 0.0
        self.margin_error = max(self.margin_error or 0.0, gap)

    def loss_grad(self, x: Tensor, y: Tensor, loss: LossFn,
                  target: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, per-example loss and d(sum loss)/dx in one forward and one backward."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self(xg)
            values = loss(logits, y, target)
            (grad,) = torch.autograd.grad(values.sum(), xg)
        self.gradients += int(x.shape[0])
        return logits.detach(), values.detach(), grad.detach()


def search_copy(model: nn.Module, probe: Tensor, channels_last: bool) -> nn.Module:
    """A private copy of ``model`` for the attack search, or ``model`` itself.

    The copy has every eval-mode BatchNorm that directly follows a convolution folded into it
    (torch.fx) and, with ``channels_last``, its weights in that layout: the same function in
    fewer, faster kernels (forward+backward of ResNet-18 on a CPU in bf16: 1.4x). The model
    itself is used where that cannot apply or cannot be trusted: a model in training mode, a
    TorchScript module, no BatchNorm, one torch.fx cannot trace (control flow on values), or a
    copy whose fp32 logits on ``probe`` differ from the model's.
    """
    batchnorm = nn.modules.batchnorm._BatchNorm
    has_bn = any(isinstance(m, batchnorm) and m.track_running_stats for m in model.modules())
    if not has_bn or model.training or isinstance(model, torch.jit.ScriptModule):
        return model
    # Outside inference mode (the first search forward may be inside it): the copy's weights
    # must be ordinary tensors, usable in the gradient forwards that follow.
    try:
        with torch.inference_mode(False), torch.no_grad():
            twin = fuse_conv_bn(model)
            if channels_last and probe.dim() == 4:
                twin = twin.to(memory_format=torch.channels_last)
            for p in twin.parameters():
                p.requires_grad_(False)
            sample = probe[:8].detach().float()
            with torch.autocast(probe.device.type, enabled=False):
                ref = model(in_layout(sample)).float()
                got = twin(in_layout(sample, channels_last)).float()
    except Exception:  # tracing runs user code: any failure means "use the model itself"
        return model
    scale = float(ref.abs().max()) + 1e-6
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * scale):
        return model
    return twin


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(model)  # traces a deep copy; the model is left as it is


def ce_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    if target is not None:
        return -F.cross_entropy(logits, target, reduction="none")
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020): scale- and shift-invariant margin.

    Untargeted: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3). Targeted (APGD-T):
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2). Indices clamp for fewer than 4 classes.
    """
    c = logits.shape[1]
    zs = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    p3 = zs[:, min(2, c - 1)]
    if target is not None:
        z_t = logits.gather(1, target[:, None]).squeeze(1)
        p4 = zs[:, min(3, c - 1)]
        return -(z_y - z_t) / (zs[:, 0] - 0.5 * (p3 + p4) + 1e-12)
    return -margin(logits, y) / (zs[:, 0] - p3 + 1e-12)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j: negative exactly when the example is misclassified."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_y - other


def margin_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    if target is not None:
        z_t = logits.gather(1, target[:, None]).squeeze(1)
        return z_t - logits.gather(1, y[:, None]).squeeze(1)
    return -margin(logits, y)


class Loss(StrEnum):
    CE = "ce"
    DLR = "dlr"
    MARGIN = "margin"


LOSSES: dict[Loss, LossFn] = {Loss.CE: ce_loss, Loss.DLR: dlr_loss, Loss.MARGIN: margin_loss}


@dataclass
class AttackOutput:
    """Adversarial inputs (inside the ball and the box) and which ones the attack believes
    are misclassified. The runner confirms every claimed success in fp32 before counting it."""

    x_adv: Tensor
    success: Tensor  # bool [N]


class Attack(ABC):
    """An attack on a batch: ``run(fwd, x, y, eps, generator) -> AttackOutput``.

    ``clean_logits`` (fp32 logits of ``x``) lets targeted attacks pick their targets without
    a second clean forward; ``eps`` may be a float or a per-example tensor.
    """

    norm: Norm
    name: str = "attack"

    @abstractmethod
    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput: ...


class Ranking(StrEnum):
    """How targeted attacks order the wrong classes: by clean logit (AutoAttack), or by the
    gradient-normalised margin (MALT)."""

    LOGITS = "logits"
    NORMALISED_MARGIN = "normalised-margin"


DUAL_ORDER = {Norm.LINF: 1.0, Norm.L2: 2.0, Norm.L1: float("inf")}


def margin_ranked_targets(fwd: Forward, x: Tensor, y: Tensor, clean_logits: Tensor,
                          n_targets: int, norm: Norm, candidates: int = 9) -> Tensor:
    """The ``n_targets`` wrong classes nearest to the boundary to first order, nearest first
    ``[N, k]`` (MALT, Melamed et al., NeurIPS 2024).

    For each of the ``candidates`` most likely wrong classes j, the linearised distance to
    the j-boundary is (z_y - z_j) / ||grad_x (z_y - z_j)||_q (q the dual norm): a class with
    a small logit gap but a steep one is nearer than its logit says. One forward and one
    input gradient per candidate; the ranking is among the candidates only.
    """
    cand = top_targets(clean_logits, y, candidates)
    scores = torch.empty(cand.shape, device=x.device)
    q = DUAL_ORDER[norm]
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = fwd(xg)
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        for j in range(cand.shape[1]):
            gap = z_y - logits.gather(1, cand[:, j:j + 1]).squeeze(1)
            (grad,) = torch.autograd.grad(gap.sum(), xg, retain_graph=j < cand.shape[1] - 1)
            fwd.gradients += int(x.shape[0])
            dual = grad.flatten(1).norm(p=q, dim=1)
            scores[:, j] = gap.detach() / dual.clamp_min(1e-12)
    order = scores.argsort(dim=1)
    return cand.gather(1, order)[:, : min(n_targets, cand.shape[1])]


def top_targets(clean_logits: Tensor, y: Tensor, n_targets: int) -> Tensor:
    """The ``n_targets`` most likely wrong classes per example, most likely first ``[N, k]``."""
    order = clean_logits.masked_fill(
        torch.nn.functional.one_hot(y, clean_logits.shape[1]).bool(), float("-inf")
    ).argsort(dim=1, descending=True)
    return order[:, : min(n_targets, clean_logits.shape[1] - 1)]


def over_targets(fwd: Forward, x: Tensor, y: Tensor, clean_logits: Tensor | None,
                 n_targets: int,
                 attack: Callable[[Tensor, Tensor], AttackOutput],
                 ranking: Ranking = Ranking.LOGITS, norm: Norm = Norm.LINF,
                 skip: int = 0, parallel: bool = False) -> AttackOutput:
    """Targeted attacks (APGD-T, PGD-T) try the top wrong classes in turn; each target runs
    only on the examples no earlier target broke. ``attack(index, targets)`` attacks
    ``x[index]`` towards ``targets``. ``skip``: leave out the first ``skip`` classes of the
    ranking (an earlier stage tried them). ``parallel``: every target at once, one row per
    example and target in a single run (one loop of steps instead of one per target: far
    less wall time where the batch is small, at the price of the rows of targets an earlier
    one would have made unnecessary); an example is broken if any of its rows is."""
    if clean_logits is None:
        with torch.inference_mode():
            clean_logits = fwd.fp32(x)
    if ranking is Ranking.NORMALISED_MARGIN:
        targets = margin_ranked_targets(fwd, x, y, clean_logits, n_targets + skip, norm)
    else:
        targets = top_targets(clean_logits, y, n_targets + skip)
    targets = targets[:, skip:]
    out = x.clone()
    success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if parallel and targets.shape[1] > 1:
        n, t = targets.shape
        rows = torch.arange(n, device=x.device).repeat_interleave(t)
        res = attack(rows, targets.reshape(-1))
        hit = res.success.view(n, t)
        success = hit.any(1)
        first = hit.float().argmax(1)  # the first target that broke it (0 where none did)
        return AttackOutput(res.x_adv.view(n, t, *x.shape[1:])[torch.arange(n), first],
                            success)
    for k in range(targets.shape[1]):
        todo = (~success).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        res = attack(todo, targets[todo, k])
        out[todo] = res.x_adv
        success[todo] = res.success
    return AttackOutput(out, success)


def restrict(state: dict[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """Keep the rows ``keep`` (a bool mask or an index) of every per-example state tensor."""
    return {k: v[keep] for k, v in state.items()}
