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
    cache.layers = [_RoomyLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class _RoomyLayer(DynamicLayer):
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
        if self.room is None or n + q > self.room[0].shape[-2]:
            size = max(self.capacity, 2 * (n + q)) if self.room is not None else max(self.capacity, n + q)
            room = tuple(s.new_empty((*s.shape[:-2], size, s.shape[-1])) for s in (key_states, value_states))
            if n:
                room[0][..., :n, :], room[1][..., :n, :] = self.keys, self.values  # type: ignore[assignment]
            self.room = room  # type: ignore[assignment]
        keys, values = self.room  # type: ignore[misc]
        keys[..., n : n + q, :], values[..., n : n + q, :] = key_states, value_states
        self.keys, self.values = keys[..., : n + q, :], values[..., : n + q, :]
        return self.keys, self.values
