"""Automatic collection keys: an answer generated inside a run that retrieved from a vector store is profiled
under the store's collection name (``runs.store_collection``: Chroma, PGVector, Qdrant, ...).

LangChain's retriever events name no vector store, so a callback handler, added to every run by a configure
hook, finds the retriever object of each retriever run it is told of (the suspended frames of the callback
manager's ``on_retriever_start`` that created that run id, on a thread's stack or in an asyncio task), tags the
run's ancestors with the Chroma collection it reads, and the model looks up the nearest tagged ancestor of its
own run.

The handler is an ordinary (not inline) handler that only listens to chain and retriever events, so other
models' callbacks behave exactly as without this package: an inline handler would make langchain-core's
``AsyncCallbackManager.on_llm_start`` skip every non-inline handler of text-completion models.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from types import FrameType
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.retrievers import BaseRetriever
from langchain_core.tracers.context import register_configure_hook

from adaskip_rag.runs import RunTree, store_collection


def _stacks() -> Iterator[list[FrameType]]:
    """Every live call chain, outermost frame first: each thread's stack and each asyncio task's awaited
    coroutines (a suspended ``ainvoke`` is on no thread's stack)."""
    for top in sys._current_frames().values():
        chain: list[FrameType] = []
        frame: FrameType | None = top
        while frame is not None:
            chain.append(frame)
            frame = frame.f_back
        yield chain[::-1]
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no event loop in this thread
        return
    for task in tasks:
        awaited: Any = task.get_coro()
        chain = []
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                chain.append(frame)
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        yield chain


def retriever_of(run_id: UUID) -> BaseRetriever | None:
    """The retriever whose run ``run_id`` is starting: the nearest caller of the ``on_retriever_start`` frame
    that holds this run id."""
    for chain in _stacks():
        for i, frame in enumerate(chain):
            if frame.f_code.co_name == "on_retriever_start" and frame.f_locals.get("run_id") == run_id:
                for caller in reversed(chain[:i]):
                    owner = caller.f_locals.get("self")
                    if isinstance(owner, BaseRetriever):
                        return owner
    return None


class RetrievalTracker(BaseCallbackHandler):
    """Follows the open chain runs and which of them retrieved from a Chroma collection."""

    ignore_llm = ignore_chat_model = ignore_agent = ignore_custom_event = True

    def __init__(self) -> None:
        self.runs = RunTree()

    def collection_of(self, run_id: UUID | None) -> str | None:
        return self.runs.collection_of(run_id)

    def unnamed_store(self, run_id: UUID | None) -> str | None:
        return self.runs.unnamed_store(run_id)

    def on_chain_start(
        self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self.runs.open(run_id, parent_run_id)

    async def on_retriever_start(
        self, serialized: Any, query: str, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        # a coroutine, so that under an AsyncCallbackManager it runs on the event loop, where the retriever's
        # task can be seen, rather than in an executor thread
        retriever = retriever_of(run_id)
        store = getattr(retriever, "vectorstore", None)  # a vector-store retriever's store
        if store is not None:
            self.runs.retrieved(parent_run_id, store_collection(store), type(store).__name__)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.runs.close(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.runs.close(run_id)


TRACKER = RetrievalTracker()
_tracker: ContextVar[RetrievalTracker | None] = ContextVar("adaskip_retrieval_tracker", default=TRACKER)
register_configure_hook(_tracker, inheritable=True)
