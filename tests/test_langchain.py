"""LangChain integration: the framework's own standard tests, skip metadata, callbacks, streaming."""

import asyncio
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from adaskip_rag import AdaSkipEngine
from adaskip_rag.history import SQLiteProfileStore
from adaskip_rag.policies import AdaSkipPolicy
from langchain_adaskip import AdaSkipLLM, ChatAdaSkip
from langchain_adaskip._common import shared_engine

PARAMS = {"model": "default", "max_tokens": 32}


class ShortChatAdaSkip(ChatAdaSkip):
    """ChatAdaSkip with short answers, so the standard tests finish quickly on a CPU."""

    max_tokens: int = 32


class StandardTestSettings:
    @property
    def chat_model_class(self) -> type[ChatAdaSkip]:
        return ShortChatAdaSkip

    @property
    def chat_model_params(self) -> dict:
        return {"model": "default"}


class TestChatAdaSkipUnit(StandardTestSettings, ChatModelUnitTests):
    pass


@pytest.mark.slow
class TestChatAdaSkipIntegration(StandardTestSettings, ChatModelIntegrationTests):
    pass


class StatsHandler(BaseCallbackHandler):
    def __init__(self):
        self.events: list[dict[str, Any]] = []

    def on_custom_event(self, name, data, **kwargs):
        if name == "adaskip_stats":
            self.events.append(data)


QUESTION = "What is the capital of France?"


@pytest.mark.slow
def test_stats_reach_metadata_and_handlers_alone_and_in_a_chain():
    llm = ChatAdaSkip(**PARAMS, collection="geo")
    handler = StatsHandler()
    message = llm.invoke(QUESTION, config={"callbacks": [handler]})
    stats = message.response_metadata["adaskip"]
    assert stats["collection"] == "geo" and message.content.strip()  # answers depend on what is skipped
    assert message.usage_metadata == {
        "input_tokens": stats["prompt_tokens"], "output_tokens": stats["generated_tokens"],
        "total_tokens": stats["prompt_tokens"] + stats["generated_tokens"],
    }
    assert handler.events == [stats]

    chain = ChatPromptTemplate.from_messages([("user", "{question}")]) | llm | StrOutputParser()
    handler = StatsHandler()
    answer = chain.invoke({"question": QUESTION}, config={"callbacks": [handler],
                                                          "metadata": {"adaskip_collection": "chain-geo"}})
    assert answer.strip()
    assert len(handler.events) == 1 and handler.events[0]["collection"] == "chain-geo"  # config beats constructor


@pytest.mark.slow
def test_collection_from_config_metadata_and_per_call():
    llm = ChatAdaSkip(**PARAMS)
    meta = llm.invoke(QUESTION, config={"metadata": {"adaskip_collection": "from-config"}})
    assert meta.response_metadata["adaskip"]["collection"] == "from-config"
    assert llm.invoke(QUESTION, collection="per-call").response_metadata["adaskip"]["collection"] == "per-call"
    assert llm.invoke(QUESTION).response_metadata["adaskip"]["collection"] == "default"


@pytest.fixture
def full_engine(tmp_path):
    """The shared default model behind an engine that always runs in full, so repeated answers are equal."""
    base = shared_engine("default", None)
    return AdaSkipEngine(base.model, base.tokenizer, base.name, store=SQLiteProfileStore(tmp_path / "p.sqlite"),
                         policy=AdaSkipPolicy(warmup=10**9, refresh_every=0))


@pytest.mark.slow
def test_streaming_yields_the_invoke_text_and_stats_on_the_last_chunk(full_engine):
    llm = ChatAdaSkip(**PARAMS, engine=full_engine)
    chunks = list(llm.stream(QUESTION))
    assert "".join(c.content for c in chunks) == llm.invoke(QUESTION).content
    assert chunks[-1].response_metadata["adaskip"]["generated_tokens"] == chunks[-1].usage_metadata["output_tokens"]

    async def astream():
        return [c async for c in llm.astream(QUESTION)]

    achunks = asyncio.run(astream())
    assert "".join(c.content for c in achunks) == "".join(c.content for c in chunks)


@pytest.mark.slow
def test_text_completion_llm(full_engine):
    llm = AdaSkipLLM(**PARAMS, collection="completion", engine=full_engine)
    handler = StatsHandler()
    result = llm.generate(["The capital of France is"], stop=["."], callbacks=[handler])
    generation = result.generations[0][0]
    assert "Paris" in generation.text and "." not in generation.text
    assert generation.generation_info["adaskip"]["collection"] == "completion"
    assert handler.events == [generation.generation_info["adaskip"]]
    assert "".join(llm.stream("The capital of France is", stop=["."])) == generation.text
    assert asyncio.run(llm.ainvoke("The capital of France is", stop=["."])) == generation.text
    assert llm.get_token_ids("Paris") == llm.get_engine().tokenizer.encode("Paris", add_special_tokens=False)
    with pytest.raises(ValueError, match="unsupported arguments"):
        llm.invoke("x", frobnicate=1)
