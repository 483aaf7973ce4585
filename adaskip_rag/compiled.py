"""The decode step of one answer token as one compiled graph (``torch.compile``, inductor). At one token a step's
dozens of small operations per layer (norms, rotary, residuals) cost as much as its matrix products; compiled, they
are fused and run without Python between them.

It serves the steps whose plan runs every sublayer (the full model, and plans that skip only in prefill, as the
default's attention skips that keep their keys and values) over a cache whose layers all have room (``cache.py``).
The token's keys and values are written into the room and attention reads the whole room under a mask, so the
graph's shapes do not change as the cache grows: the room's length is its one dynamic dimension, and one compilation
serves every request. Other steps run eagerly (``forward.py``)."""

from __future__ import annotations

import math
import time
import types
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from .attention import token_qkv
from .cache import RoomyLayer, new_cache


class CompiledDecode:
    """``model``'s one-token step compiled, and compiled now: the first call pays the compilation (seconds to a
    minute; inductor keeps it in its on-disk cache for the next process), :attr:`warmup_seconds` says how long.
    The model must not change afterwards (its modules are not checked again at each step)."""

    def __init__(self, model: PreTrainedModel):
        if any(type(layer) is not RoomyLayer for layer in new_cache(model).layers):
            raise ValueError("compile_decode: the model has sliding-window layers, whose decode steps do not compile")
        self.model = model
        # A copy of the step's code for this model alone: compilations are kept per code object, and this one's
        # skip the guards on the model's modules (checking them took 1.5 ms of a 13 ms step). Casts round as the
        # eager step's do.
        step = types.FunctionType(token_step.__code__.replace(), token_step.__globals__, token_step.__name__)
        self._step = torch.compile(
            step,
            fullgraph=True,
            options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                "emulate_precision_casts": True,
            },
        )
        start = time.perf_counter()
        try:
            self._warm_up()
        except Exception as e:  # inductor's own errors: no C++ compiler on a CPU machine, an unsupported module
            raise RuntimeError(f"compile_decode: the decode step did not compile ({type(e).__name__}: {e})") from e
        self.warmup_seconds = time.perf_counter() - start

    @staticmethod
    def serves(cache: DynamicCache) -> bool:
        """Whether a step over ``cache`` can run compiled: every layer has room (none is a sliding window's)."""
        return all(type(layer) is RoomyLayer and layer.room is not None for layer in cache.layers)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, position: int, cache: DynamicCache) -> torch.Tensor:
        """The logits (1, vocab) of token ``ids`` (1,) at ``position``, its keys and values added to ``cache``."""
        layers: list[RoomyLayer] = cache.layers  # type: ignore[assignment]
        n = layers[0].get_seq_length()
        rooms = [layer.reserve(1) for layer in layers]
        device = ids.device  # every input is made here, as the compiled graph's guards expect (inference tensors)
        like = torch.empty(0, dtype=self.model.dtype, device=device)  # the rotary's dtype and device
        rotary = self.model.model.rotary_emb(like, position_ids=torch.tensor([[position]], device=device))
        logits = self._step(self.model, ids.clone(), rotary, torch.tensor(n, device=device), rooms)
        for layer in layers:
            layer.filled(n + 1)
        return logits

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """One step over a cache of one token, its room's length marked dynamic, made as requests make theirs
        (in inference mode): the compilation every request then reuses."""
        attn, device = self.model.model.layers[0].self_attn, self.model.device
        kv_heads = self.model.config.num_key_value_heads
        cache = new_cache(self.model, capacity=8)
        like = torch.zeros(1, kv_heads, 1, attn.head_dim, dtype=self.model.dtype, device=device)
        layers: list[RoomyLayer] = cache.layers  # type: ignore[assignment]
        for i, layer in enumerate(layers):
            cache.update(like, like, i)
            for room in layer.reserve(1):
                torch._dynamo.mark_dynamic(room, 2)
        self(torch.zeros(1, dtype=torch.long, device=device), 1, cache)


def token_step(
    model: PreTrainedModel,
    ids: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    filled: torch.Tensor,
    rooms: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The logits (1, vocab) of token ``ids`` (1,) with ``rotary`` (cos, sin) at its position, every sublayer run:
    its keys and values written into each layer's room (keys, values: (1, kv_heads, room, head_dim)) after the
    ``filled`` tokens, attention over the room's first ``filled + 1``. What the eager one-token step computes
    (``forward._token_forward``); the rotary's angles are computed eagerly, as there, in float32 whatever the
    model's dtype (a compiled cosine rounds differently)."""
    base = model.model
    hidden = base.embed_tokens(ids)  # (1, d)
    at = filled.view(1)
    mask = (torch.arange(rooms[0][0].shape[2], device=ids.device) <= filled).view(1, 1, 1, -1)
    for layer, (keys, values) in zip(base.layers, rooms):
        attn: Any = layer.self_attn
        q, k, v = token_qkv(attn, layer.input_layernorm(hidden), rotary)
        keys.index_copy_(2, at, k)
        values.index_copy_(2, at, v)
        folded = q.view(1, keys.shape[1], -1, attn.head_dim)  # query heads that share a KV head: its queries
        scores = (folded @ keys.transpose(-1, -2)) * attn.scaling  # explicit: compiled, 1.3x SDPA at 4k tokens
        weights = scores.masked_fill(~mask, -math.inf).softmax(-1, dtype=torch.promote_types(keys.dtype, torch.float32))
        out = weights.to(values.dtype) @ values
        hidden = hidden + attn.o_proj(out.view(1, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(base.norm(hidden))
