"""FLOP cost model of the sublayers of a pre-norm decoder layer.

Per token and layer (d = hidden size, g = kv_heads / heads, n = context length):

* attention: projections 4 d^2 (1 + g) plus scores and weighted values c * n * d, where c = 2 in prefill
  (causal: a token sees n/2 keys on average) and c = 4 in decode (a new token sees all n keys);
* SwiGLU FFN: 6 d d_ff.

An attention sublayer skipped in prefill that keeps its KV cache still pays its K and V projections,
4 d^2 g. Decode also pays the LM head, 2 d V per token; prefill computes logits for the last token only, so the
head is left out there. A protected tail of m prompt tokens runs every sublayer that has a cache, each of its
tokens seeing about n keys; a protected head runs them too (counted at the average prefill cost per token).
Evidence recompute runs the tail once more (looking) and its recomputed prompt tokens like head tokens.
A local attention sublayer (``SkipPlan.local``) scores each block of b prefill queries against the w + b keys the
block sees (w the window), c * n * d becoming 4 (w + b) d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import PretrainedConfig

from .attention import LOCAL_BLOCK
from .skipping import SkipPlan


@dataclass(frozen=True)
class CostModel:
    hidden: int
    ffn_hidden: int
    kv_ratio: float
    vocab: int
    layers: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> CostModel:
        return cls(
            hidden=config.hidden_size,
            ffn_hidden=config.intermediate_size,
            kv_ratio=config.num_key_value_heads / config.num_attention_heads,
            vocab=config.vocab_size,
            layers=config.num_hidden_layers,
        )

    def attention(self, n: int, phase: str = "prefill") -> float:
        c = 2 if phase == "prefill" else 4
        return 4 * self.hidden**2 * (1 + self.kv_ratio) + c * n * self.hidden

    def local_attention(self, n: int, window: int) -> float:
        """Prefill attention of a token over the attention sink and the last ``window`` keys (``SkipPlan.local``),
        its query scored with its block's against the keys the block sees."""
        return 4 * self.hidden**2 * (1 + self.kv_ratio) + 4 * min(window + LOCAL_BLOCK, n) * self.hidden

    def keys_values(self) -> float:
        """K and V projections of one token: what a skipped attention sublayer that keeps its cache still costs."""
        return 4 * self.hidden**2 * self.kv_ratio

    def ffn(self) -> float:
        return 6 * self.hidden * self.ffn_hidden

    def saving(self, kind: str, n: int, keep_kv: bool = False) -> float:
        """Prefill FLOPs per token that skipping one ``kind`` ("attn" or "ffn") sublayer saves at context length n
        (a skipped attention sublayer that keeps its cache still pays its K and V projections)."""
        if kind == "ffn":
            return self.ffn()
        return self.attention(n, "prefill") - (self.keys_values() if keep_kv else 0.0)

    def head(self, phase: str) -> float:
        return 2 * self.hidden * self.vocab if phase == "decode" else 0.0

    def flops(
        self,
        n: int,
        skipped_attn: int = 0,
        skipped_ffn: int = 0,
        phase: str = "prefill",
        kept_kv: int = 0,
        local: int = 0,
        window: int = 0,
    ) -> float:
        """FLOPs per token at context length n with the given numbers of sublayers skipped, ``kept_kv`` of the
        skipped attention sublayers still computing their keys and values, and ``local`` attention sublayers over
        a ``window`` (prefill)."""
        attn, ffn = self.attention(n, phase), self.ffn()
        return (
            (self.layers - skipped_attn - local) * attn
            + local * self.local_attention(n, window)
            + kept_kv * self.keys_values()
            + (self.layers - skipped_ffn) * ffn
            + self.head(phase)
        )

    def speedup(
        self,
        n: int,
        skipped_attn: int,
        skipped_ffn: int,
        phase: str = "prefill",
        kept_kv: int = 0,
        tail: int = 0,
        head: int = 0,
        protected_skipped_attn: int = 0,
        recomputed: int = 0,
        local: int = 0,
        window: int = 0,
    ) -> float:
        """Full-model FLOPs divided by the FLOPs left after skipping the given numbers of sublayers; in prefill the
        first ``head`` and last ``tail`` of the n tokens run every sublayer but ``protected_skipped_attn``
        attention sublayers (those without a cache), and so do ``recomputed`` tokens (after the tail looked once);
        ``local`` attention sublayers attend over a ``window`` in prefill. Infinite when nothing is left to compute."""
        full = self.flops(n, 0, 0, phase)
        left = self.flops(n, skipped_attn, skipped_ffn, phase, kept_kv, local, window)
        if phase == "prefill" and (tail or head):
            tail = min(tail, n)
            head = min(head, n - tail)
            # a tail token sees about n keys, twice a prefill token's average
            tail_flops = self.flops(n, protected_skipped_attn, 0, "decode") - self.head("decode")
            head_flops = self.flops(n, protected_skipped_attn, 0, "prefill")
            looks = tail if recomputed else 0
            left = (left * (n - tail - head) + tail_flops * (tail + looks) + head_flops * (head + recomputed)) / n
        return full / left if left > 0 else math.inf

    def prefill_speedup(self, plan: SkipPlan, n: int, tail: int) -> float:
        """:meth:`speedup` of the prefill of an n-token prompt under ``plan``, its last ``tail`` tokens protected (the
        plan's tail resolved)."""
        if plan.is_empty:
            return 1.0
        attn, ffn, kept_kv = plan.skips("prefill")
        return self.speedup(
            n,
            len(attn),
            len(ffn),
            "prefill",
            kept_kv=len(kept_kv),
            tail=tail,
            head=plan.head,
            protected_skipped_attn=len(attn) - len(kept_kv),
            recomputed=plan.recomputed_tokens(n - tail) if tail else 0,
            local=len(plan.local),
            window=plan.local_window,
        )
