"""Browsers: a session from an API key (``/login``), what its cookie opens and what it cannot
do, public pages for anyone, and share links of private reports. Without a browser (the
pages in Chromium are in test_pages_browser.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from core.db import make_engine, make_sessionmaker
from core.sessions import COOKIE, safe_next
from core.tables import BrowserSession, Evaluation, Result, ShareLink, Sweep, utcnow
from service.app import create_app
from tests.factories import auth, new_key, settings

HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture
def app_settings(sqlite_url: str, tmp_path: Path) -> object:
    return settings(sqlite_url, tmp_path)


@pytest.fixture
def client(app_settings: object) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings), follow_redirects=False) as c:  # type: ignore[arg-type]
        yield c


def _evaluation(url: str, owner: str, public: bool, name: str = "resnet-a") -> str:
    with make_sessionmaker(make_engine(url)).begin() as s:
        ev = Evaluation(owner=owner, model_name=name, dataset="shapes-32", suite=[
            {"benchmark": "clean"}], seed=0, status="succeeded", public=public,
            progress_fraction=1.0, checks=[])
        ev.results = [Result(entry_index=0, benchmark="clean", metric="accuracy", value=0.75,
                             params={}, params_key="{}")]
        s.add(ev)
        s.flush()
        return str(ev.id)


def _login(client: TestClient, key: str, next_url: str = "/") -> str:
    resp = client.post("/login", data={"api_key": key, "next": next_url})
    assert resp.status_code == 303, resp.text
    return str(resp.cookies[COOKIE])


def test_logging_in_sets_a_session_cookie_that_opens_the_owners_pages(
        client: TestClient, sqlite_url: str) -> None:
    key = new_key(sqlite_url, "alice")
    mine = _evaluation(sqlite_url, "alice", public=False)
    report = f"/evaluations/{mine}/report"

    # Without a session a browser is sent to the login form, which comes back here.
    resp = client.get(report, headers=HTML)
    assert resp.status_code == 303
    assert resp.headers["location"] == f"/login?next=%2Fevaluations%2F{mine}%2Freport"
    assert client.get(report).status_code == 401  # not a browser: the problem+json
    assert client.get(report).headers["content-type"] == "application/problem+json"
    form = client.get("/login?next=" + report)
    assert form.status_code == 200
    assert f"name='next' value='{report}'" in form.text
    assert "type='password' name='api_key'" in form.text

    # A wrong key: a 401 page, no cookie.
    wrong = client.post("/login", data={"api_key": "rs_000000000000_nope", "next": report})
    assert wrong.status_code == 401
    assert "not valid" in wrong.text
    assert "set-cookie" not in wrong.headers

    resp = client.post("/login", data={"api_key": key, "next": report})
    assert resp.status_code == 303
    assert resp.headers["location"] == report
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    parts = {p.strip().split("=")[0].lower() for p in cookie.split(";")}
    assert {"httponly", "samesite", "max-age", "path"} <= parts
    assert "samesite=lax" in cookie.lower()
    assert "secure" not in parts  # plain HTTP here; HTTPS below
    assert "max-age=43200" in cookie.lower()  # 12 hours

    page = client.get(report, headers=HTML)
    assert page.status_code == 200
    assert "logged in as <b>alice</b>" in page.text
    assert "action='/share-links/form'" in page.text  # the owner may share it
    assert client.get("/", headers=HTML).text.count(f"/evaluations/{mine}/report") == 1
    # The records the page links to open too (the poll's path takes the session's owner).
    record = client.get(f"/evaluations/{mine}")
    assert record.status_code == 200
    assert (record.json()["id"], record.json()["model_name"]) == (mine, "resnet-a")
    assert client.get(f"/evaluations/{mine}", headers=auth(key)).json()["id"] == mine
    # Another owner's private report stays hidden from this session.
    theirs = _evaluation(sqlite_url, "bob", public=False)
    assert client.get(f"/evaluations/{theirs}/report", headers=HTML).status_code == 404
    assert client.get(f"/evaluations/{theirs}").status_code == 404
    assert client.get(f"/trainings/{uuid.uuid4()}").status_code == 404
    client.cookies.clear()
    assert client.get(f"/evaluations/{mine}").status_code == 401  # no session, no key


def test_the_cookie_is_secure_over_https(app_settings: object, sqlite_url: str) -> None:
    key = new_key(sqlite_url, "alice")
    with TestClient(create_app(app_settings), base_url="https://testserver",  # type: ignore[arg-type]
                    follow_redirects=False) as c:
        resp = c.post("/login", data={"api_key": key})
    assert resp.status_code == 303
    assert "secure" in {p.strip().lower() for p in resp.headers["set-cookie"].split(";")}


def test_the_cookie_authorises_no_write(client: TestClient, sqlite_url: str) -> None:
    key = new_key(sqlite_url, "alice")
    mine = _evaluation(sqlite_url, "alice", public=False)
    _login(client, key)
    prefix = key.split("_")[1]
    writes = [("POST", "/evaluations", {"model_id": str(uuid.uuid4()), "dataset": "shapes-32",
                                        "suite": "standard"}),
              ("POST", f"/evaluations/{mine}/cancel", None),
              ("POST", "/keys", {"name": "stolen"}),
              ("DELETE", f"/keys/{prefix}", None),
              ("POST", "/share-links", {"evaluation_id": mine}),
              ("POST", "/sweeps", {"dataset": "shapes-32", "architecture": "small_cnn",
                                   "methods": ["standard"]})]
    for method, path, body in writes:
        resp = client.request(method, path, json=body, headers=HTML)
        assert resp.status_code == 401, (method, path, resp.status_code)
    # Nothing was written: the key is live, no key or link was made.
    assert client.get("/keys", headers=auth(key)).json()["items"][0]["revoked_at"] is None
    assert len(client.get("/keys", headers=auth(key)).json()["items"]) == 1
    assert client.get("/share-links", headers=auth(key)).json() == {"items": []}
    # A form posted from another site is refused before anything is read.
    cross = client.post("/login", data={"api_key": key},
                        headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    assert "set-cookie" not in cross.headers


def test_a_session_ends_at_logout_at_expiry_and_with_its_key(
        client: TestClient, sqlite_url: str) -> None:
    mine = _evaluation(sqlite_url, "alice", public=False)
    report = f"/evaluations/{mine}/report"
    sessions = make_sessionmaker(make_engine(sqlite_url))

    key = new_key(sqlite_url, "alice")
    token = _login(client, key)
    assert client.get(report, headers=HTML).status_code == 200
    out = client.post("/logout")
    assert out.status_code == 303
    assert out.headers["location"] == "/login"
    client.cookies.set(COOKIE, token)  # the old cookie, replayed
    assert client.get(report, headers=HTML).status_code == 303
    client.cookies.clear()

    _login(client, key)
    with sessions.begin() as s:
        s.execute(update(BrowserSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert client.get(report, headers=HTML).status_code == 303

    _login(client, key)
    assert client.get(report, headers=HTML).status_code == 200
    other = new_key(sqlite_url, "alice")
    prefix = key.split("_")[1]
    assert client.delete(f"/keys/{prefix}", headers=auth(other)).status_code == 204
    assert client.get(report, headers=HTML).status_code == 303


@pytest.mark.parametrize(("target", "expected"), [
    ("/evaluations/x/report?a=1", "/evaluations/x/report?a=1"),
    ("//evil.example/x", "/"), ("https://evil.example/", "/"), ("/\\evil.example", "/"),
    ("javascript:alert(1)", "/"), ("/ok\r\nSet-Cookie: x", "/"), ("", "/"),
])
def test_next_never_leaves_the_site(client: TestClient, sqlite_url: str, target: str,
                                    expected: str) -> None:
    assert safe_next(target) == expected
    key = new_key(sqlite_url, f"u-{uuid.uuid4().hex[:6]}")
    resp = client.post("/login", data={"api_key": key, "next": target})
    assert resp.headers["location"] == expected


def test_public_reports_and_the_leaderboard_open_to_anyone(
        client: TestClient, sqlite_url: str) -> None:
    public = _evaluation(sqlite_url, "alice", public=True, name="public-model")
    private = _evaluation(sqlite_url, "alice", public=False, name="private-model")
    page = client.get(f"/evaluations/{public}/report", headers=HTML)
    assert page.status_code == 200
    assert "Evaluation of public-model on shapes-32" in page.text
    assert "evaluation JSON" not in page.text  # the owner's records stay the owner's
    assert "action='/share-links/form'" not in page.text
    assert client.get(f"/evaluations/{private}/report", headers=HTML).status_code == 303
    board = client.get("/leaderboard/page?dataset=shapes-32&benchmark=clean&metric=accuracy",
                       headers=HTML)
    assert board.status_code == 200
    assert "public-model" in board.text
    assert "private-model" not in board.text
    _login(client, new_key(sqlite_url, "alice"))
    board = client.get("/leaderboard/page?dataset=shapes-32&benchmark=clean&metric=accuracy",
                       headers=HTML)
    assert "public-model" in board.text
    assert "private-model" in board.text


def test_a_public_sweep_opens_to_anyone(client: TestClient, sqlite_url: str) -> None:
    with make_sessionmaker(make_engine(sqlite_url)).begin() as s:
        rows = [Sweep(owner="alice", spec={"dataset": "shapes-32", "architecture": "small_cnn",
                                           "public": public}, training_ids=[])
                for public in (True, False)]
        s.add_all(rows)
        s.flush()
        public, private = (str(r.id) for r in rows)
    page = client.get(f"/sweeps/{public}/report", headers=HTML)
    assert page.status_code == 200
    assert "public: anyone can open this page" in page.text
    assert client.get(f"/sweeps/{private}/report", headers=HTML).status_code == 303


def test_share_links_open_a_private_report_until_revoked_or_expired(
        client: TestClient, sqlite_url: str) -> None:
    key = new_key(sqlite_url, "alice")
    mine = _evaluation(sqlite_url, "alice", public=False, name="secret-model")
    theirs = _evaluation(sqlite_url, "bob", public=False)

    made = client.post("/share-links", headers=auth(key), json={"evaluation_id": mine,
                                                                "days": 2})
    assert made.status_code == 201
    link = made.json()
    assert link["kind"] == "evaluation"
    assert link["target_id"] == mine
    assert link["url"].startswith("http://testserver/shared/")
    path = link["url"].removeprefix("http://testserver")
    page = client.get(path)  # no key, no session
    assert page.status_code == 200
    assert "Evaluation of secret-model on shapes-32" in page.text
    assert "shared by link: read-only" in page.text
    assert "log in" not in page.text
    assert "evaluation JSON" not in page.text
    # A guessed token, another owner's evaluation, too long a life: nothing.
    assert client.get("/shared/" + "A" * 43).status_code == 404
    assert client.post("/share-links", headers=auth(key), json={
        "evaluation_id": theirs}).status_code == 404
    too_long = client.post("/share-links", headers=auth(key), json={"evaluation_id": mine,
                                                                    "days": 91})
    assert too_long.status_code == 422
    assert too_long.json()["field"] == "days"

    listed = client.get("/share-links", headers=auth(key)).json()["items"]
    assert [(x["id"], x["revoked_at"]) for x in listed] == [(link["id"], None)]
    assert "url" not in listed[0]
    assert client.delete(f"/share-links/{link['id']}", headers=auth(key)).status_code == 204
    assert client.get(path).status_code == 404

    # The report page's form: the key typed into it authorises the link.
    form = client.post("/share-links/form", data={"api_key": key, "kind": "evaluation",
                                                  "target_id": mine, "days": "1"})
    assert form.status_code == 201
    url = form.text.split("class='share-url' readonly size='90' value='")[1].split("'")[0]
    assert client.get(url.removeprefix("http://testserver")).status_code == 200
    # Its page's revoke form (the key again) ends it.
    share_id = form.text.split("name='share_id' value='")[1].split("'")[0]
    revoked = client.post("/share-links/form", data={"api_key": key, "action": "revoke",
                                                     "share_id": share_id})
    assert revoked.status_code == 200
    assert "opens nothing from now on" in revoked.text
    assert client.get(url.removeprefix("http://testserver")).status_code == 404
    form = client.post("/share-links/form", data={"api_key": key, "kind": "evaluation",
                                                  "target_id": mine, "days": "1"})
    url = form.text.split("class='share-url' readonly size='90' value='")[1].split("'")[0]
    with make_sessionmaker(make_engine(sqlite_url)).begin() as s:
        s.execute(update(ShareLink).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert client.get(url.removeprefix("http://testserver")).status_code == 404
    # A sweep's page is shared the same way.
    with make_sessionmaker(make_engine(sqlite_url)).begin() as s:
        sweep = Sweep(owner="alice", spec={"dataset": "shapes-32", "architecture": "small_cnn"},
                      training_ids=[])
        s.add(sweep)
        s.flush()
        sweep_id = str(sweep.id)
    shared = client.post("/share-links", headers=auth(key), json={"sweep_id": sweep_id}).json()
    sweep_page = client.get(shared["url"].removeprefix("http://testserver"))
    assert sweep_page.status_code == 200
    assert "Sweep on shapes-32 (small_cnn)" in sweep_page.text
    assert "shared by link: read-only" in sweep_page.text
    assert client.get(f"/sweeps/{sweep_id}/report", headers=HTML).status_code == 303
    bad = client.post("/share-links/form", data={"api_key": "wrong", "kind": "evaluation",
                                                 "target_id": mine})
    assert bad.status_code == 401
    assert json.dumps(client.get("/share-links", headers=auth(key)).json()).count(
        '"revoked_at": null') == 2  # the expired one and the sweep's; the wrong key made none
