"""The pages in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright
through ``executable_path``) at 1280 x 800 against a live server with no network beyond it.

A person with only a browser and an API key logs in at ``/login`` and opens every page; an
anonymous one opens the public ones; a private report is shared by link and opened by someone
with no key. Each page must render, its charts must have tick values, axis titles and fixed
ranges, no text may be cut ("…") or overflow its chart, the table columns that matter must be
in view at 1280 px, links must lead where they say, and the console must stay free of errors.
Every request the browser makes outside the server is refused and fails the test (``/docs``
included: Swagger UI's files come from a package). Screenshots of every page are written to
the folder ``ROBUSTSCOPE_SCREENSHOTS`` names, when it is set.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select

from core.db import make_engine, make_sessionmaker
from core.tables import Dataset, Evaluation, Result, Training
from service.app import create_app
from tests.factories import auth, new_key, settings

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

if not shutil.which(CHROMIUM):
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; .ci/run installs the Debian package 'chromium'",
                    pytrace=False)
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    app = create_app(settings(sqlite_url, tmp_path))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


VIEWPORT = {"width": 1280, "height": 800}
SHOTS = os.environ.get("ROBUSTSCOPE_SCREENSHOTS")
EPS8 = 8 / 255


def _add_results(s: Any, ev: Evaluation, rows: list[tuple[int, str, str, float, dict[str, Any],
                                                          int | None]]) -> None:
    for j, (entry, bench, metric, value, p, n) in enumerate(rows):
        s.add(Result(evaluation_id=ev.id, entry_index=entry, benchmark=bench, metric=metric,
                     value=value, params=p, n=n,
                     params_key=json.dumps({**p, "_row": j}, sort_keys=True)))


def _finish_sweep(sqlite_url: str) -> None:
    """Stand in for the workers: every training of the sweep succeeds, and its evaluation
    holds rows on both axes (values chosen per model); the third model is flagged
    degenerate."""
    sessions = make_sessionmaker(make_engine(sqlite_url))
    with sessions.begin() as s:
        for i, t in enumerate(s.scalars(select(Training).order_by(Training.created_at))):
            ev = Evaluation(owner=t.owner, model_name=t.name, dataset=t.dataset,
                            dataset_params=t.dataset_params, split="test",
                            suite=t.evaluate or [], seed=0, status="succeeded", public=False,
                            checks=[{"name": "degenerate_predictions", "passed": i != 2,
                                     "detail": "class 0 is predicted for 100.0% of 32 inputs",
                                     "entry": 0}],
                            artifacts={}, completed_entries=[], timings={}, options={
                                "n_examples": 32})
            s.add(ev)
            s.flush()
            rows: list[tuple[int, str, str, float, dict[str, Any], int | None]] = [
                (0, "clean", "accuracy", 0.9 - 0.05 * i, {}, 32),
                (4, "fg_bg_noise", "rfs", 0.3 - 0.1 * i, {"sigma": "mean"}, None),
                (3, "backgrounds", "bg_gap", 0.02 + 0.03 * i, {}, None),
                (5, "groups", "worst_group_accuracy", 0.6 - 0.05 * i, {"group": "0/land"}, 8)]
            rows += [(4, "fg_bg_noise", metric, value - 0.1 * k - 0.02 * i, {"sigma": sigma}, n)
                     for k, sigma in enumerate((0.125, 0.25, 0.5))
                     for metric, value, n in (("fg_noise_accuracy", 0.8, 32),
                                              ("bg_noise_accuracy", 0.85, 32),
                                              ("rfs", 0.3, None))]
            rows += [(1 if norm == "l2" else 2, "adversarial", "robust_accuracy",
                      max(0.0, 0.5 - 0.2 * k + 0.1 * i),
                      {"attack": "apgd-ce", "norm": norm, "eps": eps}, 32)
                     for norm, grid in (("l2", (0.25, 1.0)), ("linf", (2 / 255, EPS8)))
                     for k, eps in enumerate(grid)]
            rows += [(entry, "adversarial", "clean_accuracy", 0.9 - 0.05 * i,
                      {"attack": "apgd-ce", "norm": norm}, 32)
                     for entry, norm in ((1, "l2"), (2, "linf"))]
            rows += [
                     (2, "adversarial", "forward_passes", 120.0,
                      {"attack": "apgd-ce", "norm": "linf", "eps": EPS8, "stage": "total",
                       "passes": 3840}, None)]
            _add_results(s, ev, rows)
            t.status, t.evaluation_id, t.progress_fraction = "succeeded", ev.id, 1.0


def _board(sqlite_url: str) -> dict[str, str]:
    """Public evaluations at the dataset's standard threat (AutoAttack, l_inf 8/255): a model
    that answers one class (flagged, and the highest robust accuracy) beside two working ones;
    and a failed evaluation on an uploaded dataset."""
    sessions = make_sessionmaker(make_engine(sqlite_url))
    out = {}
    suite = [{"benchmark": "clean"},
             {"benchmark": "adversarial", "attack": "autoattack", "norm": "linf", "eps": EPS8}]
    with sessions.begin() as s:
        for name, clean, robust, degenerate in (("one-class-2-epochs", 0.5, 0.5, True),
                                                ("resnet18-pgd-linf", 0.82, 0.41, False),
                                                ("resnet18-standard", 0.94, 0.02, False)):
            ev = Evaluation(owner="bob", model_name=name, dataset="waterbirds-32", suite=suite,
                            seed=0, status="succeeded", public=True, options={"n_examples": 200},
                            checks=[{"name": "degenerate_predictions", "passed": not degenerate,
                                     "detail": f"class 0 is predicted for "
                                               f"{'100.0' if degenerate else '52.0'}% of 200 "
                                               "inputs", "entry": e} for e in (0, 1)])
            s.add(ev)
            s.flush()
            _add_results(s, ev, [(0, "clean", "accuracy", clean, {}, 200),
                                 (1, "adversarial", "clean_accuracy", clean,
                                  {"attack": "autoattack", "norm": "linf"}, 200),
                                 (1, "adversarial", "robust_accuracy", robust,
                                  {"attack": "autoattack", "norm": "linf", "eps": EPS8}, 200)])
            out[name] = str(ev.id)
        ds = Dataset(owner="alice", name="my-birds", info={}, sha256="0" * 64, size_bytes=1,
                     storage_path="datasets/x.npz")
        s.add(ds)
        s.flush()
        failed = Evaluation(
            owner="alice", model_name="exported-vit", dataset=str(ds.id), dataset_id=ds.id,
            suite=suite, seed=0, status="failed", public=False, checks=[],
            error={"type": "model-crashed",
                   "detail": "RuntimeError: RuntimeError: shape '[1, 197, 768]' is invalid"})
        s.add(failed)
        s.flush()
        out["failed"] = str(failed.id)
    return out


CHECK_CHARTS = """() => [...document.querySelectorAll('svg.chart')].map(svg => {
  const w = svg.viewBox.baseVal.width, h = svg.viewBox.baseVal.height;
  const overflow = [...svg.querySelectorAll('text')].filter(t => {
    const b = t.getBBox();
    if (t.getAttribute('transform')) { return b.width > h + 1; }  // the rotated y title
    return b.x < -1 || b.x + b.width > w + 1 || b.y < -1 || b.y + b.height > h + 1;
  }).map(t => t.textContent);
  return {
    label: svg.getAttribute('aria-label'),
    xTitle: (svg.querySelector('.x-title') || {}).textContent || '',
    yTitle: (svg.querySelector('.y-title') || {}).textContent || '',
    xTicks: [...svg.querySelectorAll('.x-tick')].map(t => t.textContent),
    yTicks: [...svg.querySelectorAll('.y-tick')].map(t => t.textContent),
    points: svg.querySelectorAll('.point').length,
    references: svg.querySelectorAll('.reference').length,
    overflow,
  };
})"""

# The right edge of each table's header cells, to check what is in view at 1280 px.
HEADER_EDGES = """sel => [...document.querySelectorAll(sel + ' th')].map(th => {
  const b = th.getBoundingClientRect(); return [th.textContent, b.right]; })"""


class Browser:
    """One Chromium with the network cut at the server, collecting console errors."""

    def __init__(self, pw: Any, server: str) -> None:
        self.server = server
        self.browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        self.outside: list[str] = []
        self.errors: list[str] = []

    def context(self) -> Any:
        context = self.browser.new_context(viewport=VIEWPORT)

        def guard(route: Any) -> None:
            if route.request.url.startswith(self.server):
                route.continue_()
            else:
                self.outside.append(route.request.url)
                route.abort()

        context.route("**/*", guard)
        return context

    def page(self, context: Any) -> Any:
        page = context.new_page()
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" and
                "401" not in m.text and "404" not in m.text else None)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        return page


def shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def _clean_text(page: Any) -> None:
    """Nothing on the page is cut, and no error names its type twice."""
    text = page.inner_text("body")
    assert "…" not in text
    svg_text = page.evaluate("() => [...document.querySelectorAll('svg text')]"
                             ".map(t => t.textContent).join(' ')")
    assert "…" not in svg_text
    assert "RuntimeError: RuntimeError" not in text


def _log_in(page: Any, server: str, key: str, path: str) -> None:
    """Open ``path`` without a session: the login form, then back to ``path``."""
    resp = page.goto(f"{server}{path}")
    assert resp.status == 200
    assert page.url.startswith(f"{server}/login?next=")
    shot(page, "login")
    page.fill("input[name=api_key]", "rs_000000000000_wrong")
    page.click("button[type=submit]")
    assert "not valid" in page.inner_text("p.flag")
    page.fill("input[name=api_key]", key)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert page.url == f"{server}{path}"


def test_a_browser_logs_in_and_reads_the_sweep_its_reports_and_shares_one(
        server: str, sqlite_url: str) -> None:
    key = new_key(sqlite_url, "alice")
    with httpx.Client(base_url=server, headers=auth(key)) as http:
        sweep = http.post("/sweeps", json={
            "dataset": "waterbirds-32", "architecture": "small_cnn",
            "methods": ["standard", "pgd"], "threats": {"l2": [0.25, 1.0],
                                                         "linf": [2 / 255, EPS8]},
            "epochs": 1, "n_examples": 32}).json()
        _finish_sweep(sqlite_url)
        table = http.get(f"/sweeps/{sweep['id']}").json()["table"]
    assert len(table) == 5
    first_eval = table[0]["evaluation_id"]

    with sync_api.sync_playwright() as pw:
        b = Browser(pw, server)
        context = b.context()
        page = b.page(context)
        _log_in(page, server, key, f"/sweeps/{sweep['id']}/report")
        cookie, = context.cookies()
        assert (cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (True, "Lax", False)

        # The sweep report: per norm, two charts side by side on fixed ranges, the standard
        # model marked on each, one point per model.
        assert "logged in as alice" in page.inner_text("nav")
        shot(page, "sweep")
        charts = page.evaluate(CHECK_CHARTS)
        assert [c["label"] for c in charts] == [
            "Robust accuracy (l_2 eps 1) against RFS",
            "Robust accuracy (l_2 eps 1) against BG-gap",
            "Robust accuracy (l_inf eps 8/255) against RFS",
            "Robust accuracy (l_inf eps 8/255) against BG-gap"]
        for c in charts:
            assert c["points"] == 5
            assert c["references"] == 1
            assert c["yTitle"].startswith("robust accuracy, APGD-CE ")
            assert c["xTitle"].startswith(("RFS:", "BG-gap:"))
            assert (c["xTicks"][0], c["xTicks"][-1]) == ("-1", "1")
            assert (c["yTicks"][0], c["yTicks"][-1]) == ("0", "1")
            assert c["overflow"] == []
        boxes = page.eval_on_selector_all("svg.chart", "s => s.map(e => [e.getBoundingClientRect()"
                                          ".x, e.getBoundingClientRect().y])")
        assert boxes[0][1] == boxes[1][1]  # side by side
        assert boxes[0][0] < boxes[1][0]
        _clean_text(page)
        assert page.locator("td.flag").all_inner_texts() == ["degenerate predictions"]
        first = page.locator("table.models tr").nth(1).inner_text().split("\t")
        assert first[4].strip() == "0.900\n0.76 to 0.97"  # clean: 29 of 32, Wilson
        edges = dict(page.evaluate(HEADER_EDGES, "table.models"))
        assert edges["checks"] <= VIEWPORT["width"]  # in view at 1280 px
        assert page.locator("a.report").count() == 5

        # Its first report link leads to the evaluation report.
        page.locator("a.report").first.click()
        page.wait_for_load_state()
        assert page.url == f"{server}/evaluations/{first_eval}/report"
        shot(page, "report")
        text = page.inner_text("body")
        assert "a seeded subset of 32 examples" in text
        charts = page.evaluate(CHECK_CHARTS)
        assert [c["label"] for c in charts] == [
            "Accuracy with Gaussian noise on the object (fg) and on the background (bg) "
            "against sigma",
            "RFS (relative foreground sensitivity) against sigma",
            "Robust accuracy against eps (l_2; apgd-ce), clean accuracy at eps = 0",
            "Robust accuracy against eps (l_inf; apgd-ce), clean accuracy at eps = 0"]
        assert [c["points"] for c in charts] == [6, 3, 3, 3]  # eps = 0: the clean accuracy
        assert [(c["yTicks"][0], c["yTicks"][-1]) for c in charts] == [
            ("0", "1"), ("-1", "1"), ("0", "1"), ("0", "1")]
        assert [c["xTicks"][0] for c in charts] == ["0", "0", "0", "0"]
        for c in charts:
            assert c["overflow"] == []
        _clean_text(page)
        assert page.locator("li.check").all_inner_texts() == [
            "degenerate_predictions (entry 1: clean): passed. class 0 is predicted for 100.0% "
            "of 32 inputs\nFails when the model predicts one class for (nearly) every input: "
            "its accuracy is that class's share and its robust accuracy equals its clean "
            "accuracy, so neither means anything."]
        assert page.locator("table.cost").count() == 1
        assert "forward passes" in page.inner_text("table.cost")
        assert "forward_passes" not in " ".join(page.locator("table.results").all_inner_texts())
        assert "0.758 to 0.968" in page.inner_text("table.results")  # 29 of 32: Wilson
        assert page.locator("a.sweep").get_attribute("href") == f"/sweeps/{sweep['id']}/report"
        assert page.locator("a.training").get_attribute("href") == (
            f"/trainings/{table[0]['training_id']}")
        assert page.locator("meta[http-equiv=refresh]").count() == 0

        # The records it links to open in the session too.
        report_url = page.url
        for link in ("evaluation", "training"):
            page.click(f"nav a.{link}")
            page.wait_for_load_state()
            assert page.url.startswith(f"{server}/{link}s/")
            assert json.loads(page.inner_text("body"))["status"] == "succeeded"
            page.goto(report_url)

        # From the report to the leaderboard at its first threat, and to a comparison.
        page.click("nav a.compare")
        page.wait_for_load_state()
        assert page.inner_text("h1") == ("Leaderboard: robust_accuracy (adversarial) at "
                                         "apgd-ce, l_2 eps 0.25 on waterbirds-32")
        assert page.locator("table.board tr").count() == 1 + 5  # alice's five, private
        assert page.locator("table.board a.compare").count() == 4  # all but this one
        page.locator("table.board a.compare").first.click()
        page.wait_for_load_state()
        assert page.url.endswith(f"/compare/page?baseline={first_eval}")
        assert page.locator("table.compare tr").count() > 1
        # Ranked by RFS (no threat): robust accuracy beside it at the threat most measured.
        page.goto(f"{server}/leaderboard/page?dataset=waterbirds-32&benchmark=fg_bg_noise"
                  "&metric=rfs")
        head = page.locator("table.board tr").first.inner_text().split("\t")
        assert head[5] == "robust accuracy (apgd-ce, l_2 eps 0.25)"
        rows = [r.split("\t") for r in page.locator("table.board tr").all_inner_texts()[1:]]
        assert [r[0] for r in rows] == [  # by RFS, the degenerate one last
            "1 small_cnn-standard", "2 small_cnn-pgd-l2-0.25", "3 small_cnn-pgd-linf-0.007843",
            "4 small_cnn-pgd-linf-0.03137", "5 small_cnn-pgd-l2-1"]
        assert [r[5] for r in rows] == ["0.500", "0.600", "0.800", "0.900", "0.700"]
        assert [r[6] for r in rows] == ["0.300", "0.200", "0.000", "-0.100", "0.100"]  # RFS
        shot(page, "leaderboard-rfs")
        page.goto(report_url)

        # The cookie makes no write, even from the service's own page.
        status = page.evaluate("() => fetch('/evaluations', {method: 'POST', "
                               "headers: {'content-type': 'application/json'}, body: '{}'})"
                               ".then(r => r.status)")
        assert status == 401

        # Share the private report; someone with no key opens the link.
        page.fill("form.share input[name=api_key]", key)
        page.click("form.share button[type=submit]")
        page.wait_for_load_state()
        link = page.input_value("input.share-url")
        assert link.startswith(f"{server}/shared/")
        stranger = b.page(b.context())
        assert stranger.goto(link).status == 200
        shot(stranger, "shared-report")
        assert "shared by link: read-only" in stranger.inner_text("body")
        assert stranger.locator("form.share").count() == 0
        assert stranger.goto(f"{server}/evaluations/{first_eval}/report").status == 200
        assert stranger.url.startswith(f"{server}/login?next=")  # the report itself is private

        # Log out: the private page asks for a login again.
        page.goto(f"{server}/")
        shot(page, "home")
        assert page.locator("td", has_text="queued").count() == 0
        page.click("nav form button")
        page.wait_for_load_state()
        assert page.url == f"{server}/login"
        page.goto(f"{server}/sweeps/{sweep['id']}/report")
        assert page.url.startswith(f"{server}/login?next=")

        # /docs: Swagger UI from the package renders the API's title.
        assert page.goto(f"{server}/docs").status == 200
        page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
        assert "robustscope" in page.inner_text(".swagger-ui .info .title")
        b.browser.close()
    assert b.outside == []
    assert b.errors == []


def test_anyone_reads_the_public_leaderboard_and_compares_two_evaluations(
        server: str, sqlite_url: str) -> None:
    ids = _board(sqlite_url)
    with sync_api.sync_playwright() as pw:
        b = Browser(pw, server)
        page = b.page(b.context())
        assert page.goto(f"{server}/leaderboard/page?dataset=waterbirds-32").status == 200
        shot(page, "leaderboard")
        assert page.inner_text("h1") == ("Leaderboard: robust_accuracy (adversarial) at "
                                         "autoattack, l_inf eps 8/255 on waterbirds-32")
        rows = [r.split("\t") for r in page.locator("table.board tr").all_inner_texts()]
        assert rows[0] == ["rank · model", "failed checks", "robust_accuracy", "n",
                           "clean accuracy", "robust accuracy (autoattack, l_inf eps 8/255)",
                           "RFS", "BG-gap", "worst group", "owner", "links"]
        assert [r[0] for r in rows[1:]] == ["1 resnet18-pgd-linf", "2 resnet18-standard",
                                            "3 one-class-2-epochs"]
        assert [r[1] for r in rows[1:3]] == ["passed", "passed"]
        assert rows[3][1].strip().split("\n") == [
            "degenerate_predictions (entry 1: clean): class 0 is predicted for 100.0% of 200 "
            "inputs", "degenerate_predictions (entry 2: adversarial (autoattack, l_inf, eps "
            "8/255)): class 0 is predicted for 100.0% of 200 inputs"]
        assert rows[1][2].strip() == "0.4100\n95%: 0.344 to 0.479"  # 82 of 200: Wilson
        assert [r[3] for r in rows[1:]] == ["200", "200", "200"]
        assert page.locator("tr.flagged").count() == 1
        edges = dict(page.evaluate(HEADER_EDGES, "table.board"))
        assert max(edges.values()) <= VIEWPORT["width"]  # the whole table fits 1280 px
        assert "log in" in page.inner_text("nav")
        _clean_text(page)

        # A public report opens without a session, read-only.
        page.locator("table.board a.report").first.click()
        page.wait_for_load_state()
        assert page.url == f"{server}/evaluations/{ids['resnet18-pgd-linf']}/report"
        shot(page, "public-report")
        assert page.inner_text("h1") == "Evaluation of resnet18-pgd-linf on waterbirds-32"
        assert "public: anyone can open this report" in page.inner_text("body")
        assert page.locator("form.share").count() == 0
        assert page.locator("nav a.evaluation").count() == 0  # the owner's JSON record
        _clean_text(page)
        page.go_back()

        # Compare the second with the first, side by side.
        page.locator("a.compare").first.click()
        page.wait_for_load_state()
        assert page.url == (f"{server}/evaluations/{ids['resnet18-standard']}/compare/page"
                            f"?baseline={ids['resnet18-pgd-linf']}")
        shot(page, "compare")
        rows = [r.split("\t") for r in page.locator("table.compare tr").all_inner_texts()]
        assert rows[0] == ["metric", "resnet18-standard", "resnet18-pgd-linf",
                           "difference (resnet18-standard - resnet18-pgd-linf)", "p-value",
                           "better"]
        assert [r[0].split("\n")[0] for r in rows[1:]] == [
            "clean · accuracy", "adversarial · clean_accuracy", "adversarial · robust_accuracy"]
        assert rows[3][3].startswith("-0.3900")
        assert rows[3][5].startswith("resnet18-pgd-linf")
        _clean_text(page)
        b.browser.close()
    assert b.outside == []
    assert b.errors == []


def test_a_failed_evaluation_says_what_failed_and_what_to_do(server: str,
                                                             sqlite_url: str) -> None:
    ids = _board(sqlite_url)
    key = new_key(sqlite_url, "alice")
    with sync_api.sync_playwright() as pw:
        b = Browser(pw, server)
        page = b.page(b.context())
        _log_in(page, server, key, f"/evaluations/{ids['failed']}/report")
        shot(page, "failed-report")
        assert page.inner_text("h1") == "Evaluation of exported-vit on my-birds"
        box = page.inner_text("div.failure")
        assert ("model-crashed: RuntimeError: shape '[1, 197, 768]' is invalid") in box
        assert "What to do" in box
        assert "Run it locally on one batch" in box
        assert "No suite entry had finished; no result was recorded." in box
        assert "No check ran" in page.inner_text("body")
        _clean_text(page)
        b.browser.close()
    assert b.outside == []
    assert b.errors == []
