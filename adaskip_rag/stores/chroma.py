"""Profiles shared by the replicas of a service through the Chroma server they already run.

Each replica keeps its own running totals (sums and counts) for every (model, collection) it served, and for
the model's global profile, and writes only its own records; a read merges every replica's records of the
collection and of the global profile. Sums add, so merging is exact and no update can be lost to a concurrent
writer. Reads are cached for ``cache_seconds``, so a request does not wait on the network. When the server cannot
be reached, requests go on with the last profiles read (or none, so no skipping), one warning is logged, and the
unsent totals are written once it is back, by a background retry when no request comes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..profiles import GLOBAL, Profile, check_collection, parse_profile
from .base import ProfileStore

log = logging.getLogger(__name__)
PROFILES_COLLECTION = "adaskip_profiles"  # the Chroma collection the records live in
_CORRUPT_MODEL = "__corrupt__"  # model key under which an unreadable record of this replica is kept


class ChromaProfileStore(ProfileStore):
    """Profiles in a Chroma collection of their own (``profiles_collection``, default ``adaskip_profiles``) on a
    Chroma server.

    Args:
        host, port, ssl, headers: the server, as for ``chromadb.HttpClient``.
        client: a ready Chroma client instead (then host and port are not used).
        replica: this replica's name; default unique per store object (host, process, random).
        cache_seconds: how long a read of the server is reused.
        retry_seconds: while the server is unreachable, how often to try it again.
        max_pending: most (model, collection) totals waiting to be written while the server is away;
            beyond it the oldest waiting totals are dropped with an error.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 8000,
        *,
        ssl: bool = False,
        headers: dict[str, str] | None = None,
        profiles_collection: str = PROFILES_COLLECTION,
        client: Any = None,
        replica: str | None = None,
        cache_seconds: float = 2.0,
        retry_seconds: float = 1.0,
        max_pending: int = 1024,
    ):
        for name, value in (("cache_seconds", cache_seconds), ("retry_seconds", retry_seconds)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending!r}")
        self.host, self.port, self.profiles_collection = host, port, profiles_collection
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.cache_seconds, self.max_pending = cache_seconds, max_pending
        self._records = _Records(lambda: client or _http_client(host, port, ssl, headers), profiles_collection)
        self._own: dict[tuple[str, str], tuple[float, Profile]] = {}  # this replica's totals and update times
        self._pending: OrderedDict[tuple[str, str], None] = OrderedDict()  # own totals not yet on the server
        self._others: dict[tuple[str, str], tuple[float, list[tuple[float, Profile]]]] = {}  # read at, records
        self._seeded_models: set[str | None] = set()  # models (None: all) whose records were all read
        self._seeded_keys: set[tuple[str, str]] = set()  # keys whose records were read
        self._link = _Link(f"{host}:{port}", retry_seconds)
        self._lock = threading.RLock()
        self._retrying: threading.Thread | None = None  # writes held-back totals once the server is back

    @property
    def retry_seconds(self) -> float:  # kept by the link, which uses it
        return self._link.retry_seconds

    @retry_seconds.setter
    def retry_seconds(self, seconds: float) -> None:
        self._link.retry_seconds = seconds

    @property
    def degraded(self) -> bool:
        """True while the server cannot be reached."""
        return self._link.down_since is not None

    # ------------------------------------------------------------------ ProfileStore

    def get(self, model: str, collection: str) -> Profile | None:
        with self._lock:
            return self._merged(model, collection, self._read(model, collection))

    def global_profile(self, model: str) -> Profile | None:
        with self._lock:
            return self._merged(model, GLOBAL, self._read(model, GLOBAL))

    def add(self, delta: Profile) -> Profile:
        return self.add_all([delta])[0]

    def add_all(self, deltas: list[Profile]) -> list[Profile]:
        """:meth:`add` of every delta, sent to the server in one upsert."""
        for delta in deltas:
            check_collection(delta.collection)
        with self._lock:
            results = []
            for delta in deltas:
                key = (delta.model, delta.collection)
                others = self._read(*key)  # also adopts this replica's records from an earlier run
                for part in delta.split():
                    at = (part.model, part.collection)
                    _, own = self._own.get(at, (0.0, Profile(*at, delta.num_layers)))
                    total = own.merge(part)
                    self._own[at] = (time.time(), total if at[1] == GLOBAL else total.split()[0])
                    self._pending[at] = None
                    self._pending.move_to_end(at)
                results.append((key, others))
            while len(self._pending) > self.max_pending:
                lost, _ = self._pending.popitem(last=False)
                self._own.pop(lost, None)
                log.error("profile server unreachable: dropped this replica's unsent totals of %s", lost)
            self.flush()
            merged = [self._merged(*key, others) for key, others in results]
            return [p for p in merged if p is not None]  # none is: each holds at least its own delta

    def profiles(self, model: str | None = None) -> list[Profile]:
        with self._lock:
            others = self._read(model)
            keys = sorted({k for k in others} | {k for k in self._own if model is None or k[0] == model})
            return [p for p in (self._merged(m, c, others) for m, c in keys if c != GLOBAL) if p is not None]

    def delete(self, model: str, collection: str | None = None) -> int:
        """Remove every replica's records (running replicas write their own totals again on their next
        update: stop them first for a clean reset). Returns how many profiles were removed."""
        where: dict[str, Any] = (
            {"model": model} if collection is None else {"$and": [{"model": model}, {"collection": collection}]}
        )
        with self._lock:
            removed = self._records.delete(where)
            for key in [k for k in self._own if k[0] == model and collection in (None, k[1])]:
                self._own.pop(key)
                self._pending.pop(key, None)
            self._others.clear()
            return len({(m, c) for m, c in removed if c != GLOBAL})

    def migrate(self, old: str, new: str) -> int | None:
        """See :meth:`ProfileStore.migrate`: every replica's records of ``old`` added up, added to this replica's
        totals of ``new`` and written, then removed (upgrade every replica first: one still writing ``old`` keeps
        its own later updates there). None, with nothing changed, while the server cannot be reached."""
        with self._lock:
            if self._link.waiting():
                return None
            try:
                records = self._records.get({"model": old}, self.replica)
            except _UNREACHABLE as exc:
                self._link.failed(exc)
                return None
            found: dict[str, list[tuple[float, Profile]]] = {}
            for _, updated, profile in records:
                found.setdefault(profile.collection, []).append((updated, dataclasses.replace(profile, model=new)))
            before = (dict(self._own), OrderedDict(self._pending), set(self._seeded_keys), set(self._seeded_models))
            for collection, parts in found.items():
                total = _add_up(new, collection, [p for _, p in sorted(parts, key=lambda part: part[0])])
                if total is not None:
                    _, own = self._own.get((new, collection), (0.0, Profile(new, collection, total.num_layers)))
                    self._own[(new, collection)] = (time.time(), own.merge(total))
                    self._pending[(new, collection)] = None
            if not self.flush():
                self._own, self._pending, self._seeded_keys, self._seeded_models = before  # old's stay, for later
                return None
            self._records.delete({"model": old})
            self._others.clear()
            return sum(c != GLOBAL for c in found)

    def flush(self) -> bool:
        """Write this replica's unsent totals; False (and the totals kept) if the server is unreachable. Totals
        left unsent are tried again in the background every ``retry_seconds`` (at least 0.1 s) until they are
        written, so they reach the server without waiting for this replica's next request."""
        with self._lock:
            try:
                return self._write_pending()
            finally:
                if self._pending and (self._retrying is None or not self._retrying.is_alive()):
                    self._retrying = threading.Thread(target=self._retry, name="adaskip-profile-retry", daemon=True)
                    self._retrying.start()

    def _retry(self) -> None:
        """Flush until nothing is pending; a fault other than an unreachable server is logged and tried again."""
        while True:
            time.sleep(max(self.retry_seconds, 0.1))
            with self._lock:
                try:
                    self._write_pending()
                except Exception as exc:
                    log.debug("profile server %s: writing held-back totals failed: %r", self._link.where, exc)
                if not self._pending:
                    self._retrying = None
                    return

    def _write_pending(self) -> bool:
        """:meth:`flush` without the retry; the caller holds the lock."""
        if not self._pending:
            return True
        if self._link.waiting():
            return False
        for key in [k for k in self._pending if not self._seeded(k)]:
            self._read(*key)  # first continue this replica's earlier record, never overwrite it
        keys = [k for k in self._pending if self._seeded(k)]
        if not keys:
            return not self._pending
        try:
            self._records.put(self.replica, [self._own[k] for k in keys])
        except _UNREACHABLE as exc:
            self._link.failed(exc)
            return False
        self._link.succeeded()
        for k in keys:
            self._pending.pop(k, None)
        return True

    # ------------------------------------------------------------------ internals

    def _read(
        self, model: str | None, collection: str | None = None
    ) -> dict[tuple[str, str], list[tuple[float, Profile]]]:
        """Other replicas' records of one collection and of its model's global profile (or, without ``collection``,
        of every collection of ``model``, or of all models), from the cache while it is fresh, and the last ones
        read while the server is unreachable."""
        keys = None if collection is None or model is None else [(model, collection), (model, GLOBAL)]
        now = time.monotonic()
        last = {
            k: records for k, (_, records) in self._others.items() if (k in keys if keys else model in (None, k[0]))
        }
        stale = keys and [k for k in keys if k not in self._others or now - self._others[k][0] >= self.cache_seconds]
        if (keys and not stale) or self._link.waiting():
            return last
        where: dict[str, Any] | None = {"model": model} if model else None
        if stale:  # only what is not fresh: a new collection's record, not the model's global profile again
            where = {"$and": [{"model": model}, {"collection": {"$in": sorted({c for _, c in stale})}}]}
        try:
            records = self._records.get(where, self.replica)
        except _UNREACHABLE as exc:
            self._link.failed(exc)
            return last
        back = self._link.succeeded()
        others: dict[tuple[str, str], list[tuple[float, Profile]]] = {k: [] for k in stale or ()}
        for replica, updated, profile in records:
            key = (profile.model, profile.collection)
            if replica != self.replica:
                others.setdefault(key, []).append((updated, profile))
            elif not self._seeded(key):  # this replica's record from an earlier run: continue it
                _, own = self._own.get(key, (0.0, Profile(*key, profile.num_layers)))
                self._own[key] = (time.time(), profile.merge(own))
        if stale:
            self._seeded_keys.update(stale)
        else:
            self._seeded_models.add(model)
        self._others.update({k: (now, v) for k, v in others.items()})
        if back:  # after an outage: write what waited
            self.flush()
        return {**last, **others} if keys else others

    def _seeded(self, key: tuple[str, str]) -> bool:
        """Whether this replica's earlier record of ``key``, if any, is already in its totals."""
        return None in self._seeded_models or key[0] in self._seeded_models or key in self._seeded_keys

    def _merged(self, model: str, collection: str, others: dict) -> Profile | None:
        """Every replica's totals of one collection added up; the newest record's state wins."""
        parts = list(others.get((model, collection), []))
        if (model, collection) in self._own:
            parts.append(self._own[(model, collection)])
        return _add_up(model, collection, [p for _, p in sorted(parts, key=lambda part: part[0])])


class _Link:
    """Whether the server ``where`` is reachable: one warning when it goes away, one when it is back, and while it is
    away a new try at most every ``retry_seconds``."""

    def __init__(self, where: str, retry_seconds: float):
        self.where, self.retry_seconds = where, retry_seconds
        self.down_since: float | None = None
        self.last_try = 0.0

    def waiting(self) -> bool:
        """True while the server is away and the next try is not due."""
        return self.down_since is not None and time.monotonic() - self.last_try < self.retry_seconds

    def failed(self, exc: BaseException) -> None:
        self.last_try = time.monotonic()
        if self.down_since is None:
            self.down_since = time.time()
            log.warning(
                "profile server %s unreachable (%s): serving from the last profiles read, keeping this "
                "replica's updates until it is back",
                self.where,
                exc,
            )

    def succeeded(self) -> bool:
        """Note a call that reached the server; True if it had been away."""
        if self.down_since is None:
            return False
        log.warning("profile server %s reachable again after %.0f s", self.where, time.time() - self.down_since)
        self.down_since = None
        return True


class _Records:
    """The Chroma collection the records live in, made on first use by ``client()``: one record per (model,
    collection, replica), its running totals in the metadata (a document is text-indexed: 20x slower to write)."""

    def __init__(self, client: Callable[[], Any], name: str):
        self._client, self._name = client, name
        self._collection: Any = None
        self._warned: set[tuple[str, str]] = set()  # damaged records (id, content) already warned about

    def collection(self) -> Any:
        if self._collection is None:
            self._collection = self._client().get_or_create_collection(self._name, embedding_function=None)
        return self._collection

    @staticmethod
    def record_id(model: str, collection: str, replica: str) -> str:
        return json.dumps([model, collection, replica])

    def get(self, where: dict[str, Any] | None, replica: str) -> list[tuple[str, float, Profile]]:
        """(replica, update time, profile) of each readable record ``where`` selects; ``replica``'s damaged ones
        are kept aside before they are overwritten."""
        found = self.collection().get(where=where, include=["documents", "metadatas"])
        records = []
        for record_id, doc, meta in zip(found["ids"], found["documents"], found["metadatas"]):
            profile = self._parse(record_id, doc, meta, replica)
            if profile is not None:
                records.append((meta["replica"], meta["updated"], profile))
        return records

    def put(self, replica: str, records: list[tuple[float, Profile]]) -> None:
        """Write ``replica``'s (update time, profile) records."""
        self.collection().upsert(
            ids=[self.record_id(p.model, p.collection, replica) for _, p in records],
            metadatas=[
                {
                    "model": p.model,
                    "collection": p.collection,
                    "replica": replica,
                    "updated": t,
                    "profile": json.dumps(p.to_dict()),
                }
                for t, p in records
            ],
            embeddings=[[0.0]] * len(records),
        )

    def delete(self, where: dict[str, Any]) -> list[tuple[str, str]]:
        """Remove every record ``where`` selects; their (model, collection) keys."""
        found = self.collection().get(where=where, include=["metadatas"])
        if found["ids"]:
            self.collection().delete(ids=found["ids"])
        return [(m["model"], m["collection"]) for m in found["metadatas"]]

    def _parse(self, record_id: str, doc: str, meta: dict[str, Any], replica: str) -> Profile | None:
        """The profile of a record (in its metadata, or its document where older versions wrote it), or None if it
        is damaged: then a warning (once per record content) and, for a record of this ``replica`` (about to be
        overwritten), a copy kept aside."""
        if meta.get("model") == _CORRUPT_MODEL:
            return None
        doc = meta.get("profile", doc)
        try:
            profile = parse_profile(doc)
            if (profile.model, profile.collection) != (meta.get("model"), meta.get("collection")):
                raise ValueError("record metadata does not match its content")
            float(meta["updated"]), str(meta["replica"])
            return profile
        except (ValueError, TypeError, KeyError) as exc:
            if (record_id, doc) not in self._warned:
                self._warned.add((record_id, doc))
                warnings.warn(
                    f"ignoring corrupt profile record {record_id} (collection {meta.get('collection')!r}): {exc}",
                    stacklevel=4,
                )
            if meta.get("replica") == replica:
                self.collection().upsert(
                    ids=[f"{record_id}#corrupt-{time.time()}"],
                    documents=[str(doc)],
                    metadatas=[{"model": _CORRUPT_MODEL}],
                    embeddings=[[0.0]],
                )
            return None


def _http_client(host: str, port: int, ssl: bool, headers: dict[str, str] | None) -> Any:
    """A Chroma HTTP client; ConnectionError if the server cannot be reached."""
    import chromadb

    try:
        return chromadb.HttpClient(host=host, port=port, ssl=ssl, headers=headers)
    except ValueError as exc:  # the client checks the server when it is built
        raise ConnectionError(str(exc)) from exc


def _add_up(model: str, collection: str, profiles: list[Profile]) -> Profile | None:
    """``profiles`` of one collection added in order; one that cannot add to the others (layer counts, moment
    widths) is skipped with a warning."""
    total: Profile | None = None
    for profile in profiles:
        try:
            total = (total or Profile(model, collection, profile.num_layers)).merge(profile)
        except ValueError as exc:
            warnings.warn(
                f"ignoring a profile record of collection {collection!r} that does not add to the others: {exc}",
                stacklevel=5,
            )
    return total


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.TransportError, ConnectionError)


try:
    _UNREACHABLE = _unreachable_errors()
except ImportError:  # chromadb (and with it httpx) not installed: the store cannot be used anyway
    _UNREACHABLE = (ConnectionError,)
