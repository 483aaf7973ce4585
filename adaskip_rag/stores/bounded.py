"""Calls into a profile store with a bounded time: what keeps a store's faults (a server that stops answering, a
locked or deleted file) from stalling or failing the requests that learn from it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """A profile store call failed, or did not return within the store's ``timeout``."""


class BoundedCalls:
    """Runs each call into one store in a thread of its own and waits for it at most ``timeout`` seconds.

    A call that raises or runs late raises :class:`StoreUnavailable`; then, for ``retry_seconds``, and while a late
    call still runs, calls raise it at once without touching the store. One warning is logged when the store fails
    and one when it answers again.
    """

    def __init__(self, name: str, timeout: float, retry_seconds: float):
        self.name, self.timeout, self.retry_seconds = name, timeout, retry_seconds
        self._lock = threading.Lock()
        self._late: threading.Thread | None = None
        self._down_since: float | None = None  # wall clock, for the messages
        self._failed_at = 0.0

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self._late is not None and self._late.is_alive():
                raise StoreUnavailable(f"profile store {self.name}: an earlier call has not returned")
            if self._down_since is not None and time.monotonic() - self._failed_at < self.retry_seconds:
                raise StoreUnavailable(f"profile store {self.name} failed; next try within {self.retry_seconds} s")
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller
                box["error"] = exc

        thread = threading.Thread(target=run, name="adaskip-store", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            self._failed(f"no answer within {self.timeout} s", thread)
            raise StoreUnavailable(f"profile store {self.name}: no answer within {self.timeout} s")
        if "error" in box:
            error = box["error"]
            self._failed(f"{type(error).__name__}: {error}")
            raise StoreUnavailable(f"profile store {self.name}: {type(error).__name__}: {error}") from error
        if self._down_since is not None:
            with self._lock:
                if self._down_since is not None:
                    log.warning(
                        "profile store %s answers again after %.0f s: learning resumes",
                        self.name,
                        time.time() - self._down_since,
                    )
                    self._down_since = None
        return box["value"]

    def _failed(self, why: str, late: threading.Thread | None = None) -> None:
        with self._lock:
            self._failed_at = time.monotonic()
            self._late = late or self._late
            if self._down_since is None:
                self._down_since = time.time()
                log.warning(
                    "profile store %s failed (%s): answering without learning until it is back (tried again "
                    "every %s s)",
                    self.name,
                    why,
                    self.retry_seconds,
                )
