"""SkipStats: what one request skipped, how long it took and how much faster skipping should make it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SkipStats:
    """Per-request record, JSON-serialisable through :meth:`to_dict`; built once a request is done (a request
    served for a collection gets a copy with what it learned).

    Speedups are full-model time (or FLOPs) divided by this request's; ``measured_prefill_speedup`` is set
    only when a full prefill at this context length was timed (refresh requests: the full prefill, less the time
    its probes took, over the plan's unprobed prefill).
    """

    prompt_tokens: int
    generated_tokens: int
    skipped_attention: list[int]  # in prefill, including those that kept their KV cache
    attention_kv_kept: list[int]  # skipped in prefill with their keys and values still cached; run in decode
    protected_tail: int  # prompt tokens at the end that ran every sublayer with a cache
    protected_head: int  # likewise at the start (the attention sink)
    skipped_ffn_prefill: list[int]
    skipped_attention_decode: list[int]
    skipped_ffn_decode: list[int]
    prefill_seconds: float
    decode_seconds: float
    kv_bytes_saved: int
    estimated_prefill_speedup: float
    estimated_decode_speedup: float
    finish_reason: str
    recomputed_tokens: int = 0  # prompt tokens the tail attended to most, run again in full (evidence recompute)
    measured_prefill_speedup: float | None = None
    measured_in_this_request: bool = False
    # set when the request was served for a collection (learned plan); None for explicit plans
    collection: str | None = None
    mode: str | None = None  # warmup (full model, learning), skip, or refresh (full model, re-measuring)
    warming_up: bool = False
    profile_source: str | None = None  # collection, global, shipped or none
    queries_seen: int | None = None  # by the collection, this one included
    budget: int | None = None
    budget_reason: str | None = None
    skip_set_changed: bool = False
    fidelity: float | None = None  # teacher-forced top-1 agreement of the plan with the full answer (refresh)
    store_error: str | None = None  # the profile store failed or did not answer: this request did not learn
    max_new_tokens: int | None = None  # the answer's token limit: the request's, or less where the window ends
    skipped_every_sublayer: bool = False  # prefill ran no sublayer; its estimated speedup is unbounded (None)
    waited_seconds: float = 0.0  # before the engine admitted the request (its serving limits were full)
    batch_sizes: list[int] = field(default_factory=list)  # requests in each forward step this one ran in
    local_attention: list[int] = field(default_factory=list)  # attended over a local window in prefill
    local_window: int = 0  # the tokens each prompt token saw in them, besides the attention sink

    @property
    def skipped_sublayers(self) -> int:
        return len(self.skipped_attention) + len(self.skipped_ffn_prefill)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes out of prefill; decode produced the rest.
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: an unbounded estimated speedup (every sublayer skipped) is None."""
        data = asdict(self)
        for name in ("estimated_prefill_speedup", "estimated_decode_speedup"):
            if not math.isfinite(data[name]):
                data[name] = None
        data["skipped_sublayers"] = self.skipped_sublayers
        data["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        return data

    def summary(self) -> str:
        """One human-readable line."""
        measured = f", measured {self.measured_prefill_speedup:.2f}x" if self.measured_prefill_speedup else ""
        where = f"[{self.collection}: {self.mode}] " if self.collection else ""
        kept = f" (KV kept: {self.attention_kv_kept})" if self.attention_kv_kept else ""
        tail = f"; last {self.protected_tail} prompt tokens in full" if self.protected_tail else ""
        if self.recomputed_tokens:
            tail += f", {self.recomputed_tokens} they attend to most recomputed"
        if self.skipped_every_sublayer:
            tail += "; every sublayer skipped in prefill"
        if self.local_attention:
            tail += f"; local attention {self.local_attention} (window {self.local_window})"
        return where + (
            f"{self.prompt_tokens} prompt tokens, {self.generated_tokens} generated; skipped attention "
            f"{self.skipped_attention or '-'}{kept}, FFN {self.skipped_ffn_prefill or '-'} (decode FFN "
            f"{self.skipped_ffn_decode or '-'}){tail}; prefill {self.prefill_seconds:.2f}s "
            f"(estimated {self.estimated_prefill_speedup:.2f}x{measured}), decode {self.decode_tokens_per_s:.1f} tok/s"
        )
