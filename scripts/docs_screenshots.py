"""Builds the documentation site, serves it on localhost and looks at it as a user would, in headless Chromium.

    python scripts/docs_screenshots.py OUT_DIR [--chromium /usr/bin/chromium]

Opens the home page, the Padding guide, the Performance guide's plots, an API page, the search and the dark
palette; checks that the navigation tabs lead somewhere, that the search box finds a query, that code is
highlighted, that every plot image loaded (naturalWidth > 0) and that the light/dark toggle switches; and
writes one PNG per view to OUT_DIR for a person to look at before a release. Exits 1, naming each failed
check, if any fails. Needs the `docs` extra and Python playwright (`pip install playwright`; it drives the
Chromium given, and downloads no browser of its own).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def build(site: Path) -> None:
    # Not --strict: tests/test_docs.py judges the warnings; here the pages only need to exist.
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--no-strict", "--quiet", "-d", str(site)],
                   cwd=ROOT, check=True)


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per request would bury the checks' output
        pass


def look(base: str, out: Path, chromium: str) -> list:
    """Returns the failed checks; writes the screenshots."""
    from playwright.sync_api import sync_playwright

    failures = []

    def check(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        # Nothing but the repository widget's star count (api.github.com) may come from outside localhost:
        # fonts and scripts are served by the site itself.
        outside = []
        page.on("request", lambda request: None if request.url.startswith((base, "data:", "https://api.github.com/"))
                else outside.append(request.url))

        page.goto(base + "/", wait_until="networkidle")
        tabs = page.locator(".md-tabs__link")
        check(tabs.count() >= 4, f"home: {tabs.count()} navigation tabs (Home, Getting started, Guides, API...)")
        page.screenshot(path=str(out / "home.png"), full_page=False)

        page.locator(".md-tabs__link", has_text="Guides").first.click()
        page.wait_for_load_state("networkidle")
        check("/padding/" in page.url, f"navigation: the Guides tab opens its first guide ({page.url})")

        page.goto(base + "/padding/", wait_until="networkidle")
        highlighted = page.locator(".md-content .highlight code span[class]").count()
        check(highlighted > 0, f"guide: {highlighted} highlighted spans in the Padding guide's code blocks")
        page.locator("h2", has_text="Teacher forcing").first.scroll_into_view_if_needed()
        # Scrolled past the first heading, the header swaps the site name for the page title: wait until it
        # has, so that the screenshot shows no half-faded mix of the two.
        page.wait_for_selector(".md-header__title--active")
        page.wait_for_function("() => document.getAnimations().every(a => a.playState !== 'running')")
        page.screenshot(path=str(out / "guide.png"), full_page=False)

        page.goto(base + "/performance/", wait_until="networkidle")
        images = page.eval_on_selector_all(".md-content img", "imgs => imgs.map(i => [i.src, i.naturalWidth])")
        check(len(images) >= 3, f"performance: {len(images)} plot images")
        for src, width in images:
            check(width > 0, f"performance: image {src.rsplit('/', 1)[-1]} rendered, naturalWidth {width}")
        page.locator("img[src*='classes']").first.scroll_into_view_if_needed()
        page.screenshot(path=str(out / "plot.png"), full_page=False)

        page.goto(base + "/api/functions/", wait_until="networkidle")
        check(page.locator("[id='tf_seqloss.sequence_loss']").count() == 1, "api: sequence_loss has its entry")
        signature = page.locator(".doc-signature span[class]").count()
        check(signature > 0, f"api: highlighted signature ({signature} spans)")
        page.screenshot(path=str(out / "api.png"), full_page=False)

        page.goto(base + "/", wait_until="networkidle")
        page.locator(".md-search__input").first.click(force=True)
        page.keyboard.type("padding_id")  # typed key by key: the search listens to key events
        page.wait_for_selector(".md-search-result__item", timeout=15000)
        results = page.locator(".md-search-result__item").count()
        check(results > 0, f"search: 'padding_id' gives {results} results")
        page.screenshot(path=str(out / "search.png"), full_page=False)

        page.goto(base + "/getting-started/", wait_until="networkidle")
        before = page.evaluate("() => document.body.getAttribute('data-md-color-scheme')")
        page.locator("label.md-header__button[for^='__palette']:visible").first.click()
        page.wait_for_function(f"() => document.body.getAttribute('data-md-color-scheme') !== '{before}'")
        after = page.evaluate("() => document.body.getAttribute('data-md-color-scheme')")
        check((before, after) == ("default", "slate"), f"palette toggle: {before} -> {after}")
        page.wait_for_function("() => document.getAnimations().every(a => a.playState !== 'running')")
        page.screenshot(path=str(out / "dark.png"), full_page=False)

        check(not outside, f"no request left localhost ({outside[:3]})")
        browser.close()
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the PNGs (created if missing)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium to drive (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        site = Path(folder) / "site"
        build(site)
        server = serve(site)
        try:
            failures = look(f"http://127.0.0.1:{server.server_address[1]}", args.out, args.chromium)
        finally:
            server.shutdown()
    print(f"screenshots in {args.out}: " + ", ".join(sorted(path.name for path in args.out.glob("*.png"))))
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
