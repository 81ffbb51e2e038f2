"""The pages' HTML without a browser: the chart axes' ticks, a running report that reloads
itself, links, and 404s (the browser checks are in test_pages_browser.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.http.chrome import num
from service.http.svg import fmt, nice_ticks, wrap
from tests.factories import auth, new_key, settings, tiny_net, torchscript_bytes, upload


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0.0039, 0.0314) == [0.0, 0.01, 0.02, 0.03, 0.04]
    assert nice_ticks(-0.2, 0.35) == [-0.2, 0.0, 0.2, 0.4]
    assert nice_ticks(0.5, 0.5) == [0.4, 0.6, 0.8, 1.0]  # a point range widens upwards
    assert [fmt(v) for v in (0.0, 0.25, 0.0314, 12.0, 0.0001)] == ["0", "0.25", "0.0314", "12",
                                                                    "0.0001"]
    assert wrap("robust accuracy against eps for apgd-ce", 100) == [
        "robust accuracy", "against eps for", "apgd-ce"]  # 15 characters a line, nothing cut
    assert wrap("a" * 20, 66) == ["a" * 10, "a" * 10]
    assert wrap("short", 66) == ["short"]
    assert (num(0.3 - 0.1 * 3), num(-0.1), num(0.41, 4)) == ("0.000", "-0.100", "0.4100")


def test_a_running_evaluation_report_reloads_itself(sqlite_url: str, tmp_path: Path) -> None:
    key = new_key(sqlite_url, "bob")
    with TestClient(create_app(settings(sqlite_url, tmp_path))) as client:
        model = upload(client, key, torchscript_bytes(tiny_net())).json()
        ev = client.post("/evaluations", headers=auth(key), json={
            "model_id": model["id"], "dataset": "shapes-32",
            "suite": [{"benchmark": "clean"}]}).json()
        html = client.get(f"/evaluations/{ev['id']}/report", headers=auth(key)).text
        assert "<meta http-equiv='refresh' content='5'>" in html
        assert f"<a class='model' href='/models/{model['id']}'>model</a>" in html
        assert client.get(f"/sweeps/{uuid.uuid4()}/report", headers=auth(key)).status_code == 404


def test_the_home_page_says_what_this_is_and_lists_the_callers_jobs(
        sqlite_url: str, tmp_path: Path) -> None:
    bob, eve = new_key(sqlite_url, "bob"), new_key(sqlite_url, "eve")
    with TestClient(create_app(settings(sqlite_url, tmp_path))) as client:
        anonymous = client.get("/")
        assert anonymous.status_code == 200
        assert anonymous.headers["content-type"].startswith("text/html")
        for link in ("href='/docs'", "href='/leaderboard/page'", "href='/openapi.json'"):
            assert link in anonymous.text
        assert "Authorization: Bearer" in anonymous.text
        assert "<table>" not in anonymous.text
        model = upload(client, bob, torchscript_bytes(tiny_net())).json()
        ev = client.post("/evaluations", headers=auth(bob), json={
            "model_id": model["id"], "dataset": "shapes-32",
            "suite": [{"benchmark": "clean"}]}).json()
        mine = client.get("/", headers=auth(bob)).text
        assert f"href='/evaluations/{ev['id']}/report'" in mine
        assert "<td>queued</td>" in mine
        theirs = client.get("/", headers=auth(eve)).text
        assert ev["id"] not in theirs
        assert "No jobs yet" in theirs
        assert client.get("/", headers=auth("rs_not_a_key")).status_code == 401
