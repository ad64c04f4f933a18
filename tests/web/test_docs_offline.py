"""/docs works without internet access: Swagger UI's files come from the package
(swagger-ui-bundle), and in headless chromium with every non-loopback request blocked
the page still lists the API's operations."""

from __future__ import annotations

import re

import pytest

from validator.store import Store, upgrade
from validator.web.app import create_app

from ..browser import chromium_page
from .conftest import LiveServer


@pytest.fixture(scope="module")
def server(tmp_path_factory, registry):
    url = Store.default_url(tmp_path_factory.mktemp("docs") / "v.db")
    upgrade(url)
    store = Store(url)
    live = LiveServer(create_app(store, registry=registry))
    yield live
    live.stop()
    store.close()


def test_docs_page_references_only_its_own_assets(server):
    with server.client() as c:
        html = c.get("/docs").text
        assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)
        assert assets and all(a.startswith("/docs-assets/") for a in assets), assets
        assert "cdn" not in html.lower() and "https://" not in html
        for asset in assets:
            r = c.get(asset)
            assert r.status_code == 200 and len(r.content) > 100, asset


def test_docs_render_with_the_internet_blocked(server):
    outside: list[str] = []
    with chromium_page() as page:
        def route(r):
            if r.request.url.startswith(server.url):
                return r.continue_()
            outside.append(r.request.url)
            return r.abort()

        page.route("**/*", route)
        page.goto(server.url + "/docs")
        page.wait_for_selector("[data-path='/validator/v1/llm']", timeout=30_000)
        assert page.locator(".opblock").count() > 10
        assert not page.js_errors
    assert outside == []
