"""LlamaIndex integration of adaskip-rag: ``AdaSkipLLM`` and its ``AdaSkipStatsEvent``."""

from llama_index.llms.adaskip.base import AdaSkipLLM, AdaSkipStatsEvent

__all__ = ["AdaSkipLLM", "AdaSkipStatsEvent"]
