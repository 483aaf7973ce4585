from langchain_adaskip.chat_models.adaskip import ChatAdaSkip

__all__ = ["ChatAdaSkip"]
