"""LangChain integration: the framework's own standard tests, skip metadata, callbacks, streaming."""

import asyncio
import warnings
from typing import Any

import pytest
from conftest import steps_around_a_cancel
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel, Field

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
        return {"temperature": 0, "max_tokens": 48, "stop": []}  # room for a tool call; JSON closes in time

    @property
    def supports_json_mode(self) -> bool:
        return True


class TestChatAdaSkipUnit(StandardTestSettings, ChatModelUnitTests):
    pass


@pytest.mark.slow
class TestChatAdaSkipIntegration(StandardTestSettings, ChatModelIntegrationTests):
    @pytest.mark.xfail(
        reason="with tool_choice='auto' the 135M default model mostly answers in text instead of "
        "calling the tool; forced choices ('any', a tool's name) always call it",
        strict=False,
    )
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)


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
        "input_tokens": stats["prompt_tokens"],
        "output_tokens": stats["generated_tokens"],
        "total_tokens": stats["prompt_tokens"] + stats["generated_tokens"],
    }
    assert handler.events == [stats]

    chain = ChatPromptTemplate.from_messages([("user", "{question}")]) | llm | StrOutputParser()
    handler = StatsHandler()
    answer = chain.invoke(
        {"question": QUESTION}, config={"callbacks": [handler], "metadata": {"adaskip_collection": "chain-geo"}}
    )
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
    # a bare question, where the instruct model would end its turn at once, still gets a completion
    assert "Paris" in llm.invoke("What is the capital of France?", max_tokens=12)


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
def test_rag_chains_over_two_chroma_collections_build_two_profiles_automatically(full_engine, minilm_path, tmp_path):
    chromadb = pytest.importorskip("chromadb")
    from conftest import COLLECTIONS
    from langchain_chroma import Chroma
    from langchain_core.runnables import RunnablePassthrough
    from langchain_huggingface import HuggingFaceEmbeddings

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    embeddings = HuggingFaceEmbeddings(model_name=minilm_path)
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "Answer the question using only this context:\n{context}"),
            ("user", "{question}"),
        ]
    )
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


# ----------------------------------------------------------------- callbacks, conventions, validation


class TokenCounter(BaseCallbackHandler):
    def __init__(self):
        self.tokens: list[str] = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


def test_completion_streams_report_every_token_sync_async_and_in_a_chain(tiny_engine):
    llm = AdaSkipLLM(engine=tiny_engine, max_tokens=12)
    counter = TokenCounter()
    deltas = list(llm.stream(QUESTION, config={"callbacks": [counter]}))
    assert deltas[-1] == ""  # the last chunk carries the stats, no text
    assert len(deltas) > 3 and counter.tokens == deltas  # every chunk is reported

    async def astream(runnable, value, counter):
        return [c async for c in runnable.astream(value, config={"callbacks": [counter]})]

    counter = TokenCounter()
    assert asyncio.run(astream(llm, QUESTION, counter)) == deltas and counter.tokens == deltas
    chain = ChatPromptTemplate.from_template("{q}") | llm
    counter = TokenCounter()
    streamed = list(chain.stream({"q": QUESTION}, config={"callbacks": [counter]}))
    assert counter.tokens == streamed and "".join(streamed)
    counter = TokenCounter()
    assert asyncio.run(astream(chain, {"q": QUESTION}, counter)) == streamed and counter.tokens == streamed

    async def events():
        return [e["event"] async for e in chain.astream_events({"q": QUESTION}, version="v2")]

    kinds = asyncio.run(events())
    assert kinds.count("on_llm_start") == kinds.count("on_llm_end") == 1
    assert kinds.count("on_llm_stream") == len(streamed)


FOREIGN_MODELS = """
import asyncio, json, sys
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import FakeListLLM, FakeStreamingListLLM
from langchain_core.prompts import PromptTemplate

class Recorder(BaseCallbackHandler):
    def __init__(self):
        self.events = []
    def on_llm_start(self, *a, **k): self.events.append("llm_start")
    def on_llm_new_token(self, token, **k): self.events.append("token")
    def on_llm_end(self, *a, **k): self.events.append("llm_end")
    def on_chain_start(self, *a, **k): self.events.append("chain_start")
    def on_chain_end(self, *a, **k): self.events.append("chain_end")

def record():
    seen = []
    handler = Recorder()
    asyncio.run(FakeListLLM(responses=["a"]).ainvoke("x", config={"callbacks": [handler]}))
    seen.append(handler.events)
    chain = PromptTemplate.from_template("{q}") | FakeStreamingListLLM(responses=["abc"])
    handler = Recorder()
    async def astream():
        return [c async for c in chain.astream({"q": "x"}, config={"callbacks": [handler]})]
    asyncio.run(astream())
    seen.append(handler.events)
    handler = Recorder()
    chain.invoke({"q": "x"}, config={"callbacks": [handler]})
    seen.append(handler.events)
    async def events():
        return [e["event"] async for e in chain.astream_events({"q": "x"}, version="v2")]
    seen.append(asyncio.run(events()))
    return seen

before = record()
import langchain_adaskip  # noqa: E402
print(json.dumps({"before": before, "after": record()}))
"""


def test_importing_the_package_leaves_other_models_callbacks_alone():
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FOREIGN_MODELS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert "llm_start" in seen["before"][0] and "on_llm_start" in seen["before"][3]
    assert seen["after"] == seen["before"]
    assert "KeyError" not in run.stderr and "Error in" not in run.stderr


@pytest.mark.parametrize("cls", [ChatAdaSkip, AdaSkipLLM])
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"foo": 1}, "foo"),
        ({"model_name": "x"}, "model_name"),
        ({"model": "/nonexistent"}, "model"),
        ({"truncation": "right"}, "truncation"),
        ({"stop": [""]}, "stop"),
        ({"collection": ""}, "collection"),
        ({"device": "gpu9"}, "device"),
        ({"dtype": "float64"}, "dtype"),
        ({"budget": -1}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"quality_target": 0}, "quality_target"),
        ({"skip": "no"}, "skip"),
    ],
)
def test_bad_constructor_arguments_raise_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"(?s)\b{field}\b.*"):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [ChatAdaSkip, AdaSkipLLM])
def test_aliases_and_the_model_name(cls, tiny_engine, tmp_path):
    assert cls(max_new_tokens=5).max_tokens == 5 and cls(model_name="default").model == "default"
    assert cls().model_name == "SmolLM2-135M-Instruct" and cls(engine=tiny_engine).model_name == "tiny-llama"
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    llm = cls(model=str(folder))
    assert llm.model_name == "my-model" and llm._get_ls_params()["ls_model_name"] == "my-model"


def test_responses_name_the_model_and_empty_prompts_raise_in_both_classes(tiny_engine):
    chat, completion = ChatAdaSkip(engine=tiny_engine, max_tokens=4), AdaSkipLLM(engine=tiny_engine, max_tokens=4)
    assert chat.invoke(QUESTION).response_metadata["model_name"] == "tiny-llama"
    assert completion.generate([QUESTION]).llm_output["model_name"] == "tiny-llama"
    for llm in (chat, completion):
        with pytest.raises(ValueError, match="prompt is empty"):
            llm.invoke("")


def test_budget_quality_target_and_skip_at_construction_and_per_call(tokenizer, tmp_path):
    from conftest import tiny_model

    from adaskip_rag import AdaSkipEngine
    from adaskip_rag.policies import AdaSkipPolicy
    from adaskip_rag.stores import SQLiteProfileStore

    policy = AdaSkipPolicy(budget=2, warmup=1, window=0, refresh_every=0, tail=0)
    engine = AdaSkipEngine(
        tiny_model("llama"), tokenizer, "tiny", store=SQLiteProfileStore(tmp_path / "p"), policy=policy
    )
    skipped = lambda llm, **kw: llm.invoke(QUESTION, **kw).response_metadata["adaskip"]["skipped_sublayers"]  # noqa: E731
    chat = ChatAdaSkip(engine=engine, max_tokens=2, budget=4)
    assert skipped(chat) == 0  # the collection's warm-up
    assert skipped(chat) == 4 and skipped(chat, budget=3) == 3 and skipped(chat, skip=False) == 0
    assert skipped(ChatAdaSkip(engine=engine, max_tokens=2, skip=False)) == 0
    assert skipped(ChatAdaSkip(engine=engine, max_tokens=2)) == 2
    reason = chat.invoke(QUESTION, quality_target=0.9).response_metadata["adaskip"]["budget_reason"]
    assert reason.startswith("quality guard")


def test_truncation_left_through_field_and_call(tiny_engine):
    long_prompt = "Retrieved context: " + "the fox jumps over the dog. " * 120 + "Question: what jumps?"
    assert len(tiny_engine.encode(long_prompt)) > tiny_engine.context_window
    for llm in (ChatAdaSkip(engine=tiny_engine, max_tokens=4), AdaSkipLLM(engine=tiny_engine, max_tokens=4)):
        with pytest.raises(ValueError, match="truncation='left'"):
            llm.invoke(long_prompt)
        llm.invoke(long_prompt, truncation="left")
        llm.model_copy(update={"truncation": "left"}).invoke(long_prompt)
    kept = ChatAdaSkip(engine=tiny_engine, max_tokens=4, truncation="left").invoke(long_prompt)
    assert kept.response_metadata["adaskip"]["prompt_tokens"] == tiny_engine.context_window - 4


# ----------------------------------------------------------------- structured output and tools (default model)


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="the person's full name")
    age: int = Field(ge=0, le=150, description="age in years")
    city: str = Field(description="the city where the person lives")


PEOPLE = [
    ("Marie Curie", 66, "Paris"),
    ("Alan Turing", 41, "Manchester"),
    ("Ada Lovelace", 36, "London"),
    ("Nikola Tesla", 86, "New York"),
    ("Frida Kahlo", 47, "Mexico City"),
]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}. Extract the person.",
    "Extract the person from this note: '{city} resident {name}, aged {age}.'",
    "Record: name={name}; age={age}; home={city}. Return the person as JSON.",
    "Our customer {name} ({age}) moved to {city} last year. Who is the customer?",
]
EXTRACTIONS = [t.format(name=n, age=a, city=c) for t in TEMPLATES for n, a, c in PEOPLE]  # 20 prompts, 5 per template


@pytest.fixture(scope="module")
def skipping_engine(tmp_path_factory):
    """The default model learning from the first query with a tail that fits short prompts: every answer skips."""
    from adaskip_rag import AdaSkipEngine
    from adaskip_rag.policies import AdaSkipPolicy
    from adaskip_rag.stores import SQLiteProfileStore

    base = AdaSkipEngine.shared("default")
    store = SQLiteProfileStore(tmp_path_factory.mktemp("skip") / "p.sqlite")
    return AdaSkipEngine(
        base.model,
        base.tokenizer,
        base.name,
        store=store,
        policy=AdaSkipPolicy(warmup=0, refresh_every=0, budget=6, tail=8, min_gain=0),
    )


@pytest.mark.slow
def test_structured_output_always_parses_with_and_without_skipping_streamed_and_not(full_engine, skipping_engine):
    """Every template and every person, three prompts per engine, streamed and not in turn (closing itself is
    tested on random schemas in test_constrained.py)."""
    for engine, prompts in ((full_engine, (0, 6, 12)), (skipping_engine, (18, 4, 13))):
        structured = ChatAdaSkip(engine=engine, max_tokens=48).with_structured_output(Person)
        for k, prompt in enumerate(EXTRACTIONS[i] for i in prompts):
            handler = StatsHandler()
            config = {"callbacks": [handler]}
            streamed = k % 2 == 1
            person = list(structured.stream(prompt, config))[-1] if streamed else structured.invoke(prompt, config)
            assert isinstance(person, Person), (prompt, person)
            [stats] = handler.events
            skipped = stats["skipped_attention"] + stats["skipped_ffn_prefill"]
            assert bool(skipped) == (engine is skipping_engine)


@pytest.mark.slow
def test_structured_output_methods_and_schema_kinds(full_engine):
    from typing_extensions import TypedDict

    class PersonDict(TypedDict):
        name: str
        age: int

    llm = ChatAdaSkip(engine=full_engine, max_tokens=48)
    prompt = EXTRACTIONS[0]
    assert llm.with_structured_output(Person).invoke(prompt) == Person(name="Marie Curie", age=66, city="Paris")
    assert llm.with_structured_output(PersonDict).invoke(prompt) == {"name": "Marie Curie", "age": 66}
    assert isinstance(llm.with_structured_output(Person, method="function_calling").invoke(prompt), Person)
    # JSON schema dicts and json_mode: the standard tests (test_structured_output[json_schema], test_json_mode)
    with pytest.raises(ValueError, match="method must be"):
        llm.with_structured_output(Person, method="xml")


@tool
def get_weather(city: str) -> str:
    """The current weather of a city."""
    return f"sunny and 21 C in {city}"


@pytest.mark.slow
def test_tool_calls_parse_and_a_second_turn_with_the_result_answers(full_engine):
    llm = ChatAdaSkip(engine=full_engine, max_tokens=48)
    question = HumanMessage("What is the weather in Paris?")
    by_name = {"type": "function", "function": {"name": "get_weather"}}
    assert (
        llm.bind_tools([get_weather], tool_choice=by_name).kwargs
        == llm.bind_tools([get_weather], tool_choice="get_weather").kwargs
    )
    for choice in ("any", by_name):
        call = llm.bind_tools([get_weather], tool_choice=choice).invoke([question])
        assert [c["name"] for c in call.tool_calls] == ["get_weather"] and call.tool_calls[0]["args"]["city"]
    chunks = list(llm.bind_tools([get_weather], tool_choice="any").stream([question]))
    streamed = chunks[0]
    for c in chunks[1:]:
        streamed += c
    assert [c["name"] for c in streamed.tool_calls] == ["get_weather"]
    result = get_weather.invoke(call.tool_calls[0])
    answer = llm.bind_tools([get_weather]).invoke([question, call, result], max_tokens=16)
    assert isinstance(answer, AIMessage) and answer.content.strip() and not answer.invalid_tool_calls
    assert answer.response_metadata["adaskip"]["prompt_tokens"] > call.response_metadata["adaskip"]["prompt_tokens"]
    with pytest.raises(ValueError, match="tool_choice must be"):
        llm.bind_tools([get_weather], tool_choice="other_tool")


def test_bind_tools_needs_a_template_with_tool_support(tiny_engine):
    with pytest.raises(ValueError, match="tiny-llama's chat template does not support tool calling"):
        ChatAdaSkip(engine=tiny_engine).bind_tools([get_weather])


def test_tools_and_schemas_the_model_cannot_serve_raise_when_bound(default_path):
    from conftest import tiny_model
    from transformers import AutoTokenizer

    from adaskip_rag import AdaSkipEngine
    from adaskip_rag.chat_templates import SMOLLM2_TOOLS

    tokenizer = AutoTokenizer.from_pretrained(default_path)
    tokenizer.chat_template = SMOLLM2_TOOLS
    chat = ChatAdaSkip(engine=AdaSkipEngine(tiny_model("llama"), tokenizer, name="tiny-tools"), max_tokens=8)
    with pytest.raises(ValueError, match="'<lambda>' is not 1-64 letters"):
        chat.bind_tools([lambda x: x])
    for schema in (str, list[int], 5):
        with pytest.raises(ValueError, match="schema must be a pydantic model class, a TypedDict or a JSON schema"):
            chat.with_structured_output(schema)
    untitled = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with pytest.raises(ValueError, match="needs a 'title'"):
        chat.with_structured_output(untitled, method="function_calling")
    assert set(chat.with_structured_output(untitled).invoke("Give a.")) == {"a"}


def test_collections_of_other_vector_stores_and_a_warning_where_a_store_has_none(tiny_engine, monkeypatch):
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.runnables import RunnablePassthrough
    from langchain_core.vectorstores import InMemoryVectorStore

    from adaskip_rag import adapters

    class NamedStore(InMemoryVectorStore):
        collection_name = "manuals"  # as PGVector, Qdrant and Milvus name theirs

    monkeypatch.setattr(adapters, "_warned_stores", set())
    prompt = ChatPromptTemplate.from_template("Context: {context}\nQuestion: {question}")
    chat = ChatAdaSkip(engine=tiny_engine, max_tokens=2)

    def ask(store: InMemoryVectorStore) -> str:
        store.add_texts(["Paris is the capital of France."])
        context = store.as_retriever(search_kwargs={"k": 1}) | (lambda docs: docs[0].page_content)
        chain = {"context": context, "question": RunnablePassthrough()} | prompt | chat
        return chain.invoke("What is the capital?").response_metadata["adaskip"]["collection"]

    embeddings = DeterministicFakeEmbedding(size=8)
    assert ask(NamedStore(embeddings)) == "manuals"
    with pytest.warns(UserWarning, match="collection name from the InMemoryVectorStore.*pass collection="):
        assert ask(InMemoryVectorStore(embeddings)) == "default"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per store type
        assert ask(InMemoryVectorStore(embeddings)) == "default"


BAD_CALLS = [
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": 5}, "stop"),
    ({"seed": "abc"}, "seed"),
    ({"top_k": 1.5}, "top_k"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"collection": 5}, "collection"),
    ({"truncation": "middle"}, "truncation"),
    ({"stop_token_ids": [1]}, "stop_token_ids"),
    ({"json_schema": 5}, "json_schema"),
    ({"budget": 999}, "budget"),
    ({"quality_target": 2}, "quality_target"),
    ({"skip": "no"}, "skip"),
]


@pytest.mark.parametrize("kwargs, name", BAD_CALLS)
@pytest.mark.parametrize("cls", [ChatAdaSkip, AdaSkipLLM])
def test_bad_call_arguments_raise_value_error_naming_them(cls, kwargs, name, tiny_engine):
    llm = cls(engine=tiny_engine, max_tokens=4)
    with pytest.raises(ValueError, match=name):
        llm.invoke(QUESTION, **kwargs)
    with pytest.raises(ValueError, match=name):
        list(llm.stream(QUESTION, **kwargs))
    with pytest.raises(ValueError, match=name):
        asyncio.run(llm.ainvoke(QUESTION, **kwargs))


def test_a_cancelled_ainvoke_stops_generating(tiny_engine, monkeypatch):
    llm = ChatAdaSkip(engine=tiny_engine, max_tokens=400)
    ran, after = steps_around_a_cancel(tiny_engine, monkeypatch, lambda: llm.ainvoke(QUESTION))
    assert 5 < ran < 100 and after <= 1


OTHER_CHAIN = """
import asyncio, json, sys, time
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

if sys.argv[1] == "with":
    import langchain_adaskip  # noqa: F401
store = InMemoryVectorStore(DeterministicFakeEmbedding(size=8))
store.add_texts(["Paris is the capital of France.", "Rome is the capital of Italy."])
prompt = ChatPromptTemplate.from_template("Context: {context}\\nQuestion: {question}")
model = FakeListChatModel(responses=["Paris."])
retriever = store.as_retriever(search_kwargs={"k": 1})
chain = {"context": retriever, "question": RunnablePassthrough()} | prompt | model | StrOutputParser()
start = time.process_time()  # this process's CPU time: what the import could add, not what other processes take
for _ in range(12):
    chain.invoke("What is the capital of France?")
seconds = time.process_time() - start

async def events():
    return [(e["event"], e["name"]) async for e in chain.astream_events("Capital?", version="v2")]

print(json.dumps({"seconds": seconds, "events": asyncio.run(events())}))
"""


def test_importing_the_package_costs_other_chains_nothing():
    """A retriever chain with another chat model: its first 12 calls take as long, and it sends the same events
    (first and last the same), with and without the import (each variant run twice, alternately, in fresh
    interpreters)."""
    import json
    import subprocess
    import sys

    def run(variant: str) -> dict:
        done = subprocess.run([sys.executable, "-c", OTHER_CHAIN, variant], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    runs = {"without": [], "with": []}
    for _ in range(2):
        for variant in runs:
            runs[variant].append(run(variant))
    with_import, without = runs["with"][0]["events"], runs["without"][0]["events"]
    # the retriever and the passthrough run concurrently: their events may interleave either way in both variants
    assert sorted(with_import) == sorted(without)
    assert (with_import[0], with_import[-1]) == (without[0], without[-1])
    assert "on_retriever_end" in {event for event, _ in runs["with"][0]["events"]}
    extra = min(r["seconds"] for r in runs["with"]) - min(r["seconds"] for r in runs["without"])
    assert extra < 0.030, runs
