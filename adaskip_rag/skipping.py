"""Skip-aware forward pass over a pre-norm decoder stack (AdaSkip, arXiv 2501.02336).

Decoder layer ``l`` computes ``h1 = h0 + Attn(norm(h0))`` and ``h2 = h1 + FFN(norm(h1))``. A skipped
sublayer is replaced by a compensation of its input (``compensation.py``): ``h1 = f(h0)`` or ``h2 = f(h1)``,
in the paper ``f(x) = s * x``. A skipped attention sublayer either stores no keys and values, so it stays
skipped for the rest of the request (the paper), or still computes them from its input as the full layer would
(input norm, K/V projections, rotary) and runs in full in decode (``SkipPlan.prefill_attn``).

The forward pass here calls the model's own modules (embeddings, rotary embedding, norms, attention, MLP,
LM head) and takes the plan as an argument, so one model serves concurrent requests with different plans.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .compensation import Affine, Compensation, apply, moments

Kind = Literal["attn", "ffn"]


class Sublayer(NamedTuple):
    kind: Kind
    layer: int


SKIP_FIELDS = ("attn", "prefill_attn", "ffn", "decode_ffn")
Tail = int | Literal["last_user_turn"]


def _compensations(name: str, raw: Mapping[Any, Any]) -> dict[int, Compensation]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"SkipPlan.{name} must map layer indices to compensations, got {type(raw).__name__}")
    out: dict[int, Compensation] = {}
    for layer, value in raw.items():
        if isinstance(layer, bool) or not isinstance(layer, (int, str)) or not str(layer).lstrip("-").isdigit():
            raise ValueError(f"SkipPlan.{name}: layer index {layer!r} is not an integer")
        try:
            if isinstance(value, Mapping):
                value = Affine(torch.tensor(value["scale"]), torch.tensor(value["bias"]))
            if not isinstance(value, Affine):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"a scale is a number, got {type(value).__name__}")
                value = float(value)
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"SkipPlan.{name}[{layer}]: not a scale or an affine compensation ({exc})") from None
        if not isinstance(value, Affine) and (math.isnan(value) or math.isinf(value) or value < 0):
            raise ValueError(f"SkipPlan.{name}[{layer}]: scale must be a finite number >= 0, got {value}")
        out[int(layer)] = value
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class SkipPlan:
    """Which sublayers one request skips, each with the compensation that replaces it (a scale s for the paper's
    ``s * x``, or an :class:`~adaskip_rag.compensation.Affine` per-channel map).

    ``attn``: attention sublayers skipped in prefill and decode; no KV cache is kept for them (the paper; saves
    KV memory). ``prefill_attn``: attention sublayers skipped in prefill only; their keys and values are still
    computed and cached, and decode runs them in full. ``ffn``: FFN sublayers skipped in prefill and decode.
    ``decode_ffn``: further FFNs skipped in decode only. ``tail``: the last ``tail`` prompt tokens (or, with
    ``"last_user_turn"``, those from the start of the last user message of a chat prompt) run every sublayer
    that has a cache, after the rest of the prompt, attending to the whole cache. ``head``: likewise the first
    ``head`` prompt tokens (token 0 is the attention sink, which every later token attends to).
    """

    attn: Mapping[int, Compensation] = field(default_factory=dict)
    ffn: Mapping[int, Compensation] = field(default_factory=dict)
    decode_ffn: Mapping[int, Compensation] = field(default_factory=dict)
    prefill_attn: Mapping[int, Compensation] = field(default_factory=dict)
    tail: Tail = 0
    head: int = 0

    def __post_init__(self) -> None:
        for name in SKIP_FIELDS:
            object.__setattr__(self, name, _compensations(name, getattr(self, name)))
        for a, b in (("ffn", "decode_ffn"), ("attn", "prefill_attn")):
            both = sorted(set(getattr(self, a)) & set(getattr(self, b)))
            if both:
                raise ValueError(f"SkipPlan: layers {both} are in both {a} and {b}; list each once")
        tail = self.tail
        if tail != "last_user_turn" and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 0):
            raise ValueError(f"SkipPlan.tail must be a token count >= 0 or 'last_user_turn', got {tail!r}")
        if isinstance(self.head, bool) or not isinstance(self.head, int) or self.head < 0:
            raise ValueError(f"SkipPlan.head must be a token count >= 0, got {self.head!r}")

    @property
    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in SKIP_FIELDS)

    def check(self, num_layers: int, hidden: int | None = None) -> None:
        """Raise ValueError if a layer index is outside ``0 .. num_layers - 1`` or a per-channel compensation does
        not have ``hidden`` channels."""
        for name in SKIP_FIELDS:
            bad = [layer for layer in getattr(self, name) if not 0 <= layer < num_layers]
            if bad:
                raise ValueError(f"SkipPlan.{name}: layer indices {bad} out of range for a {num_layers}-layer model")
            if hidden is None:
                continue
            wrong = [layer for layer, c in getattr(self, name).items() if isinstance(c, Affine) and c.hidden != hidden]
            if wrong:
                raise ValueError(
                    f"SkipPlan.{name}: compensations of layers {wrong} do not have the model's {hidden} channels"
                )

    def check_protected(self, prompt_tokens: int, tail: int) -> None:
        """Raise ValueError if the protected head and a tail of ``tail`` tokens (``self.tail`` resolved) leave no
        token of a prompt of ``prompt_tokens`` to skip in."""
        if (tail or self.head) and tail + self.head >= prompt_tokens:
            raise ValueError(
                f"SkipPlan: a protected head of {self.head} and tail of {tail} tokens leave nothing "
                f"of the {prompt_tokens}-token prompt to skip in; protect fewer tokens"
            )

    def skips(self, phase: str) -> tuple[dict[int, Compensation], dict[int, Compensation], set[int]]:
        """The (attention, FFN) sublayers skipped in ``phase`` ('prefill' or 'decode'), and the skipped attention
        sublayers that still cache their keys and values."""
        if phase == "prefill":
            return {**self.attn, **self.prefill_attn}, dict(self.ffn), set(self.prefill_attn)
        return dict(self.attn), {**self.ffn, **self.decode_ffn}, set()

    def protected_plan(self) -> SkipPlan:
        """The plan of the protected head and tail: every sublayer runs, except attention that has no cache."""
        return SkipPlan(attn=self.attn)

    def to_dict(self) -> dict[str, Any]:
        def value(c: Compensation) -> Any:
            return {"scale": c.scale.tolist(), "bias": c.bias.tolist()} if isinstance(c, Affine) else c

        out: dict[str, Any] = {name: {str(k): value(v) for k, v in getattr(self, name).items()} for name in SKIP_FIELDS}
        return {**out, "tail": self.tail, "head": self.head}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkipPlan:
        unknown = set(data) - {*SKIP_FIELDS, "tail", "head"}
        if unknown:
            raise ValueError(f"SkipPlan: unknown fields {sorted(unknown)}")
        fields: dict[str, Any] = {k: v if k in ("tail", "head") else dict(v) for k, v in data.items()}
        return cls(**fields)


@runtime_checkable
class PlanSchedule(Protocol):
    """Chooses the plan of every step of one request, and whether to probe it.

    ``decode(step, probes)`` is asked before decode step ``step`` (0-based) with the probes of the previous step
    (None when it was not probed). A plain :class:`SkipPlan` is wrapped in :class:`StaticSchedule`.
    """

    def prefill(self) -> tuple[SkipPlan, bool]: ...

    def decode(self, step: int, probes: dict[Sublayer, Probe] | None) -> tuple[SkipPlan, bool]: ...


@dataclass(frozen=True)
class StaticSchedule:
    plan: SkipPlan
    probe: bool = False

    def prefill(self) -> tuple[SkipPlan, bool]:
        return self.plan, self.probe

    def decode(self, step: int, probes: dict[Sublayer, Probe] | None) -> tuple[SkipPlan, bool]:
        return self.plan, self.probe


@dataclass(frozen=True)
class Probe:
    """IO similarity and scale of one executed sublayer.

    ``similarity``: cosine(input, output) per token, mean over tokens. ``scale``: ||output|| / ||input|| over
    the whole tensor (the paper's estimate). ``scale_no_sink``: the same without token 0, whose huge
    activations (the attention sink) dominate the whole-tensor norm; equal to ``scale`` for one token.
    ``moments``: in a prefill that runs the full model, the sums that compensations are fitted from
    (``compensation.moments``; token 0 of the sequence left out), so fits come from the full model's activations.
    """

    similarity: float
    scale: float
    scale_no_sink: float
    moments: torch.Tensor | None = field(default=None, compare=False)


def _measure(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[similarity, scale, scale_no_sink] of a sublayer with input x and output y, shape (batch, tokens, d).

    Three reductions per token (x.y, |x|, |y|); the whole-tensor norms follow from the per-token ones.
    """
    x, y = x.float(), y.float()
    dot = torch.einsum("btd,btd->bt", x, y)
    nx, ny = torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(y, dim=-1)
    similarity = (dot / (nx * ny).clamp_min(1e-12)).mean()
    sx, sy = nx.square(), ny.square()
    scale = (sy.sum() / sx.sum()).sqrt()
    scale_no_sink = (sy[:, 1:].sum() / sx[:, 1:].sum()).sqrt() if x.shape[1] > 1 else scale
    return torch.stack([similarity, scale, scale_no_sink])


def layer_types(model: PreTrainedModel) -> list[str]:
    """Attention type of every layer ('full_attention' or 'sliding_attention'), as the model's cache sees it."""
    return get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))[0]


def new_cache(model: PreTrainedModel) -> DynamicCache:
    return DynamicCache(config=model.config)


def _cache_keys_values(
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
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own rotary
    cos, sin = rotary
    _, keys = rope(keys[:, :0], keys, cos, sin)  # an empty query: only the keys are rotated
    cache.update(keys, values, index)


def _head_attention(layer: Any, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention output of the first ``hidden.shape[1]`` tokens of a prefill: they see only each other."""
    m = hidden.shape[1]
    mask = torch.full((m, m), float("-inf"), dtype=hidden.dtype, device=hidden.device).triu(1)[None, None]
    out, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden),
        attention_mask=mask,
        position_embeddings=tuple(r[:, :m] for r in rotary),
    )
    return out


@torch.inference_mode()
def skip_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    position: int,
    cache: DynamicCache,
    plan: SkipPlan,
    phase: Literal["prefill", "decode"],
    probe: bool = False,
    logits_to_keep: int = 1,
) -> tuple[torch.Tensor, dict[Sublayer, Probe] | None]:
    """Run ``input_ids`` (batch, q), whose first token sits at ``position``, through the model under ``plan``.

    Returns the logits of the last ``logits_to_keep`` positions (0 = all) and, with ``probe``, a Probe for every
    executed sublayer (with moments in a full prefill). ``cache`` is updated in place for the attention sublayers that
    run or keep their keys and values. In a prefill from position 0 the first ``plan.head`` tokens run every
    sublayer that has a cache (they attend only to each other, so this costs little and keeps the prompt in one
    chunk); ``plan.tail`` is the caller's (``generation.prefill``).
    """
    base = model.model
    skip_attn, skip_ffn, keep_kv = plan.skips(phase)
    hidden = base.embed_tokens(input_ids)
    position_ids = torch.arange(position, position + input_ids.shape[1], device=hidden.device).unsqueeze(0)
    rotary = base.rotary_emb(hidden, position_ids=position_ids)
    attend = _Attention(model, cache, position_ids, rotary)
    probes = _Probes(first=1 if position == 0 else 0, moments=phase == "prefill" and plan.is_empty) if probe else None
    head = min(plan.head, input_ids.shape[1]) if phase == "prefill" and position == 0 else 0

    for i, layer in enumerate(base.layers):
        # Attention sublayer: skip and compensate (caching K and V if the plan keeps them), or run (and probe).
        if i in skip_attn:
            out = apply(hidden, skip_attn[i])
            if i in keep_kv:
                _cache_keys_values(layer, hidden, rotary, cache, i)
                if head:
                    out[:, :head] = hidden[:, :head] + _head_attention(layer, hidden[:, :head], rotary)
        else:
            out = hidden + attend(i, layer, hidden)
            if probes:
                probes.record(Sublayer("attn", i), hidden, out)
        hidden = out
        # FFN sublayer: the same steps.
        if i in skip_ffn:
            out = apply(hidden, skip_ffn[i])
            if head:
                out[:, :head] = hidden[:, :head] + layer.mlp(layer.post_attention_layernorm(hidden[:, :head]))
        else:
            out = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if probes:
                probes.record(Sublayer("ffn", i), hidden, out)
        hidden = out

    hidden = base.norm(hidden)
    logits = model.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
    return logits, probes.result() if probes else None


class _Attention:
    """The attention sublayers of one forward step, with the causal (or sliding-window) masks they share."""

    def __init__(self, model: PreTrainedModel, cache: DynamicCache, position_ids: torch.Tensor, rotary: Any):
        self.config, self.cache, self.position_ids, self.rotary = model.config, cache, position_ids, rotary
        self.types = layer_types(model)
        self.masks: dict[tuple[str, int], Any] = {}

    def __call__(self, i: int, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s attention output for ``hidden``, its keys and values added to the cache."""
        key = (self.types[i], self.cache.get_seq_length(i))
        if key not in self.masks:  # a mask per layer type and cache length: layers that skipped have shorter caches
            make_mask = create_sliding_window_causal_mask if key[0] == "sliding_attention" else create_causal_mask
            self.masks[key] = make_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=None,
                cache=self.cache,
                position_ids=self.position_ids,
                layer_idx=i,
            )
        out, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden),
            attention_mask=self.masks[key],
            position_ids=self.position_ids,
            cache=self.cache,
            use_cache=True,
            position_embeddings=self.rotary,
        )
        return out


class _Probes:
    """The probes of one forward step: IO similarity and norm ratios, and (in a full prefill) the moments that
    compensations are fitted from, token ``first``-on (token 0, the attention sink, left out)."""

    def __init__(self, first: int, moments: bool):
        self.first, self.moments = first, moments
        self.measured: list[tuple[Sublayer, torch.Tensor]] = []
        self.fitted: list[torch.Tensor] = []

    def record(self, sub: Sublayer, x: torch.Tensor, y: torch.Tensor) -> None:
        self.measured.append((sub, _measure(x, y)))
        if self.moments:
            d = x.shape[-1]
            self.fitted.append(moments(x[:, self.first :].reshape(-1, d), y[:, self.first :].reshape(-1, d)))

    def result(self) -> dict[Sublayer, Probe]:
        values = torch.stack([m for _, m in self.measured]).tolist() if self.measured else []
        sums: list[torch.Tensor | None] = list(self.fitted) if self.fitted else [None] * len(self.measured)
        return {sub: Probe(v[0], v[1], v[2], moments=m) for (sub, _), v, m in zip(self.measured, values, sums)}
