"""How the integrations key profiles automatically: the collection a vector store reads (both), and the open runs
of a trace (LlamaIndex spans), so that a model call can find the collection of the nearest enclosing run that
retrieved. LangChain's model finds its calling chain at its own call instead (``langchain_adaskip._retrieval``)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

MAX_OPEN_RUNS = 10_000  # bound for runs that never report their end (abandoned streams)
NAME_ATTRIBUTES = ("collection_name", "index_name", "table_name")  # how vector stores name what they read


def store_collection(store: Any) -> str | None:
    """The collection a vector store reads, by the store's own name for it: a Chroma collection's name, else its
    first of :data:`NAME_ATTRIBUTES` that is a non-empty string (PGVector, Qdrant, Milvus, Elasticsearch, Redis,
    LanceDB, ...); None for stores without one (FAISS, in-memory stores)."""
    names = [getattr(getattr(store, "_collection", None), "name", None)]
    names += [getattr(store, attr, None) for attr in NAME_ATTRIBUTES]
    return next((n for n in names if isinstance(n, str) and n), None)


class RunTree:
    """Parent links of the open runs, and the collection each run's retrievals read (thread-safe)."""

    def __init__(self, max_open: int = MAX_OPEN_RUNS):
        self.max_open = max_open
        self._parents: OrderedDict[Hashable, Hashable | None] = OrderedDict()
        self._collections: dict[Hashable, str] = {}
        self._unnamed: dict[Hashable, str] = {}  # runs that retrieved from a store without a collection name
        self._lock = threading.Lock()

    def open(self, run: Hashable, parent: Hashable | None) -> None:
        with self._lock:
            self._parents[run] = parent
            while len(self._parents) > self.max_open:
                oldest = self._parents.popitem(last=False)[0]
                self._collections.pop(oldest, None)
                self._unnamed.pop(oldest, None)

    def close(self, run: Hashable) -> None:
        with self._lock:
            self._parents.pop(run, None)
            self._collections.pop(run, None)
            self._unnamed.pop(run, None)

    def retrieved(self, parent: Hashable | None, collection: str | None, store: str) -> None:
        """A retrieval from ``collection`` of a ``store`` (its type's name) ran under ``parent``: every enclosing run
        now holds an answer's context from it (the first retrieval of a run wins); None: a store without a
        collection name."""
        with self._lock:
            while parent is not None:
                if collection is None:
                    self._unnamed.setdefault(parent, store)
                else:
                    self._collections.setdefault(parent, collection)
                parent = self._parents.get(parent)

    def unnamed_store(self, run: Hashable | None) -> str | None:
        """The type of a store without a collection name that ``run`` or an ancestor retrieved from, if any."""
        return self._nearest(self._unnamed, run)

    def _nearest(self, marks: dict[Hashable, str], run: Hashable | None) -> str | None:
        """The mark of ``run`` or of its nearest ancestor that has one in ``marks``."""
        with self._lock:
            while run is not None:
                if run in marks:
                    return marks[run]
                run = self._parents.get(run)
        return None

    def collection_in(self, run: Hashable) -> str | None:
        """The collection a retrieval under ``run`` itself read, if any (ancestors not consulted)."""
        with self._lock:
            return self._collections.get(run)

    def collection_of(self, run: Hashable | None) -> str | None:
        """The collection retrieved from by ``run`` or its nearest ancestor that retrieved, if any."""
        return self._nearest(self._collections, run)
