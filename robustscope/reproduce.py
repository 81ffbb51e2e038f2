"""``robustscope reproduce``: the trade-off of Moayeri, Banihashem & Feizi (NeurIPS 2022),
measured through the product.

A client of a running server, like ``evaluate``. It submits two sweeps on the built-in
Waterbirds-style set, with the background correlation kept in the test split (as in
ImageNet-9, so that the backgrounds benchmark's same-class backgrounds carry the class signal
the model learnt and BG-gap can show reliance), and waits for them:

1. **trade-off**: standard training against PGD training at two or more eps per norm (l_2,
   l_inf, l_1), every model evaluated on both axes (APGD-CE per norm, ``fg_bg_noise``,
   ``backgrounds``, ``groups``). The paper's claim: l_1 and l_2 adversarial training raise
   reliance on the background (lower RFS, larger BG-gap than the standard model); l_inf only
   when the background's scale exceeds the object's.
2. **removed**: the standard recipe trained at correlation 0.5, tested on the same split as the
   trade-off's standard model (trained where the correlation exists); the claim: the model
   trained with the correlation is the more robust (APGD).

Then it prints both tables and the sweep pages' URLs. The tables are computed from the sweep
records alone (:func:`tradeoff_rows`, :func:`preserved_rows`), so they can be checked from
known rows. Exit codes as ``evaluate``'s: 1 a job failed or was cancelled, 4 the server refused
a request or could not be reached.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import httpx

from contract.jobs import FINAL_STATES, JobStatus
from robustscope.client import EXIT_FAILED, ClientError, _problem


@dataclass(frozen=True)
class Scale:
    """How big a run is. ``n_examples`` is the seeded test subset every evaluation measures."""

    dataset: str
    architecture: str
    epochs: int
    train_examples: int | None
    n_examples: int | None
    threats: dict[str, list[float]]
    correlation: float
    batch_size: int = 128
    eval_examples: int = 200
    lr: float | None = None  # None: the method's default
    steps: int | None = None  # PGD training's inner steps; None: the method's default (7)
    dataset_params: dict[str, float] = field(default_factory=dict)  # the feature scales
    attack_steps: int | None = None  # APGD-CE iterations (one restart); None: its defaults
    note: str = ""


def suite(scale: Scale) -> list[dict[str, Any]]:
    """Both axes: clean, APGD-CE per norm at the grid's eps, backgrounds, RFS, groups."""
    budget = {} if scale.attack_steps is None else {"steps": scale.attack_steps, "restarts": 1}
    return [{"benchmark": "clean"},
            *[{"benchmark": "adversarial", "attack": "apgd-ce", "norm": norm,
               "eps": sorted(eps), **budget} for norm, eps in scale.threats.items()],
            {"benchmark": "backgrounds"}, {"benchmark": "fg_bg_noise"}, {"benchmark": "groups"}]


# The built-in set's feature scales the reproduction uses (docs/REPRODUCTION.md, "The task"):
# a standard small_cnn learns the birds at these and still leans on the background.
FEATURES = {"core_scale": 0.6, "background_scale": 0.5}

SCALES: dict[str, Scale] = {
    # Checks the machinery in minutes; its numbers mean nothing.
    "tiny": Scale("waterbirds-32", "small_cnn", epochs=1, train_examples=64, n_examples=32,
                  threats={"l2": [0.25], "linf": [2 / 255], "l1": [4.0]}, correlation=0.9,
                  batch_size=32, eval_examples=32, lr=0.02, steps=3, dataset_params=FEATURES,
                  attack_steps=5, note="machinery check only"),
    # One eps per norm, for a shared or slow CPU. The training budget is the smallest at which
    # a standard small_cnn learnt the birds (docs/REPRODUCTION.md): 600 images for 5 epochs
    # stayed at chance.
    "small": Scale("waterbirds-32", "small_cnn", epochs=6, train_examples=1000, n_examples=200,
                   threats={"l2": [0.5], "linf": [4 / 255], "l1": [8.0]}, correlation=0.9,
                   batch_size=32, eval_examples=100, lr=0.02, steps=3,
                   dataset_params=FEATURES, attack_steps=10),
    # The 2-core CPU of `robustscope up`: two eps per norm.
    "default": Scale("waterbirds-32", "small_cnn", epochs=6, train_examples=1000,
                     n_examples=400, threats={"l2": [0.25, 1.0], "linf": [2 / 255, 8 / 255],
                                              "l1": [4.0, 12.0]}, correlation=0.9,
                     batch_size=32, eval_examples=100, lr=0.02, steps=3,
                     dataset_params=FEATURES, attack_steps=10),
    # A GPU: every train and test image, PreAct-ResNet-18, four eps per norm, PGD-7 training
    # and APGD-CE's own budget.
    "paper": Scale("waterbirds-64", "preact_resnet18", epochs=30, train_examples=None,
                   n_examples=None, threats={"l2": [0.25, 0.5, 1.0, 2.0],
                                             "linf": [1 / 255, 2 / 255, 4 / 255, 8 / 255],
                                             "l1": [4.0, 8.0, 16.0, 32.0]},
                   correlation=0.9, eval_examples=800, dataset_params=FEATURES),
}


def sweep_specs(scale: Scale, seed: int) -> dict[str, dict[str, Any]]:
    """The two sweeps' request bodies (``POST /sweeps``)."""
    common = {"dataset": scale.dataset, "architecture": scale.architecture,
              "threats": scale.threats, "epochs": scale.epochs,
              "batch_size": scale.batch_size, "seed": seed,
              "train_examples": scale.train_examples, "eval_examples": scale.eval_examples,
              "n_examples": scale.n_examples, "suite": suite(scale),
              **{k: v for k, v in (("lr", scale.lr), ("steps", scale.steps)) if v is not None}}
    c = scale.correlation
    base = {**scale.dataset_params, "correlation": c, "test_correlation": c}
    return {
        "tradeoff": {**common, "methods": ["standard", "pgd"], "dataset_params": base},
        "removed": {**common, "methods": ["standard"],
                    "dataset_params": {**base, "correlation": 0.5}},
    }


# ---------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class TradeoffRow:
    model: str
    method: str
    norm: str | None
    eps: float | None
    clean: float | None
    robust: float | None  # at the model's own training threat (None for standard)
    rfs: float | None
    bg_gap: float | None
    worst_group: float | None
    degenerate: bool | None
    d_rfs: float | None  # minus the standard model's
    d_bg_gap: float | None


def _key(norm: str, eps: float) -> str:
    return f"{norm}:{eps:.4g}"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def tradeoff_rows(sweep: dict[str, Any]) -> list[TradeoffRow]:
    """One row per model of the trade-off sweep, differences taken against its standard model."""
    table = sweep["table"]
    standard = next((r for r in table if r["method"] == "standard"), None)
    out = []
    for r in table:
        own = None if r["norm"] is None else r["robust_accuracy"].get(_key(r["norm"], r["eps"]))
        out.append(TradeoffRow(
            model=r.get("name") or r["method"], method=r["method"], norm=r["norm"], eps=r["eps"],
            clean=r["clean_accuracy"], robust=own, rfs=r["rfs"], bg_gap=r["bg_gap"],
            worst_group=r.get("worst_group_accuracy"), degenerate=r.get("degenerate"),
            d_rfs=None if standard is None or r is standard else _diff(r["rfs"], standard["rfs"]),
            d_bg_gap=None if standard is None or r is standard
            else _diff(r["bg_gap"], standard["bg_gap"])))
    return out


@dataclass(frozen=True)
class Verdict:
    """Per norm: at how many of its eps the adversarially trained model relies more on the
    background than the standard model (lower RFS)."""

    norm: str
    more_reliant: int
    of: int


def verdicts(rows: list[TradeoffRow]) -> list[Verdict]:
    out = []
    for norm in ("l2", "linf", "l1"):
        mine = [r for r in rows if r.norm == norm and r.d_rfs is not None]
        if mine:
            out.append(Verdict(norm, sum(r.d_rfs is not None and r.d_rfs < 0 for r in mine),
                               len(mine)))
    return out


@dataclass(frozen=True)
class PreservedRow:
    model: str
    train_correlation: float
    test_correlation: float
    clean: float | None
    robust: dict[str, float] = field(default_factory=dict)  # "<norm>:<eps>" -> APGD accuracy


def preserved_rows(tradeoff: dict[str, Any], removed: dict[str, Any]) -> list[PreservedRow]:
    """The trade-off's standard model (trained with the correlation) and the removed sweep's
    (trained without it), on the same test split."""
    out = []
    for sweep in (tradeoff, removed):
        params = sweep["spec"]["dataset_params"]
        r = next(row for row in sweep["table"] if row["method"] == "standard")
        out.append(PreservedRow(
            model=r.get("name") or r["method"], train_correlation=float(params["correlation"]),
            test_correlation=float(params["test_correlation"]), clean=r["clean_accuracy"],
            robust=dict(r["robust_accuracy"])))
    return out


def _f(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _eps(norm: str | None, eps: float | None) -> str:
    if norm is None or eps is None:
        return "-"
    if norm == "linf":
        return f"{eps * 255:.3g}/255"
    return f"{eps:.4g}"


def _grid(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *[line(r) for r in body]])


def format_tradeoff(rows: list[TradeoffRow]) -> str:
    header = ["model", "norm", "eps", "clean", "robust (own threat)", "RFS", "dRFS", "BG-gap",
              "dBG-gap", "worst-group", "degenerate"]
    body = [[r.model, r.norm or "-", _eps(r.norm, r.eps), _f(r.clean), _f(r.robust), _f(r.rfs),
             _f(r.d_rfs, True), _f(r.bg_gap), _f(r.d_bg_gap, True), _f(r.worst_group),
             "-" if r.degenerate is None else ("YES" if r.degenerate else "no")] for r in rows]
    lines = [_grid(header, body), ""]
    for v in verdicts(rows):
        lines.append(f"{v.norm}: lower RFS than the standard model (more background reliance) "
                     f"at {v.more_reliant} of {v.of} eps")
    return "\n".join(lines)


def format_preserved(rows: list[PreservedRow]) -> str:
    keys = sorted({k for r in rows for k in r.robust})
    header = ["model", "train corr", "test corr", "clean",
              *[f"APGD {k.split(':')[0]} {_eps(k.split(':')[0], float(k.split(':')[1]))}"
                for k in keys]]
    body = [[r.model, f"{r.train_correlation:.2f}", f"{r.test_correlation:.2f}", _f(r.clean),
             *[_f(r.robust.get(k)) for k in keys]] for r in rows]
    lines = [_grid(header, body)]
    if len(rows) == 2 and keys:
        wins = sum((rows[0].robust.get(k) or 0.0) > (rows[1].robust.get(k) or 0.0) for k in keys)
        lines.append(f"\ntrained with the correlation: more robust at {wins} of {len(keys)} "
                     "threats than trained without it (same test split)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the command


def _post_sweep(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post("/sweeps", json=body)
    if resp.status_code != 202:
        raise ClientError(f"the server refused the sweep: {_problem(resp)}")
    sweep: dict[str, Any] = resp.json()
    return sweep


def _failures(client: httpx.Client, sweep: dict[str, Any]) -> list[str]:
    """What went wrong in a sweep that did not succeed, one line per failed job."""
    out = []
    for row in sweep["table"]:
        name = row.get("name") or row["training_id"]
        if row["training_status"] != JobStatus.SUCCEEDED:
            t = client.get(f"/trainings/{row['training_id']}").json()
            err = t.get("error") or {}
            out.append(f"training {name} {row['training_status']}: {err.get('type', '')} "
                       f"{err.get('detail', '')}".rstrip())
        elif row["evaluation_status"] not in (None, JobStatus.SUCCEEDED):
            e = client.get(f"/evaluations/{row['evaluation_id']}").json()
            err = e.get("error") or {}
            out.append(f"evaluation of {name} {row['evaluation_status']}: "
                       f"{err.get('type', '')} {err.get('detail', '')}".rstrip())
    return out


def run(server: str, api_key: str | None, scale_name: str, seed: int, out: TextIO,
        err: TextIO, interval: float = 10.0, correlation: float | None = None) -> int:
    if not api_key:
        raise ClientError("pass --api-key or set ROBUSTSCOPE_API_KEY")
    scale = SCALES[scale_name]
    if correlation is not None:
        scale = replace(scale, correlation=correlation)
    try:
        with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {api_key}"},
                          timeout=120) as client:
            return follow(client, server.rstrip("/"), scale_name, scale, seed, out, err,
                          interval)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach {server}: {exc}") from exc


def follow(client: httpx.Client, base: str, scale_name: str, scale: Scale, seed: int,
           out: TextIO, err: TextIO, interval: float,
           sleep: Callable[[float], None] = time.sleep) -> int:
    """Submit the sweeps on ``client``, wait for them, print the tables."""
    sweeps = {name: _post_sweep(client, body) for name, body in sweep_specs(scale, seed).items()}
    for name, s in sweeps.items():
        err.write(f"sweep {name}: {base}/sweeps/{s['id']}/report\n")
    began = time.monotonic()
    while True:
        for name, s in sweeps.items():
            resp = client.get(f"/sweeps/{s['id']}")
            if resp.status_code != 200:
                raise ClientError(f"could not read sweep {name}: {_problem(resp)}")
            sweeps[name] = resp.json()
        done = sum(s["progress"]["fraction"] for s in sweeps.values()) / len(sweeps)
        err.write(f"[{time.monotonic() - began:7.0f} s] {100 * done:5.1f}% "
                  + ", ".join(f"{n}: {s['progress']['message']}" for n, s in sweeps.items())
                  + "\n")
        err.flush()
        if all(s["status"] in FINAL_STATES for s in sweeps.values()):
            break
        sleep(interval)
    failed = {name: s for name, s in sweeps.items() if s["status"] != JobStatus.SUCCEEDED}
    if failed:
        for name, s in failed.items():
            for line in _failures(client, s) or [f"the sweep is {s['status']}"]:
                err.write(f"robustscope reproduce: sweep {name}: {line}\n")
        return EXIT_FAILED
    out.write(f"Scale {scale_name!r}: {scale.dataset}, {scale.architecture}, {scale.epochs} "
              f"epochs, train correlation {scale.correlation}, "
              f"test subset {scale.n_examples or 'all'}"
              + (f" ({scale.note})" if scale.note else "") + "\n\n")
    out.write("Trade-off: adversarial training against background reliance\n\n")
    out.write(format_tradeoff(tradeoff_rows(sweeps["tradeoff"])) + "\n\n")
    out.write("A correlation preserved in the test domain and adversarial robustness\n\n")
    out.write(format_preserved(preserved_rows(sweeps["tradeoff"], sweeps["removed"])) + "\n\n")
    for name, s in sweeps.items():
        out.write(f"{name}: {base}/sweeps/{s['id']}/report\n")
    return 0


def main(server: str, api_key: str | None, scale: str, seed: int,
         correlation: float | None) -> int:
    try:
        return run(server, api_key, scale, seed, sys.stdout, sys.stderr,
                   correlation=correlation)
    except ClientError as exc:
        sys.stderr.write(f"robustscope reproduce: {exc}\n")
        return exc.code
