"""Pages drawn in a real Chromium with the network refused: what a person offline sees."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

#: Hosts a page under test may reach: the project's servers listen on loopback.
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def loopback_only(context, refused: list[str]) -> None:
    """Refuse, and record in ``refused``, every request of ``context`` (a Playwright browser
    context) that leaves loopback: a page of `mlflow ui` must not call out (fonts from a CDN,
    telemetry), and a test must never send traffic off this machine."""

    def route(route) -> None:
        url = route.request.url
        scheme, host = urlsplit(url).scheme, urlsplit(url).hostname or ""
        if scheme in ("data", "blob", "about") or host in LOOPBACK or host.startswith("127."):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    context.route("**/*", route)


def draw(page: Path) -> tuple[int, list[str]]:
    """Open ``page`` in Chromium with every network request refused; return how many Vega
    charts it drew and the page's errors (a script that failed, a request refused)."""
    if not Path("/usr/bin/chromium").exists():
        if os.environ.get("MNIST_REQUIRE_SERVICES"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []

    def only_files(route) -> None:
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            errors.append(f"request refused: {route.request.url}")
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        try:
            context = browser.new_context(offline=True)
            context.route("**/*", only_files)
            tab = context.new_page()
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto(page.as_uri(), wait_until="load")
            tab.wait_for_selector(".vega-embed svg, .vega-embed canvas", timeout=15_000)
            return tab.locator(".vega-embed svg.marks, .vega-embed canvas.marks").count(), errors
        finally:
            browser.close()
