"""Automatic collection keys: an answer generated inside a run that retrieved from a ``langchain-chroma``
collection is profiled under that collection's name.

LangChain's retriever events name no vector store, so a callback handler, added to every run by a configure
hook, finds the retriever object on the calling stack when its run starts, tags the run and its ancestors
with the Chroma collection it reads, and the model looks up the nearest tagged ancestor of its own run.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from contextvars import ContextVar
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.retrievers import BaseRetriever
from langchain_core.tracers.context import register_configure_hook

MAX_OPEN_RUNS = 10_000  # bound for runs that never report their end (abandoned streams)
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
    """Remembers the open runs' parents and which of them retrieved from a Chroma collection."""

    run_inline = True  # called on the retriever's own stack, so the retriever can be found

    def __init__(self) -> None:
        self._parents: OrderedDict[UUID, UUID | None] = OrderedDict()
        self._collections: dict[UUID, str] = {}
        self._lock = threading.Lock()

    def collection_of(self, run_id: UUID | None) -> str | None:
        """The collection retrieved from by ``run_id`` or its nearest ancestor that retrieved, if any."""
        with self._lock:
            while run_id is not None:
                if run_id in self._collections:
                    return self._collections[run_id]
                run_id = self._parents.get(run_id)
        return None

    def _open(self, run_id: UUID, parent_run_id: UUID | None) -> None:
        with self._lock:
            self._parents[run_id] = parent_run_id
            while len(self._parents) > MAX_OPEN_RUNS:
                self._collections.pop(self._parents.popitem(last=False)[0], None)

    def _close(self, run_id: UUID) -> None:
        with self._lock:
            self._parents.pop(run_id, None)
            self._collections.pop(run_id, None)

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                       **kwargs: Any) -> None:
        self._open(run_id, parent_run_id)

    def on_retriever_start(self, serialized: Any, query: str, *, run_id: UUID, parent_run_id: UUID | None = None,
                           **kwargs: Any) -> None:
        retriever = _calling_retriever()
        name = chroma_collection(retriever) if retriever is not None else None
        if name is None:
            return
        with self._lock:
            node: UUID | None = parent_run_id
            while node is not None:  # every enclosing run now holds an answer's context from `name`
                self._collections.setdefault(node, name)
                node = self._parents.get(node)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)


TRACKER = RetrievalTracker()
_tracker: ContextVar[RetrievalTracker | None] = ContextVar("adaskip_retrieval_tracker", default=TRACKER)
register_configure_hook(_tracker, inheritable=True)
