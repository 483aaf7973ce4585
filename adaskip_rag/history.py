"""Per-collection profiles of sublayer importance, and the stores that keep them.

A :class:`Profile` holds, for one (model fingerprint, collection), running *sums and counts* of the prefill
IO similarity and scale of every sublayer and the moments its compensation is fitted from
(``compensation.py``), so merging profiles (collections into a global profile, or replicas into one) is exact
and order-free. :class:`SQLiteProfileStore` is the default store: one file, WAL,
every update one transaction, safe across threads and processes. Replicas of a service share profiles through
a Chroma server (``chroma_store.ChromaProfileStore``); :func:`open_store` opens either from a URL.
"""

from __future__ import annotations

import base64
import json
import math
import re
import sqlite3
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch

from .compensation import check_moments
from .skipping import Probe, Sublayer

FORMAT = 1
KINDS = ("attn", "ffn")
METRICS = ("similarity", "scale", "scale_no_sink")
MAX_COLLECTION_KEY = 256


def check_collection(key: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"collection key must be a non-empty string, got {key!r}")
    if len(key) > MAX_COLLECTION_KEY:
        raise ValueError(f"collection key is {len(key)} characters long; the limit is {MAX_COLLECTION_KEY}")
    return key


@dataclass
class Profile:
    """Sums and counts of prefill probes of one (model, collection), plus what the learner keeps beside them.

    ``sums[f"{kind}.{metric}"][layer]`` and ``counts[kind][layer]``; ``moments[k, layer]`` (k = 0 attention,
    1 FFN; float64, shape (2, num_layers, 4 d + 2)) the sums compensations are fitted from, None in profiles
    written before they were kept (those plan with the scalar compensation). ``state`` holds per-collection
    settings that are not sums (the quality guard's budget, the latest measured speedup): last writer wins.
    """

    model: str
    collection: str
    num_layers: int
    queries: int = 0
    context_tokens: int = 0
    max_context: int = 0
    sums: dict[str, list[float]] = field(default_factory=dict)
    counts: dict[str, list[int]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    moments: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for kind in KINDS:
            self.counts.setdefault(kind, [0] * self.num_layers)
            for metric in METRICS:
                self.sums.setdefault(f"{kind}.{metric}", [0.0] * self.num_layers)

    @classmethod
    def from_probes(
        cls, model: str, collection: str, num_layers: int, probes: Mapping[Sublayer, Probe], context_tokens: int
    ) -> "Profile":
        """The contribution of one served query: its prompt length and the probes of the sublayers it ran."""
        delta = cls(model, collection, num_layers, queries=1, context_tokens=context_tokens, max_context=context_tokens)
        for (kind, layer), probe in probes.items():
            delta.counts[kind][layer] += 1
            for metric in METRICS:
                delta.sums[f"{kind}.{metric}"][layer] += getattr(probe, metric)
            if probe.moments is not None:
                if delta.moments is None:
                    delta.moments = torch.zeros(len(KINDS), num_layers, probe.moments.numel(), dtype=torch.float64)
                delta.moments[KINDS.index(kind), layer] += probe.moments
        return delta

    def merge(self, other: "Profile") -> "Profile":
        """A new profile with both profiles' sums and counts added (``other.state`` wins on conflicts)."""
        if other.model != self.model or other.num_layers != self.num_layers:
            raise ValueError(f"cannot merge a profile of {other.model} into one of {self.model}")
        return Profile(
            model=self.model,
            collection=self.collection,
            num_layers=self.num_layers,
            queries=self.queries + other.queries,
            context_tokens=self.context_tokens + other.context_tokens,
            max_context=max(self.max_context, other.max_context),
            sums={k: [a + b for a, b in zip(v, other.sums[k])] for k, v in self.sums.items()},
            counts={k: [a + b for a, b in zip(v, other.counts[k])] for k, v in self.counts.items()},
            state={**self.state, **other.state},
            moments=_add(self.moments, other.moments),
        )

    def mean(self, metric: str = "similarity") -> dict[Sublayer, float]:
        """Mean of ``metric`` for every sublayer measured at least once."""
        return {
            Sublayer(kind, layer): self.sums[f"{kind}.{metric}"][layer] / count
            for kind in KINDS
            for layer, count in enumerate(self.counts[kind])
            if count
        }

    def sublayer_moments(self, sub: Sublayer) -> torch.Tensor | None:
        """The compensation moments of one sublayer (None if this profile keeps none)."""
        return None if self.moments is None else self.moments[KINDS.index(sub.kind), sub.layer]

    @property
    def mean_context(self) -> float:
        return self.context_tokens / self.queries if self.queries else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "moments"}}
        if self.moments is not None:  # little-endian float64, base64: 1.1 MB for a 30-layer model with d = 576
            raw = self.moments.numpy().astype("<f8").tobytes()
            data["moments"] = {"shape": list(self.moments.shape), "float64": base64.b64encode(raw).decode()}
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "Profile":
        """Parse and validate field by field: types, ranges, finiteness, list lengths equal to ``num_layers`` (and
        to the layer count in a fingerprint's ``-<L>L-``), the layout of ``state``; ValueError naming the field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"malformed profile: not a JSON object but {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"malformed profile: unknown format {data.get('format')!r}")
        names = {f.name for f in fields(cls)}
        missing, unknown = names - {"moments"} - set(data), set(data) - names - {"format"}
        if missing or unknown:
            raise ValueError(f"malformed profile: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
        for name in ("model", "collection"):
            if not isinstance(data[name], str) or not data[name].strip() or len(data[name]) > MAX_COLLECTION_KEY:
                raise _field(name, f"must be a non-empty string of at most {MAX_COLLECTION_KEY} characters")
        for name in ("num_layers", "queries", "context_tokens", "max_context"):
            if not _is_int(data[name]) or data[name] < (1 if name == "num_layers" else 0):
                raise _field(name, f"must be an integer >= {1 if name == 'num_layers' else 0}, got {data[name]!r}")
        L, queries = data["num_layers"], data["queries"]
        declared = re.search(r"-(\d+)L-", data["model"])
        if declared and int(declared.group(1)) != L:
            raise _field("num_layers", f"is {L}, but the model {data['model']} has {declared.group(1)} layers")
        if data["max_context"] > data["context_tokens"]:
            raise _field("max_context", "exceeds context_tokens, the sum of all prompt lengths")
        sums, counts = data["sums"], data["counts"]
        if not isinstance(sums, Mapping) or set(sums) != {f"{k}.{m}" for k in KINDS for m in METRICS}:
            raise _field("sums", f"must map exactly {[f'{k}.{m}' for k in KINDS for m in METRICS]} to lists")
        if not isinstance(counts, Mapping) or set(counts) != set(KINDS):
            raise _field("counts", f"must map exactly {list(KINDS)} to lists")
        for key, values in sums.items():
            if not _numbers(values, L, lambda x: not isinstance(x, bool) and isinstance(x, (int, float))
                            and math.isfinite(x)):
                raise _field(f"sums.{key}", f"must be {L} finite numbers")
        for key, values in counts.items():
            if not _numbers(values, L, lambda x: _is_int(x) and 0 <= x <= queries):
                raise _field(f"counts.{key}", f"must be {L} integers in [0, queries = {queries}]")
        _check_state(data["state"])
        try:
            moments = _moments(data.get("moments"), L)
        except (KeyError, TypeError, AttributeError) as exc:
            raise _field("moments", f"malformed ({exc!r})") from None
        return cls(model=data["model"], collection=data["collection"], num_layers=L, queries=queries,
                   context_tokens=data["context_tokens"], max_context=data["max_context"],
                   sums={k: list(v) for k, v in sums.items()}, counts={k: list(v) for k, v in counts.items()},
                   state=dict(data["state"]), moments=moments)


def parse_profile(text: str | bytes) -> Profile:
    """A profile from its JSON text (what every reader uses): ValueError for anything that does not parse or
    validate, nesting too deep for the JSON parser included."""
    return Profile.from_dict(_json(text))


def _json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("malformed profile: JSON nested too deeply") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed profile: not JSON ({exc})") from None


def _field(name: str, problem: str) -> ValueError:
    return ValueError(f"malformed profile: field {name!r} {problem}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numbers(values: Any, length: int, ok: Any) -> bool:
    return isinstance(values, list) and len(values) == length and all(ok(x) for x in values)


def _check_state(state: Any) -> None:
    """The learner's per-collection state: ``skip_set`` (sublayer names), ``measured`` (the latest refresh) and
    ``guard`` (the quality guard's budget)."""
    if not isinstance(state, Mapping) or set(state) - {"skip_set", "measured", "guard"}:
        raise _field("state", "must be an object with only skip_set, measured and guard")
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
    fraction = lambda x: x is None or number(x) and 0 <= x <= 1  # noqa: E731
    if "skip_set" in state and not (isinstance(state["skip_set"], list)
                                    and all(isinstance(x, str) for x in state["skip_set"])):
        raise _field("state.skip_set", "must be a list of sublayer names")
    measured = state.get("measured")
    if measured is not None and not (
        isinstance(measured, Mapping) and set(measured) == {"speedup", "prompt_tokens", "budget", "fidelity"}
        and number(measured["speedup"]) and measured["speedup"] > 0 and _is_int(measured["prompt_tokens"])
        and _is_int(measured["budget"]) and measured["budget"] >= 0 and fraction(measured["fidelity"])
    ):
        raise _field("state.measured", "must hold a positive finite speedup, prompt_tokens, budget and fidelity")
    guard = state.get("guard")
    if guard is not None and not (
        isinstance(guard, Mapping) and set(guard) == {"budget", "reason", "fidelity"} and _is_int(guard["budget"])
        and guard["budget"] >= 0 and isinstance(guard["reason"], str) and fraction(guard["fidelity"])
    ):
        raise _field("state.guard", "must hold an integer budget >= 0, a reason and a fidelity in [0, 1]")


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return None if a is None and b is None else (b if a is None else a).clone()  # a merge owns its result
    if a.shape != b.shape:
        raise ValueError(f"cannot merge compensation moments of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return a + b


def _moments(data: Any, num_layers: Any) -> torch.Tensor | None:
    """Decode and validate the ``moments`` of a profile's JSON; ValueError if they are malformed."""
    if data is None:
        return None
    shape = data["shape"]
    if (not isinstance(shape, list) or len(shape) != 3 or shape[:2] != [len(KINDS), num_layers]
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise ValueError(f"malformed profile: moments of shape {shape!r} for {num_layers!r} layers")
    try:
        raw = base64.b64decode(data["float64"], validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed profile: moments are not base64 ({exc})") from None
    if len(raw) != 8 * math.prod(shape):
        raise ValueError(f"malformed profile: {len(raw)} bytes of moments for shape {shape}")
    moments = torch.from_numpy(np.frombuffer(raw, dtype="<f8").astype(np.float64)).reshape(shape)
    if not check_moments(moments):
        raise ValueError("malformed profile: moments are not finite, or have negative squares or token counts")
    return moments


def merged(profiles: Iterable[Profile], collection: str) -> Profile | None:
    """All profiles added into one under the name ``collection`` (None when there are none)."""
    total: Profile | None = None
    for p in profiles:
        total = Profile(p.model, collection, p.num_layers).merge(p) if total is None else total.merge(p)
    return total


class ProfileStore(ABC):
    """Where profiles live. ``add`` must be atomic: concurrent adders never lose an update."""

    @abstractmethod
    def get(self, model: str, collection: str) -> Profile | None: ...

    @abstractmethod
    def add(self, delta: Profile) -> Profile:
        """Merge ``delta`` into the stored profile of its (model, collection) and return the result."""

    @abstractmethod
    def profiles(self, model: str | None = None) -> list[Profile]:
        """Every valid stored profile (of one model, if given)."""

    @abstractmethod
    def delete(self, model: str, collection: str | None = None) -> int:
        """Remove one collection's profile (or all of a model's); returns how many were removed."""

    def global_profile(self, model: str) -> Profile | None:
        """All collections of ``model`` merged (exact: sums add)."""
        return merged(self.profiles(model), "*")

    def export_json(self, model: str | None = None) -> str:
        return json.dumps([p.to_dict() for p in self.profiles(model)], indent=1)

    def add_all(self, deltas: list[Profile]) -> list[Profile]:
        """:meth:`add` of every delta, written together where the store can (SQLite: one transaction)."""
        return [self.add(delta) for delta in deltas]

    def import_json(self, text: str) -> int:
        """Add every profile in ``text`` (from :meth:`export_json`) to this store; returns how many were added.
        Every item is validated first and all are written together: a bad item writes nothing (ValueError
        naming the item and the field)."""
        items = _json(text)
        if not isinstance(items, list):
            raise ValueError("profile JSON must be a list of profiles")
        profiles = []
        for i, item in enumerate(items):
            try:
                profiles.append(Profile.from_dict(item))
                check_collection(profiles[-1].collection)
            except ValueError as exc:
                raise ValueError(f"profile {i} of {len(items)}: {exc}") from None
        for i, p in enumerate(profiles):  # the merges a write will make, checked before anything is written
            stored = self.get(p.model, p.collection)
            try:
                (stored or Profile(p.model, p.collection, p.num_layers)).merge(p)
            except ValueError as exc:
                raise ValueError(f"profile {i} of {len(items)}: {exc}") from None
        self.add_all(profiles)
        return len(profiles)


class SQLiteProfileStore(ProfileStore):
    """Profiles in one SQLite file (WAL). Each :meth:`add` is one ``BEGIN IMMEDIATE`` transaction.

    A row that does not validate is never used: the first read that meets it warns once, naming the collection
    and the field, and moves it to the ``corrupt_profiles`` table (kept for inspection); the collection starts
    afresh. A file that is not a SQLite database (damaged, truncated) is renamed to ``<name>.corrupt-<time>``
    with a warning and a fresh store is created: profiles are relearned, serving goes on.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time():.0f}")
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{self.path}{suffix}").exists():
                    Path(f"{self.path}{suffix}").rename(f"{aside}{suffix}")
            warnings.warn(f"profile store {self.path} is damaged ({exc}): moved to {aside}, starting a new store; "
                          "collections relearn their profiles", stacklevel=2)
            self._create()

    def _create(self) -> None:
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS profiles (model TEXT, collection TEXT, data TEXT NOT NULL, "
                "updated REAL NOT NULL, PRIMARY KEY (model, collection))"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS corrupt_profiles (model TEXT, collection TEXT, data TEXT, moved REAL)"
            )
            db.execute("SELECT count(*) FROM profiles").fetchone()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)  # autocommit; add() opens its own
        try:
            db.execute("PRAGMA busy_timeout=60000")
            yield db
        finally:
            db.close()

    def _read(self, db: sqlite3.Connection, model: str, collection: str, data: str) -> Profile | None:
        """The row's profile, or None after moving a row that does not validate aside (with one warning)."""
        try:
            profile = parse_profile(data)
            if (profile.model, profile.collection) != (model, collection):
                raise ValueError("malformed profile: row key does not match its content")
            return profile
        except ValueError as exc:
            self._move_aside(db, model, collection, data, exc)
            return None

    @staticmethod
    def _move_aside(db: sqlite3.Connection, model: str, collection: str, data: str, why: Exception) -> None:
        moved = db.execute(  # unless another reader moved it first
            "DELETE FROM profiles WHERE model = ? AND collection = ? AND data = ?", (model, collection, data)
        ).rowcount
        if moved:
            db.execute("INSERT INTO corrupt_profiles VALUES (?, ?, ?, ?)", (model, collection, data, time.time()))
            warnings.warn(f"profile of collection {collection!r} (model {model}) moved aside to corrupt_profiles: "
                          f"{why}", stacklevel=4)

    def get(self, model: str, collection: str) -> Profile | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT data FROM profiles WHERE model = ? AND collection = ?", (model, collection)
            ).fetchone()
            return self._read(db, model, collection, row[0]) if row else None

    def add(self, delta: Profile) -> Profile:
        return self.add_all([delta])[0]

    def add_all(self, deltas: list[Profile]) -> list[Profile]:
        """:meth:`add` of every delta in one transaction: all are written, or (on an error) none."""
        for delta in deltas:
            check_collection(delta.collection)
        results = []
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for delta in deltas:
                    results.append(self._add(db, delta))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")  # a crash before this line rolls the whole update back
        return results

    def _add(self, db: sqlite3.Connection, delta: Profile) -> Profile:
        row = db.execute(
            "SELECT data FROM profiles WHERE model = ? AND collection = ?", (delta.model, delta.collection)
        ).fetchone()
        current = self._read(db, delta.model, delta.collection, row[0]) if row else None
        try:
            result = (current or Profile(delta.model, delta.collection, delta.num_layers)).merge(delta)
        except ValueError as exc:  # a stored profile this model's updates cannot add to (layers, moment widths)
            self._move_aside(db, delta.model, delta.collection, row[0], exc)
            result = Profile(delta.model, delta.collection, delta.num_layers).merge(delta)
        db.execute(
            "INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?)",
            (delta.model, delta.collection, json.dumps(result.to_dict()), time.time()),
        )
        return result

    def profiles(self, model: str | None = None) -> list[Profile]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT model, collection, data FROM profiles WHERE ? IS NULL OR model = ? ORDER BY model, collection",
                (model, model),
            ).fetchall()
            return [p for p in (self._read(db, *row) for row in rows) if p is not None]

    def delete(self, model: str, collection: str | None = None) -> int:
        with self._connect() as db:
            cur = db.execute(
                "DELETE FROM profiles WHERE model = ? AND (? IS NULL OR collection = ?)", (model, collection, collection)
            )
            return cur.rowcount


def open_store(url: str | Path) -> ProfileStore:
    """The store at ``url``: a file path, ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` (SQLite), or
    ``chroma://host:port[/collection][?replica=NAME&cache_seconds=S&retry_seconds=S&max_pending=N&ssl=1]``
    (profiles shared through a Chroma server)."""
    text = str(url)
    parts = urlsplit(text)
    if parts.scheme == "sqlite":
        return SQLiteProfileStore(parts.path[1:])  # sqlite:///relative, sqlite:////absolute
    if parts.scheme != "chroma":
        if "://" in text:
            raise ValueError(f"unknown profile store {text!r}: use a file path, sqlite:///PATH or chroma://HOST:PORT")
        return SQLiteProfileStore(text)
    from .chroma_store import DEFAULT_COLLECTION, ChromaProfileStore

    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    known = {"replica", "cache_seconds", "retry_seconds", "max_pending", "ssl"}
    if set(query) - known:
        raise ValueError(f"unknown profile store options {sorted(set(query) - known)} in {text!r}")
    try:
        options = {
            **({"replica": query["replica"]} if "replica" in query else {}),
            **{k: float(query[k]) for k in ("cache_seconds", "retry_seconds") if k in query},
            **({"max_pending": int(query["max_pending"])} if "max_pending" in query else {}),
            "ssl": query.get("ssl", "0").lower() in ("1", "true", "yes"),
        }
        port = parts.port or 8000
    except ValueError as exc:
        raise ValueError(f"bad profile store URL {text!r}: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"profile store URL {text!r} names no host")
    return ChromaProfileStore(parts.hostname, port, collection=parts.path.strip("/") or DEFAULT_COLLECTION, **options)
