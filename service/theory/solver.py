"""The linear theory of METRICS.md: adversarial training of a linear regressor on a core
and a spurious feature, solved numerically (numpy only; the API process runs it).

Data: ``y0 ~ N(0, 1)``, ``y = y0 + s_n * noise``, core ``x_c = s_c * y0``, spurious
``x_s = s_s * (rho * y0 + sqrt(1 - rho^2) * xi)``. For weights ``w = (w_c, w_s)`` the residual
``y - w.x`` is Gaussian with variance ``v = s_n^2 + (1 - a - rho b)^2 + (1 - rho^2) b^2``
(``a = s_c w_c``, ``b = s_s w_s``). An l_p attack of size eps adds ``eps |w|_q`` to the
absolute residual (q the dual norm), so the adversarial risk is
``E[(|r| + eps |w|_q)^2] = v + 2 eps |w|_q sqrt(2 v / pi) + eps^2 |w|_q^2``.

That risk is convex in ``w`` (the square of a non-negative convex function, averaged), but not
smooth: the l_1 and l_inf dual norms have kinks exactly where the interesting answers lie
(``w_s = 0`` for l_inf, ``w_s = w_c`` for l_1). Newton's method stalls on a kink, so the solver
uses nested golden-section search, which needs only convexity: the inner search minimises
over ``w_c`` for a fixed ``w_s``; partial minimisation of a jointly convex function is convex,
so the outer search over ``w_s`` is sound too. Both run to the limit of double precision,
vectorised over the eps grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# The attack's norm p -> the dual norm q that prices the weights.
DUAL_NORM: dict[str, float] = {"l1": math.inf, "l2": 2.0, "linf": 1.0}
_GOLDEN = (math.sqrt(5) - 1) / 2
_ITERATIONS = 56  # 0.618^56 ~ 2e-12 of the bracket: 3 decimals with room to spare


@dataclass(frozen=True)
class LinearSetting:
    """Scales of the core and spurious features, their correlation, and the label noise."""

    s_c: float = 1.0
    s_s: float = 1.0
    rho: float = 0.9
    s_n: float = 0.5

    def validate(self) -> None:
        for name in ("s_c", "s_s", "rho", "s_n"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.s_c <= 0 or self.s_s <= 0:
            raise ValueError("s_c and s_s must be positive")
        if self.s_n < 0:
            raise ValueError("s_n must be non-negative")
        if not -1.0 <= self.rho <= 1.0:
            raise ValueError("rho must lie in [-1, 1]")


def dual_norm(w_c: np.ndarray, w_s: np.ndarray, q: float) -> np.ndarray:
    a, b = np.abs(w_c), np.abs(w_s)
    if q == 1.0:
        return a + b
    if q == 2.0:
        return np.hypot(a, b)
    return np.maximum(a, b)


def natural_risk(setting: LinearSetting, w_c: Any, w_s: Any,
                 rho: float | None = None) -> np.ndarray:
    """Clean squared-loss risk ``v`` (the residual variance), at ``rho`` or a shifted one."""
    r = setting.rho if rho is None else rho
    a = setting.s_c * np.asarray(w_c, float)
    b = setting.s_s * np.asarray(w_s, float)
    return setting.s_n**2 + (1 - a - r * b) ** 2 + (1 - r**2) * b**2


def adversarial_risk(setting: LinearSetting, w_c: Any, w_s: Any, eps: Any, norm: str,
                     rho: float | None = None) -> np.ndarray:
    q = DUAL_NORM[norm]
    v = natural_risk(setting, w_c, w_s, rho)
    wq = dual_norm(np.asarray(w_c, float), np.asarray(w_s, float), q)
    e = np.asarray(eps, float)
    return v + 2 * e * wq * np.sqrt(2 * v / math.pi) + e**2 * wq**2


def adversarial_loss(y: np.ndarray, x: np.ndarray, w: np.ndarray, eps: float,
                     norm: str) -> np.ndarray:
    """Per-sample worst case ``max_{|d|_p <= eps} (y - w.(x + d))^2`` in closed form."""
    q = DUAL_NORM[norm]
    wq = float(dual_norm(np.asarray(w[0]), np.asarray(w[1]), q))
    return (np.abs(y - x @ w) + eps * wq) ** 2


def _golden(f: Any, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Vectorised golden-section minimisation of a convex ``f`` on ``[lo, hi]`` elementwise."""
    a, b = lo.copy(), hi.copy()
    c = b - _GOLDEN * (b - a)
    d = a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(_ITERATIONS):
        left = fc <= fd  # the minimum lies in [a, d], else in [c, b]
        a, b = np.where(left, a, c), np.where(left, d, b)
        c_next = np.where(left, b - _GOLDEN * (b - a), d)
        d_next = np.where(left, c, a + _GOLDEN * (b - a))
        f_new = f(np.where(left, c_next, d_next))
        fc, fd = np.where(left, f_new, fd), np.where(left, fc, f_new)
        c, d = c_next, d_next
    return (a + b) / 2


def _bounds(setting: LinearSetting, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes that must contain the minimiser, from R(w*) <= R(0) = 1 + s_n^2.

    ``R >= v`` bounds ``b`` by ``1 / sqrt(1 - rho^2)`` and ``a`` by ``2 + |rho| |b|``;
    ``R >= eps^2 |w|_q^2`` bounds every weight by ``sqrt(1 + s_n^2) / eps``.
    """
    r0 = math.sqrt(1 + setting.s_n**2)
    with np.errstate(divide="ignore"):
        by_eps = np.where(eps > 0, r0 / np.where(eps > 0, eps, 1.0), np.inf)
    if abs(setting.rho) < 1:
        lb = 1 / math.sqrt(1 - setting.rho**2)
        by_v_s = np.full_like(eps, lb / setting.s_s)
        by_v_c = np.full_like(eps, (2 + abs(setting.rho) * lb) / setting.s_c)
    else:
        by_v_s = by_v_c = np.full_like(eps, np.inf)
    ws = np.minimum(by_v_s, by_eps) * 1.01
    wc = np.minimum(by_v_c, by_eps) * 1.01
    if not (np.isfinite(ws).all() and np.isfinite(wc).all()):
        raise ValueError("with |rho| = 1 and eps = 0 the minimiser is not unique; use |rho| < 1")
    return wc, ws


def _optimal(setting: LinearSetting, q: np.ndarray,
             eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimisers for many (dual norm, eps) pairs at once: one vectorised search for all."""
    wc_box, ws_box = _bounds(setting, eps)
    s_c, s_s, rho, s_n2 = setting.s_c, setting.s_s, setting.rho, setting.s_n**2
    l1, l2 = q == 1.0, q == 2.0

    def risk(w_c: np.ndarray, w_s: np.ndarray) -> np.ndarray:
        a, b = s_c * w_c, s_s * w_s
        v = s_n2 + (1 - a - rho * b) ** 2 + (1 - rho * rho) * b * b
        ac, bs = np.abs(w_c), np.abs(w_s)
        wq = np.where(l1, ac + bs, np.where(l2, np.hypot(ac, bs), np.maximum(ac, bs)))
        ewq = eps * wq
        return v + 2 * ewq * np.sqrt(v * (2 / math.pi)) + ewq * ewq

    def inner(w_s: np.ndarray) -> np.ndarray:
        return _golden(lambda w_c: risk(w_c, w_s), -wc_box, wc_box)

    w_s = _golden(lambda w: risk(inner(w), w), -ws_box, ws_box)
    return inner(w_s), w_s


def _check_eps(eps_grid: Sequence[float]) -> np.ndarray:
    eps = np.asarray(eps_grid, float)
    if eps.ndim != 1 or eps.size == 0 or not np.isfinite(eps).all() or (eps < 0).any():
        raise ValueError("eps_grid must be a non-empty list of finite non-negative numbers")
    return eps


def optimal_weights(setting: LinearSetting, norm: str,
                    eps_grid: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The adversarially optimal ``(w_c, w_s)`` for each eps, against an l_``norm`` attack."""
    if norm not in DUAL_NORM:
        raise ValueError(f"unknown norm {norm!r}; use one of {sorted(DUAL_NORM)}")
    eps = _check_eps(eps_grid)
    return _optimal(setting, np.full(eps.shape, DUAL_NORM[norm]), eps)


def solve(setting: LinearSetting, norms: Sequence[str], eps_grid: Sequence[float],
          rho_shift: float = 0.0) -> dict[str, Any]:
    """Optimal weights and risks per attack norm and eps, as plain JSON-able data.

    For each norm, one row per eps: the optimal ``w_c``, ``w_s`` (and ``a = s_c w_c``,
    ``b = s_s w_s``), ``spurious_ratio = w_s / w_c``, the adversarial risk it attains, the
    natural (clean) risk in distribution (``risk_in``, at ``rho``) and under the shift to
    ``rho_shift`` (``risk_shift``), and ``risk_change`` = their difference, which equals
    ``2 b (1 - a) (rho - rho_shift)`` (claim 4).
    """
    setting.validate()
    if not -1.0 <= rho_shift <= 1.0:
        raise ValueError("rho_shift must lie in [-1, 1]")
    unknown = [n for n in norms if n not in DUAL_NORM]
    if unknown or not norms:
        raise ValueError(f"unknown norm(s) {unknown}; use some of {sorted(DUAL_NORM)}")
    grid = _check_eps(eps_grid)
    eps = [float(e) for e in grid]
    k = len(eps)
    q = np.repeat([DUAL_NORM[n] for n in norms], k)
    w_c_all, w_s_all = _optimal(setting, q, np.tile(grid, len(norms)))
    results: dict[str, list[dict[str, float | None]]] = {}
    for j, norm in enumerate(norms):
        w_c, w_s = w_c_all[j * k:(j + 1) * k], w_s_all[j * k:(j + 1) * k]
        adv = adversarial_risk(setting, w_c, w_s, grid, norm)
        risk_in = natural_risk(setting, w_c, w_s)
        risk_shift = natural_risk(setting, w_c, w_s, rho_shift)
        rows = []
        for i, e in enumerate(eps):
            wc, ws = float(w_c[i]), float(w_s[i])
            rows.append({
                "eps": e, "w_c": wc, "w_s": ws,
                "a": setting.s_c * wc, "b": setting.s_s * ws,
                # undefined once the attack wins and the best model is w = 0
                "spurious_ratio": ws / wc if abs(wc) > 1e-9 else None,
                "adversarial_risk": float(adv[i]),
                "risk_in": float(risk_in[i]),
                "risk_shift": float(risk_shift[i]),
                "risk_change": float(risk_shift[i] - risk_in[i]),
            })
        results[norm] = rows
    return {"setting": asdict(setting), "rho_shift": float(rho_shift), "eps_grid": eps,
            "norms": list(norms), "results": results}
