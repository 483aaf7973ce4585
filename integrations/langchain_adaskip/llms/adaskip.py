"""AdaSkipLLM: a LangChain text-completion model over a local skip-aware LLM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from adaskip_rag import AdaSkipEngine, GenerationResult, SkipStats
from langchain_adaskip._common import AdaSkipParams, aemit_stats, emit_stats, usage


def _info(stats: SkipStats) -> dict[str, Any]:
    return {"finish_reason": stats.finish_reason, "usage": usage(stats), "adaskip": stats.to_dict()}


class AdaSkipLLM(AdaSkipParams, BaseLLM):
    """Text-completion model that skips the sublayers its collection does not need (AdaSkip), on a local model.

    The prompt is passed to the model as it is (no chat template; use ``ChatAdaSkip`` for chat models), and the
    completion has at least one token: an instruct model would end its turn at once after a bare question.

    Example:
        .. code-block:: python

            from langchain_adaskip import AdaSkipLLM

            llm = AdaSkipLLM(max_tokens=64, collection="manuals")
            result = llm.generate(["Q: What is the capital of France?\\nA:"])
            result.generations[0][0].generation_info["adaskip"]      # SkipStats of the request

    Every call's SkipStats are in ``generation_info["adaskip"]`` (on the last chunk when streaming), and
    callback handlers receive them as the custom event ``adaskip_stats``.
    """

    model_config = AdaSkipParams.model_config  # over the framework's (which ignores unknown keywords)
    ls_model_type: ClassVar[Literal["chat", "llm"]] = "llm"

    @property
    def _llm_type(self) -> str:
        return "adaskip"

    def request(
        self, stop: list[str] | None, run_manager: Any, kwargs: dict[str, Any]
    ) -> tuple[AdaSkipEngine, dict[str, Any]]:
        engine, request = super().request(stop, run_manager, kwargs)
        return engine, {"min_new_tokens": 1, **request}

    def _result(self, results: list[GenerationResult]) -> LLMResult:
        model_name = self.model_name
        total = {
            "prompt_tokens": sum(r.stats.prompt_tokens for r in results),
            "completion_tokens": sum(r.stats.generated_tokens for r in results),
        }
        return LLMResult(
            generations=[[Generation(text=r.text, generation_info=_info(r.stats))] for r in results],
            llm_output={"token_usage": total, "model_name": model_name},
        )

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        engine, request = self.request(stop, run_manager, kwargs)
        results = [engine.generate(prompt, **request) for prompt in prompts]
        for r in results:
            emit_stats(run_manager, r.stats)
        return self._result(results)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        engine, request = self.request(stop, run_manager, kwargs)
        results = [await engine.agenerate(prompt, **request) for prompt in prompts]
        for r in results:
            await aemit_stats(run_manager, r.stats)
        return self._result(results)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        engine, request = self.request(stop, run_manager, kwargs)
        stream = engine.stream(prompt, **request)
        for delta in stream:
            chunk = GenerationChunk(text=delta)
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        emit_stats(run_manager, stream.finished.stats)
        last = GenerationChunk(text="", generation_info=_info(stream.finished.stats))
        if run_manager is not None:  # every chunk is reported, the last one (the stats) too
            run_manager.on_llm_new_token("", chunk=last)
        yield last

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        engine, request = self.request(stop, run_manager, kwargs)
        stream = engine.astream(prompt, **request)
        async for delta in stream:
            chunk = GenerationChunk(text=delta)
            if run_manager is not None:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        await aemit_stats(run_manager, stream.finished.stats)
        last = GenerationChunk(text="", generation_info=_info(stream.finished.stats))
        if run_manager is not None:
            await run_manager.on_llm_new_token("", chunk=last)
        yield last
