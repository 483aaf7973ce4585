"""Skip-aware forward pass over a pre-norm decoder stack (AdaSkip, arXiv 2501.02336).

Decoder layer ``l`` computes ``h1 = h0 + Attn(norm(h0))`` and ``h2 = h1 + FFN(norm(h1))``. A skipped
sublayer is replaced by its input times a scale: ``h1 = s * h0`` or ``h2 = s * h1``. A skipped attention
sublayer stores no keys and values, so it stays skipped for the rest of the request.

The forward pass here calls the model's own modules (embeddings, rotary embedding, norms, attention, MLP,
LM head) and takes the plan as an argument, so one model serves concurrent requests with different plans.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

Kind = Literal["attn", "ffn"]


class Sublayer(NamedTuple):
    kind: Kind
    layer: int


def _scales(name: str, raw: Mapping[Any, Any]) -> dict[int, float]:
    out: dict[int, float] = {}
    for layer, scale in raw.items():
        if isinstance(layer, bool) or not isinstance(layer, (int, str)) or not str(layer).lstrip("-").isdigit():
            raise ValueError(f"SkipPlan.{name}: layer index {layer!r} is not an integer")
        scale = float(scale)
        if math.isnan(scale) or math.isinf(scale) or scale < 0:
            raise ValueError(f"SkipPlan.{name}[{layer}]: scale must be a finite number >= 0, got {scale}")
        out[int(layer)] = scale
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class SkipPlan:
    """Which sublayers one request skips, each with the scale that replaces it.

    ``attn``: attention sublayers skipped in prefill and decode (no KV cache is kept for them).
    ``ffn``: FFN sublayers skipped in prefill and decode. ``decode_ffn``: further FFNs skipped in decode only.
    """

    attn: Mapping[int, float] = field(default_factory=dict)
    ffn: Mapping[int, float] = field(default_factory=dict)
    decode_ffn: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("attn", "ffn", "decode_ffn"):
            object.__setattr__(self, name, _scales(name, getattr(self, name)))
        both = sorted(set(self.ffn) & set(self.decode_ffn))
        if both:
            raise ValueError(f"SkipPlan: FFN layers {both} are in both ffn and decode_ffn; list each once")

    @property
    def is_empty(self) -> bool:
        return not (self.attn or self.ffn or self.decode_ffn)

    def check(self, num_layers: int) -> None:
        """Raise ValueError if a layer index is outside ``0 .. num_layers - 1``."""
        for name in ("attn", "ffn", "decode_ffn"):
            bad = [layer for layer in getattr(self, name) if not 0 <= layer < num_layers]
            if bad:
                raise ValueError(f"SkipPlan.{name}: layer indices {bad} out of range for a {num_layers}-layer model")

    def skips(self, phase: str) -> tuple[dict[int, float], dict[int, float]]:
        """The (attention, FFN) sublayers skipped in ``phase`` ('prefill' or 'decode')."""
        return dict(self.attn), (dict(self.ffn) if phase == "prefill" else {**self.ffn, **self.decode_ffn})

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {name: {str(k): v for k, v in getattr(self, name).items()} for name in ("attn", "ffn", "decode_ffn")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[Any, float]]) -> "SkipPlan":
        unknown = set(data) - {"attn", "ffn", "decode_ffn"}
        if unknown:
            raise ValueError(f"SkipPlan: unknown fields {sorted(unknown)}")
        return cls(**{k: dict(v) for k, v in data.items()})


class PlanSchedule(Protocol):
    """Chooses the plan of every step of one request, and whether to probe it.

    ``decode(step, probes)`` is asked before decode step ``step`` (0-based) with the probes of the previous step
    (None when it was not probed). A plain :class:`SkipPlan` is wrapped in :class:`StaticSchedule`.
    """

    def prefill(self) -> tuple[SkipPlan, bool]: ...

    def decode(self, step: int, probes: "dict[Sublayer, Probe] | None") -> tuple[SkipPlan, bool]: ...


@dataclass(frozen=True)
class StaticSchedule:
    plan: SkipPlan
    probe: bool = False

    def prefill(self) -> tuple[SkipPlan, bool]:
        return self.plan, self.probe

    def decode(self, step: int, probes: "dict[Sublayer, Probe] | None") -> tuple[SkipPlan, bool]:
        return self.plan, self.probe


@dataclass(frozen=True)
class Probe:
    """IO similarity and scale of one executed sublayer.

    ``similarity``: cosine(input, output) per token, mean over tokens. ``scale``: ||output|| / ||input|| over
    the whole tensor (the paper's estimate). ``scale_no_sink``: the same without token 0, whose huge
    activations (the attention sink) dominate the whole-tensor norm; equal to ``scale`` for one token.
    """

    similarity: float
    scale: float
    scale_no_sink: float


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
    executed sublayer. ``cache`` is updated in place for the attention sublayers that run.
    """
    base = model.model
    skip_attn, skip_ffn = plan.skips(phase)
    types = layer_types(model)

    hidden = base.embed_tokens(input_ids)
    position_ids = torch.arange(position, position + input_ids.shape[1], device=hidden.device).unsqueeze(0)
    rotary = base.rotary_emb(hidden, position_ids=position_ids)
    masks: dict[tuple[str, int], Any] = {}
    measured: list[tuple[Sublayer, torch.Tensor]] = []

    for i, layer in enumerate(base.layers):
        # Attention sublayer: skip and compensate, or run (and probe).
        if i in skip_attn:
            hidden = hidden * skip_attn[i]
        else:
            key = (types[i], cache.get_seq_length(i))
            if key not in masks:
                make_mask = create_sliding_window_causal_mask if types[i] == "sliding_attention" else create_causal_mask
                masks[key] = make_mask(
                    config=model.config, inputs_embeds=hidden, attention_mask=None,
                    past_key_values=cache, position_ids=position_ids, layer_idx=i,
                )
            attn_out, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden), attention_mask=masks[key], position_ids=position_ids,
                past_key_values=cache, use_cache=True, position_embeddings=rotary,
            )
            out = hidden + attn_out
            if probe:
                measured.append((Sublayer("attn", i), _measure(hidden, out)))
            hidden = out

        # FFN sublayer: the same three steps.
        if i in skip_ffn:
            hidden = hidden * skip_ffn[i]
        else:
            out = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if probe:
                measured.append((Sublayer("ffn", i), _measure(hidden, out)))
            hidden = out

    hidden = base.norm(hidden)
    logits = model.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
    if not probe:
        return logits, None
    values = torch.stack([m for _, m in measured]).tolist() if measured else []
    return logits, {sub: Probe(*v) for (sub, _), v in zip(measured, values)}
