"""Skip-aware forward pass over a pre-norm decoder stack (AdaSkip, arXiv 2501.02336), for several sequences at
once, each with its own plan.

Decoder layer ``l`` computes ``h1 = h0 + Attn(norm(h0))`` and ``h2 = h1 + FFN(norm(h1))``. A skipped sublayer is
replaced by a compensation of its input (``compensation.py``): ``h1 = f(h0)`` or ``h2 = f(h1)``, in the paper
``f(x) = s * x``. A skipped attention sublayer either stores no keys and values, so it stays skipped for the rest
of the request (the paper), or still computes them from its input as the full layer would (input norm, K/V
projections, rotary) and runs in full in decode (``SkipPlan.prefill_attn``).

One step runs :class:`Row` s: some tokens of one sequence (a decode token, a prefill chunk) with its cache, its
position and its plan. Their tokens are packed into one (tokens, d) matrix. At every sublayer the rows whose plan
runs it go through it together (one matrix product per weight) and the others get their compensation; attention
runs per row over the row's own cache. A sublayer that one row runs calls the model's own attention module, as
transformers does. Nothing request-specific is stored on the model, so one model serves concurrent requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .attention import cache_keys_values, folded_attention, head_attention, rewriting_attention, rope
from .compensation import apply
from .probes import Phase, Probes, token_stats
from .skipping import Probe, SkipPlan, Sublayer


def layer_types(model: PreTrainedModel) -> list[str]:
    """Attention type of every layer ('full_attention' or 'sliding_attention'), as the model's cache sees it."""
    return get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))[0]


@dataclass
class Row:
    """Tokens ``ids`` (q,) of one sequence, the first at ``position``, fed under ``plan`` into ``cache``.

    Returns the logits of the last ``logits_to_keep`` of them (0 = all); ``probes`` (if given) records every
    sublayer the row runs. In a prefill from position 0 the first ``plan.head`` tokens run every sublayer that
    has a cache (they attend only to each other, so this costs little and keeps the prompt in one pass).

    Two kinds of rows serve evidence recompute (``generation.recompute_evidence``): with ``positions`` (q,) (on
    the host, ascending, ``position`` the first), the tokens are already cached there and are computed again,
    their keys and values overwriting the cached ones, each attending to every cached token up to its own
    position; with ``attention`` (a float tensor of k entries), the row only looks: its keys and values are not
    cached, and the attention its tokens pay to the first k cached tokens (summed over heads, tokens and the
    layers it runs attention in) is added to ``attention``.
    """

    ids: torch.Tensor
    position: int
    cache: DynamicCache
    plan: SkipPlan
    phase: Phase
    probes: Probes | None = None
    logits_to_keep: int = 1
    positions: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    head: int = field(init=False)

    def __post_init__(self) -> None:
        self.head = min(self.plan.head, len(self.ids)) if self.phase == "prefill" and self.position == 0 else 0
        self.attn, self.ffn, self.keep_kv = self.plan.skips(self.phase)

    @property
    def appends(self) -> bool:
        """Whether the row's tokens follow its cache and are added to it (the common case)."""
        return self.positions is None and self.attention is None


def skip_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    position: int,
    cache: DynamicCache,
    plan: SkipPlan,
    phase: Phase,
    probe: bool = False,
    logits_to_keep: int = 1,
) -> tuple[torch.Tensor, dict[Sublayer, Probe] | None]:
    """Run one sequence's ``input_ids`` (1, q), the first token at ``position``, under ``plan``: the logits of the
    last ``logits_to_keep`` tokens (1, keep, vocab) and, with ``probe``, a Probe for every executed sublayer (with
    moments in a prefill with the full model). ``cache`` is updated in place; see :class:`Row`."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"skip_forward runs one sequence, input_ids of shape (1, q); got {tuple(input_ids.shape)}")
    probes = Probes.of(plan, phase) if probe else None
    (logits,) = forward_rows(model, [Row(input_ids[0], position, cache, plan, phase, probes, logits_to_keep)])
    return logits[None], probes.result() if probes else None


@torch.inference_mode()
def forward_rows(model: PreTrainedModel, rows: Sequence[Row]) -> list[torch.Tensor]:
    """One forward step over ``rows`` (see :class:`Row`), their tokens packed as one sequence (1, tokens, d):
    every row's logits (keep, vocab)."""
    base = model.model
    step = _Step(model, rows)
    hidden = base.embed_tokens(torch.cat([r.ids for r in rows]).to(step.device)[None])  # (1, tokens, d)
    for i, layer in enumerate(base.layers):
        hidden = step.sublayer(Sublayer("attn", i), layer, hidden)
        hidden = step.sublayer(Sublayer("ffn", i), layer, hidden)
    step.add_probes()
    ends = [s.stop for s in step.slices]
    keep = [e - (len(r.ids) if not r.logits_to_keep else min(r.logits_to_keep, len(r.ids))) for r, e in zip(rows, ends)]
    picked = torch.cat([torch.arange(k, e, device=step.device) for k, e in zip(keep, ends)])
    logits = model.lm_head(base.norm(hidden[:, picked]))[0]
    return list(logits.split([e - k for k, e in zip(keep, ends)]))


class _Step:
    """The rows of one forward step packed together: their token slices, rotary embeddings and masks."""

    def __init__(self, model: PreTrainedModel, rows: Sequence[Row]):
        self.model, self.rows, self.config = model, rows, model.config
        self.device: torch.device = model.get_input_embeddings().weight.device  # type: ignore[assignment]
        self.types = layer_types(model)
        starts = [0]
        for r in rows:
            starts.append(starts[-1] + len(r.ids))
        self.slices = [slice(a, b) for a, b in zip(starts, starts[1:])]
        positions = torch.cat(
            [torch.arange(r.position, r.position + len(r.ids)) if r.positions is None else r.positions for r in rows]
        ).to(self.device)
        dummy = torch.empty(0, device=self.device, dtype=model.dtype)
        cos, sin = model.model.rotary_emb(dummy, position_ids=positions[None])
        self.rotary = [(cos[:, s], sin[:, s]) for s in self.slices]
        self.packed_rotary = {tuple(range(len(rows))): (cos, sin)}
        self.position_ids = [positions[None, s] for s in self.slices]
        self.masks: list[dict[tuple[str, int], Any]] = [{} for _ in rows]
        self.first = [1 if r.position == 0 else 0 for r in rows]  # whether a row starts with token 0, the sink
        self.measured: list[tuple[Sublayer, list[int], torch.Tensor]] = []  # probed sublayers, rows, token stats

    def sublayer(self, sub: Sublayer, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` after sublayer ``sub``: run for the rows whose plan runs it, compensated for the others."""
        kind, i = sub
        running = [k for k, r in enumerate(self.rows) if i not in (r.attn if kind == "attn" else r.ffn)]
        if len(running) == len(self.rows):
            out = hidden + (self._attention(i, layer, hidden, running) if kind == "attn" else _ffn(layer, hidden))
        else:
            out = torch.empty_like(hidden)
            if running:
                idx = torch.cat([torch.arange(self.slices[k].start, self.slices[k].stop) for k in running])
                idx = idx.to(self.device)
                x = hidden[:, idx]
                out[:, idx] = x + (self._attention(i, layer, x, running) if kind == "attn" else _ffn(layer, x))
            for k in range(len(self.rows)):
                if k not in running:
                    out[:, self.slices[k]] = self._skipped(sub, layer, k, hidden[:, self.slices[k]])
        probed = [k for k in running if self.rows[k].probes is not None]
        if probed:
            self.measured.append((sub, probed, token_stats(hidden[0], out[0])))
        for k in probed:
            row = self.rows[k]
            if row.probes.fit_moments:  # type: ignore[union-attr]
                s = self.slices[k]
                row.probes.add_moments(sub, hidden[0, s], out[0, s], self.first[k])  # type: ignore[union-attr]
        return out

    def add_probes(self) -> None:
        """Hand every probed row the measures of the sublayers it ran in this step."""
        for k, row in enumerate(self.rows):
            ran = [(sub, stats[self.slices[k]]) for sub, rows, stats in self.measured if k in rows]
            if row.probes is not None and ran:
                row.probes.add([sub for sub, _ in ran], torch.stack([t for _, t in ran]), self.first[k])

    def _skipped(self, sub: Sublayer, layer: Any, k: int, x: torch.Tensor) -> torch.Tensor:
        """Row ``k``'s output of a sublayer its plan skips: the compensation of its input ``x``; its protected
        head runs the sublayer (attention only where the plan keeps its keys and values, which are cached)."""
        row = self.rows[k]
        kind, i = sub
        y = apply(x, (row.attn if kind == "attn" else row.ffn)[i])
        head = row.head
        if kind == "attn" and i in row.keep_kv:
            cache_keys_values(layer, x, self.rotary[k], row.cache, i)
            if head:
                y[:, :head] = x[:, :head] + head_attention(layer, x[:, :head], self.rotary[k])
        elif kind == "ffn" and head:
            y[:, :head] = x[:, :head] + _ffn(layer, x[:, :head])
        return y

    def _attention(self, i: int, layer: Any, x: torch.Tensor, running: list[int]) -> torch.Tensor:
        """Attention output of layer ``i`` for the tokens ``x`` of the ``running`` rows (packed in that order),
        each row's keys and values added to its cache."""
        if len(running) == 1 and self.rows[running[0]].appends:
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
            else:
                mask = self._row_mask(i, r, keys.shape[-2])
                if mask is True:  # a prompt without a past: the plain causal mask
                    out = F.scaled_dot_product_attention(
                        qr, keys, values, is_causal=True, scale=attn.scaling, enable_gqa=qr.shape[1] != keys.shape[1]
                    )
                else:
                    out = folded_attention(qr, keys, values, mask, attn.scaling, row.attention)
            outs.append(out[0].transpose(0, 1).reshape(n, -1))
        return attn.o_proj(torch.cat(outs))[None]

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


def _ffn(layer: Any, x: torch.Tensor) -> torch.Tensor:
    return layer.mlp(layer.post_attention_layernorm(x))
