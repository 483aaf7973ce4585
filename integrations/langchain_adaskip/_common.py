"""What both LangChain classes share: settings, the shared engine, the collection key, and the
``adaskip_stats`` custom callback event."""

from __future__ import annotations

import sys
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages.ai import UsageMetadata
from pydantic import ConfigDict, Field

from adaskip_rag import AdaSkipEngine, SkipStats, adapters
from adaskip_rag.adapters import AdaSkipSettings, call_arguments, call_collection
from adaskip_rag.loading import model_label
from langchain_adaskip._retrieval import retrieval_of

STATS_EVENT = "adaskip_stats"
COLLECTION_METADATA_KEY = "adaskip_collection"


class AdaSkipParams(AdaSkipSettings):
    """Settings (:class:`~adaskip_rag.adapters.AdaSkipSettings`) and LangChain hooks both classes share; every
    setting can be overridden per call as a keyword argument. Listed first among a class's bases, so its hooks
    override the framework's defaults."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: AdaSkipEngine | None = Field(default=None, exclude=True)
    """An engine to use instead of the shared one of ``model``."""
    ls_model_type: ClassVar[Literal["chat", "llm"]]

    @property
    def model_name(self) -> str:
        """The model's name (``SmolLM2-135M-Instruct`` for ``"default"``), as response metadata reports it."""
        return self.engine.name if self.engine is not None else model_label(self.model)

    def get_engine(self, model: str | None = None) -> AdaSkipEngine:
        """The instance's engine, or the shared engine of ``model`` when a call overrides the model."""
        if model is None or model == self.model:
            return self.engine or AdaSkipEngine.shared(self.model, self.device, self.dtype)
        return AdaSkipEngine.shared(model, self.device, self.dtype)

    def request(
        self, stop: list[str] | None, run_manager: Any, kwargs: dict[str, Any]
    ) -> tuple[AdaSkipEngine, dict[str, Any]]:
        """The engine and the engine arguments of one call: per-call kwargs over the instance's settings."""
        kwargs = dict(kwargs)
        engine = self.get_engine(kwargs.pop("model", None))
        metadata = getattr(run_manager, "metadata", None) or {}
        parent = getattr(run_manager, "parent_run_id", None)
        collection = call_collection(
            kwargs.pop("collection", None),
            metadata.get(COLLECTION_METADATA_KEY),
            self.collection,
            retrieval=lambda: retrieval_of(parent),
        )
        if stop is not None:
            kwargs["stop"] = stop
        return engine, {"collection": collection, **call_arguments(self, kwargs)}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.model_dump(exclude={"engine", "callbacks", "cache", "verbose", "tags", "metadata"}, mode="json")

    def get_token_ids(self, text: str) -> list[int]:
        return self.get_engine().tokenizer.encode(text, add_special_tokens=False)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(
            ls_provider="adaskip",
            ls_model_name=model_label(kwargs["model"]) if "model" in kwargs else self.model_name,
            ls_model_type=self.ls_model_type,
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
            ls_stop=stop or self.stop,
        )


def stream_run_manager(run_manager: Any) -> Any:
    """The run manager of a streamed chat call. ``BaseChatModel.stream``/``astream`` do not pass theirs to
    ``_stream``/``_astream``, so it is read from their frame (the generator's caller), so that streamed calls
    also get their collection from config metadata or the chain, and send ``adaskip_stats``."""
    if run_manager is not None:
        return run_manager
    caller = sys._getframe(2).f_locals.get("run_manager")
    return caller if isinstance(caller, (CallbackManagerForLLMRun, AsyncCallbackManagerForLLMRun)) else None


def usage(stats: SkipStats) -> UsageMetadata:
    counts = adapters.usage(stats)
    return UsageMetadata(
        input_tokens=counts["prompt_tokens"],
        output_tokens=counts["completion_tokens"],
        total_tokens=counts["total_tokens"],
    )


def emit_stats(run_manager: CallbackManagerForLLMRun | None, stats: SkipStats) -> None:
    """Send the request's SkipStats to the callback handlers as the custom event ``adaskip_stats``."""
    if run_manager is not None:
        manager = CallbackManager(
            handlers=run_manager.handlers,
            inheritable_handlers=run_manager.inheritable_handlers,
            parent_run_id=run_manager.parent_run_id,
            tags=run_manager.tags,
            metadata=run_manager.metadata,
        )
        manager.on_custom_event(STATS_EVENT, stats.to_dict(), run_id=run_manager.run_id)


async def aemit_stats(run_manager: AsyncCallbackManagerForLLMRun | None, stats: SkipStats) -> None:
    if run_manager is not None:
        manager = AsyncCallbackManager(
            handlers=run_manager.handlers,
            inheritable_handlers=run_manager.inheritable_handlers,
            parent_run_id=run_manager.parent_run_id,
            tags=run_manager.tags,
            metadata=run_manager.metadata,
        )
        await manager.on_custom_event(STATS_EVENT, stats.to_dict(), run_id=run_manager.run_id)
