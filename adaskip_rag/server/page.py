"""The QA page at ``/``: pick a Chroma collection, ask, watch the answer stream beside the passages it came from, the
request's skip stats and a heatmap of what the collection has learned. Its routes retrieve and generate server-side.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, Field

from ..corpora import rag_messages
from ..engine import AdaSkipEngine
from ..profiles import KINDS, check_collection
from ..qa import Library
from .admission import Admission, APIError
from .metrics import Metrics

STORE_SECONDS = 5.0  # longest the page waits for a profile from the store


class Question(BaseModel):
    collection: str
    question: str = Field(min_length=1, max_length=4000)
    passages: int = Field(default=4, ge=1, le=16)
    max_tokens: int = Field(default=128, ge=1, le=1024)


def add_page(
    app: FastAPI, engine: AdaSkipEngine, library: Library | None, admission: Admission, metrics: Metrics
) -> None:
    """The page and its routes: ``GET /``, ``GET /api/collections``, ``GET /api/profile/{collection}``,
    ``POST /api/ask`` (server-sent events: ``passages``, ``delta`` s, then ``stats`` or ``error``)."""
    page = files(__package__).joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/api/collections")
    async def collections() -> dict[str, Any]:
        found = await asyncio.to_thread(library.collections) if library else []
        return {"model": engine.name, "layers": engine.num_layers, "collections": found, "chroma": library is not None}

    @app.get("/api/profile/{collection}")
    async def profile(collection: str) -> dict[str, Any]:
        """Per layer, how much each sublayer changes the hidden state (1 - mean IO similarity; None: not measured)."""
        try:
            check_collection(collection)
            learner = engine.learner
            stored = await asyncio.wait_for(
                asyncio.to_thread(learner.store.get, engine.fingerprint, collection), STORE_SECONDS
            )
        except ValueError as error:
            raise APIError(400, str(error), param="collection") from None
        except Exception as error:  # a store that fails or does not answer: the page shows no heatmap
            return {"collection": collection, "queries": 0, "error": f"profile store: {type(error).__name__}"}
        importance: dict[str, list[float | None]] = {kind: [None] * engine.num_layers for kind in KINDS}
        for (kind, layer), similarity in (stored.mean() if stored else {}).items():
            importance[kind][layer] = 1 - similarity
        return {"collection": collection, "queries": stored.queries if stored else 0, **importance}

    @app.post("/api/ask")
    async def ask(body: Question) -> StreamingResponse:
        if library is None:
            raise APIError(400, "the server has no Chroma store: start it with --chroma-path or --chroma-host")
        try:
            found = await asyncio.to_thread(library.retrieve, body.collection, body.question, body.passages)
        except ValueError as error:
            raise APIError(400, str(error), param="collection") from None
        messages = rag_messages("\n\n".join(p.text for p in found), body.question)
        args = {"collection": body.collection, "max_new_tokens": body.max_tokens, "temperature": 0.0}
        start = time.perf_counter()
        stream = await admission.open(messages, args)

        async def events() -> AsyncIterator[str]:
            try:
                yield _event("passages", [dataclasses.asdict(p) for p in found])
                first = None
                async for delta in stream:
                    first = first or time.perf_counter() - start
                    yield _event("delta", delta)
                stats = stream.finished.stats
                metrics.served(stats)
                yield _event("stats", {**stats.to_dict(), "time_to_first_token": first})
            except ValueError as error:
                yield _event("error", str(error))
            finally:
                admission.release(stream)

        return StreamingResponse(events(), media_type="text/event-stream")


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"
