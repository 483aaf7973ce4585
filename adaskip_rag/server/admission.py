"""What the server's routes share: errors in OpenAI's shape, and the admission of requests up to a bound."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..engine import AdaSkipEngine
from ..streams import AsyncTextStream
from .openai import Unsupported

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


class Admission:
    """The requests the server holds (answering, or waiting for the engine), at most ``limit``."""

    def __init__(self, engine: AdaSkipEngine, limit: int):
        self.engine, self.limit, self.active = engine, limit, 0

    async def open(self, prompt: Any, args: dict[str, Any]) -> AsyncTextStream:
        """The request's stream, once the engine has checked it (a ValueError: 400) and the server has room (503)."""
        if self.active >= self.limit:
            raise APIError(
                503, f"the server holds {self.active} requests; retry shortly", "server_error", code="overloaded",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        self.active += 1
        try:
            stream = await asyncio.to_thread(self.engine.stream, prompt, **args)
        except ValueError as error:
            self.active -= 1
            raise bad_request(error) from None
        except BaseException:
            self.active -= 1
            raise
        return AsyncTextStream(stream)

    def release(self, stream: AsyncTextStream) -> None:
        stream.cancel()  # a no-op once the answer is done; else the engine stops before its next step
        self.active -= 1


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is a 413, counted as it arrives (a declared length and
    a chunked body alike), so no client makes the server read without end."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refusal().response()(scope, receive, send)
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, str(self.refusal()))  # the route's error handler answers it
            return message

        await self.app(scope, counted, send)

    def refusal(self) -> APIError:
        return APIError(413, f"request body over {self.limit} bytes", code="request_too_large")
