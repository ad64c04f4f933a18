"""The dashboard in headless Debian chromium (Playwright, tests/browser.py), against the
live server: log in with a token, the hosts table and its sorting, a host page whose
chart draws its points, probe pages with tokens coloured by gap beside the reference's
re-run. A screenshot of each page lands in test-artifacts/screenshots/."""

from __future__ import annotations

import pytest

from ..browser import chromium_page, screenshot


@pytest.fixture(scope="module")
def page(served):
    """A browser logged in through the login form with a reader token."""
    with chromium_page() as page:
        page.failed = []
        page.on("response", lambda r: page.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(f"{served.server.url}/hosts")
        assert "/login?next=%2Fhosts" in page.url  # no token yet: the login form
        page.fill("input[name=token]", "vt_wrong")
        page.click("button[type=submit]")
        assert "Unknown or revoked token" in page.inner_text("main")
        page.fill("input[name=token]", served.reader)
        page.click("button[type=submit]")
        page.wait_for_selector("table#hosts")
        assert page.url.endswith("/hosts")
        page.failed.clear()  # the refused token's 401
        yield page
    assert page.js_errors == []


def test_hosts_table_sorts_by_score_and_state(served, page):
    page.goto(f"{served.server.url}/hosts")
    rows = page.locator("table#hosts tbody tr")
    assert rows.count() == 5
    scores = [float(s) for s in rows.evaluate_all("rs => rs.map(r => r.dataset.score)") if s]
    assert scores == sorted(scores, reverse=True)  # by score, best first, by default
    assert rows.first.get_attribute("data-host") == "honest-a"
    screenshot(page, "dashboard-hosts")

    page.click("th a[data-sort=state]")
    page.wait_for_url("**sort=state**")
    states = page.locator("table#hosts tbody tr").evaluate_all("rs => rs.map(r => r.dataset.state)")
    order = ["new", "trusted", "probation", "flagged", "disabled"]
    assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)
    page.click("th a[data-sort=state]")  # again: the other way
    page.wait_for_url("**order=desc**")
    assert page.locator("table#hosts tbody tr").first.get_attribute("data-state") == "disabled"
    page.click(".filters a:text-is('flagged')")
    page.wait_for_url("**state=flagged**")
    assert page.locator("table#hosts tbody tr").evaluate_all("rs => rs.map(r => r.dataset.host)") == ["cheat-b"]
    assert page.failed == []


def test_host_page_draws_the_score_chart(served, page):
    page.goto(f"{served.server.url}/hosts/honest-a")
    page.wait_for_selector("#score-chart svg")
    answers = len(served.net.probes["honest-a"])
    assert page.locator("#score-chart circle.point-score").count() == answers
    assert page.locator("#score-chart circle.point-availability").count() == answers
    assert page.locator("#score-chart path.series-score").get_attribute("d").count("L") == answers - 1
    assert int(page.get_attribute("#score-chart", "data-points")) >= 3 * answers
    assert page.inner_text("#card-availability .value") != "-"
    assert page.locator("table#answers tbody tr").count() == answers
    assert "pass" in page.inner_text("table#answers") and "unscored" in page.inner_text("table#answers")
    screenshot(page, "dashboard-host")
    page.goto(f"{served.server.url}/hosts/cheat-b")
    page.wait_for_selector("#score-chart svg")
    assert "new → flagged" in page.inner_text("table#events")
    assert page.failed == []


def test_probe_pages_colour_tokens_by_gap(served, page):
    net = served.net
    page.goto(f"{served.server.url}/probes/{net.probes['cheat-b'][0]}")
    page.wait_for_selector("#answer span.tok")
    classes = page.locator("#answer span.tok").evaluate_all("ts => ts.map(t => t.className)")
    assert len(classes) > 5 and any(c.endswith(("g4", "g5")) for c in classes)  # a replayed answer
    assert "".join(page.locator("#answer span.tok").all_inner_texts()).strip() == net.texts[net.probes['cheat-b'][0]].strip()
    assert page.inner_text("#rerun").strip()  # the reference's re-run beside it
    assert "fail" in page.inner_text("#verdict")
    screenshot(page, "dashboard-probe")
    page.goto(f"{served.server.url}/probes/{net.probes['honest-a'][0]}")
    page.wait_for_selector("#answer span.tok")
    honest = page.locator("#answer span.tok").evaluate_all("ts => ts.map(t => t.className)")
    assert set(honest) <= {"tok g0", "tok g1"}  # the reference's own greedy answer: no gaps
    assert page.inner_text("#rerun").strip() == net.texts[net.probes['honest-a'][0]].strip()
    page.goto(f"{served.server.url}/probes/nope")
    assert "No probe" in page.inner_text("main")
    assert page.failed == [f"404 {served.server.url}/probes/nope"]
