"""OpenAI's chat and completion requests as the engine's arguments, and the engine's results as OpenAI's responses.

Fields the server does not support (``n`` > 1, ``logprobs``, audio, images, penalties other than 0, a logit bias)
are refused with the field named; fields it does not know are ignored, as OpenAI's servers do. AdaSkip's own:
``collection`` (the profile a request learns into and is skipped by) and ``adaskip`` (``skip``, ``budget``,
``quality_target``)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..adapters import tool_call_entry, usage
from ..generation import GenerationResult

FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}  # the engine's reasons, OpenAI's names


class Unsupported(ValueError):
    """A request field the server does not serve; ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AdaSkipOptions(_Open):
    skip: bool = True
    budget: int | float | None = None
    quality_target: float | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class _Sampling(_Open):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    collection: str | None = None
    adaskip: AdaSkipOptions = Field(default_factory=AdaSkipOptions)

    def check(self) -> None:
        """:class:`Unsupported` naming the first field set to what the server does not serve."""
        if self.n != 1:
            raise Unsupported("n", f"n must be 1 (one choice per request), got {self.n}")
        if self.logprobs:
            raise Unsupported("logprobs", "logprobs are not supported")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise Unsupported(name, f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise Unsupported("logit_bias", "logit_bias is not supported")

    def engine_arguments(self, window: int) -> dict[str, Any]:
        """The engine's generation arguments; an answer limit above the context window stops where it ends."""
        args: dict[str, Any] = {
            "max_new_tokens": window if self.max_tokens is None else min(self.max_tokens, window),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "skip": self.adaskip.skip,
            "budget": self.adaskip.budget,
            "quality_target": self.adaskip.quality_target,
        }
        if self.collection is not None:
            args["collection"] = self.collection
        return args


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    top_logprobs: int | None = None

    def check(self) -> None:
        super().check()
        if self.audio is not None or (self.modalities and self.modalities != ["text"]):
            raise Unsupported("modalities", "only text answers are supported")
        if self.top_logprobs:
            raise Unsupported("top_logprobs", "logprobs are not supported")

    def engine_arguments(self, window: int) -> dict[str, Any]:
        args = super().engine_arguments(window)
        if self.max_completion_tokens is not None:
            args["max_new_tokens"] = min(self.max_completion_tokens, window)
        if self.tools:
            args.update(tools=self.tools, tool_choice=self.tool_choice, parallel_tool_calls=self.parallel_tool_calls)
        elif self.tool_choice not in (None, "none"):
            raise Unsupported("tool_choice", "tool_choice needs tools")
        schema = response_schema(self.response_format)
        if schema is not None:
            args["json_schema"] = schema
        return args

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them: text content (parts joined), an assistant's tool calls with
        their arguments as objects, a tool result's call id."""
        chat = []
        for i, m in enumerate(self.messages):
            entry: dict[str, Any] = {"role": m.get("role"), "content": _text(m.get("content"), f"messages[{i}]")}
            for j, call in enumerate(m.get("tool_calls") or []):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise Unsupported(f"messages[{i}].tool_calls[{j}]", "a tool call needs function.name")
                arguments = function.get("arguments") or "{}"
                try:
                    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                except json.JSONDecodeError:
                    pass  # the template renders what the model said, parsed or not
                entry.setdefault("tool_calls", []).append(tool_call_entry(call.get("id"), function["name"], arguments))
            if m.get("tool_call_id") is not None:
                entry["tool_call_id"] = m["tool_call_id"]
            chat.append(entry)
        return chat


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise Unsupported("prompt", "prompt must be one string (a list of one)")
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise Unsupported(name, f"{name} is not supported")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of", "best_of must be 1")

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema an answer must follow under ``response_format`` (None: free text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") if response_format else None
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise Unsupported("response_format.json_schema", "json_schema needs a 'schema' object")
        return spec.get("schema") or {"type": "object"}
    raise Unsupported(
        "response_format.type", f"response_format.type must be text, json_object or json_schema, got {kind!r}"
    )


def _text(content: Any, where: str) -> str | None:
    """A message's content as text: a string, or the text of its parts (any other part is refused)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Unsupported(f"{where}.content", "content must be a string or a list of text parts")
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise Unsupported(f"{where}.content[{k}]", "only text content parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def completion_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def tool_calls(result: GenerationResult) -> list[dict[str, Any]]:
    """The answer's tool calls as OpenAI's message carries them (arguments as JSON text)."""
    return [
        {
            "index": i,
            "id": call["id"],
            "type": "function",
            "function": {
                "name": call["name"],
                "arguments": call["arguments"] if isinstance(call["arguments"], str) else json.dumps(call["arguments"]),
            },
        }
        for i, call in enumerate([*result.tool_calls, *result.invalid_tool_calls])
    ]


def finish_reason(result: GenerationResult) -> str:
    return "tool_calls" if result.tool_calls else FINISH.get(result.stats.finish_reason, "stop")


def chat_response(result: GenerationResult, model: str, rid: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.text}
    calls = tool_calls(result)
    if calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(result), "logprobs": None}],
        "usage": usage(result.stats),
        "adaskip": result.stats.to_dict(),
    }


def completion_response(result: GenerationResult, model: str, rid: str) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": result.text, "finish_reason": finish_reason(result), "logprobs": None}],
        "usage": usage(result.stats),
        "adaskip": result.stats.to_dict(),
    }


def chunk(
    kind: Literal["chat", "completion"], rid: str, model: str, delta: Any, finish: str | None = None
) -> dict[str, Any]:
    """One streamed chunk: a chat ``delta`` (a dict) or completion text (a string)."""
    choice = {"index": 0, "delta": delta} if kind == "chat" else {"index": 0, "text": delta}
    return {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{**choice, "finish_reason": finish, "logprobs": None}],
    }
