"""Automatic collection keys: an answer generated inside a run that retrieved from a ``langchain-chroma``
collection is profiled under that collection's name.

LangChain's retriever events name no vector store, so a callback handler, added to every run by a configure
hook, finds the retriever object on the calling stack when its run starts, tags the run and its ancestors
with the Chroma collection it reads, and the model looks up the nearest tagged ancestor of its own run.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.retrievers import BaseRetriever
from langchain_core.tracers.context import register_configure_hook

from adaskip_rag.runs import RunTree

_STACK_DEPTH = 12  # frames between a retriever's ``invoke`` and this handler


def chroma_collection(retriever: BaseRetriever) -> str | None:
    """The Chroma collection a ``langchain-chroma`` vector-store retriever reads, else None."""
    try:
        from langchain_chroma import Chroma
    except ImportError:
        return None
    store = getattr(retriever, "vectorstore", None)
    return store._collection.name if isinstance(store, Chroma) else None


def _calling_retriever() -> BaseRetriever | None:
    frame = sys._getframe(2)
    for _ in range(_STACK_DEPTH):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, BaseRetriever):
            return owner
        frame = frame.f_back
    return None


class RetrievalTracker(BaseCallbackHandler):
    """Follows the open chain runs and which of them retrieved from a Chroma collection."""

    run_inline = True  # called on the retriever's own stack, so the retriever can be found

    def __init__(self) -> None:
        self.runs = RunTree()

    def collection_of(self, run_id: UUID | None) -> str | None:
        return self.runs.collection_of(run_id)

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                       **kwargs: Any) -> None:
        self.runs.open(run_id, parent_run_id)

    def on_retriever_start(self, serialized: Any, query: str, *, run_id: UUID, parent_run_id: UUID | None = None,
                           **kwargs: Any) -> None:
        retriever = _calling_retriever()
        name = chroma_collection(retriever) if retriever is not None else None
        if name is not None:
            self.runs.retrieved(parent_run_id, name)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.runs.close(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.runs.close(run_id)


TRACKER = RetrievalTracker()
_tracker: ContextVar[RetrievalTracker | None] = ContextVar("adaskip_retrieval_tracker", default=TRACKER)
register_configure_hook(_tracker, inheritable=True)
