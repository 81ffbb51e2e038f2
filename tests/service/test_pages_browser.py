"""The pages in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright
through ``executable_path``) against a live server with no network beyond it.

Each page must render, its charts must have tick values and axis titles, every chart's text
must fit inside its SVG, links must lead where they say, and the console must stay free of
errors. Every request the browser makes outside the server is refused and fails the test
(``/docs`` included: Swagger UI's files come from a package). Screenshots are not kept.
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
from core.tables import Evaluation, Result, Training
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


def _finish_sweep(sqlite_url: str) -> None:
    """Stand in for the workers: every training of the sweep succeeds, and its evaluation
    holds rows on both axes (values chosen per model)."""
    sessions = make_sessionmaker(make_engine(sqlite_url))
    with sessions.begin() as s:
        for i, t in enumerate(s.scalars(select(Training).order_by(Training.created_at))):
            ev = Evaluation(owner=t.owner, model_name=t.name, dataset=t.dataset,
                            dataset_params=t.dataset_params, split="test",
                            suite=t.evaluate or [], seed=0, status="succeeded", public=i == 0,
                            checks=[{"name": "degenerate_predictions", "passed": i != 2,
                                     "detail": "class 0 is predicted for 100.0% of 32 inputs",
                                     "entry": 0}],
                            artifacts={}, completed_entries=[], timings={}, options={
                                "n_examples": 32})
            s.add(ev)
            s.flush()
            rows: list[tuple[str, str, float, dict[str, Any]]] = [
                ("clean", "accuracy", 0.9 - 0.05 * i, {}),
                ("fg_bg_noise", "rfs", 0.3 - 0.1 * i, {"sigma": "mean"}),
                ("backgrounds", "bg_gap", 0.02 + 0.03 * i, {}),
                ("groups", "worst_group_accuracy", 0.6 - 0.05 * i, {})]
            rows += [("fg_bg_noise", "fg_noise_accuracy", 0.8 - 0.1 * k - 0.02 * i,
                      {"sigma": sigma}) for k, sigma in enumerate((0.125, 0.25, 0.5))]
            rows += [("adversarial", "robust_accuracy", max(0.0, 0.5 - 0.2 * k + 0.1 * i),
                      {"attack": "apgd-ce", "norm": norm, "eps": eps})
                     for norm, grid in (("l2", (0.25, 1.0)), ("linf", (2 / 255, 8 / 255)))
                     for k, eps in enumerate(grid)]
            for j, (bench, metric, value, p) in enumerate(rows):
                s.add(Result(evaluation_id=ev.id, entry_index=j, benchmark=bench,
                             metric=metric, value=value, params=p,
                             params_key=json.dumps(p, sort_keys=True)))
            t.status, t.evaluation_id, t.progress_fraction = "succeeded", ev.id, 1.0


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
    ticks: [...svg.querySelectorAll('.tick')].map(t => t.textContent),
    points: svg.querySelectorAll('.point').length,
    overflow,
  };
})"""


def test_pages_render_in_chromium_without_a_network(server: str, sqlite_url: str) -> None:
    key = new_key(sqlite_url, "alice")
    with httpx.Client(base_url=server, headers=auth(key)) as http:
        sweep = http.post("/sweeps", json={
            "dataset": "waterbirds-32", "architecture": "small_cnn",
            "methods": ["standard", "pgd"], "threats": {"l2": [0.25, 1.0],
                                                         "linf": [2 / 255, 8 / 255]},
            "epochs": 1, "n_examples": 32}).json()
        _finish_sweep(sqlite_url)
        table = http.get(f"/sweeps/{sweep['id']}").json()["table"]
    assert len(table) == 5
    first_eval = table[0]["evaluation_id"]

    outside: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(extra_http_headers=auth(key))

        def guard(route: Any) -> None:
            if route.request.url.startswith(server):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", guard)
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        # The sweep report: two scatter plots per norm, one point per model each.
        assert page.goto(f"{server}/sweeps/{sweep['id']}/report").status == 200
        charts = page.evaluate(CHECK_CHARTS)
        assert [c["label"] for c in charts] == [
            "Robust accuracy (l_2 eps 1) against RFS",
            "Robust accuracy (l_2 eps 1) against BG-gap",
            "Robust accuracy (l_inf eps 8/255) against RFS",
            "Robust accuracy (l_inf eps 8/255) against BG-gap"]
        for c in charts:
            assert c["points"] == 5
            assert c["yTitle"].startswith("robust accuracy, APGD ")
            assert c["xTitle"].startswith(("RFS:", "BG-gap:"))
            assert "0" in c["ticks"]
            assert "1" in c["ticks"]
            assert c["overflow"] == []
        assert page.locator("td.flag").all_inner_texts() == ["degenerate predictions"]
        assert page.locator("a.report").count() == 5

        # Its first report link leads to the evaluation report.
        page.locator("a.report").first.click()
        page.wait_for_load_state()
        assert page.url == f"{server}/evaluations/{first_eval}/report"
        assert "a seeded subset of 32 examples" in page.inner_text("body")
        charts = page.evaluate(CHECK_CHARTS)
        assert len(charts) == 5  # one per benchmark: clean, rfs, backgrounds, groups, adv
        lines = [c for c in charts if "against" in c["label"]]
        assert {c["xTitle"].split(",")[0] for c in lines} == {"eps", "sigma"}
        for c in charts:
            assert c["xTitle"]
            assert c["ticks"]
            assert c["overflow"] == []
        assert page.locator("p.meaning").count() == 5
        assert page.locator("a.sweep").get_attribute("href") == f"/sweeps/{sweep['id']}/report"
        assert page.locator("a.training").get_attribute("href") == (
            f"/trainings/{table[0]['training_id']}")
        assert page.locator("meta[http-equiv=refresh]").count() == 0

        # The leaderboard page: ranked rows with both axes.
        assert page.goto(f"{server}/leaderboard/page?dataset=waterbirds-32&metric=rfs"
                         "&benchmark=fg_bg_noise").status == 200
        rows = page.locator("table tr").all_inner_texts()
        assert len(rows) == 1 + 5
        assert rows[1].split("\t")[:4] == ["1", "small_cnn-standard", "alice (you)", "0.3000"]
        assert page.locator("select[name=dataset]").input_value() == "waterbirds-32"

        # /docs: Swagger UI from the package renders the API's title.
        assert page.goto(f"{server}/docs").status == 200
        page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
        assert "robustscope" in page.inner_text(".swagger-ui .info .title")
        browser.close()
    assert outside == []
    assert errors == []
