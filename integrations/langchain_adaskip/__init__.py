"""LangChain integration of adaskip-rag: ``ChatAdaSkip`` (chat model) and ``AdaSkipLLM`` (text completion).

Importing it registers one thing: a configure hook that adds the retrieval tracker of ``_retrieval.py`` (an
ordinary callback handler for chain and retriever events only) to every run, so that answers are keyed by the
Chroma collection their chain retrieved from. Other models' callbacks are unchanged.
"""

from langchain_adaskip.chat_models import ChatAdaSkip
from langchain_adaskip.llms import AdaSkipLLM

__all__ = ["AdaSkipLLM", "ChatAdaSkip"]
