"""ChatAdaSkip: a LangChain chat model over a local skip-aware LLM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from adaskip_rag import SkipStats
from langchain_adaskip._common import AdaSkipParams, aemit_stats, emit_stats, stream_run_manager, usage

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def to_chat(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``{"role", "content"}`` dicts for the model's chat template."""
    return [
        {"role": m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type, "user"), "content": m.text}
        for m in messages
    ]


class ChatAdaSkip(AdaSkipParams, BaseChatModel):
    """Chat model that skips the sublayers its collection does not need (AdaSkip), on a local model.

    Example:
        .. code-block:: python

            from langchain_adaskip import ChatAdaSkip

            llm = ChatAdaSkip(max_tokens=64)          # SmolLM2-135M-Instruct, bundled; shared per model
            msg = llm.invoke("What is the capital of France?", config={"metadata": {"adaskip_collection": "geo"}})
            msg.usage_metadata, msg.response_metadata["adaskip"]   # token usage, SkipStats of the request

    Every call's SkipStats are in ``response_metadata["adaskip"]`` (on the last chunk when streaming), and
    callback handlers receive them as the custom event ``adaskip_stats``.
    """

    ls_model_type: ClassVar[str] = "chat"

    @property
    def _llm_type(self) -> str:
        return "adaskip-chat"

    def _metadata(self, stats: SkipStats) -> dict[str, Any]:
        return {"adaskip": stats.to_dict(), "finish_reason": stats.finish_reason, "model_name": self.model,
                "model_provider": "adaskip"}

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:
        engine, request = self.request(stop, run_manager, kwargs)
        result = engine.generate(to_chat(messages), **request)
        emit_stats(run_manager, result.stats)
        return self._result(result.text, result.stats)

    async def _agenerate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:
        engine, request = self.request(stop, run_manager, kwargs)
        result = await engine.agenerate(to_chat(messages), **request)
        await aemit_stats(run_manager, result.stats)
        return self._result(result.text, result.stats)

    def _result(self, text: str, stats: SkipStats) -> ChatResult:
        message = AIMessage(content=text, usage_metadata=usage(stats), response_metadata=self._metadata(stats))
        return ChatResult(generations=[ChatGeneration(message=message, generation_info={"finish_reason": stats.finish_reason})])

    def _last_chunk(self, stats: SkipStats) -> ChatGenerationChunk:
        message = AIMessageChunk(content="", usage_metadata=usage(stats), response_metadata=self._metadata(stats),
                                 chunk_position="last")
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": stats.finish_reason})

    def _stream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        run_manager = stream_run_manager(run_manager)
        engine, request = self.request(stop, run_manager, kwargs)
        stream = engine.stream(to_chat(messages), **request)
        for delta in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            yield chunk
        emit_stats(run_manager, stream.result.stats)
        yield self._last_chunk(stream.result.stats)

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        run_manager = stream_run_manager(run_manager)
        engine, request = self.request(stop, run_manager, kwargs)
        stream = engine.astream(to_chat(messages), **request)
        async for delta in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            yield chunk
        await aemit_stats(run_manager, stream.result.stats)
        yield self._last_chunk(stream.result.stats)
