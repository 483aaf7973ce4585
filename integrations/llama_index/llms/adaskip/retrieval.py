"""Automatic collection keys: an answer generated inside a span that retrieved from a vector store is profiled
under the store's collection name (``runs.store_collection``: Chroma, PGVector, Qdrant, ...).

A span handler on the root dispatcher (added when this package is imported) sees every retriever span with
its retriever object, tags the span's ancestors with the collection the retriever reads, and the LLM looks up
the nearest tagged ancestor of its own span. A streaming query engine calls its LLM only when its response is
read, after the query's spans have ended, so a tagged span that returns a streaming response (``response_gen``)
has that generator wrapped to carry the collection to the LLM while it is read.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.span import BaseSpan
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from pydantic import PrivateAttr

from adaskip_rag.runs import RunTree, store_collection

_reading: ContextVar[str | None] = ContextVar("adaskip_streamed_collection", default=None)


class _Reading(Iterator[str]):
    """A streaming response's generator that, while it runs, tells the LLM which collection it answers from."""

    def __init__(self, gen: Iterator[str], collection: str):
        self.gen, self.collection = gen, collection

    def __next__(self) -> str:
        token = _reading.set(self.collection)
        try:
            return next(self.gen)
        finally:
            _reading.reset(token)


class _AsyncReading(AsyncIterator[str]):
    def __init__(self, gen: AsyncIterator[str], collection: str):
        self.gen, self.collection = gen, collection

    async def __anext__(self) -> str:
        token = _reading.set(self.collection)
        try:
            return await anext(self.gen)
        finally:
            _reading.reset(token)


class RetrievalTracker(BaseSpanHandler[BaseSpan]):
    """Follows the open spans and which of them retrieved from a Chroma collection."""

    _runs: RunTree = PrivateAttr(default_factory=RunTree)

    @classmethod
    def class_name(cls) -> str:
        return "AdaSkipRetrievalTracker"

    def collection_of(self, span_id: str | None) -> str | None:
        """The collection retrieved from by ``span_id`` or its nearest ancestor that retrieved, else that of the
        streaming response being read, if any."""
        return self._runs.collection_of(span_id) or _reading.get()

    def unnamed_store(self, span_id: str | None) -> str | None:
        return self._runs.unnamed_store(span_id)

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._runs.open(id_, parent_id)
        store = getattr(instance, "_vector_store", None) if isinstance(instance, BaseRetriever) else None
        if store is not None:  # a vector-index retriever's store
            self._runs.retrieved(parent_id, store_collection(store), type(store).__name__)

    def span_exit(
        self, id_: str, bound_args: inspect.BoundArguments, instance: Any = None, result: Any = None, **kwargs: Any
    ) -> None:
        name = self._runs.collection_in(id_)
        gen = getattr(result, "response_gen", None)
        if name is not None and gen is not None and not isinstance(gen, (_Reading, _AsyncReading)):
            result.response_gen = _AsyncReading(gen, name) if hasattr(gen, "__anext__") else _Reading(gen, name)
        self._runs.close(id_)

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        self._runs.close(id_)

    # span objects are not kept: the tracker only needs the parent links above
    def new_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None


TRACKER = RetrievalTracker()
get_dispatcher().add_span_handler(TRACKER)
