"""adaskip-rag over HTTP: OpenAI's chat and completion routes (streaming included) over one engine, the model list,
health and Prometheus metrics. Concurrent requests share the engine's batched forward steps.

Every answer (and the last chunk of a stream) carries an ``adaskip`` object: the request's SkipStats; an answer also
sends them, batch sizes aside, in the ``X-AdaSkip-Stats`` header (LangChain's ChatOpenAI keeps headers). Errors have
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (the field as
``param``), 401 for a missing or wrong key, 404 for an unknown model, 503 with ``Retry-After`` when more requests
wait than the server holds. A client that leaves a stream cancels its request before the next decode step."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from ..adapters import DEFAULT_COLLECTION, usage
from ..engine import AdaSkipEngine
from ..qa import Library
from ..streams import AsyncTextStream
from .admission import Admission, APIError, BodyLimit, bad_request
from .metrics import Metrics
from .openai import (
    ChatRequest,
    CompletionRequest,
    chat_response,
    chunk,
    completion_id,
    completion_response,
    finish_reason,
    tool_calls,
)
from .page import add_page

STATS_HEADER = "X-AdaSkip-Stats"


def create_app(
    engine: AdaSkipEngine,
    *,
    api_key: str | None = None,
    max_waiting: int = 32,
    library: Library | None = None,
    max_body_bytes: int = 16 * 2**20,
    replica: str | None = None,
) -> FastAPI:
    """The server's app over ``engine``: ``api_key`` (None: no key asked), ``max_waiting`` (requests beyond the
    engine's batch that may wait for it; more get a 503), ``library`` (Chroma collections the page at ``/`` asks
    questions of; None: the page says how to give it some), ``max_body_bytes`` (a larger request body is a 413),
    ``replica`` (a name added to every answer's ``adaskip`` object, where several replicas serve)."""
    tags = {"replica": replica} if replica else {}
    metrics = Metrics()
    admission = Admission(engine, engine.scheduler.limits.max_batch_size + max_waiting)
    app = FastAPI(title="adaskip-rag", summary="OpenAI-compatible server with adaptive sublayer skipping")
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return APIError(error.status_code, str(error.detail), kind, headers=dict(error.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        loc = [part for part in first.get("loc", ()) if part != "body"]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return APIError(400, message, param=param).response()

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")  # a known route's path: the label's values stay few whatever is asked
        metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    def authorized(authorization: str | None = Header(None)) -> None:
        if api_key is not None and authorization != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")

    def check_model(model: str) -> None:
        if model != engine.name:
            raise APIError(
                404, f"model {model!r} not found; this server serves {engine.name!r}", code="model_not_found"
            )

    async def serve(kind: Literal["chat", "completion"], body: ChatRequest | CompletionRequest, prompt: Any) -> Any:
        check_model(body.model)
        try:
            body.check()
            args = body.engine_arguments(engine.context_window)
        except ValueError as error:
            raise bad_request(error) from None
        if args.get("skip", True):
            args.setdefault("collection", DEFAULT_COLLECTION)
        stream = await admission.open(prompt, args)
        rid = completion_id("chatcmpl" if kind == "chat" else "cmpl")
        if body.stream:
            usage_chunk = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(events(kind, stream, rid, usage_chunk), media_type="text/event-stream")
        try:
            async for _ in stream:
                pass
        except ValueError as error:
            raise bad_request(error) from None
        finally:
            admission.release(stream)
        result = stream.finished
        metrics.served(result.stats)
        respond = chat_response if kind == "chat" else completion_response
        # the stats in a header too, for clients that keep only the fields they know (batch sizes left out)
        answer = respond(result, engine.name, rid)
        answer["adaskip"].update(tags)
        header = json.dumps({k: v for k, v in answer["adaskip"].items() if k != "batch_sizes"})
        return JSONResponse(answer, headers={STATS_HEADER: header})

    async def events(
        kind: Literal["chat", "completion"], stream: AsyncTextStream, rid: str, usage_chunk: bool
    ) -> AsyncIterator[str]:
        """Server-sent events of one answer: its deltas, a last chunk with the finish reason, tool calls and the
        ``adaskip`` stats, the usage chunk if asked for, then ``[DONE]``."""
        try:
            if kind == "chat":
                yield _event(chunk(kind, rid, engine.name, {"role": "assistant", "content": ""}))
            async for delta in stream:
                yield _event(chunk(kind, rid, engine.name, {"content": delta} if kind == "chat" else delta))
            result = stream.finished
            metrics.served(result.stats)
            calls = tool_calls(result)
            last = chunk(kind, rid, engine.name, ({"tool_calls": calls} if calls else {}) if kind == "chat" else "")
            last["choices"][0]["finish_reason"] = finish_reason(result)
            last["adaskip"] = {**result.stats.to_dict(), **tags}
            yield _event(last)
            if usage_chunk:
                yield _event({**chunk(kind, rid, engine.name, {}), "choices": [], "usage": usage(result.stats)})
            yield "data: [DONE]\n\n"
        except ValueError as error:  # a bad request found while generating, e.g. a schema no answer fits
            failed = bad_request(error)
            yield _event({"error": {"message": str(failed), "type": failed.kind, "param": failed.param, "code": None}})
        finally:
            admission.release(stream)

    add_page(app, engine, library, admission, metrics)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        model = {"id": engine.name, "object": "model", "created": int(time.time()), "owned_by": "adaskip-rag"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest) -> Any:
        try:
            messages = body.chat_messages()
        except ValueError as error:
            raise bad_request(error) from None
        return await serve("chat", body, messages)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest) -> Any:
        return await serve("completion", body, body.text)

    return app


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
