"""Choosing a SkipPlan from measured sublayer importance (AdaSkip's ranking)."""

from __future__ import annotations

from collections.abc import Mapping

from .skipping import Probe, SkipPlan, Sublayer


def top_k_plan(probes: Mapping[Sublayer, Probe], budget: int, robust_scale: bool = True) -> SkipPlan:
    """Skip the ``budget`` sublayers with the highest IO similarity, attention and FFN pooled.

    Each skipped sublayer is replaced by its input times its measured scale: the whole-prompt norm ratio
    (the paper's) or, with ``robust_scale``, the ratio without the attention-sink token 0.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    ranked = sorted(probes.items(), key=lambda item: item[1].similarity, reverse=True)[:budget]
    chosen: dict[str, dict[int, float]] = {"attn": {}, "ffn": {}}
    for sub, probe in ranked:
        chosen[sub.kind][sub.layer] = probe.scale_no_sink if robust_scale else probe.scale
    return SkipPlan(attn=chosen["attn"], ffn=chosen["ffn"])
