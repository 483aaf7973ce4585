"""The interface of a profile store, and what every store gets from it (JSON export and import).

A store keeps, for every model, one small record per collection (sums and counts, no moments) and the model's
global profile (collection ``"*"``): the running sum of every collection's updates, with the compensation moments,
updated by every :meth:`ProfileStore.add` in the same write. So planning reads two records at any number of
collections. Removing a collection's profile leaves what the model learned from it in the global profile.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod

from ..profiles import Profile, check_collection, load_json


class ProfileStore(ABC):
    """Where profiles live. ``add`` must be atomic: concurrent adders never lose an update.

    The learner gives every call ``timeout`` seconds; a call that fails or runs late leaves the requests of that
    time answered without learning, and the store is tried again every ``retry_seconds`` (see ``bounded.py``).
    """

    timeout: float = 2.0
    retry_seconds: float = 1.0

    @abstractmethod
    def get(self, model: str, collection: str) -> Profile | None:
        """The collection's stored profile (without moments)."""

    @abstractmethod
    def global_profile(self, model: str) -> Profile | None:
        """The model's global profile: every collection's updates added up, with the compensation moments."""

    @abstractmethod
    def add(self, delta: Profile) -> Profile:
        """Merge ``delta`` into the stored profile of its (model, collection) and into the model's global profile;
        return the collection's."""

    @abstractmethod
    def profiles(self, model: str | None = None) -> list[Profile]:
        """Every valid stored collection profile (of one model, if given); not the global profiles."""

    @abstractmethod
    def delete(self, model: str, collection: str | None = None) -> int:
        """Remove one collection's profile (or all of a model's); returns how many were removed."""

    def migrate(self, old: str, new: str) -> int | None:
        """Move every profile of model ``old`` (its collections and its global profile) to model ``new``, each added
        to what ``new`` has; returns how many collections moved, or None if the store cannot do it now (a server
        away: the learner tries again at its next read). The learner calls it when a model's fingerprint changes
        between versions. A store that does not implement it keeps them where they are (relearned)."""
        return 0

    def export_json(self, model: str | None = None) -> str:
        return json.dumps([p.to_dict() for p in self.profiles(model)], indent=1)

    def add_all(self, deltas: list[Profile]) -> list[Profile]:
        """:meth:`add` of every delta, written together where the store can (SQLite: one transaction)."""
        return [self.add(delta) for delta in deltas]

    def import_json(self, text: str) -> int:
        """Add every profile in ``text`` (from :meth:`export_json`) to this store; returns how many were added.
        Every item is validated first and all are written together: a bad item writes nothing (ValueError
        naming the item and the field)."""
        items = load_json(text)
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
