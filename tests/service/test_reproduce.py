"""``robustscope reproduce`` at tiny scale, through the real API: the sweeps it submits, the
tables it prints (computed exactly from known result rows), and its failures (a job that
failed, a server that is not there)."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from core.db import make_engine, make_sessionmaker
from core.tables import Evaluation, Result, Training
from robustscope import reproduce
from robustscope.reproduce import PreservedRow, TradeoffRow
from tests.factories import api, auth, new_key, settings

pytestmark = pytest.mark.slow

LINF = 2 / 255

# Per training: clean, RFS, BG-gap, worst-group and APGD robust accuracy per (norm, eps).
STANDARD = (0.9, 0.30, 0.05, 0.70, {("l2", 0.25): 0.20, ("linf", LINF): 0.10, ("l1", 4.0): 0.05})
VALUES = {  # (method, training norm, train correlation, test correlation)
    ("standard", None, 0.9, 0.9): STANDARD,
    ("pgd", "l2", 0.9, 0.9): (0.85, 0.10, 0.15, 0.60,
                                {("l2", 0.25): 0.60, ("linf", LINF): 0.30, ("l1", 4.0): 0.20}),
    ("pgd", "linf", 0.9, 0.9): (0.80, 0.35, 0.03, 0.65,
                                  {("l2", 0.25): 0.50, ("linf", LINF): 0.55, ("l1", 4.0): 0.10}),
    ("pgd", "l1", 0.9, 0.9): (0.82, 0.05, 0.20, 0.50,
                                {("l2", 0.25): 0.40, ("linf", LINF): 0.20, ("l1", 4.0): 0.45}),
    ("standard", None, 0.5, 0.9): (0.88, 0.4, 0.0, 0.8,
                                    {("l2", 0.25): 0.15, ("linf", LINF): 0.1, ("l1", 4.0): 0.05}),
}


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with api(settings(sqlite_url, tmp_path)) as c:
        c.headers.update(auth(new_key(sqlite_url, "alice")))
        yield c


def _worker(sqlite_url: str, fail: str | None = None) -> reproduce.Callable[[float], None]:
    """Stands in for the workers between two polls: every training succeeds (``fail`` names
    one that fails) and its evaluation writes the result rows of VALUES."""
    sessions = make_sessionmaker(make_engine(sqlite_url))

    def tick(_: float) -> None:
        with sessions.begin() as s:
            for t in s.scalars(select(Training).where(Training.status == "queued")):
                if t.name == fail:
                    t.status, t.error = "failed", {
                        "type": "training-error",
                        "detail": "the loss became nan in epoch 1; lower the learning rate"}
                    continue
                params = t.dataset_params
                key = (t.method, None if t.method == "standard" else t.threat["norm"],
                       params["correlation"], params["test_correlation"])
                clean, rfs, gap, worst, robust = VALUES[key]
                ev = Evaluation(owner=t.owner, model_name=t.name, dataset=t.dataset,
                                dataset_params=params, split="test", suite=t.evaluate or [],
                                seed=0, status="succeeded", checks=[{
                                    "name": "degenerate_predictions", "entry": 0,
                                    "passed": clean != 0.9}],
                                artifacts={}, completed_entries=[], timings={})
                s.add(ev)
                s.flush()
                rows: list[tuple[str, str, float, dict[str, Any]]] = [
                    ("clean", "accuracy", clean, {}), ("fg_bg_noise", "rfs", rfs,
                                                          {"sigma": "mean"}),
                        ("backgrounds", "bg_gap", gap, {}),
                        ("groups", "worst_group_accuracy", worst, {})]
                rows += [("adversarial", "robust_accuracy", v,
                          {"attack": "apgd-ce", "norm": n, "eps": e})
                         for (n, e), v in robust.items()]
                for i, (bench, metric, value, p) in enumerate(rows):
                    s.add(Result(evaluation_id=ev.id, entry_index=i, benchmark=bench,
                                 metric=metric, value=value, params=p,
                                 params_key=json.dumps(p, sort_keys=True)))
                t.status, t.evaluation_id, t.progress_fraction = "succeeded", ev.id, 1.0

    return tick


def test_reproduce_prints_the_tables_computed_from_the_rows(client: TestClient,
                                                           sqlite_url: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = reproduce.follow(client, "http://srv", "tiny", reproduce.SCALES["tiny"], 0, out, err,
                            interval=0, sleep=_worker(sqlite_url))
    assert code == 0, err.getvalue()
    sweeps = client.get("/sweeps").json()["items"][::-1]  # oldest first
    params = reproduce.SCALES["tiny"].dataset_params
    assert [s["spec"]["methods"] for s in sweeps] == [["standard", "pgd"], ["standard"]]
    assert [s["spec"]["dataset_params"] for s in sweeps] == [
        {**params, "correlation": 0.9, "test_correlation": 0.9},
        {**params, "correlation": 0.5, "test_correlation": 0.9}]
    assert all(s["spec"]["n_examples"] == 32 for s in sweeps)
    assert [(s["spec"]["lr"], s["spec"]["steps"], s["spec"]["batch_size"]) for s in sweeps] == [
        (0.02, 3, 32), (0.02, 3, 32)]
    assert sweeps[0]["spec"]["suite"] == [
        {"benchmark": "clean"},
        {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "l2", "eps": [0.25],
         "steps": 5, "restarts": 1},
        {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "linf", "eps": [LINF],
         "steps": 5, "restarts": 1},
        {"benchmark": "adversarial", "attack": "apgd-ce", "norm": "l1", "eps": [4.0],
         "steps": 5, "restarts": 1},
        {"benchmark": "backgrounds"}, {"benchmark": "fg_bg_noise"}, {"benchmark": "groups"}]

    rows = reproduce.tradeoff_rows(sweeps[0])
    assert rows[0] == TradeoffRow("small_cnn-standard", "standard", None, None, 0.9, None, 0.3,
                                  0.05, 0.7, True, None, None)
    assert rows[1] == TradeoffRow("small_cnn-pgd-l2-0.25", "pgd", "l2", 0.25, 0.85, 0.6, 0.1,
                                  0.15, 0.6, False, 0.1 - 0.3, 0.15 - 0.05)
    assert rows[2].robust == 0.55
    assert rows[2].d_rfs == pytest.approx(0.05)
    assert rows[3].robust == 0.45
    assert [(v.norm, v.more_reliant, v.of) for v in reproduce.verdicts(rows)] == [
        ("l2", 1, 1), ("linf", 0, 1), ("l1", 1, 1)]
    pres = reproduce.preserved_rows(sweeps[0], sweeps[1])
    assert pres == [
        PreservedRow("small_cnn-standard", 0.9, 0.9, 0.9,
                     {"l2:0.25": 0.2, "linf:0.007843": 0.1, "l1:4": 0.05}),
        PreservedRow("small_cnn-standard", 0.5, 0.9, 0.88,
                     {"l2:0.25": 0.15, "linf:0.007843": 0.1, "l1:4": 0.05})]

    text = out.getvalue()
    table = """\
| model                       | norm | eps   | clean | robust (own threat) | RFS   | dRFS   | BG-gap | dBG-gap | worst-group | degenerate |
|-----------------------------|------|-------|-------|---------------------|-------|--------|--------|---------|-------------|------------|
| small_cnn-standard          | -    | -     | 0.900 | -                   | 0.300 | -      | 0.050  | -       | 0.700       | YES        |
| small_cnn-pgd-l2-0.25       | l2   | 0.25  | 0.850 | 0.600               | 0.100 | -0.200 | 0.150  | +0.100  | 0.600       | no         |
| small_cnn-pgd-linf-0.007843 | linf | 2/255 | 0.800 | 0.550               | 0.350 | +0.050 | 0.030  | -0.020  | 0.650       | no         |
| small_cnn-pgd-l1-4          | l1   | 4     | 0.820 | 0.450               | 0.050 | -0.250 | 0.200  | +0.150  | 0.500       | no         |

l2: lower RFS than the standard model (more background reliance) at 1 of 1 eps
linf: lower RFS than the standard model (more background reliance) at 0 of 1 eps
l1: lower RFS than the standard model (more background reliance) at 1 of 1 eps
"""  # noqa: E501
    assert table in text
    preserved = """\
| model              | train corr | test corr | clean | APGD l1 4 | APGD l2 0.25 | APGD linf 2/255 |
|--------------------|------------|-----------|-------|-----------|--------------|-----------------|
| small_cnn-standard | 0.90       | 0.90      | 0.900 | 0.050     | 0.200        | 0.100           |
| small_cnn-standard | 0.50       | 0.90      | 0.880 | 0.050     | 0.150        | 0.100           |

trained with the correlation: more robust at 1 of 3 threats than trained without it (same test split)
"""  # noqa: E501
    assert preserved in text
    assert f"tradeoff: http://srv/sweeps/{sweeps[0]['id']}/report" in text
    assert f"removed: http://srv/sweeps/{sweeps[1]['id']}/report" in text


def test_reproduce_fails_clearly_when_a_job_fails(client: TestClient, sqlite_url: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = reproduce.follow(client, "http://srv", "tiny", reproduce.SCALES["tiny"], 0, out, err,
                            interval=0, sleep=_worker(sqlite_url, fail="small_cnn-pgd-l1-4"))
    assert code == 1
    assert out.getvalue() == ""
    assert ("robustscope reproduce: sweep tradeoff: training small_cnn-pgd-l1-4 failed: "
            "training-error the loss became nan in epoch 1; lower the learning rate"
            in err.getvalue())


def test_reproduce_fails_clearly_when_the_server_is_unreachable(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = reproduce.main("http://127.0.0.1:9", "rs_key", "tiny", 0, None)
    assert code == 4
    assert capsys.readouterr().err.startswith(
        "robustscope reproduce: cannot reach http://127.0.0.1:9: ")
    assert reproduce.main("http://127.0.0.1:9", None, "tiny", 0, None) == 4
    assert "pass --api-key" in capsys.readouterr().err


def test_a_refused_sweep_is_reported(client: TestClient) -> None:
    scale = reproduce.replace(reproduce.SCALES["tiny"], dataset="no-such-set")
    with pytest.raises(reproduce.ClientError, match="the server refused the sweep: 404"):
        reproduce.follow(client, "http://srv", "tiny", scale, 0, io.StringIO(), io.StringIO(),
                         interval=0)


def test_every_scale_is_a_valid_sweep(client: TestClient) -> None:
    """The default and paper scales' sweeps pass the API's validation (and fit its grid)."""
    for name in ("default", "paper"):
        for body in reproduce.sweep_specs(reproduce.SCALES[name], 0).values():
            resp = client.post("/sweeps", json=body)
            assert resp.status_code == 202, (name, resp.text)
    assert uuid.UUID(client.get("/sweeps").json()["items"][0]["id"])
