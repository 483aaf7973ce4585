"""LangChain integration: the framework's own standard tests, skip metadata, callbacks, streaming."""

import asyncio
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_adaskip import AdaSkipLLM, ChatAdaSkip

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

    @property
    def standard_chat_model_params(self) -> dict:
        # timeout, max_retries and api_key are settings of hosted APIs: a local model has none, and unknown
        # constructor arguments raise
        return {"temperature": 0, "max_tokens": 100, "stop": []}

    @property
    def supports_json_mode(self) -> bool:
        return True


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


@pytest.mark.slow
def test_streamed_calls_send_stats_once_with_the_config_collection(full_engine):
    llm = ChatAdaSkip(**PARAMS, engine=full_engine)
    config = {"metadata": {"adaskip_collection": "streamed"}}
    handler = StatsHandler()
    chunks = list(llm.stream(QUESTION, config={**config, "callbacks": [handler]}))
    assert handler.events == [chunks[-1].response_metadata["adaskip"]]
    assert handler.events[0]["collection"] == "streamed"

    async def astream():
        handler = StatsHandler()
        chunks = [c async for c in llm.astream(QUESTION, config={**config, "callbacks": [handler]})]
        return chunks, handler.events

    achunks, events = asyncio.run(astream())
    assert events == [achunks[-1].response_metadata["adaskip"]] and events[0]["collection"] == "streamed"

    handler = StatsHandler()
    chain = ChatPromptTemplate.from_messages([("user", "{question}")]) | llm | StrOutputParser()
    text = "".join(chain.stream({"question": QUESTION}, config={**config, "callbacks": [handler]}))
    assert text == "".join(c.content for c in chunks)
    assert len(handler.events) == 1 and handler.events[0]["collection"] == "streamed"


def _format(docs) -> str:
    return "\n".join(doc.page_content for doc in docs)


@pytest.mark.slow
def test_rag_chains_over_two_chroma_collections_build_two_profiles_automatically(full_engine, minilm_path,
                                                                                  tmp_path):
    chromadb = pytest.importorskip("chromadb")
    from langchain_chroma import Chroma
    from langchain_core.runnables import RunnablePassthrough
    from langchain_huggingface import HuggingFaceEmbeddings

    from conftest import COLLECTIONS

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    embeddings = HuggingFaceEmbeddings(model_name=minilm_path)
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer the question using only this context:\n{context}"), ("user", "{question}"),
    ])
    llm = ChatAdaSkip(**PARAMS, engine=full_engine)  # no collection given anywhere
    store = full_engine.learner.store
    for name, case in COLLECTIONS.items():
        vectors = Chroma(collection_name=name, embedding_function=embeddings, client=client)
        vectors.add_texts(case["docs"])
        retriever = vectors.as_retriever(search_kwargs={"k": 2})
        chain = {"context": retriever | _format, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()

        handler = StatsHandler()
        answer = chain.invoke(case["question"], config={"callbacks": [handler]})
        assert case["answer"] in answer
        assert [e["collection"] for e in handler.events] == [name]
        assert store.get(full_engine.fingerprint, name).queries == 1
        assert "".join(chain.stream(case["question"])) == answer
        assert asyncio.run(chain.ainvoke(case["question"])) == answer
        assert store.get(full_engine.fingerprint, name).queries == 3
        # an explicit key still wins over the retrieved collection
        chain.invoke(case["question"], config={"metadata": {"adaskip_collection": f"{name}-explicit"}})
        assert store.get(full_engine.fingerprint, f"{name}-explicit").queries == 1
    # the text-completion class finds the collection the same way
    completion = AdaSkipLLM(**PARAMS, engine=full_engine)
    chain = {"context": retriever | _format, "question": RunnablePassthrough()} | prompt | completion
    handler = StatsHandler()
    chain.invoke(case["question"], config={"callbacks": [handler]})
    assert [e["collection"] for e in handler.events] == [name]
    assert store.get(full_engine.fingerprint, "default") is None
    # outside a chain that retrieved, the fallback is "default"
    assert llm.invoke(QUESTION).response_metadata["adaskip"]["collection"] == "default"
