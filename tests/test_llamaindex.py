"""LlamaIndex integration: responses, usage, stats events, streaming, async, query engines over Chroma."""

import asyncio
import time
from typing import Any

import pydantic
import pytest

pytest.importorskip("llama_index.core")

from conftest import COLLECTIONS, steps_around_a_cancel, tiny_model
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler

from adaskip_rag import AdaSkipEngine
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.stores import SQLiteProfileStore
from llama_index.llms.adaskip import AdaSkipLLM, AdaSkipStatsEvent


class StatsEvents(BaseEventHandler):
    """Collects the AdaSkipStatsEvents the root dispatcher sends while it is registered."""

    events: list[dict[str, Any]] = []

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, AdaSkipStatsEvent):
            self.events.append(event.stats)


@pytest.fixture
def stats_events():
    handler = StatsEvents(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler.events
    root.event_handlers.remove(handler)


@pytest.fixture
def tiny(tokenizer, tmp_path):
    """A tiny model that always runs in full, so repeated answers are equal."""
    return AdaSkipEngine(
        tiny_model("llama"),
        tokenizer,
        "tiny",
        store=SQLiteProfileStore(tmp_path / "p.sqlite"),
        policy=AdaSkipPolicy(warmup=10**9, refresh_every=0),
    )


MESSAGES = [
    ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
    ChatMessage(role=MessageRole.USER, content="What is the capital of France?"),
]


def test_metadata_and_bad_arguments(tiny):
    llm = AdaSkipLLM(engine=tiny, max_tokens=12)
    meta = llm.metadata
    assert (meta.context_window, meta.num_output, meta.is_chat_model, meta.model_name) == (512, 12, True, "tiny")
    with pytest.raises(ValueError, match="unsupported arguments: \\['frobnicate'\\]"):
        llm.complete("hello", frobnicate=1)
    with pytest.raises(ValueError, match="max_tokens"):
        AdaSkipLLM(max_tokens=0)


def test_chat_usage_stats_and_token_counting(tiny, stats_events):
    # a counter whose own estimate (characters) differs from the real token counts
    counter = TokenCountingHandler(tokenizer=lambda text: list(text))
    llm = AdaSkipLLM(engine=tiny, max_tokens=8, collection="geo", callback_manager=CallbackManager([counter]))
    response = llm.chat(MESSAGES)
    stats = response.additional_kwargs["adaskip"]
    prompt_ids = tiny.encode([{"role": m.role.value, "content": m.content} for m in MESSAGES])
    assert stats["collection"] == "geo" and stats["prompt_tokens"] == len(prompt_ids)
    assert response.raw["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": stats["generated_tokens"],
        "total_tokens": len(prompt_ids) + stats["generated_tokens"],
    }
    assert response.message.content == tiny.generate(prompt_ids, max_new_tokens=8).text
    assert (counter.prompt_llm_token_count, counter.completion_llm_token_count) == (
        len(prompt_ids),
        stats["generated_tokens"],
    )
    assert stats_events == [stats]


def test_streaming_and_async_give_the_same_text_and_one_event_each(tiny, stats_events):
    llm = AdaSkipLLM(engine=tiny, max_tokens=10)
    text = llm.complete("The capital of France is").text
    chunks = list(llm.stream_complete("The capital of France is"))
    assert "".join(c.delta for c in chunks) == chunks[-1].text == text
    assert chunks[-1].additional_kwargs["adaskip"]["generated_tokens"] == chunks[-1].raw["usage"]["completion_tokens"]
    chat = llm.chat(MESSAGES).message.content
    assert "".join(r.delta for r in llm.stream_chat(MESSAGES)) == chat

    async def run_async():
        streamed = [r async for r in await llm.astream_complete("The capital of France is")]
        chat_streamed = [r async for r in await llm.astream_chat(MESSAGES)]
        return (
            (await llm.acomplete("The capital of France is")).text,
            streamed[-1].text,
            (await llm.achat(MESSAGES)).message.content,
            chat_streamed[-1].message.content,
        )

    assert asyncio.run(run_async()) == (text, text, chat, chat)
    assert len(stats_events) == 8  # one per call (8 calls), streamed or not
    assert {e["collection"] for e in stats_events} == {"default"}


def test_per_call_arguments(tiny):
    llm = AdaSkipLLM(engine=tiny, max_tokens=20)
    full = llm.complete("The capital of France is")
    short = llm.complete("The capital of France is", max_tokens=3, collection="per-call")
    assert short.additional_kwargs["adaskip"]["generated_tokens"] == 3 and full.text.startswith(short.text)
    assert short.additional_kwargs["adaskip"]["collection"] == "per-call"
    stop = full.text.strip()[-2:]
    assert stop not in llm.complete("The capital of France is", stop=[stop]).text
    sampled = {llm.complete("The capital of France is", temperature=1.5, seed=s).text for s in range(4)}
    assert len(sampled) > 1  # temperature is honoured per call


def test_budget_quality_target_and_skip_at_construction_and_per_call(tokenizer, tmp_path):
    policy = AdaSkipPolicy(budget=2, warmup=1, window=0, refresh_every=0, tail=0)
    engine = AdaSkipEngine(
        tiny_model("llama"), tokenizer, "tiny", store=SQLiteProfileStore(tmp_path / "p"), policy=policy
    )
    stats = lambda llm, **kw: llm.complete("The capital of France is", **kw).additional_kwargs["adaskip"]  # noqa: E731
    llm = AdaSkipLLM(engine=engine, max_tokens=2, budget=4)
    assert stats(llm)["skipped_sublayers"] == 0  # the collection's warm-up
    assert stats(llm)["skipped_sublayers"] == 4 and stats(llm, budget=3)["skipped_sublayers"] == 3
    assert stats(llm, skip=False)["skipped_sublayers"] == 0
    assert stats(AdaSkipLLM(engine=engine, max_tokens=2, skip=False))["skipped_sublayers"] == 0
    assert stats(AdaSkipLLM(engine=engine, max_tokens=2))["skipped_sublayers"] == 2
    assert stats(llm, quality_target=0.9)["budget_reason"].startswith("quality guard")
    chat = llm.chat(MESSAGES, budget=1).additional_kwargs["adaskip"]
    assert chat["skipped_sublayers"] == 1


def test_collections_of_other_vector_stores_and_a_warning_where_a_store_has_none(tiny, monkeypatch):
    from typing import ClassVar

    from llama_index.core import Document, MockEmbedding, VectorStoreIndex
    from llama_index.core.vector_stores import SimpleVectorStore

    from adaskip_rag import adapters

    class NamedStore(SimpleVectorStore):
        collection_name: ClassVar[str] = "manuals"  # as PGVector, Qdrant and Milvus name theirs

    monkeypatch.setattr(adapters, "_warned_stores", set())
    llm = AdaSkipLLM(engine=tiny, max_tokens=2)

    def ask(store: SimpleVectorStore) -> None:
        from llama_index.core import PromptTemplate, StorageContext

        context = StorageContext.from_defaults(vector_store=store)
        index = VectorStoreIndex.from_documents(
            [Document(text="Paris is the capital of France.")], storage_context=context, embed_model=MockEmbedding(8)
        )
        template = PromptTemplate("{context_str}\n{query_str}")
        engine = index.as_query_engine(
            llm=llm, similarity_top_k=1, text_qa_template=template, response_mode="simple_summarize"
        )
        engine.query("Capital?")

    events = StatsEvents(events=[])
    get_dispatcher().add_event_handler(events)
    try:
        ask(NamedStore())
        with pytest.warns(UserWarning, match="collection name from the SimpleVectorStore.*pass collection="):
            ask(SimpleVectorStore())
    finally:
        get_dispatcher().event_handlers.remove(events)
    assert [e["collection"] for e in events.events] == ["manuals", "default"]


@pytest.mark.slow
def test_acomplete_leaves_the_event_loop_free(full_engine):
    llm = AdaSkipLLM(engine=full_engine, max_tokens=24)

    async def measure():
        gaps, done = [], asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        start = time.perf_counter()
        answers = await asyncio.gather(llm.acomplete("Name three colours."), llm.acomplete("Name three fruits."))
        elapsed = time.perf_counter() - start
        done.set()
        await tick
        return answers, elapsed, gaps

    answers, elapsed, gaps = asyncio.run(measure())
    assert all(a.text.strip() for a in answers)
    assert elapsed > 0.5  # long enough for a blocked loop to show
    assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps):.2f}s of {elapsed:.2f}s"


@pytest.mark.slow
def test_query_engines_over_two_chroma_collections_build_two_profiles_automatically(
    full_engine, minilm_path, tmp_path, stats_events
):
    chromadb = pytest.importorskip("chromadb")
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.vector_stores.chroma import ChromaVectorStore

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    embed = HuggingFaceEmbedding(model_name=minilm_path)
    llm = AdaSkipLLM(engine=full_engine, max_tokens=32)  # no collection given anywhere
    store = full_engine.learner.store
    for name, case in COLLECTIONS.items():
        vectors = ChromaVectorStore(chroma_collection=client.create_collection(name))
        index = VectorStoreIndex.from_documents(
            [Document(text=doc) for doc in case["docs"]],
            embed_model=embed,
            storage_context=StorageContext.from_defaults(vector_store=vectors),
        )
        stats_events.clear()
        answer = str(index.as_query_engine(llm=llm, similarity_top_k=2).query(case["question"]))
        assert case["answer"] in answer
        assert [e["collection"] for e in stats_events] == [name]
        assert store.get(full_engine.fingerprint, name).queries == 1

        streaming = index.as_query_engine(llm=llm, similarity_top_k=2, streaming=True).query(case["question"])
        assert "".join(streaming.response_gen) == answer  # the LLM runs only now, after the query returned
        assert [e["collection"] for e in stats_events] == [name, name]

        async def aquery(streaming: bool, index=index, case=case) -> str:
            engine = index.as_query_engine(llm=llm, similarity_top_k=2, streaming=streaming)
            response = await engine.aquery(case["question"])
            return "".join([t async for t in response.async_response_gen()]) if streaming else str(response)

        assert asyncio.run(aquery(False)) == asyncio.run(aquery(True)) == answer
        assert store.get(full_engine.fingerprint, name).queries == 4
    assert store.get(full_engine.fingerprint, "default") is None
    assert llm.complete("Hello").additional_kwargs["adaskip"]["collection"] == "default"


# ----------------------------------------------------------------- conventions, structured prediction, tools


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"foo": 1}, "foo"),
        ({"model_name": "x"}, "model_name"),
        ({"truncation": "middle"}, "truncation"),
        ({"stop": [""]}, "stop"),
        ({"collection": ""}, "collection"),
        ({"device": "gpu9"}, "device"),
        ({"dtype": "half"}, "dtype"),
        ({"budget": -2}, "budget"),
        ({"quality_target": 1.5}, "quality_target"),
        ({"skip": 1}, "skip"),
    ],
)
def test_bad_constructor_arguments_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"(?s)\b{field}\b"):
        AdaSkipLLM(**kwargs)


def test_aliases_empty_prompts_and_truncation(tiny):
    assert AdaSkipLLM(max_new_tokens=7).max_tokens == 7 and AdaSkipLLM(model_name="default").model == "default"
    llm = AdaSkipLLM(engine=tiny, max_tokens=4)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.complete("")
    long_prompt = "Context: " + "the fox jumps over the dog. " * 120 + "Question: what jumps?"
    with pytest.raises(ValueError, match="truncation='left'"):
        llm.complete(long_prompt)
    assert llm.complete(long_prompt, truncation="left").additional_kwargs["adaskip"]["prompt_tokens"] == 508
    kept = AdaSkipLLM(engine=tiny, max_tokens=4, truncation="left").chat(
        [ChatMessage(role=MessageRole.USER, content=long_prompt)]
    )
    assert kept.additional_kwargs["adaskip"]["prompt_tokens"] == tiny.context_window - 4


def test_a_model_without_tool_template_is_not_function_calling(tiny):
    from llama_index.core.tools import FunctionTool

    llm = AdaSkipLLM(engine=tiny, max_tokens=4)
    assert llm.metadata.is_function_calling_model is False
    tool = FunctionTool.from_defaults(lambda city: city, name="echo", description="Echo a city.")
    with pytest.raises(ValueError, match="tiny's chat template does not support tool calling"):
        llm.chat_with_tools([tool], user_msg="hi")


class City(pydantic.BaseModel):
    """A city and its country."""

    city: str
    country: str
    population_millions: float = pydantic.Field(ge=0)


@pytest.mark.slow
def test_structured_predict_and_structured_llm_parse_streamed_and_not(full_engine):
    from llama_index.core.prompts import PromptTemplate

    llm = AdaSkipLLM(engine=full_engine, max_tokens=48)
    assert llm.metadata.is_function_calling_model and llm.metadata.model_name == "SmolLM2-135M-Instruct"
    prompt = PromptTemplate("Extract the city: {text}")
    texts = [
        "Paris is the capital of France, home to 2.1 million people.",
        "Tokyo, Japan has about 14 million inhabitants.",
        "Rome (Italy) counts 2.8 million residents.",
    ]
    # each way once, on the texts in turn (closing itself is tested on random schemas in test_constrained.py)
    assert isinstance(llm.structured_predict(City, prompt, text=texts[0]), City)
    assert isinstance(asyncio.run(llm.astructured_predict(City, prompt, text=texts[1])), City)
    assert isinstance(list(llm.stream_structured_predict(City, prompt, text=texts[2]))[-1], City)

    async def astream():
        return [c async for c in await llm.astream_structured_predict(City, prompt, text=texts[0])]

    assert isinstance(asyncio.run(astream())[-1], City)
    structured = llm.as_structured_llm(City)
    response = structured.chat([ChatMessage(role=MessageRole.USER, content=f"Extract the city: {texts[0]}")])
    assert isinstance(response.raw, City) and City.model_validate_json(response.message.content)


@pytest.mark.slow
def test_tool_calls_and_a_second_turn_with_the_result(full_engine):
    from llama_index.core.tools import FunctionTool

    def get_weather(city: str) -> str:
        """The current weather of a city."""
        return f"sunny and 21 C in {city}"

    tool = FunctionTool.from_defaults(get_weather)
    llm = AdaSkipLLM(engine=full_engine, max_tokens=48)
    response = llm.chat_with_tools([tool], user_msg="What is the weather in Paris?", tool_required=True)
    [call] = llm.get_tool_calls_from_response(response)
    assert call.tool_name == "get_weather" and call.tool_kwargs["city"]
    streamed = list(llm.stream_chat_with_tools([tool], user_msg="What is the weather in Paris?", tool_required=True))
    assert [c.tool_name for c in llm.get_tool_calls_from_response(streamed[-1])] == ["get_weather"]
    result = tool(**call.tool_kwargs)
    history = [
        ChatMessage(role=MessageRole.USER, content="What is the weather in Paris?"),
        response.message,
        ChatMessage(role=MessageRole.TOOL, content=str(result), additional_kwargs={"tool_call_id": call.tool_id}),
    ]
    answer = llm.chat_with_tools([tool], chat_history=history, max_tokens=16)
    assert answer.message.content.strip()
    assert answer.additional_kwargs["adaskip"]["prompt_tokens"] > response.additional_kwargs["adaskip"]["prompt_tokens"]
    assert llm.predict_and_call([tool], user_msg="What is the weather in Rome?", tool_choice="get_weather").response


BAD_CALLS = [
    ({"temperature": "0.5"}, "temperature"),
    ({"max_tokens": True}, "max_tokens"),
    ({"stop": 5}, "stop"),
    ({"seed": "abc"}, "seed"),
    ({"top_k": 1.5}, "top_k"),
    ({"collection": 5}, "collection"),
    ({"truncation": "middle"}, "truncation"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"budget": 999}, "budget"),
    ({"quality_target": 0}, "quality_target"),
    ({"skip": "no"}, "skip"),
]


@pytest.mark.parametrize("kwargs, name", BAD_CALLS)
def test_bad_call_arguments_raise_value_error_naming_them(tiny, kwargs, name):
    llm = AdaSkipLLM(engine=tiny, max_tokens=4)
    for call in (
        lambda: llm.complete("hi", **kwargs),
        lambda: llm.chat(MESSAGES, **kwargs),
        lambda: list(llm.stream_complete("hi", **kwargs)),
        lambda: asyncio.run(llm.acomplete("hi", **kwargs)),
    ):
        with pytest.raises(ValueError, match=name):
            call()


def test_a_cancelled_acomplete_stops_generating(tiny, monkeypatch):
    llm = AdaSkipLLM(engine=tiny, max_tokens=400)
    ran, after = steps_around_a_cancel(tiny, monkeypatch, lambda: llm.acomplete("The capital of France is"))
    assert 5 < ran < 100 and after <= 1
