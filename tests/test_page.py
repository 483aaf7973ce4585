"""The QA page in headless Chromium (Debian's package, driven by Playwright): a question asked of a small Chroma
collection streams its answer beside its passages, its skip stats and the collection's learned profile."""

from __future__ import annotations

import os
import shutil

import chromadb
import httpx
import pytest
from test_server import Served, engine_for_server

from adaskip_rag.qa import Library
from adaskip_rag.server import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PASSAGES = [
    ("foxes", "The quick brown fox jumps over the lazy dog every morning."),
    ("bread", "Sourdough bread needs a starter, flour, water and salt."),
    ("rivers", "The Danube flows through ten countries into the Black Sea."),
]


@pytest.fixture(scope="module")
def page_server(tokenizer, tmp_path_factory, minilm_path):
    library = Library(chromadb.PersistentClient(path=str(tmp_path_factory.mktemp("chroma"))))
    assert library.add("animals", PASSAGES) == 3
    engine = engine_for_server(tokenizer, tmp_path_factory)
    served = Served(create_app(engine, library=library))
    yield served, engine
    served.stop()


def test_page_routes_retrieve_and_stream(page_server):
    served, _ = page_server
    info = httpx.get(f"{served.url}/api/collections").json()
    assert info["collections"] == [{"name": "animals", "passages": 3}] and info["layers"] == 6
    body = {"collection": "animals", "question": "What jumps over the dog?", "max_tokens": 6}
    events = httpx.post(f"{served.url}/api/ask", json=body, timeout=60).text.split("\n\n")
    kinds = [e.split("\n")[0] for e in events if e]
    assert kinds[0] == "event: passages" and kinds[-1] == "event: stats" and "event: delta" in kinds
    assert '"source": "foxes"' in events[0].split("\n")[1][:200]  # the nearest passage first
    profile = httpx.get(f"{served.url}/api/profile/animals").json()
    assert profile["queries"] >= 1 and len(profile["attn"]) == 6 and all(v is not None for v in profile["ffn"])
    missing = httpx.post(f"{served.url}/api/ask", json={**body, "collection": "nowhere"}, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "collection"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (.ci/run installs it)")
def test_the_page_answers_in_a_real_browser(page_server, tmp_path):
    from playwright.sync_api import sync_playwright

    served, engine = page_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(served.url)
            page.wait_for_selector("#collection option[value=animals]", state="attached")
            page.fill("#question", "What jumps over the lazy dog?")
            page.click("#go")
            page.wait_for_function("document.getElementById('status').textContent === 'Done.'", timeout=60_000)
            assert page.inner_text("#answer").strip()
            passages = page.locator("#passages li")
            assert passages.count() == 3 and "foxes" in passages.first.inner_text()
            stats = page.inner_text("#stats")
            assert "mode" in stats and "time to first token" in stats and "skipped sublayers" in stats
            assert page.locator("#heatmap .cell").count() == 2 * engine.num_layers
            assert "queries learned" in page.inner_text("#learned")
            page.screenshot(
                path=os.environ.get("ADASKIP_PAGE_SCREENSHOT") or str(tmp_path / "page.png"), full_page=True
            )
        finally:
            browser.close()
