"""Square Attack: score-based black-box random search (l_inf and l_2).

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020.

It needs no gradients, which is exactly why AutoAttack runs it last: if Square breaks
examples the white-box attacks could not, the gradients are lying (masking). Each query
changes one random square window (side from the p-schedule, shrinking with the query count)
of every still-robust example and keeps the change where the margin loss decreased.
Examples leave the batch as soon as they are misclassified, and, with ``discard``, once their
margin could not reach zero in the queries left even at ``discard`` times the pace it had over
the last tenth of the budget (:func:`workers.engine.attacks.apgd.hopeless`: the windows only
shrink, so the pace only slows). The window position is shared by
the batch (as in the reference implementation) and drawn from a CPU generator seeded once from
the job's generator, so the loop never waits on the device for a random number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from workers.engine.attacks.apgd import hopeless
from workers.engine.attacks.base import Attack, AttackOutput, Forward, margin, restrict
from workers.engine.threats import Norm, Radius, per_example


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of pixels a window covers at query ``it`` (schedule rescaled to 10 000)."""
    it = int(it / max(n_queries, 1) * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                       (4000, 64), (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _pseudo_gaussian(s: int, flip: bool, device: torch.device) -> Tensor:
    """The l_2 Square window: two rectangles of opposite sign with 1/r^2 profiles, unit norm."""

    def rect(a: int, b: int) -> Tensor:
        delta = torch.zeros(a, b, device=device)
        xc, yc = a // 2 + 1, b // 2 + 1
        c0, c1 = xc - 1, yc - 1
        for counter in range(max(xc, yc)):
            delta[max(c0, 0):min(c0 + 2 * counter + 1, a),
                  max(0, c1):min(c1 + 2 * counter + 1, b)] += 1.0 / (counter + 1) ** 2
            c0 -= 1
            c1 -= 1
        return delta / delta.square().sum().sqrt()

    delta = torch.zeros(s, s, device=device)
    delta[: s // 2] = rect(s // 2, s)
    delta[s // 2:] = -rect(s - s // 2, s)
    delta = delta / delta.square().sum().sqrt()
    return delta.t() if flip else delta


@dataclass(frozen=True)
class Square(Attack):
    norm: Norm = Norm.LINF
    queries: int = 5000
    p_init: float = 0.8
    # Leave an example whose margin is hopeless (see the module docstring) with this safety
    # factor, checked every tenth of the budget from the second on. None: every example
    # takes every query, as AutoAttack runs it.
    discard: float | None = None
    name: str = "square"

    def run(self, fwd: Forward, x: Tensor, y: Tensor, eps: Radius, generator: torch.Generator,
            clean_logits: Tensor | None = None) -> AttackOutput:
        if self.norm not in (Norm.LINF, Norm.L2):
            raise ValueError("Square supports l_inf and l_2 only")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                 device=generator.device).item())
        cpu = torch.Generator().manual_seed(seed)
        e = per_example(eps, x)
        n, c, h, w = x.shape
        sgn = self._signs(generator, (n, c, 1, w), x)
        if self.norm is Norm.LINF:
            x_best = (x + e[:, None, None, None] * sgn).clamp(0.0, 1.0)
        else:
            x_best = (x + self._l2_init(x, e, generator)).clamp(0.0, 1.0)
        with torch.inference_mode():
            logits = fwd(x_best)
        m = margin(logits, y)
        out = x_best.clone()
        success = fwd.wrong(x_best, logits, y)
        st = {"idx": torch.arange(n, device=x.device), "x": x, "y": y, "eps": e,
              "x_best": x_best, "m": m, "m_check": m.clone()}
        st = restrict(st, ~success)
        interval = max(self.queries // 10, 1)
        for it in range(self.queries):
            if st["idx"].numel() == 0:
                break
            if self.discard is not None and it > 0 and it % interval == 0:
                if it >= 2 * interval:
                    keep = ~hopeless(st["m"], st["m_check"], interval, self.queries - it,
                                     self.discard)
                    st = restrict(st, keep)
                    if st["idx"].numel() == 0:
                        break
                st["m_check"] = st["m"].clone()
            p = p_selection(self.p_init, it, self.queries)
            if self.norm is Norm.LINF:
                x_new = self._linf_candidate(st, p, cpu, generator)
            else:
                x_new = self._l2_candidate(st, p, cpu, generator)
            with torch.inference_mode():
                logits = fwd(x_new)
            m_new = margin(logits, st["y"])
            improved = m_new < st["m"]
            st["m"] = torch.where(improved, m_new, st["m"])
            st["x_best"] = torch.where(improved[:, None, None, None], x_new, st["x_best"])
            broke = fwd.wrong(x_new, logits, st["y"])
            if bool(broke.any()):
                out[st["idx"][broke]] = x_new[broke]
                success[st["idx"][broke]] = True
                st = restrict(st, ~broke)
        return AttackOutput(out, success)

    @staticmethod
    def _signs(generator: torch.Generator, shape: tuple[int, ...], x: Tensor) -> Tensor:
        bits = torch.randint(0, 2, shape, generator=generator, device=x.device)
        return (2 * bits - 1).to(x.dtype)

    def _linf_candidate(self, st: dict[str, Tensor], p: float, cpu: torch.Generator,
                        generator: torch.Generator) -> Tensor:
        x, xb, e = st["x"], st["x_best"], st["eps"][:, None, None, None]
        n, c, h, w = x.shape
        s = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1) if h > 1 else 1
        vh = int(torch.randint(0, max(h - s, 0) + 1, (1,), generator=cpu))
        vw = int(torch.randint(0, max(w - s, 0) + 1, (1,), generator=cpu))
        delta = xb - x
        new = e * self._signs(generator, (n, c, 1, 1), x)  # +eps or -eps per channel
        delta = delta.clone()
        delta[:, :, vh:vh + s, vw:vw + s] = new
        return (x + delta).clamp(0.0, 1.0)

    def _l2_init(self, x: Tensor, e: Tensor, generator: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        delta = torch.zeros_like(x)
        s = max(h // 5, 1)
        sp = (h - s * 5) // 2 if h >= 5 else 0
        vh = sp
        for _ in range(h // s):
            vw = sp
            for _ in range(w // s):
                if vh + s <= h and vw + s <= w:
                    delta[:, :, vh:vh + s, vw:vw + s] += (
                        _pseudo_gaussian(s, False, x.device).view(1, 1, s, s)
                        * self._signs(generator, (n, c, 1, 1), x))
                vw += s
            vh += s
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return delta / norm[:, None, None, None] * e[:, None, None, None]

    def _l2_candidate(self, st: dict[str, Tensor], p: float, cpu: torch.Generator,
                      generator: torch.Generator) -> Tensor:
        x, xb, e = st["x"], st["x_best"], st["eps"][:, None, None, None]
        n, c, h, w = x.shape
        s = max(int(round(math.sqrt(p * h * w))), 3)
        if s % 2 == 0:
            s += 1
        s = min(s, h, w)
        vh, vw, vh2, vw2 = (int(v) for v in torch.randint(0, max(h - s, 0) + 1, (4,),
                                                           generator=cpu))
        flip = bool(torch.rand(1, generator=cpu) > 0.5)
        delta = xb - x
        win = delta[:, :, vh:vh + s, vw:vw + s]
        norms_win1 = win.square().sum((-2, -1), keepdim=True).sqrt()
        mask = torch.zeros_like(x[:1, :1])
        mask[..., vh:vh + s, vw:vw + s] = 1
        mask[..., vh2:vh2 + s, vw2:vw2 + s] = 1
        norms_image = delta.flatten(1).norm(dim=1)[:, None, None, None]
        norms_windows = (delta * mask).flatten(1).norm(dim=1)[:, None, None, None]
        new = (_pseudo_gaussian(s, flip, x.device).view(1, 1, s, s)
               * self._signs(generator, (n, c, 1, 1), x))
        new = new + win / (1e-12 + norms_win1)
        new_norm = new.square().sum((-2, -1), keepdim=True).sqrt().clamp_min(1e-12)
        budget = ((e.square() - norms_image.square()).clamp_min(0.0) / c
                  + norms_windows.square()).sqrt()
        new = new / new_norm * budget
        delta = delta.clone()
        delta[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0.0
        delta[:, :, vh:vh + s, vw:vw + s] = new
        total = delta.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        return (x + delta * (e / total)).clamp(0.0, 1.0)
