"""What a request skips (AdaSkip, arXiv 2501.02336): :class:`SkipPlan` (the sublayers and the compensations that
replace them), :class:`PlanSchedule` (a plan per step), and what a probe measures of a sublayer that ran
(:class:`Probe`). The forward pass that follows a plan is ``forward.py``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch

from .compensation import Affine, Compensation

Kind = Literal["attn", "ffn"]


class Sublayer(NamedTuple):
    kind: Kind
    layer: int


SKIP_FIELDS = ("attn", "prefill_attn", "ffn", "decode_ffn")
PLAIN_FIELDS = ("tail", "head", "recompute", "local", "local_window")  # the fields that are not layer maps
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

    ``local``: attention sublayers that run in prefill over a local window: each prompt token before the tail
    sees the attention sink (token 0) and the last ``local_window`` tokens up to itself only. They compute and cache
    every token's keys and values, and the tail and decode run them in full. A token's attention then costs
    ``local_window`` keys instead of all the tokens before it (sliding-window layers, local already, run as they are).
    """

    attn: Mapping[int, Compensation] = field(default_factory=dict)
    ffn: Mapping[int, Compensation] = field(default_factory=dict)
    decode_ffn: Mapping[int, Compensation] = field(default_factory=dict)
    prefill_attn: Mapping[int, Compensation] = field(default_factory=dict)
    tail: Tail = 0
    head: int = 0
    recompute: float = 0.0
    local: tuple[int, ...] = ()
    local_window: int = 256

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
        r = self.recompute
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(f"SkipPlan.recompute must be a fraction in [0, 1), got {r!r}")
        if r and not self.tail:
            raise ValueError("SkipPlan.recompute picks the tokens the protected tail attends to: it needs a tail")
        local = self.local
        if (
            not isinstance(local, (tuple, list, set, frozenset))
            or any(isinstance(i, bool) or not isinstance(i, int) for i in local)
            or len(set(local)) != len(local)
        ):
            raise ValueError(f"SkipPlan.local must list distinct attention layer indices, got {local!r}")
        local = tuple(sorted(local))
        object.__setattr__(self, "local", local)
        both = sorted(set(local) & (set(self.attn) | set(self.prefill_attn)))
        if both:
            raise ValueError(f"SkipPlan: attention layers {both} are both skipped and local; list each once")
        w = self.local_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"SkipPlan.local_window must be a token count >= 1, got {w!r}")

    @property
    def is_empty(self) -> bool:
        """Whether the plan runs the full model: nothing skipped, no local attention."""
        return not self.local and not any(getattr(self, name) for name in SKIP_FIELDS)

    def check(self, num_layers: int, hidden: int | None = None) -> None:
        """Raise ValueError if a layer index is outside ``0 .. num_layers - 1`` or a per-channel compensation does
        not have ``hidden`` channels."""
        for name in (*SKIP_FIELDS, "local"):
            bad = [layer for layer in getattr(self, name) if not 0 <= layer < num_layers]
            if bad:
                raise ValueError(f"SkipPlan.{name}: layer indices {bad} out of range for a {num_layers}-layer model")
            if hidden is None or name == "local":
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

    def recomputed_tokens(self, body: int) -> int:
        """How many of a ``body`` of prompt tokens (the protected head among them) evidence recompute runs again."""
        return round(self.recompute * max(body - self.head, 0))

    def protected_plan(self) -> SkipPlan:
        """The plan of the protected head and tail: every sublayer runs, except attention that has no cache."""
        return SkipPlan(attn=self.attn)

    def to_dict(self) -> dict[str, Any]:
        def value(c: Compensation) -> Any:
            return {"scale": c.scale.tolist(), "bias": c.bias.tolist()} if isinstance(c, Affine) else c

        out: dict[str, Any] = {name: {str(k): value(v) for k, v in getattr(self, name).items()} for name in SKIP_FIELDS}
        protection = {"tail": self.tail, "head": self.head, "recompute": self.recompute}
        return {**out, **protection, "local": list(self.local), "local_window": self.local_window}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkipPlan:
        unknown = set(data) - {*SKIP_FIELDS, *PLAIN_FIELDS}
        if unknown:
            raise ValueError(f"SkipPlan: unknown fields {sorted(unknown)}")
        fields: dict[str, Any] = {k: v if k in PLAIN_FIELDS else dict(v) for k, v in data.items()}
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
    activations (the attention sink) dominate the whole-tensor norm; equal to ``scale`` without other tokens.
    ``moments``: in a prefill that runs the full model, the sums that compensations are fitted from
    (``compensation.moments``; token 0 of the sequence left out), so fits come from the full model's activations.
    ``seconds``: the host time measuring it took (its statistics and moments; on a GPU only the launches), so a
    probed prefill can be timed as an unprobed one would have run.
    """

    similarity: float
    scale: float
    scale_no_sink: float
    moments: torch.Tensor | None = field(default=None, compare=False)
    seconds: float = field(default=0.0, compare=False)
