"""AdaSkipLLM: a LlamaIndex LLM over a local skip-aware model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import Field, PrivateAttr

from adaskip_rag import AdaSkipEngine, SkipStats
from adaskip_rag.engine import call_arguments
from llama_index.llms.adaskip.retrieval import TRACKER

DEFAULT_COLLECTION = "default"
dispatcher = get_dispatcher(__name__)

Prompt = str | list[dict[str, str]]


class AdaSkipStatsEvent(BaseEvent):
    """Sent through the dispatcher once per LLM call: the call's SkipStats (``SkipStats.to_dict()``)."""

    stats: dict[str, Any]

    @classmethod
    def class_name(cls) -> str:
        return "AdaSkipStatsEvent"


def _usage(stats: SkipStats) -> dict[str, int]:
    total = stats.prompt_tokens + stats.generated_tokens
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens, "total_tokens": total}


def _chat(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role.value, "content": m.content or ""} for m in messages]


class AdaSkipLLM(CustomLLM):
    """LLM that skips the sublayers its collection does not need (AdaSkip), on a local model.

    Example:
        .. code-block:: python

            from llama_index.llms.adaskip import AdaSkipLLM

            llm = AdaSkipLLM(max_tokens=64)    # SmolLM2-135M-Instruct, bundled; one engine shared per model
            query_engine = index.as_query_engine(llm=llm)   # index over a ChromaVectorStore
            query_engine.query("...")          # profiled under that Chroma collection's name

    ``complete`` puts an unformatted prompt through the chat template as one user message
    (``formatted=True`` sends it as it is). Every response carries the call's SkipStats in
    ``additional_kwargs["adaskip"]`` and token usage in ``raw["usage"]`` (on the last chunk when streaming),
    and every call sends an :class:`AdaSkipStatsEvent` to the dispatcher's event handlers.
    """

    model: str = Field(default="default", description='"default" (SmolLM2-135M-Instruct, bundled) or a local model folder.')
    device: str | None = Field(default=None, description="torch device; default: the engine's choice.")
    collection: str | None = Field(
        default=None,
        description="Profile key, unless a call passes collection=; else the Chroma collection the enclosing "
        'query retrieved from; else "default".',
    )
    max_tokens: int = Field(default=256, gt=0, description="Most new tokens per answer.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    seed: int | None = None
    stop: list[str] | None = Field(default=None, description="Stop strings, not part of the answer.")
    _engine: AdaSkipEngine | None = PrivateAttr(default=None)

    def __init__(self, engine: AdaSkipEngine | None = None, **kwargs: Any) -> None:
        """``engine``: an engine to use instead of the shared one of ``model``."""
        super().__init__(**kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "AdaSkipLLM"

    @property
    def engine(self) -> AdaSkipEngine:
        return self._engine or AdaSkipEngine.shared(self.model, self.device)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.engine.context_window, num_output=self.max_tokens,
                           is_chat_model=True, model_name=self.model, system_role=MessageRole.SYSTEM)

    def _request(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Engine arguments of one call: per-call kwargs over the instance's settings."""
        kwargs = dict(kwargs)
        collection = kwargs.pop("collection", None) or self.collection or TRACKER.collection_of(active_span_id.get())
        return {"collection": collection or DEFAULT_COLLECTION, **call_arguments(self, kwargs)}

    @staticmethod
    def _prompt(prompt: str, formatted: bool) -> Prompt:
        return prompt if formatted else [{"role": "user", "content": prompt}]

    @staticmethod
    def _finish(stats: SkipStats, span_id: str | None) -> dict[str, Any]:
        """Send the stats event; the response fields that carry the stats."""
        data = stats.to_dict()
        dispatcher.event(AdaSkipStatsEvent(stats=data, span_id=span_id))
        return {"raw": {"usage": _usage(stats)}, "additional_kwargs": {"adaskip": data}}

    def _complete(self, prompt: Prompt, kwargs: dict[str, Any]) -> CompletionResponse:
        result = self.engine.generate(prompt, **self._request(kwargs))
        return CompletionResponse(text=result.text, **self._finish(result.stats, active_span_id.get()))

    def _stream(self, prompt: Prompt, kwargs: dict[str, Any]) -> Iterator[CompletionResponse]:
        request, span_id = self._request(kwargs), active_span_id.get()  # now, not when the stream is read

        def gen() -> Iterator[CompletionResponse]:
            stream, text = self.engine.stream(prompt, **request), ""
            for delta in stream:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            yield CompletionResponse(text=text, delta="", **self._finish(stream.result.stats, span_id))

        return gen()

    async def _acomplete(self, prompt: Prompt, kwargs: dict[str, Any]) -> CompletionResponse:
        result = await self.engine.agenerate(prompt, **self._request(kwargs))
        return CompletionResponse(text=result.text, **self._finish(result.stats, active_span_id.get()))

    def _astream(self, prompt: Prompt, kwargs: dict[str, Any]) -> AsyncIterator[CompletionResponse]:
        request, span_id = self._request(kwargs), active_span_id.get()

        async def gen() -> AsyncIterator[CompletionResponse]:
            stream, text = self.engine.astream(prompt, **request), ""
            async for delta in stream:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            yield CompletionResponse(text=text, delta="", **self._finish(stream.result.stats, span_id))

        return gen()

    @staticmethod
    def _as_chat(response: CompletionResponse) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=response.text),
                            delta=response.delta, raw=response.raw, additional_kwargs=response.additional_kwargs)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(self._prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream(self._prompt(prompt, formatted), kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._as_chat(self._complete(_chat(messages), kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return (self._as_chat(r) for r in self._stream(_chat(messages), kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await self._acomplete(self._prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return self._astream(self._prompt(prompt, formatted), kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._as_chat(await self._acomplete(_chat(messages), kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen() -> ChatResponseAsyncGen:
            async for response in self._astream(_chat(messages), kwargs):
                yield self._as_chat(response)

        return gen()
