from langchain_adaskip.llms.adaskip import AdaSkipLLM

__all__ = ["AdaSkipLLM"]
