"""The docs' screenshot of the QA page: the default model served over the demo collection (``make serve``'s), two
questions asked in headless Chromium (the first warms the collection up), the page saved after the second.

    .venv/bin/python scripts/page_screenshot.py [--output docs/img/server-page.png] [--chroma-path .chroma]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

QUESTIONS = [
    "In what country is Normandy located?",
    "What company was formed by the merger of Sky Television and British Satellite Broadcasting?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("docs/img/server-page.png"))
    parser.add_argument("--chroma-path", type=Path, default=Path(".chroma"))
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = ["--threads", "2", "serve", "--port", str(port), "--chroma-path", str(args.chroma_path), "--demo"]
    server = subprocess.Popen([sys.executable, "-m", "adaskip_rag.cli", *command])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(1)
        with sync_playwright() as playwright:
            chromium = shutil.which("chromium") or shutil.which("chromium-browser")
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#collection option[value=squad-demo]", state="attached")
            page.select_option("#collection", "squad-demo")
            for question in QUESTIONS:
                page.fill("#question", question)
                page.click("#go")
                page.wait_for_function("document.getElementById('status').textContent === 'Done.'", timeout=300_000)
            page.screenshot(path=str(args.output), full_page=True)
            browser.close()
        print(f"wrote {args.output}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
