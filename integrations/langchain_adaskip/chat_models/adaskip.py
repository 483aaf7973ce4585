"""ChatAdaSkip: a LangChain chat model over a local skip-aware LLM."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, ToolMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from typing_extensions import is_typeddict

from adaskip_rag import GenerationResult, SkipStats
from adaskip_rag.adapters import tool_call_entry
from adaskip_rag.constrained import check_tools
from langchain_adaskip._common import AdaSkipParams, aemit_stats, emit_stats, stream_run_manager, usage

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def to_chat(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as chat-template dicts: ``{"role", "content"}``, with an assistant's ``tool_calls`` and a
    tool result's ``tool_call_id``."""
    chat: list[dict[str, Any]] = []
    for m in messages:
        entry: dict[str, Any] = {
            "role": m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type, "user"),
            "content": m.text,
        }
        if isinstance(m, AIMessage) and m.tool_calls:
            entry["tool_calls"] = [tool_call_entry(c["id"], c["name"], c["args"]) for c in m.tool_calls]
        if isinstance(m, ToolMessage):
            entry["tool_call_id"] = m.tool_call_id
        chat.append(entry)
    return chat


def _tool_choice(choice: str | bool | dict | None, names: list[str]) -> str | None:
    """LangChain's ``tool_choice`` values as the engine's: "auto", "none", "any" or a tool's name."""
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") or choice.get("name")
    if choice is True or choice == "required":
        return "any"
    if choice in (None, False):
        return None
    if choice in ("auto", "none", "any") or choice in names:
        return choice
    raise ValueError(
        f"tool_choice must be 'auto', 'none', 'any', 'required' or one of the tools {names}, got {choice!r}"
    )


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

    ``with_structured_output`` and ``bind_tools`` decode under a grammar (xgrammar): a structured answer always
    parses and a tool call always matches its tool's schema, even on the 135M default model.
    """

    model_config = AdaSkipParams.model_config  # over the framework's (which ignores unknown keywords)
    ls_model_type: ClassVar[Literal["chat", "llm"]] = "chat"
    streaming: bool = False
    """Generate ``invoke`` answers through streaming too (callback handlers receive every token)."""

    @property
    def _llm_type(self) -> str:
        return "adaskip-chat"

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | bool | dict | None = None,
        parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` to the model through its chat template; a call is generated under the tool's JSON schema.

        ``tool_choice``: "auto" (default: answer or call), "none", "any"/"required"/True (must call one), or a
        tool's name (must call it). One call per answer unless ``parallel_tool_calls``. Loads the model, to
        raise here if its chat template has no tool support.
        """
        engine = self.get_engine()
        engine.prompts.check_tool_support()
        formatted = [convert_to_openai_tool(t) for t in tools]
        for tool in formatted:  # each as a call will check it (names may repeat until then)
            check_tools([tool], engine.schema_limits)
        choice = _tool_choice(tool_choice, [t["function"]["name"] for t in formatted])
        return self.bind(tools=formatted, tool_choice=choice, parallel_tool_calls=parallel_tool_calls, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Answers parsed into ``schema`` (a pydantic class, a TypedDict or a JSON schema).

        ``method``: "json_schema" (default: the answer is a JSON text decoded under the schema), "function_calling"
        (a forced call of a tool whose arguments follow the schema) or "json_mode" (as "json_schema": where hosted
        APIs only promise some JSON object, the local grammar costs nothing more). ``include_raw``: return
        ``{"raw", "parsed", "parsing_error"}``. The grammar always holds, so ``strict`` is accepted and has no
        further effect.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        if not (pydantic or isinstance(schema, dict) or is_typeddict(schema)):
            raise ValueError(
                f"schema must be a pydantic model class, a TypedDict or a JSON schema dict, got {schema!r}"
            )
        if method == "function_calling" and isinstance(schema, dict) and not isinstance(schema.get("title"), str):
            raise ValueError("a JSON schema dict needs a 'title' for method='function_calling': it names the tool")
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools(
                [tool], tool_choice=name, ls_structured_output_format={"kwargs": {"method": method}, "schema": tool}
            )
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            # json_mode decodes under the schema too: a local grammar costs nothing, and the answer then parses
            json_schema = schema if isinstance(schema, dict) else convert_to_json_schema(schema)
            llm = self.bind(
                json_schema=json_schema,
                ls_structured_output_format={"kwargs": {"method": method}, "schema": json_schema},
            )
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()  # type: ignore[arg-type]
        else:
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

    def _metadata(self, stats: SkipStats) -> dict[str, Any]:
        return {
            "adaskip": stats.to_dict(),
            "finish_reason": stats.finish_reason,
            "model_name": self.model_name,
            "model_provider": "adaskip",
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine, request = self.request(stop, run_manager, kwargs)
        result = engine.generate(to_chat(messages), **request)
        emit_stats(run_manager, result.stats)
        return self._result(result)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine, request = self.request(stop, run_manager, kwargs)
        result = await engine.agenerate(to_chat(messages), **request)
        await aemit_stats(run_manager, result.stats)
        return self._result(result)

    def _result(self, result: GenerationResult) -> ChatResult:
        message = AIMessage(
            content=result.text,
            usage_metadata=usage(result.stats),
            response_metadata=self._metadata(result.stats),
            tool_calls=[tool_call(name=c["name"], args=c["arguments"], id=c["id"]) for c in result.tool_calls],
            invalid_tool_calls=[
                invalid_tool_call(name=c["name"], args=c["arguments"], id=c["id"], error=c["error"])
                for c in result.invalid_tool_calls
            ],
        )
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info={"finish_reason": result.stats.finish_reason})]
        )

    def _last_chunk(self, result: GenerationResult) -> ChatGenerationChunk:
        calls = [*result.tool_calls, *result.invalid_tool_calls]
        message = AIMessageChunk(
            content="",
            usage_metadata=usage(result.stats),
            response_metadata=self._metadata(result.stats),
            tool_call_chunks=[
                tool_call_chunk(
                    name=c["name"],
                    id=c["id"],
                    index=i,
                    args=json.dumps(c["arguments"]) if isinstance(c["arguments"], dict) else c["arguments"],
                )
                for i, c in enumerate(calls)
            ],
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": result.stats.finish_reason})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        run_manager = stream_run_manager(run_manager)
        engine, request = self.request(stop, run_manager, kwargs)
        stream = engine.stream(to_chat(messages), **request)
        for delta in stream:
            yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
        emit_stats(run_manager, stream.finished.stats)
        yield self._last_chunk(stream.finished)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        run_manager = stream_run_manager(run_manager)
        engine, request = self.request(stop, run_manager, kwargs)
        stream = engine.astream(to_chat(messages), **request)
        async for delta in stream:
            yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
        await aemit_stats(run_manager, stream.finished.stats)
        yield self._last_chunk(stream.finished)
