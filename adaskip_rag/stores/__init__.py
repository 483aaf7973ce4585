"""Where profiles live: :class:`SQLiteProfileStore` (one file, the default) and :class:`ChromaProfileStore`
(shared by the replicas of a service through a Chroma server); :func:`open_store` opens either from a URL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from .base import ProfileStore
from .sqlite import SQLiteProfileStore

if TYPE_CHECKING:
    from .chroma import ChromaProfileStore

__all__ = ["ChromaProfileStore", "ProfileStore", "SQLiteProfileStore", "open_store"]


def __getattr__(name: str):  # ChromaProfileStore needs chromadb only when used
    if name == "ChromaProfileStore":
        from .chroma import ChromaProfileStore

        return ChromaProfileStore
    raise AttributeError(name)


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
    from .chroma import PROFILES_COLLECTION, ChromaProfileStore

    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    known = {"replica", "cache_seconds", "retry_seconds", "max_pending", "ssl"}
    if set(query) - known:
        raise ValueError(f"unknown profile store options {sorted(set(query) - known)} in {text!r}")
    try:
        options: dict[str, Any] = {
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
    return ChromaProfileStore(
        parts.hostname, port, profiles_collection=parts.path.strip("/") or PROFILES_COLLECTION, **options
    )
