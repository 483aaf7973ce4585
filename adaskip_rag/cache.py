"""A key/value cache for one sequence whose full-attention layers write into spare room instead of concatenating."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer


def new_cache(model: PreTrainedModel, capacity: int = 0) -> DynamicCache:
    """A cache for one sequence: its full-attention layers keep room for ``capacity`` tokens (more as needed),
    so adding a token does not copy the whole cache; sliding-window layers are transformers' own."""
    cache = DynamicCache(config=model.config)
    cache.layers = [RoomyLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class RoomyLayer(DynamicLayer):
    """A full-attention cache layer that writes new keys and values into spare room (twice the tokens when it runs
    out) instead of concatenating: ``keys`` and ``values`` are views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.room: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = self.get_seq_length(), key_states.shape[-2]
        keys, values = self.reserve(q, key_states, value_states)
        keys[..., n : n + q, :], values[..., n : n + q, :] = key_states, value_states
        return self.filled(n + q)

    def reserve(
        self, tokens: int, key_like: torch.Tensor | None = None, value_like: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The room (keys, values), with space for ``tokens`` more after the filled part; its first room is shaped
        like ``key_like`` and ``value_like``, a bigger one like the last. What is not filled holds zeros."""
        n = self.get_seq_length()
        if self.room is None or n + tokens > self.room[0].shape[-2]:
            size = max(self.capacity, 2 * (n + tokens)) if self.room is not None else max(self.capacity, n + tokens)
            likes = (key_like, value_like) if self.room is None else self.room
            # zeros, not garbage: a step that reads the whole room under a mask (``compiled.py``) weighs the rest 0
            room = tuple(s.new_zeros((*s.shape[:-2], size, s.shape[-1])) for s in likes)  # type: ignore[union-attr]
            if n:
                room[0][..., :n, :], room[1][..., :n, :] = self.keys, self.values  # type: ignore[assignment]
            self.room = room  # type: ignore[assignment]
        return self.room  # type: ignore[return-value]

    def filled(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mark the room's first ``tokens`` as the cache: (keys, values), views of them."""
        keys, values = self.room  # type: ignore[misc]
        self.keys, self.values = keys[..., :tokens, :], values[..., :tokens, :]
        return self.keys, self.values
