"""The server's Prometheus metrics, in a registry of its own (the process's default registry is left alone)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..stats import SkipStats

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests by route and status, tokens, time to first token and per output token, batch sizes, and per
    collection the sublayers skipped and the estimated and measured prefill speedup."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adaskip_requests", "HTTP requests", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("adaskip_prompt_tokens", "Prompt tokens read", registry=r)
        self.completion_tokens = Counter("adaskip_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "adaskip_time_to_first_token_seconds", "Admission wait and prefill", buckets=_SECONDS, registry=r
        )
        self.tpot = Histogram(
            "adaskip_time_per_output_token_seconds", "Decode seconds per token after the first", buckets=_SECONDS,
            registry=r,
        )  # fmt: skip
        self.batch = Histogram(
            "adaskip_batch_size", "Requests in each forward step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.skipped = Counter("adaskip_skipped_sublayers", "Sublayers skipped in prefill", ["collection"], registry=r)
        self.estimated = Gauge(
            "adaskip_estimated_prefill_speedup", "Last request's FLOP estimate", ["collection"], registry=r
        )
        self.measured = Gauge(
            "adaskip_measured_prefill_speedup", "Last measured prefill speedup", ["collection"], registry=r
        )

    def served(self, stats: SkipStats) -> None:
        """Record one answered request."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.generated_tokens)
        self.ttft.observe(stats.waited_seconds + stats.prefill_seconds)
        if stats.generated_tokens > 1:
            self.tpot.observe(stats.decode_seconds / (stats.generated_tokens - 1))
        for size in stats.batch_sizes:
            self.batch.observe(size)
        collection = stats.collection or ""
        self.skipped.labels(collection).inc(stats.skipped_sublayers)
        if stats.estimated_prefill_speedup != float("inf"):
            self.estimated.labels(collection).set(stats.estimated_prefill_speedup)
        if stats.measured_prefill_speedup is not None:
            self.measured.labels(collection).set(stats.measured_prefill_speedup)

    def text(self) -> bytes:
        return generate_latest(self.registry)
