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

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from .attention import RowAttention, cache_keys_values, head_attention, layer_types, token_attention
from .compensation import apply
from .compiled import CompiledDecode
from .probes import Phase, Probes, token_stats
from .skipping import Probe, SkipPlan, Sublayer


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
        self.local = set(self.plan.local) if self.phase == "prefill" and self.appends else set()
        self.local_window = self.plan.local_window

    @property
    def one_token(self) -> bool:
        """Whether the row is a single token that follows its cache and neither probes nor caches a skipped
        sublayer's keys: the step an answer takes per token."""
        one = len(self.ids) == 1 and self.appends and self.probes is None
        return one and not self.head and not self.keep_kv and not self.local

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
def forward_rows(
    model: PreTrainedModel, rows: Sequence[Row], compiled: CompiledDecode | None = None
) -> list[torch.Tensor]:
    """One forward step over ``rows`` (see :class:`Row`), their tokens packed as one sequence (1, tokens, d):
    every row's logits (keep, vocab). ``compiled``: the model's compiled one-token step, for the steps it serves."""
    if len(rows) == 1 and rows[0].one_token and model.config._attn_implementation == "sdpa":
        row = rows[0]
        if compiled is not None and not row.attn and not row.ffn and compiled.serves(row.cache):
            return [compiled(row.ids, row.position, row.cache)]
        return [_token_forward(model, row)]
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


def _token_forward(model: PreTrainedModel, row: Row) -> torch.Tensor:
    """The logits (1, vocab) of a :attr:`Row.one_token` row: what :class:`_Step` computes for it, without its
    bookkeeping for several rows and probes (at one token, tensor operations and Python cost as much as the matrix
    products), in (tokens, d) shapes throughout."""
    base = model.model
    hidden = base.embed_tokens(row.ids.to(base.embed_tokens.weight.device))  # type: ignore[arg-type]  # (1, d)
    rotary = base.rotary_emb(hidden, position_ids=torch.tensor([[row.position]], device=hidden.device))
    types = layer_types(model)
    for i, layer in enumerate(base.layers):
        if i in row.attn:
            hidden = apply(hidden, row.attn[i])
        else:
            window = model.config.sliding_window if types[i] == "sliding_attention" else None
            normed = layer.input_layernorm(hidden)
            hidden = hidden + token_attention(layer.self_attn, normed, row.cache, i, rotary, window)
        hidden = apply(hidden, row.ffn[i]) if i in row.ffn else hidden + _ffn(layer, hidden)
    return model.lm_head(base.norm(hidden))


class _Step:
    """The rows of one forward step packed together: each sublayer run for the rows whose plan runs it (attention
    by :class:`~adaskip_rag.attention.RowAttention`), compensated for the others, and the probes' measures."""

    def __init__(self, model: PreTrainedModel, rows: Sequence[Row]):
        self.rows = rows
        self.device: torch.device = model.get_input_embeddings().weight.device  # type: ignore[assignment]
        self.attend = RowAttention(model, rows, self.device)
        self.slices = self.attend.slices
        self.first = [1 if r.position == 0 else 0 for r in rows]  # whether a row starts with token 0, the sink
        self.measured: list[tuple[Sublayer, list[int], torch.Tensor]] = []  # probed sublayers, rows, token stats

    def sublayer(self, sub: Sublayer, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` after sublayer ``sub``: run for the rows whose plan runs it, compensated for the others."""
        kind, i = sub
        running = [k for k, r in enumerate(self.rows) if i not in (r.attn if kind == "attn" else r.ffn)]
        if len(running) == len(self.rows):
            out = hidden + (self.attend(i, layer, hidden, running) if kind == "attn" else _ffn(layer, hidden))
        else:
            out = torch.empty_like(hidden)
            if running:
                idx = torch.cat([torch.arange(self.slices[k].start, self.slices[k].stop) for k in running])
                idx = idx.to(self.device)
                x = hidden[:, idx]
                out[:, idx] = x + (self.attend(i, layer, x, running) if kind == "attn" else _ffn(layer, x))
            for k in range(len(self.rows)):
                if k not in running:
                    out[:, self.slices[k]] = self._skipped(sub, layer, k, hidden[:, self.slices[k]])
        # a local attention sublayer is not the one the profile measures
        probed = [
            (k, probes)
            for k in running
            if (probes := self.rows[k].probes) is not None and not (kind == "attn" and i in self.rows[k].local)
        ]
        if not probed:
            return out
        start = time.perf_counter()
        self.measured.append((sub, [k for k, _ in probed], token_stats(hidden[0], out[0])))
        for k, probes in probed:
            if probes.fit_moments:
                s = self.slices[k]
                probes.add_moments(sub, hidden[0, s], out[0, s], self.first[k])
        spent = time.perf_counter() - start
        for _, probes in probed:
            probes.spent([sub], spent)
        return out

    def add_probes(self) -> None:
        """Hand every probed row the measures of the sublayers it ran in this step."""
        for k, row in enumerate(self.rows):
            ran = [(sub, stats[self.slices[k]]) for sub, rows, stats in self.measured if k in rows]
            if row.probes is not None and ran:
                start, subs = time.perf_counter(), [sub for sub, _ in ran]
                row.probes.add(subs, torch.stack([t for _, t in ran]), self.first[k])
                row.probes.spent(subs, time.perf_counter() - start)

    def _skipped(self, sub: Sublayer, layer: Any, k: int, x: torch.Tensor) -> torch.Tensor:
        """Row ``k``'s output of a sublayer its plan skips: the compensation of its input ``x``; its protected
        head runs the sublayer (attention only where the plan keeps its keys and values, which are cached)."""
        row = self.rows[k]
        kind, i = sub
        y = apply(x, (row.attn if kind == "attn" else row.ffn)[i])
        head = row.head
        if kind == "attn" and i in row.keep_kv:
            cache_keys_values(layer, x, self.attend.rotary[k], row.cache, i)
            if head:
                y[:, :head] = x[:, :head] + head_attention(layer, x[:, :head], self.attend.rotary[k])
        elif kind == "ffn" and head:
            y[:, :head] = x[:, :head] + _ffn(layer, x[:, :head])
        return y


def _ffn(layer: Any, x: torch.Tensor) -> torch.Tensor:
    return layer.mlp(layer.post_attention_layernorm(x))
