"""The web view in a real headless Chromium, served by the real `selfprog-cli serve`
over a lineage written through the store API (tests/support/lineage.py).

Browsing a finished run down to a candidate's diff, a running run's page following a
new iteration without a reload, a hostile candidate shown as text with no script
running, and the token. Every page a test opens is screenshotted and checked not blank.
"""
from __future__ import annotations

import json
import random
import re
import urllib.request

import pytest
from playwright.sync_api import expect

from pipeline.store import LineageStore
from tests.support.jsondoc import documented_keys
from tests.support.lineage import SEED, add_iteration, fill_run
from tests.support.web import assert_not_blank, browser, get, serve, watch_console

pytestmark = pytest.mark.timeout(300)


def shot(page, where: str) -> None:
    assert_not_blank(page.screenshot(full_page=True), where)


def no_problems(console: list[str]) -> None:
    # a CSP refusal, a failed fetch or a script error would be printed here
    assert not [m for m in console if m.startswith(("error:", "warning:", "pageerror:"))], \
        console


def test_browse_a_finished_run_down_to_a_candidate_diff(sqlite_url, tmp_path):
    store = LineageStore(sqlite_url, create=True)
    run_id = fill_run(store, iterations=3, candidates=4)
    other = fill_run(store, iterations=2, candidates=3, seed=1)
    store.close()
    with serve(sqlite_url, log_dir=tmp_path) as server, browser() as context:
        page = context.new_page()
        console = watch_console(page)
        page.goto(server.url + "/")
        rows = page.locator("#runs tbody tr")
        assert rows.count() == 2
        assert "completed" in page.locator("#runs").inner_text()
        shot(page, "runs")

        page.locator(f'a.run-link[href="/runs/{run_id}"]').click()
        page.wait_for_url(f"**/runs/{run_id}")
        # the iteration table of `show`: 3 iterations x 2 arms, then the figures
        assert page.locator("#iterations tbody tr").count() == 6
        assert page.locator("#lm-loss polyline").count() == 3
        assert page.locator("#scores circle").count() > 20
        assert page.locator("#tree circle.node").count() == 2 * 3 * 5
        store = LineageStore(sqlite_url, read_only=True)
        kept = sum(len(store.lineage(store.get_iteration(run_id, 2, arm).selected_id))
                   for arm in ("lm", "random"))
        assert page.locator("#tree circle.node.on-path").count() == kept
        shot(page, "run")

        target = store.candidates(run_id, iteration=1, arm="lm")[2]
        parent = store.get_candidate(target.parent_id)
        store.close()
        page.locator(f'#tree a[href="/candidates/{target.id}"]').click()
        page.wait_for_url(f"**/candidates/{target.id}")
        diff = page.locator("#diff").inner_text()
        changed = [line for line in target.source.splitlines()
                   if line not in parent.source.splitlines()]
        assert changed and all(f"+{line}" in diff for line in changed), diff
        assert page.locator("#diff .add").count() == len(changed)
        assert page.locator("#source").inner_text().strip() == target.source.strip()
        assert page.locator("#cand-status").inner_text() == target.status
        shot(page, "candidate")

        page.goto(f"{server.url}/compare?a={run_id}&b={other}")
        assert page.locator("#compare-chart polyline").count() == 2
        assert run_id[:12] in page.locator("#compare").inner_text()
        shot(page, "compare")
        no_problems(console)


def test_every_api_answer_has_the_documented_keys(sqlite_url, tmp_path):
    store = LineageStore(sqlite_url, create=True)
    run_id = fill_run(store, iterations=2, candidates=2)
    cand = store.candidates(run_id)[-1].id
    store.close()
    doc = documented_keys()
    with serve(sqlite_url, log_dir=tmp_path) as server:
        def api(path):
            status, body, headers = get(server.url + path)
            assert status == 200 and headers["content-type"] == "application/json", path
            return json.loads(body)

        assert all(frozenset(r) == doc["runs"][0] for r in api("/api/runs"))
        shown = api(f"/api/runs/{run_id}")
        assert frozenset(shown) == doc["show"][0]
        assert all(frozenset(r) == doc["iteration row"][0] for r in shown["iterations"])
        assert all(frozenset(c) == doc["candidates"][0]
                   for c in api(f"/api/runs/{run_id}/candidates"))
        assert frozenset(api(f"/api/candidates/{cand}")) == doc["candidates"][0]
        assert all(frozenset(s) == doc["lineage"][0]
                   for s in api(f"/api/candidates/{cand}/lineage"))
        assert frozenset(api(f"/api/runs/{run_id}/state")) == doc["web state"][0]
        assert frozenset(api(f"/api/compare?a={run_id}&b={run_id}")) == doc["web compare"][0]
        assert get(server.url + "/api/runs/nosuchrun")[0] == 404
        assert get(server.url + "/api/candidates/999999")[0] == 404


def test_a_running_run_page_shows_a_new_iteration_without_reload(database_url, tmp_path):
    store = LineageStore(database_url, create=True)
    rng = random.Random(0)
    run_id = fill_run(store, iterations=1, candidates=3, arms=("lm",), status="running")
    with serve(database_url, log_dir=tmp_path) as server, browser() as context:
        page = context.new_page()
        console = watch_console(page)
        page.goto(f"{server.url}/runs/{run_id}")
        assert page.locator("#iterations tbody tr").count() == 1
        assert page.locator("#run-status").inner_text() == "running"
        # a reload would lose this
        page.evaluate("window.__sameDocument = true")

        winner = store.get_iteration(run_id, 0).selected_id
        source = store.get_candidate(winner).source
        add_iteration(store, run_id, 1, source, winner, 3, rng, finish=False)
        expect(page.locator("#iterations tbody tr")).to_have_count(2, timeout=20000)
        assert "evaluating" in page.locator("#iterations tbody tr").nth(1).inner_text()
        assert page.locator("#tree circle.node").count() == 8
        shot(page, "live run")

        store.update_iteration(run_id, 1, stage="done", decision="kept",
                               selected_id=store.get_iteration(run_id, 1).incumbent_id)
        store.set_run_status(run_id, "completed")
        expect(page.locator("#run-status")).to_have_text("completed", timeout=20000)
        assert page.evaluate("window.__sameDocument") is True
        # finished: the page stops asking
        assert page.locator("#live").get_attribute("data-live") == "0"
        no_problems(console)
    store.close()


@pytest.mark.redis
def test_with_a_broker_a_live_page_gets_the_events_watch_prints(sqlite_url, redis_url, tmp_path):
    from pipeline import events
    store = LineageStore(sqlite_url, create=True)
    run_id = fill_run(store, iterations=1, candidates=2, arms=("lm",), status="running")
    store.close()
    with serve(sqlite_url, broker_url=redis_url, log_dir=tmp_path) as server:
        status, body, _ = get(f"{server.url}/runs/{run_id}")
        assert status == 200 and f'data-events-url="/api/runs/{run_id}/events"'.encode() in body
        with urllib.request.urlopen(f"{server.url}/api/runs/{run_id}/events", timeout=20) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.readline() == b": following\n"     # subscribed from here on
            events.configure(redis_url)
            try:
                events.emit(run_id, "candidate", iteration=1, index=2, status="evaluated",
                            score=1.5)
                events.emit("another-run", "stage", iteration=0, stage="training")
                events.emit(run_id, "stage", iteration=1, stage="selecting")
            finally:
                events.configure("")
            got = []
            while len(got) < 2:
                line = r.readline()
                if line.startswith(b"data: "):
                    got.append(json.loads(line[6:]))
        assert got == [{"event": "candidate", "iteration": 1, "index": 2,
                        "status": "evaluated", "score": 1.5},
                       {"event": "stage", "iteration": 1, "stage": "selecting"}]
    # without a broker the page polls, and says so
    with serve(sqlite_url, log_dir=tmp_path) as server:
        assert b"data-events-url" not in get(f"{server.url}/runs/{run_id}")[1]
        assert get(f"{server.url}/api/runs/{run_id}/events")[0] == 404


HOSTILE = ('x = "</script><script>window.__pwned = 1; alert(1)</script>"\n'
           'y = \'"><img src=x onerror="window.__pwned = 2">\'\n'
           'z = "javascript:window.__pwned = 3"\n'
           "<svg onload=\"window.__pwned = 4\"></svg>\n")


def test_a_hostile_candidate_is_shown_as_text_and_runs_no_script(sqlite_url, tmp_path):
    store = LineageStore(sqlite_url, create=True)
    run_id = store.create_run(config={"iterations": 1}, task="self", preset="quick", seed=0)
    store.set_run_status(run_id, "running")
    store.ensure_iteration(run_id, 0, source_in=SEED)
    inc = store.ensure_candidate(run_id, 0, 0, role="incumbent", source=SEED, parent_id=None,
                                 design={"width": 64})
    store.record_result(inc.id, status="evaluated", score=2.0)
    # the LM's text reaches the source, the design, the logs, the declaration and the reason
    hostile = store.ensure_candidate(run_id, 0, 1, role="candidate", source=SEED + HOSTILE,
                                     parent_id=inc.id, design={"width": HOSTILE})
    store.record_result(hostile.id, status="evaluated", score=1.0, logs=HOSTILE,
                        declaration={"note": HOSTILE})
    store.record_rescore(hostile.id, score=1.5, flagged=True, note=HOSTILE)
    store.update_iteration(run_id, 0, stage="done", incumbent_id=inc.id,
                           selected_id=hostile.id, decision="replaced")
    store.set_run_status(run_id, "completed")
    store.close()
    with serve(sqlite_url, log_dir=tmp_path) as server, browser() as context:
        page = context.new_page()
        console = watch_console(page)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        for path in (f"/candidates/{hostile.id}", f"/runs/{run_id}", "/",
                     f"/api/candidates/{hostile.id}"):
            page.goto(server.url + path)
            assert page.evaluate("window.__pwned") is None, path
            # the only script is the view's own file; no injected element exists
            scripts = page.evaluate("[...document.scripts].map(s => s.src)")
            assert all(s.endswith("/static/live.js") for s in scripts), (path, scripts)
            assert page.locator("img, svg[onload], [onerror]").count() == 0, path
            hrefs = page.evaluate(
                "[...document.querySelectorAll('[href]')].map(a => a.getAttribute('href'))")
            assert not [h for h in hrefs if not re.match(r"^/[\w/?=&.-]*$", h)], (path, hrefs)
            shot(page, path)
        page.goto(f"{server.url}/candidates/{hostile.id}")
        source = page.locator("#source").inner_text()
        for fragment in ("</script><script>window.__pwned = 1", '"><img src=x onerror=',
                         "javascript:window.__pwned = 3"):
            assert fragment in source
            assert fragment in page.locator("#diff").inner_text()
        for where in ("#reason", "#logs", "#declaration"):
            assert "</script><script>" in page.locator(where).inner_text(), where
        page.wait_for_timeout(500)   # an onerror or a timer would have fired by now
        assert page.evaluate("window.__pwned") is None
        assert not dialogs
        no_problems(console)


def test_the_token_when_one_is_set(sqlite_url, tmp_path):
    token = "s3cret-" + "x" * 24
    store = LineageStore(sqlite_url, create=True)
    run_id = fill_run(store, iterations=1, candidates=2)
    store.close()
    with serve(sqlite_url, token=token, log_dir=tmp_path) as server:
        for path in ("/", f"/runs/{run_id}", "/api/runs", f"/api/runs/{run_id}/state"):
            assert get(server.url + path)[0] == 401, path
            assert get(server.url + path, {"Authorization": "Bearer wrong"})[0] == 401, path
            assert get(server.url + path, {"Authorization": f"Bearer {token}x"})[0] == 401, path
            assert get(server.url + path, {"Authorization": f"Bearer {token}"})[0] == 200, path
        assert get(server.url + "/", {"Cookie": f"selfprog_web={token}"})[0] == 401

        with browser() as context:
            page = context.new_page()
            console = watch_console(page)
            response = page.goto(server.url + "/")
            assert response.status == 401
            shot(page, "token page")
            page.fill("input[name=token]", "wrong")
            with page.expect_response("**/login") as answer:
                page.click("button[type=submit]")
            assert answer.value.status == 401
            assert page.locator("#login-failed").count() == 1
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            page.wait_for_url(server.url + "/")
            assert page.locator("#runs tbody tr").count() == 1
            cookie = [c for c in context.cookies() if c["name"] == "selfprog_web"][0]
            assert cookie["httpOnly"] and token not in cookie["value"]
            page.goto(f"{server.url}/runs/{run_id}")
            assert page.locator("#iterations tbody tr").count() == 2
            # the console counts the deliberate 401s; anything else is a problem
            no_problems([m for m in console if "401" not in m])
        log = server.log()
    assert "GET /api/runs 401" in log and token not in log


def test_serve_refuses_other_interfaces_without_a_token(sqlite_url, tmp_path):
    import subprocess
    import sys
    from tests.support.web import REPO
    LineageStore(sqlite_url, create=True).close()
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "--database-url", sqlite_url,
                             "serve", "--host", "0.0.0.0", "--port", "1"],
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert "SELFPROG_WEB_TOKEN" in result.stderr


def test_a_foreign_host_name_is_refused_on_loopback(sqlite_url, tmp_path):
    # a DNS name rebound to 127.0.0.1 must not let a web page read the lineage
    LineageStore(sqlite_url, create=True).close()
    with serve(sqlite_url, log_dir=tmp_path) as server:
        assert get(server.url + "/api/runs", {"Host": "attacker.example"})[0] == 400
        assert get(server.url + "/api/runs")[0] == 200
