"""LangChain integration of adaskip-rag: ``ChatAdaSkip`` (chat model) and ``AdaSkipLLM`` (text completion).

Importing it registers nothing with LangChain: other chains and models run, cost and call back as without it.
Answers are keyed by the collection of the vector store their chain retrieves from, found at the model's call
(``_retrieval.py``).
"""

from langchain_adaskip.chat_models import ChatAdaSkip
from langchain_adaskip.llms import AdaSkipLLM

__all__ = ["AdaSkipLLM", "ChatAdaSkip"]
