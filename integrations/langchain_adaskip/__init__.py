"""LangChain integration of adaskip-rag: ``ChatAdaSkip`` (chat model) and ``AdaSkipLLM`` (text completion)."""

from langchain_adaskip.chat_models import ChatAdaSkip
from langchain_adaskip.llms import AdaSkipLLM

__all__ = ["AdaSkipLLM", "ChatAdaSkip"]
