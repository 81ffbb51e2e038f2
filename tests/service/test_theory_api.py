"""POST /theory reproduces METRICS.md's reference values through the API."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import api, auth, new_key, settings


def test_reference_values_over_http(sqlite_url: str, tmp_path: Path) -> None:
    key = new_key(sqlite_url, "theorist")
    with api(settings(sqlite_url, tmp_path)) as client:
        resp = client.post("/theory", headers=auth(key), json={
            "s_c": 1, "s_s": 1, "rho": 0.9, "s_n": 0.5, "norms": ["l2"],
            "eps": [0, 0.1, 0.3, 0.5], "rho_shift": 0})
        assert resp.status_code == 200, resp.text
        rows = resp.json()["results"]["l2"]
        assert [round(r["w_s"], 3) for r in rows] == [0.0, 0.157, 0.290, 0.313]
        assert [round(r["risk_in"], 3) for r in rows] == [0.250, 0.256, 0.283, 0.318]
        assert [round(r["risk_shift"], 3) for r in rows] == [0.250, 0.309, 0.487, 0.602]
        bad = client.post("/theory", headers=auth(key), json={"norms": ["l3"]})
        assert bad.status_code == 422
        assert client.post("/theory", json={}).status_code == 401


@pytest.mark.parametrize("eps", [[-0.1]])
def test_negative_eps_is_refused(sqlite_url: str, tmp_path: Path, eps: list[float]) -> None:
    key = new_key(sqlite_url, "theorist")
    with api(settings(sqlite_url, tmp_path)) as client:
        resp = client.post("/theory", headers=auth(key), json={"eps": eps})
        assert resp.status_code == 422
        assert resp.headers["content-type"].startswith("application/problem+json")
