"""adaskip-rag over HTTP: OpenAI's chat and completion routes (streaming included) over one engine, the model list,
health and Prometheus metrics. Concurrent requests share the engine's batched forward steps.

Every answer (and the last chunk of a stream) carries an ``adaskip`` object: the request's SkipStats; an answer also
sends them, batch sizes aside, in the ``X-AdaSkip-Stats`` header (LangChain's ChatOpenAI keeps headers). Errors have
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (the field as
``param``), 401 for a missing or wrong key, 404 for an unknown model, 503 with ``Retry-After`` when more requests
wait than the server holds. A client that leaves a stream cancels its request before the next decode step."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..adapters import DEFAULT_COLLECTION, usage
from ..engine import AdaSkipEngine
from ..streams import AsyncTextStream
from .metrics import Metrics
from .openai import (
    ChatRequest,
    CompletionRequest,
    Unsupported,
    chat_response,
    chunk,
    completion_id,
    completion_response,
    finish_reason,
    tool_calls,
)

STATS_HEADER = "X-AdaSkip-Stats"
# the engine's argument names in its error messages, as the request fields that set them
_FIELDS = {
    "max_new_tokens": "max_tokens",
    "json_schema": "response_format",
    "schema": "response_format",
    "messages": "messages",
    "prompt": "messages",
    "tools": "tools",
    "tool_choice": "tool_choice",
    "parallel_tool_calls": "parallel_tool_calls",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "collection": "collection",
    "budget": "adaskip.budget",
    "quality_target": "adaskip.quality_target",
    "skip": "adaskip.skip",
}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers

    def response(self) -> JSONResponse:
        error = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def bad_request(error: ValueError) -> APIError:
    """A 400 for the engine's (or the request's) ValueError, the field it names as ``param``."""
    if isinstance(error, Unsupported):
        return APIError(400, str(error), param=error.param)
    message = str(error)
    for word in re.findall(r"[a-z_]+(?:\[\d+\])?", message):
        if word.split("[")[0] in _FIELDS:
            return APIError(400, message, param=word if "[" in word else _FIELDS[word])
    return APIError(400, message)


def create_app(engine: AdaSkipEngine, *, api_key: str | None = None, max_waiting: int = 32) -> FastAPI:
    """The server's app over ``engine``: ``api_key`` (None: no key asked), ``max_waiting`` (requests beyond the
    engine's batch that may wait for it; more get a 503)."""
    metrics = Metrics()
    limit = engine.scheduler.limits.max_batch_size + max_waiting
    active = 0  # requests the server holds: answering, or waiting for the engine
    app = FastAPI(title="adaskip-rag", summary="OpenAI-compatible server with adaptive sublayer skipping")

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

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

    async def open_stream(prompt: Any, args: dict[str, Any]) -> AsyncTextStream:
        """The request's stream, once the engine has checked it (a ValueError: 400) and the server has room."""
        nonlocal active
        if active >= limit:
            raise APIError(
                503, f"the server holds {active} requests; retry shortly", "server_error", code="overloaded",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        if args.get("skip", True):
            args.setdefault("collection", DEFAULT_COLLECTION)
        active += 1
        try:
            stream = await asyncio.to_thread(engine.stream, prompt, **args)
        except ValueError as error:
            active -= 1
            raise bad_request(error) from None
        except BaseException:
            active -= 1
            raise
        return AsyncTextStream(stream)

    def release(stream: AsyncTextStream) -> None:
        nonlocal active
        stream.cancel()  # a no-op once the answer is done; else the engine stops before its next step
        active -= 1

    async def serve(kind: Literal["chat", "completion"], body: ChatRequest | CompletionRequest, prompt: Any) -> Any:
        check_model(body.model)
        try:
            body.check()
            args = body.engine_arguments(engine.context_window)
        except ValueError as error:
            raise bad_request(error) from None
        stream = await open_stream(prompt, args)
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
            release(stream)
        result = stream.finished
        metrics.served(result.stats)
        respond = chat_response if kind == "chat" else completion_response
        # the stats in a header too, for clients that keep only the fields they know (batch sizes left out)
        header = json.dumps({k: v for k, v in result.stats.to_dict().items() if k != "batch_sizes"})
        return JSONResponse(respond(result, engine.name, rid), headers={STATS_HEADER: header})

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
            last["adaskip"] = result.stats.to_dict()
            yield _event(last)
            if usage_chunk:
                yield _event({**chunk(kind, rid, engine.name, {}), "choices": [], "usage": usage(result.stats)})
            yield "data: [DONE]\n\n"
        except ValueError as error:  # a bad request found while generating, e.g. a schema no answer fits
            failed = bad_request(error)
            yield _event({"error": {"message": str(failed), "type": failed.kind, "param": failed.param, "code": None}})
        finally:
            release(stream)

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
