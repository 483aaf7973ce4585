"""Attention mechanics of the skip-aware forward pass: the rows of a step attending each over its own cache
(:class:`RowAttention`: masks, rotary, the cache with room), attention with grouped query heads folded onto their KV
head, attention of a row that rewrites cached tokens, the keys and values a skipped attention sublayer still
caches, the protected head's attention among its own tokens, and the model's own rotary embedding."""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

REWRITE_BLOCK = 64  # tokens of a rewriting row (evidence recompute) attended together, see rewriting_attention
LOCAL_BLOCK = 128  # queries of a local-attention sublayer attended together, see local_attention


def folded_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | bool,
    scale: float,
    attention: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of queries ``q`` (1, heads, n, head_dim) over ``keys`` and ``values`` (1, kv_heads, kv, head_dim)
    under ``mask`` (1, 1, n, kv; False: none). The query heads that share a KV head become queries of that head, so
    keys and values are not copied. With ``attention``, the weights are computed explicitly and their sums over
    heads and queries added to it (its entries: the first keys)."""
    n, groups = q.shape[2], q.shape[1] // keys.shape[1]
    folded = q.reshape(1, keys.shape[1], groups * n, q.shape[-1])
    fold_mask = None if isinstance(mask, bool) else mask.repeat(1, 1, groups, 1)
    if attention is None or fold_mask is None:
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=fold_mask, scale=scale)
    else:
        scores = (folded @ keys.transpose(-1, -2)) * scale
        weights = scores.masked_fill(~fold_mask, -math.inf).softmax(-1, dtype=torch.float32)
        attention += weights.sum((0, 1, 2))[: len(attention)]
        out = weights.to(values.dtype) @ values
    return out.view(q.shape)


def token_attention(
    attn: Any,
    normed: torch.Tensor,
    cache: DynamicCache,
    index: int,
    rotary: tuple[torch.Tensor, ...],
    window: int | None,
) -> torch.Tensor:
    """Attention output (1, d) of layer ``index`` for one token that follows its ``cache`` (its input norm
    ``normed``, (1, d)), its keys and values added to the cache; ``window``: the layer's sliding window, if any. A
    decode step's attention as :class:`RowAttention` computes it, in the shapes one token has (no transposes)."""
    q, k, v = token_qkv(attn, normed, rotary)
    keys, values = cache.update(k, v, index)
    if window is not None:  # the token sees the last ``window`` keys (a sliding-window cache holds no more)
        keys, values = keys[..., -window:, :], values[..., -window:, :]
    return attn.o_proj(folded_attention(q, keys, values, False, attn.scaling).view(1, -1))


def token_qkv(
    attn: Any, normed: torch.Tensor, rotary: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (1, heads, 1, head_dim) of one token from its input norm ``normed`` (1, d): the
    projections, the model's Q and K norms if it has them, and the rotary."""
    shape = (1, -1, 1, attn.head_dim)
    q, k, v = attn.q_proj(normed).view(shape), attn.k_proj(normed).view(shape), attn.v_proj(normed).view(shape)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = rope(attn)(q, k, *rotary)
    return q, k, v


def rewriting_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, at: torch.Tensor, positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of a rewriting row's queries ``q`` (1, heads, n, head_dim) at the ascending ``positions`` (``at``:
    the same on the device), each over the cached keys up to its own position: in blocks of :data:`REWRITE_BLOCK`
    tokens, each over the keys its last token sees (a masked attention scores every query against every key)."""
    outs = []
    for a in range(0, len(positions), REWRITE_BLOCK):
        block = slice(a, a + REWRITE_BLOCK)
        kv = int(positions[block][-1]) + 1
        mask = (torch.arange(kv, device=at.device)[None] <= at[block, None])[None, None]
        outs.append(folded_attention(q[:, :, block], keys[:, :, :kv], values[:, :, :kv], mask, scale))
    return torch.cat(outs, 2)


def local_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int, window: int, scale: float
) -> torch.Tensor:
    """Attention of queries ``q`` (1, heads, n, head_dim) at positions ``first`` .. ``first + n - 1`` over the
    cached ``keys`` and ``values`` (1, kv_heads, first + n, head_dim), each query seeing the attention sink (key 0)
    and the keys of the last ``window`` positions up to its own (``SkipPlan.local``): in blocks of
    :data:`LOCAL_BLOCK` queries, each over the sink and the keys its block's queries see."""
    outs = []
    for a in range(first, first + q.shape[2], LOCAL_BLOCK):
        b = min(a + LOCAL_BLOCK, first + q.shape[2])
        near = torch.arange(max(1, a - window + 1), b, device=q.device)
        seen = torch.cat([torch.zeros(1, dtype=torch.long, device=q.device), near])  # the sink, then near keys
        at = torch.arange(a, b, device=q.device)[:, None]
        mask = (seen <= at) & ((seen == 0) | (at - seen < window))
        kv = (keys[:, :, seen], values[:, :, seen])
        outs.append(folded_attention(q[:, :, a - first : b - first], *kv, mask[None, None], scale))
    return torch.cat(outs, 2)


def rope(attn: Any) -> Any:
    """The model's own ``apply_rotary_pos_emb``, from the module of its attention class."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def cache_keys_values(
    layer: Any, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], cache: DynamicCache, index: int
) -> None:
    """Store the keys and values attention sublayer ``index`` computes from its input ``hidden``, as the full layer
    does (input norm, K/V projections, the model's K norm if it has one, rotary), without running attention."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    shape = (*normed.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(normed).view(shape)
    if getattr(attn, "k_norm", None) is not None:
        keys = attn.k_norm(keys)
    keys, values = keys.transpose(1, 2), attn.v_proj(normed).view(shape).transpose(1, 2)
    cos, sin = rotary
    _, keys = rope(attn)(keys[:, :0], keys, cos, sin)  # an empty query: only the keys are rotated
    cache.update(keys, values, index)


def head_attention(layer: Any, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention output of the first ``hidden.shape[1]`` tokens of a prefill: they see only each other."""
    m = hidden.shape[1]
    mask = torch.full((m, m), float("-inf"), dtype=hidden.dtype, device=hidden.device).triu(1)[None, None]
    out, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden),
        attention_mask=mask,
        position_embeddings=tuple(r[:, :m] for r in rotary),
    )
    return out


def layer_types(model: PreTrainedModel) -> list[str]:
    """Attention type of every layer ('full_attention' or 'sliding_attention'), as the model's cache sees it."""
    if model not in _LAYER_TYPES:  # reading them from the config takes about a millisecond: once per model
        _LAYER_TYPES[model] = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))[0]
    return _LAYER_TYPES[model]


_LAYER_TYPES: weakref.WeakKeyDictionary[PreTrainedModel, list[str]] = weakref.WeakKeyDictionary()


class AttendingRow(Protocol):
    """What attention reads of a row of a forward step (:class:`~adaskip_rag.forward.Row`)."""

    ids: torch.Tensor
    position: int
    cache: DynamicCache
    positions: torch.Tensor | None
    attention: torch.Tensor | None
    local: set[int]
    local_window: int

    @property
    def appends(self) -> bool: ...


class RowAttention:
    """Attention for the rows of one forward step, their tokens packed in one sequence: each row over its own cache
    (its keys and values added to it, written over cached ones, or only looked with), through the model's own
    attention module when one appending row runs the sublayer with more than one token (or any, where the model's
    attention is not SDPA). Holds the rows' token slices, rotary embeddings and
    masks for the step."""

    def __init__(self, model: PreTrainedModel, rows: Sequence[AttendingRow], device: torch.device):
        self.rows, self.config, self.device = rows, model.config, device
        # a decode step of the model's SDPA attention runs folded here: torch's bf16 SDPA of one query is ~6x slower
        self.sdpa = model.config._attn_implementation == "sdpa"
        self.types = layer_types(model)
        starts = [0]
        for r in rows:
            starts.append(starts[-1] + len(r.ids))
        self.slices = [slice(a, b) for a, b in zip(starts, starts[1:])]
        positions = torch.cat(
            [torch.arange(r.position, r.position + len(r.ids)) if r.positions is None else r.positions for r in rows]
        ).to(device)
        dummy = torch.empty(0, device=device, dtype=model.dtype)
        cos, sin = model.model.rotary_emb(dummy, position_ids=positions[None])
        self.rotary = [(cos[:, s], sin[:, s]) for s in self.slices]
        self.packed_rotary = {tuple(range(len(rows))): (cos, sin)}
        self.position_ids = [positions[None, s] for s in self.slices]
        self.masks: list[dict[tuple[str, int], Any]] = [{} for _ in rows]

    def __call__(self, i: int, layer: Any, x: torch.Tensor, running: list[int]) -> torch.Tensor:
        """Attention output of layer ``i`` for the tokens ``x`` of the ``running`` rows (packed in that order),
        each row's keys and values added to its cache."""
        first = self.rows[running[0]]
        if len(running) == 1 and first.appends and (x.shape[1] > 1 or not self.sdpa) and not self._local(i, first):
            return self._module_attention(i, layer, x, running[0])
        attn = layer.self_attn
        normed = layer.input_layernorm(x)[0]
        shape = (normed.shape[0], -1, attn.head_dim)
        q, k, v = attn.q_proj(normed).view(shape), attn.k_proj(normed).view(shape), attn.v_proj(normed).view(shape)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rope(attn)(q.transpose(0, 1)[None], k.transpose(0, 1)[None], *self._rotary_of(tuple(running)))
        v = v.transpose(0, 1)[None]  # (1, heads, tokens, head_dim), as q and k now
        outs, start = [], 0
        for r in running:
            row, n = self.rows[r], len(self.rows[r].ids)
            part = slice(start, start + n)
            start += n
            qr = q[:, :, part]
            keys, values = self._keys_values(i, r, k[:, :, part], v[:, :, part])
            if row.positions is not None:
                out = rewriting_attention(qr, keys, values, self.position_ids[r][0], row.positions, attn.scaling)
            elif self._local(i, row):
                out = local_attention(qr, keys, values, row.position, row.local_window, attn.scaling)
            else:
                mask = self._row_mask(i, r, keys.shape[-2])
                if mask is True:  # a prompt without a past: the plain causal mask
                    out = F.scaled_dot_product_attention(
                        qr, keys, values, is_causal=True, scale=attn.scaling, enable_gqa=qr.shape[1] != keys.shape[1]
                    )
                else:
                    out = folded_attention(qr, keys, values, mask, attn.scaling, row.attention)
            outs.append(out[0].transpose(0, 1).reshape(n, -1))
        return attn.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))[None]

    def _local(self, i: int, row: AttendingRow) -> bool:
        """Whether the row's tokens attend locally at layer ``i`` (a sliding-window layer already does)."""
        return i in row.local and self.types[i] == "full_attention"

    def _rotary_of(self, running: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding (cos, sin) of the tokens of the ``running`` rows, packed in that order."""
        if running not in self.packed_rotary:
            parts = [self.rotary[r] for r in running]
            self.packed_rotary[running] = (torch.cat([c for c, _ in parts], 1), torch.cat([s for _, s in parts], 1))
        return self.packed_rotary[running]

    def _keys_values(self, i: int, r: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Row ``r``'s keys and values at layer ``i`` with its new ``keys`` and ``values``: added to its cache,
        written over the cached ones at the row's ``positions``, or (a row that only looks) not kept."""
        row = self.rows[r]
        if row.appends:
            return row.cache.update(keys, values, i)
        layer = row.cache.layers[i]
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        if row.positions is not None:
            at = self.position_ids[r][0]  # the row's positions, already on the device
            layer.keys[:, :, at], layer.values[:, :, at] = keys, values
            return layer.keys, layer.values
        return torch.cat([layer.keys, keys], -2), torch.cat([layer.values, values], -2)

    def _row_mask(self, i: int, r: int, kv: int) -> torch.Tensor | bool:
        """Which of ``kv`` keys each token of row ``r`` (a row that follows them) may see: those up to its own
        position, within the window on a sliding-window layer. False when that is every key, True when it is the
        plain causal mask of a sequence without a past (both without a mask tensor)."""
        row, q = self.rows[r], len(self.rows[r].ids)
        window = self.config.sliding_window if self.types[i] == "sliding_attention" else None
        if row.appends and (window is None or kv <= window):
            if q == 1:
                return False
            if q == kv:
                return True
        # positions relative to the keys at hand (a sliding-window cache holds only the last ones)
        query = torch.arange(kv - q, kv, device=self.device)[:, None]
        key = torch.arange(kv, device=self.device)[None]
        allowed = key <= query
        if window is not None:
            allowed &= query - key < window
        return allowed[None, None]

    def _module_attention(self, i: int, layer: Any, x: torch.Tensor, r: int) -> torch.Tensor:
        """Row ``r``'s attention output of layer ``i`` through the model's own attention module and masks."""
        row = self.rows[r]
        key = (self.types[i], row.cache.get_seq_length(i))
        if key not in self.masks[r]:  # a mask per layer type and cache length: layers that skipped have shorter caches
            make_mask = create_sliding_window_causal_mask if key[0] == "sliding_attention" else create_causal_mask
            self.masks[r][key] = make_mask(
                config=self.config,
                inputs_embeds=x,
                attention_mask=None,
                cache=row.cache,
                position_ids=self.position_ids[r],
                layer_idx=i,
            )
        out, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(x),
            attention_mask=self.masks[r][key],
            position_ids=self.position_ids[r],
            cache=row.cache,
            use_cache=True,
            position_embeddings=self.rotary[r],
        )
        return out
