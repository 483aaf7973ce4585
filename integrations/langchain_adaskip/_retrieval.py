"""Automatic collection keys: an answer generated inside a chain that retrieves from a vector store is profiled
under the store's collection name (``runs.store_collection``: Chroma, PGVector, Qdrant, ...).

Nothing is registered with LangChain, so chains that do not call an adaskip model run exactly as without this
package, at the same cost and with the same events. At a model call, the runnable that called the model is found
from the model run's parent run id: the frame whose run manager holds that run id, on a thread's stack or in an
asyncio task's awaited coroutines. Its graph is searched for vector-store retrievers; where it has none, the
runnable that called it, and so on outwards. The first retriever of the nearest runnable that has one gives the
collection, so a chain that routes between collections passes ``collection=``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any
from uuid import UUID

from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable

from adaskip_rag.runs import store_collection


def retrieval_of(run_id: UUID | None) -> tuple[str | None, str | None]:
    """The collection the nearest runnable around the run ``run_id`` (itself first) retrieves from, if any; and
    where that store has no collection name, the store's type."""
    while run_id is not None:
        found = _runnable_of(run_id)
        if found is None:
            break
        runnable, run_id = found
        for node in runnable.get_graph().nodes.values():
            store = _store_of(node.data)
            if store is not None:
                collection = store_collection(store)
                return collection, None if collection else type(store).__name__
    return None, None


def _store_of(retriever: Any) -> Any:
    """The vector store ``retriever`` reads (directly, or through the retriever it wraps), if any."""
    for candidate in (retriever, getattr(retriever, "retriever", None), getattr(retriever, "base_retriever", None)):
        if isinstance(candidate, BaseRetriever) and getattr(candidate, "vectorstore", None) is not None:
            return candidate.vectorstore  # type: ignore[attr-defined]
    return None


def _runnable_of(run_id: UUID) -> tuple[Runnable, UUID | None] | None:
    """The runnable running as ``run_id`` and its parent run id: the ``self`` of the frame that holds the run
    manager (or, batching, one of the run managers) of that run."""
    for frame in _frames():
        local = frame.f_locals
        owner = local.get("self")
        if not isinstance(owner, Runnable):
            continue
        for manager in [local.get("run_manager"), *(local.get("run_managers") or ())]:
            if getattr(manager, "run_id", None) == run_id:
                return owner, manager.parent_run_id
    return None


def _frames() -> Iterator[FrameType]:
    """Every live frame: the current thread's stack first, then the other threads' stacks, then the awaited
    coroutines of each asyncio task of this thread's event loop (a runnable awaiting its step's task is on no
    thread's stack)."""
    here = threading.get_ident()
    for top in [sys._getframe(), *(top for thread, top in sys._current_frames().items() if thread != here)]:
        frame: FrameType | None = top
        while frame is not None:
            yield frame
            frame = frame.f_back
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no event loop in this thread
        return
    for task in tasks:
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = next(
                (getattr(awaited, a) for a in ("cr_frame", "ag_frame", "gi_frame") if hasattr(awaited, a)), None
            )
            if frame is not None:
                yield frame
            awaited = next(
                (getattr(awaited, a) for a in ("cr_await", "ag_await", "gi_yieldfrom") if hasattr(awaited, a)), None
            )
