"""Attention mechanics of the skip-aware forward pass: attention with grouped query heads folded onto their KV
head, attention of a row that rewrites cached tokens, the keys and values a skipped attention sublayer still
caches, the protected head's attention among its own tokens, and the model's own rotary embedding."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

REWRITE_BLOCK = 64  # tokens of a rewriting row (evidence recompute) attended together, see rewriting_attention


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
