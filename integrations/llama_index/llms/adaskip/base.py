"""AdaSkipLLM: a LlamaIndex LLM over a local skip-aware model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.program.function_program import FunctionCallingProgram, get_function_tool
from llama_index.core.prompts import PromptTemplate
from pydantic import PrivateAttr

from adaskip_rag import AdaSkipEngine, GenerationResult
from adaskip_rag.adapters import AdaSkipSettings, call_arguments, call_collection, tool_call_entry, usage
from llama_index.llms.adaskip.retrieval import TRACKER

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

dispatcher = get_dispatcher(__name__)

Prompt = str | list[dict[str, Any]]


class AdaSkipStatsEvent(BaseEvent):
    """Sent through the dispatcher once per LLM call: the call's SkipStats (``SkipStats.to_dict()``)."""

    stats: dict[str, Any]

    @classmethod
    def class_name(cls) -> str:
        return "AdaSkipStatsEvent"


def _chat(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages as chat-template dicts, with an assistant's tool calls (``ToolCallBlock``s)."""
    chat = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role.value, "content": m.content or ""}
        calls = [b for b in m.blocks if isinstance(b, ToolCallBlock)]
        if calls:
            entry["tool_calls"] = [tool_call_entry(b.tool_call_id, b.tool_name, b.tool_kwargs) for b in calls]
        if "tool_call_id" in m.additional_kwargs:
            entry["tool_call_id"] = m.additional_kwargs["tool_call_id"]
        chat.append(entry)
    return chat


class AdaSkipLLM(AdaSkipSettings, FunctionCallingLLM):
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
        return self._engine or AdaSkipEngine.shared(self.model, self.device, self.dtype)

    @property
    def metadata(self) -> LLMMetadata:
        engine = self.engine
        return LLMMetadata(
            context_window=engine.context_window,
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=engine.supports_tools,
            model_name=engine.name,
            system_role=MessageRole.SYSTEM,
        )

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat`` arguments offering ``tools``: a call is generated under its tool's JSON schema; with
        ``tool_required`` the answer is a tool call ("any"), ``tool_choice`` may name the tool."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg
            )
        return {
            "messages": messages,
            "tools": [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools] or None,
            "tool_choice": tool_choice or ("any" if tool_required else None),
            "parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def _structured_stream_call(
        self, output_cls: type, prompt: PromptTemplate, llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any
    ) -> Any:
        return _structured_program(self, output_cls, prompt).stream_call(llm_kwargs=llm_kwargs, **prompt_args)

    async def _structured_astream_call(
        self, output_cls: type, prompt: PromptTemplate, llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any
    ) -> Any:
        return await _structured_program(self, output_cls, prompt).astream_call(llm_kwargs=llm_kwargs, **prompt_args)

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        return _tool_selections(response, error_on_no_tool_call)

    def _request(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Engine arguments of one call: per-call kwargs over the instance's settings."""
        kwargs = {k: v for k, v in kwargs.items() if not (k in ("tools", "tool_choice") and v is None)}
        span = active_span_id.get()
        collection = call_collection(
            kwargs.pop("collection", None),
            self.collection,
            retrieval=lambda: (TRACKER.collection_of(span), TRACKER.unnamed_store(span)),
        )
        return {"collection": collection, **call_arguments(self, kwargs)}

    def _complete(self, prompt: Prompt, kwargs: dict[str, Any]) -> CompletionResponse:
        result = self.engine.generate(prompt, **self._request(kwargs))
        return _final(result.text, result, active_span_id.get())

    def _stream(self, prompt: Prompt, kwargs: dict[str, Any]) -> CompletionResponseGen:
        request, span_id = self._request(kwargs), active_span_id.get()  # now, not when the stream is read

        def gen() -> CompletionResponseGen:
            stream, text = self.engine.stream(prompt, **request), ""
            for delta in stream:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            yield _final(text, stream.finished, span_id, streamed=True)

        return gen()

    async def _acomplete(self, prompt: Prompt, kwargs: dict[str, Any]) -> CompletionResponse:
        result = await self.engine.agenerate(prompt, **self._request(kwargs))
        return _final(result.text, result, active_span_id.get())

    def _astream(self, prompt: Prompt, kwargs: dict[str, Any]) -> CompletionResponseAsyncGen:
        request, span_id = self._request(kwargs), active_span_id.get()

        async def gen() -> CompletionResponseAsyncGen:
            stream, text = self.engine.astream(prompt, **request), ""
            async for delta in stream:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            yield _final(text, stream.finished, span_id, streamed=True)

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(_prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream(_prompt(prompt, formatted), kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _as_chat(self._complete(_chat(messages), kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return (_as_chat(r) for r in self._stream(_chat(messages), kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await self._acomplete(_prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return self._astream(_prompt(prompt, formatted), kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _as_chat(await self._acomplete(_chat(messages), kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen() -> ChatResponseAsyncGen:
            async for response in self._astream(_chat(messages), kwargs):
                yield _as_chat(response)

        return gen()


def _prompt(prompt: str, formatted: bool) -> Prompt:
    return prompt if formatted else [{"role": "user", "content": prompt}]


def _final(text: str, result: GenerationResult, span_id: str | None, streamed: bool = False) -> CompletionResponse:
    """The response that ends a call (the whole answer when not streaming); sends the stats event. Its ``raw``
    holds the token usage and the tool calls (``{"id", "name", "arguments"}``), ``additional_kwargs`` the
    stats."""
    data = result.stats.to_dict()
    dispatcher.event(AdaSkipStatsEvent(stats=data, span_id=span_id))
    raw = {"usage": usage(result.stats), "tool_calls": result.tool_calls}
    return CompletionResponse(text=text, delta="" if streamed else None, raw=raw, additional_kwargs={"adaskip": data})


def _as_chat(response: CompletionResponse) -> ChatResponse:
    calls = (response.raw or {}).get("tool_calls") or []
    blocks = [
        TextBlock(text=response.text),
        *(ToolCallBlock(tool_call_id=c["id"], tool_name=c["name"], tool_kwargs=c["arguments"]) for c in calls),
    ]
    # the calls are also listed in the message's additional_kwargs, where the framework's streaming
    # structured prediction looks for them
    message = ChatMessage(
        role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs={"tool_calls": calls} if calls else {}
    )
    return ChatResponse(
        message=message, delta=response.delta, raw=response.raw, additional_kwargs=response.additional_kwargs
    )


def _tool_selections(response: ChatResponse, error_on_no_tool_call: bool) -> list[ToolSelection]:
    calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    if not calls and error_on_no_tool_call:
        raise ValueError(f"expected a tool call, the model answered: {response.message.content!r}")
    return [
        ToolSelection(
            tool_id=b.tool_call_id or "",
            tool_name=b.tool_name,
            tool_kwargs=b.tool_kwargs if isinstance(b.tool_kwargs, dict) else {},
        )
        for b in calls
    ]


def _structured_program(llm: AdaSkipLLM, output_cls: type, prompt: PromptTemplate) -> FunctionCallingProgram:
    """Structured prediction as a forced call of the output class's tool, streamed or not (the framework's
    streaming program would leave the call to the model's choice)."""
    if llm.pydantic_program_mode != "default":
        raise ValueError("AdaSkipLLM's structured prediction decodes under the schema; leave pydantic_program_mode")
    name = get_function_tool(output_cls).metadata.name
    return FunctionCallingProgram.from_defaults(output_cls=output_cls, prompt=prompt, llm=llm, tool_choice=name)
