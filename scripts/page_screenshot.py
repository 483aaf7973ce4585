"""The docs' screenshot of the QA page: the default model served over the demo collection (``make serve``'s), two
questions asked in headless Chromium (the first warms the collection up), the page saved after the second.

    .venv/bin/python scripts/page_screenshot.py [--output docs/img/server-page.png] [--chroma-path .chroma]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

from adaskip_rag.server.process import ServerProcess

QUESTIONS = [
    "In what country is Normandy located?",
    "What company was formed by the merger of Sky Television and British Satellite Broadcasting?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("docs/img/server-page.png"))
    parser.add_argument("--chroma-path", type=Path, default=Path(".chroma"))
    args = parser.parse_args()
    serve = ["--chroma-path", str(args.chroma_path), "--demo"]
    with ServerProcess(serve, cli_args=["--threads", "2"], timeout=600) as server, sync_playwright() as playwright:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url)
        page.wait_for_selector("#collection option[value=squad-demo]", state="attached")
        page.select_option("#collection", "squad-demo")
        for question in QUESTIONS:
            page.fill("#question", question)
            page.click("#go")
            page.wait_for_function("document.getElementById('status').textContent === 'Done.'", timeout=300_000)
        page.screenshot(path=str(args.output), full_page=True)
        browser.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
