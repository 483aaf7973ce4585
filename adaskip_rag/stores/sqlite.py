"""Profiles in one SQLite file: the default store."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..profiles import GLOBAL, Profile, check_collection, merged, parse_profile
from .base import ProfileStore


class SQLiteProfileStore(ProfileStore):
    """Profiles in one SQLite file (WAL). Each :meth:`add` is one ``BEGIN IMMEDIATE`` transaction; a call waits at
    most ``timeout`` seconds for another connection's lock (then ``sqlite3.OperationalError``). A file removed while
    serving is created anew (with a warning) by the next call.

    A row that does not validate is never used: the first read that meets it warns once, naming the collection
    and the field, and moves it to the ``corrupt_profiles`` table (kept for inspection); the collection starts
    afresh. A file that is not a SQLite database (damaged, truncated) is renamed to ``<name>.corrupt-<time>``
    with a warning and a fresh store is created: profiles are relearned, serving goes on.
    """

    def __init__(self, path: str | Path, *, timeout: float = ProfileStore.timeout):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.path, self.timeout = Path(path), float(timeout)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made = False  # whether a file this store made has been seen (a later missing file was removed)
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time():.0f}")
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{self.path}{suffix}").exists():
                    Path(f"{self.path}{suffix}").rename(f"{aside}{suffix}")
            warnings.warn(
                f"profile store {self.path} is damaged ({exc}): moved to {aside}, starting a new store; "
                "collections relearn their profiles",
                stacklevel=2,
            )
            self._create()
        self._made = True

    def _create(self) -> None:
        with self._connect() as db:
            self._tables(db)

    @staticmethod
    def _tables(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS profiles (model TEXT, collection TEXT, data TEXT NOT NULL, "
            "updated REAL NOT NULL, PRIMARY KEY (model, collection))"
        )
        db.execute("CREATE TABLE IF NOT EXISTS corrupt_profiles (model TEXT, collection TEXT, data TEXT, moved REAL)")
        db.execute("SELECT count(*) FROM profiles").fetchone()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        gone = not self.path.exists()
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)  # autocommit; add() opens its own
        try:
            db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            if gone and self._made:
                warnings.warn(f"profile store {self.path} was removed: starting a new one", stacklevel=4)
                self._tables(db)
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
            warnings.warn(
                f"profile of collection {collection!r} (model {model}) moved aside to corrupt_profiles: {why}",
                stacklevel=4,
            )

    def get(self, model: str, collection: str) -> Profile | None:
        with self._connect() as db:
            return self._row(db, model, collection)

    def _row(self, db: sqlite3.Connection, model: str, collection: str) -> Profile | None:
        row = db.execute("SELECT data FROM profiles WHERE model = ? AND collection = ?", (model, collection)).fetchone()
        return self._read(db, model, collection, row[0]) if row else None

    def global_profile(self, model: str) -> Profile | None:
        with self._connect() as db:
            found = self._row(db, model, GLOBAL)
            if (
                found is not None
                or not db.execute("SELECT 1 FROM profiles WHERE model = ? LIMIT 1", (model,)).fetchone()
            ):
                return found  # stored, or nothing to add up: no write lock taken
        with self._connect() as db:  # a store written before global profiles were kept: add it up once
            db.execute("BEGIN IMMEDIATE")
            try:
                found = self._global(db, model)
                if found is not None:
                    self._write(db, found)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return found

    def _global(self, db: sqlite3.Connection, model: str) -> Profile | None:
        """The stored global profile of ``model``, else its collections added up (None if it has none)."""
        found = self._row(db, model, GLOBAL)
        if found is not None:
            return found
        rows = db.execute(
            "SELECT collection, data FROM profiles WHERE model = ? AND collection != ?", (model, GLOBAL)
        ).fetchall()
        return merged((p for p in (self._read(db, model, c, d) for c, d in rows) if p is not None), GLOBAL)

    @staticmethod
    def _write(db: sqlite3.Connection, profile: Profile) -> None:
        db.execute(
            "INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?)",
            (profile.model, profile.collection, json.dumps(profile.to_dict()), time.time()),
        )

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
        """Merge ``delta`` into the model's global row (made first where it is missing, so that it also holds what
        came before) and into its collection's row, which keeps no moments."""
        own, total = delta.split()
        self._write(db, self._merged(db, self._global(db, delta.model), total))
        result = self._merged(db, self._row(db, delta.model, delta.collection), own).split()[0]
        self._write(db, result)
        return result

    def _merged(self, db: sqlite3.Connection, current: Profile | None, delta: Profile) -> Profile:
        """``delta`` added to the stored ``current`` of its key; a stored profile it cannot add to (layers, moment
        widths) is moved aside."""
        empty = Profile(delta.model, delta.collection, delta.num_layers)
        try:
            return (current or empty).merge(delta)
        except ValueError as exc:
            (data,) = db.execute(
                "SELECT data FROM profiles WHERE model = ? AND collection = ?", (delta.model, delta.collection)
            ).fetchone()
            self._move_aside(db, delta.model, delta.collection, data, exc)
            return empty.merge(delta)

    def migrate(self, old: str, new: str) -> int:
        """See :meth:`ProfileStore.migrate`; one transaction."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute("SELECT collection, data FROM profiles WHERE model = ?", (old,)).fetchall()
                moved = [p for p in (self._read(db, old, c, d) for c, d in rows) if p is not None]
                for profile in sorted(moved, key=lambda p: p.collection != GLOBAL):  # the global profile first
                    delta = dataclasses.replace(profile, model=new)
                    current = (
                        self._global(db, new) if delta.collection == GLOBAL else self._row(db, new, delta.collection)
                    )
                    self._write(db, self._merged(db, current, delta))
                db.execute("DELETE FROM profiles WHERE model = ?", (old,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return sum(p.collection != GLOBAL for p in moved)

    def profiles(self, model: str | None = None) -> list[Profile]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT model, collection, data FROM profiles WHERE (? IS NULL OR model = ?) AND collection != ? "
                "ORDER BY model, collection",
                (model, model, GLOBAL),
            ).fetchall()
            return [p for p in (self._read(db, *row) for row in rows) if p is not None]

    def delete(self, model: str, collection: str | None = None) -> int:
        """Remove one collection's profile (the global profile keeps what it added), or all of a model's."""
        with self._connect() as db:
            cur = db.execute(
                "DELETE FROM profiles WHERE model = ? AND (? IS NULL AND collection != ? OR collection = ?)",
                (model, collection, GLOBAL, collection),
            )
            if collection is None:
                db.execute("DELETE FROM profiles WHERE model = ? AND collection = ?", (model, GLOBAL))
            return cur.rowcount
