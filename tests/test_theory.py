"""The linear theory solver against METRICS.md: reference values, the four claims, and the
closed-form adversarial loss against brute force."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from service.theory import (
    LinearSetting,
    adversarial_loss,
    adversarial_risk,
    natural_risk,
    optimal_weights,
    solve,
)

REF = LinearSetting(s_c=1.0, s_s=1.0, rho=0.9, s_n=0.5)
EPS = [0.0, 0.1, 0.3, 0.5]
GRID = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]


def test_reference_values_l2() -> None:
    out = solve(REF, ["l2"], EPS, rho_shift=0.0)["results"]["l2"]
    assert [round(r["w_s"], 3) + 0.0 for r in out] == [0.0, 0.157, 0.290, 0.313]
    assert [round(r["risk_in"], 3) for r in out] == [0.250, 0.256, 0.283, 0.318]
    assert [round(r["risk_shift"], 3) for r in out] == [0.250, 0.309, 0.487, 0.602]


def test_reference_values_linf_strong_spurious_feature() -> None:
    setting = LinearSetting(s_c=1.0, s_s=2.0, rho=0.9, s_n=0.5)
    _, w_s = optimal_weights(setting, "linf", EPS)
    assert [round(float(w), 3) + 0.0 for w in w_s] == [0.0, 0.045, 0.155, 0.301]


SETTINGS = [REF, LinearSetting(1.0, 2.0, 0.9, 0.5), LinearSetting(2.0, 1.0, 0.5, 0.3),
            LinearSetting(1.0, 1.5, 0.6, 1.0)]


def _weights(setting: LinearSetting, norm: str, grid: list[float],
             out: dict[str, object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    res = out if out is not None else solve(setting, [norm], grid)
    rows = res["results"][norm]  # type: ignore[index]
    return np.array([r["w_c"] for r in rows]), np.array([r["w_s"] for r in rows])


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.slow
def test_claim1_standard_training_ignores_the_spurious_feature(setting: LinearSetting) -> None:
    out = solve(setting, ["l1", "l2", "linf"], [0.0])
    for norm in ("l1", "l2", "linf"):
        w_c, w_s = _weights(setting, norm, [0.0], out)
        assert abs(w_s[0]) < 1e-6
        assert w_c[0] == pytest.approx(1 / setting.s_c, abs=1e-6)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.slow
def test_claim2_l2_and_l1_attacks_buy_spurious_weight(setting: LinearSetting) -> None:
    out = solve(setting, ["l2", "l1"], GRID[1:])
    for norm in ("l2", "l1"):
        w_c, w_s = _weights(setting, norm, GRID[1:], out)
        # past some eps the attack wins and the best model is w = 0: nothing to compare
        alive = w_c > 1e-6
        assert alive[:4].all()
        assert (w_s[alive] > 1e-4).all(), (norm, w_s)
        ratio = w_s[alive] / w_c[alive]
        assert (np.diff(ratio) >= -1e-6).all(), (norm, ratio)
        if norm == "l2":
            assert (np.diff(ratio) > 0).all()
        else:
            assert ratio.max() <= 1 + 1e-6  # l_1 never pays more for the spurious weight


def test_claim2_l1_saturates_at_equal_weights() -> None:
    w_c, w_s = optimal_weights(REF, "l1", [0.1, 0.5, 0.75, 1.0])
    assert w_s[0] < w_c[0] - 0.1
    assert np.allclose(w_s[1:], w_c[1:], atol=1e-6)
    assert (w_c[1:] > 0.1).all()


@pytest.mark.parametrize(("s_c", "s_s", "rho", "spurious"), [
    (1.0, 1.0, 0.9, False),  # rho s_s = 0.9 <= 1
    (1.0, 1.1, 0.9, False),  # 0.99 <= 1
    (2.0, 2.0, 0.99, False),
    (1.0, 2.0, 0.9, True),  # 1.8 > 1
    (1.0, 1.25, 0.9, True),  # 1.125 > 1
    (0.5, 1.0, 0.6, True),
])
@pytest.mark.slow
def test_claim3_linf_uses_the_spurious_feature_iff_rho_s_s_exceeds_s_c(
        s_c: float, s_s: float, rho: float, spurious: bool) -> None:
    w_c, w_s = optimal_weights(LinearSetting(s_c, s_s, rho, 0.5), "linf", GRID[1:])
    if spurious:
        alive = w_c > 1e-6  # past some eps the attack wins and the best model is w = 0
        assert alive[:4].all()
        assert (w_s[alive] > 1e-4).all(), w_s
    else:
        assert np.abs(w_s).max() < 1e-6, w_s


@pytest.mark.parametrize("rho_shift", [0.0, 0.5, -0.3, 0.9])
@pytest.mark.slow
def test_claim4_shift_cost_is_2b_1_minus_a_delta_rho(rho_shift: float) -> None:
    out = solve(REF, ["l2", "l1", "linf"], GRID, rho_shift=rho_shift)
    for rows in out["results"].values():
        for r in rows:
            predicted = 2 * r["b"] * (1 - r["a"]) * (REF.rho - rho_shift)
            assert r["risk_change"] == pytest.approx(predicted, abs=1e-12)
    l2 = out["results"]["l2"]
    if rho_shift < REF.rho:
        assert l2[0]["risk_change"] == pytest.approx(0.0, abs=1e-6)  # core-only: immune
        # while the spurious weight grows with eps (up to 0.3 here), so does the shift's cost
        growing = [r for r in l2 if r["eps"] <= 0.3]
        assert np.diff([r["b"] for r in growing]).min() > 0
        assert np.diff([r["risk_change"] for r in growing]).min() > 0
    linf = [r["risk_change"] for r in out["results"]["linf"]]
    assert np.allclose(linf, 0.0, atol=1e-6)  # l_inf with rho s_s <= s_c stays core-only


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
@pytest.mark.parametrize("eps", [0.1, 0.4])
@pytest.mark.slow
def test_solver_beats_a_generic_optimiser(norm: str, eps: float) -> None:
    from scipy.optimize import minimize  # imported here: the fast tier does not pay for it

    setting = LinearSetting(1.0, 1.7, 0.8, 0.4)
    w_c, w_s = optimal_weights(setting, norm, [eps])
    ours = float(adversarial_risk(setting, w_c[0], w_s[0], eps, norm))

    def f(w: np.ndarray) -> float:
        return float(adversarial_risk(setting, w[0], w[1], eps, norm))

    best = min(minimize(f, x0, method="Nelder-Mead",
                        options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 4000}).fun
               for x0 in ([1.0, 0.0], [0.3, 0.3], [0.0, 1.0], [-0.5, 0.5]))
    assert ours <= best + 1e-10
    # and a brute-force grid around the answer finds nothing better
    g = np.linspace(-0.02, 0.02, 81)
    risks = adversarial_risk(setting, w_c[0] + g[:, None], w_s[0] + g[None, :], eps, norm)
    assert ours <= risks.min() + 1e-12


def _brute_force_max(y: np.ndarray, x: np.ndarray, w: np.ndarray, eps: float,
                     norm: str) -> np.ndarray:
    """max over the ball by enumeration: the loss is convex in d, so its maximum over a
    polytope is at a vertex; the l_2 ball is sampled densely on its boundary."""
    if norm == "linf":
        dirs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], float)
    elif norm == "l1":
        dirs = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], float)
    else:
        t = np.linspace(0, 2 * math.pi, 20_000, endpoint=False)
        dirs = np.stack([np.cos(t), np.sin(t)], 1)
    resid = y[:, None] - (x @ w)[:, None] - eps * (dirs @ w)[None, :]
    return (resid**2).max(axis=1)


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
@pytest.mark.slow
def test_closed_form_adversarial_loss_matches_brute_force(norm: str) -> None:
    rng = np.random.default_rng(0)
    y0 = rng.standard_normal(300)
    y = y0 + REF.s_n * rng.standard_normal(300)
    x = np.stack([REF.s_c * y0, REF.s_s * (REF.rho * y0 + math.sqrt(1 - REF.rho**2)
                                            * rng.standard_normal(300))], 1)
    for w in (np.array([0.8, 0.15]), np.array([0.4, -0.6]), np.array([1.0, 0.0])):
        closed = adversarial_loss(y, x, w, 0.3, norm)
        brute = _brute_force_max(y, x, w, 0.3, norm)
        assert (brute <= closed + 1e-12).all()
        tol = 1e-12 if norm != "l2" else 1e-6
        assert np.allclose(brute, closed, rtol=tol, atol=tol)


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_adversarial_risk_is_the_mean_adversarial_loss(norm: str) -> None:
    rng = np.random.default_rng(1)
    n = 400_000
    y0 = rng.standard_normal(n)
    y = y0 + REF.s_n * rng.standard_normal(n)
    x = np.stack([REF.s_c * y0, REF.s_s * (REF.rho * y0 + math.sqrt(1 - REF.rho**2)
                                            * rng.standard_normal(n))], 1)
    w = np.array([0.7, 0.25])
    empirical = adversarial_loss(y, x, w, 0.2, norm).mean()
    assert float(adversarial_risk(REF, w[0], w[1], 0.2, norm)) == pytest.approx(
        empirical, rel=0.01)
    assert float(natural_risk(REF, w[0], w[1])) == pytest.approx(
        ((y - x @ w) ** 2).mean(), rel=0.01)


def test_output_is_plain_json() -> None:
    import json

    out = solve(REF, ["l2", "linf"], [0.0, 0.1], rho_shift=0.2)
    again = json.loads(json.dumps(out))
    assert again["setting"] == {"s_c": 1.0, "s_s": 1.0, "rho": 0.9, "s_n": 0.5}
    assert set(again["results"]) == {"l2", "linf"}
    assert len(again["results"]["l2"]) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"setting": LinearSetting(rho=1.5)}, "rho"),
    ({"setting": LinearSetting(s_c=0.0)}, "positive"),
    ({"setting": LinearSetting(s_n=-1.0)}, "s_n"),
    ({"norms": ["l3"]}, "norm"),
    ({"eps_grid": [-0.1]}, "eps_grid"),
    ({"eps_grid": [float("nan")]}, "eps_grid"),
    ({"rho_shift": 2.0}, "rho_shift"),
    ({"setting": LinearSetting(rho=1.0), "eps_grid": [0.0]}, "not unique"),
])
def test_refuses_bad_input(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"setting": REF, "norms": ["l2"], "eps_grid": [0.1],
                               "rho_shift": 0.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        solve(**args)  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_solver_needs_neither_torch_nor_scipy() -> None:
    code = ("import sys, service.theory; "
            "sys.exit(int(any(m in sys.modules for m in ('torch', 'scipy', 'workers'))))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
