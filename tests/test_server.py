"""The OpenAI-compatible server, through a real uvicorn server on 127.0.0.1 and real clients: the openai package
(sync, async, streaming, tools, structured output), LangChain's ChatOpenAI and LlamaIndex's OpenAILike; errors in
OpenAI's shape, the key, the 503 bound, a disconnect that frees its place, and concurrent clients batched."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import uvicorn
from conftest import free_port, tiny_model
from pydantic import BaseModel
from test_constrained import WEATHER

from adaskip_rag import AdaSkipEngine
from adaskip_rag.chat_templates import SMOLLM2_TOOLS
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.scheduler import ServingLimits
from adaskip_rag.server import create_app
from adaskip_rag.server.process import ServerProcess
from adaskip_rag.stores import SQLiteProfileStore

MODEL = "tiny-server"
QUESTION = [{"role": "user", "content": "Retrieved context: the fox jumps. Question: what jumps?"}]
# longer than the protected tail (64 tokens), so a learned plan has tokens to skip
LONG = [{"role": "user", "content": "Retrieved context: " + "the quick brown fox jumps over the lazy dog. " * 36}]


class City(BaseModel):
    name: str
    population: int


class Person(BaseModel):
    name: str
    age: int


def engine_for_server(tokenizer, tmp_path_factory, **limits) -> AdaSkipEngine:
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = SMOLLM2_TOOLS
    store = SQLiteProfileStore(tmp_path_factory.mktemp("server") / "p.sqlite")
    policy = AdaSkipPolicy(warmup=2, refresh_every=4, budget=4)  # a collection warms up, then skips, in a few requests
    return AdaSkipEngine(tiny_model("llama"), tok, MODEL, store=store, policy=policy, serving=ServingLimits(**limits))


class Served:
    """A uvicorn server of ``app`` on a free port of 127.0.0.1, in a thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    return engine_for_server(tokenizer, tmp_path_factory)


@pytest.fixture(scope="module")
def server(engine) -> Iterator[Served]:
    served = Served(create_app(engine))
    yield served
    served.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, max_tokens: int = 12, messages=QUESTION, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens, **kwargs
    )


def test_chat_answers_with_usage_and_skip_stats(client, engine):
    answer = chat(client, extra_body={"collection": "docs"})
    alone = engine.generate(QUESTION, max_new_tokens=12, skip=False)
    assert answer.choices[0].message.content == alone.text and answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == alone.stats.prompt_tokens and answer.usage.completion_tokens == 12
    stats = answer.model_extra["adaskip"]
    assert stats["collection"] == "docs" and stats["mode"] == "warmup" and stats["generated_tokens"] == 12
    full = chat(client, extra_body={"adaskip": {"skip": False}}).model_extra["adaskip"]
    assert full["collection"] is None and full["mode"] is None  # the full model, nothing learned


def test_a_collection_learns_then_skips_over_http(client):
    modes = [chat(client, messages=LONG, extra_body={"collection": "learns"}).model_extra["adaskip"] for _ in range(4)]
    assert modes[0]["mode"] == "warmup" and [m["queries_seen"] for m in modes] == [1, 2, 3, 4]
    skipped = [m for m in modes if m["mode"] == "skip"]
    assert skipped and all(m["skipped_sublayers"] == 4 for m in skipped)


def test_streaming_gives_the_same_answer_and_ends_with_stats_and_usage(client):
    whole = chat(client, extra_body={"adaskip": {"skip": False}}).choices[0].message.content
    chunks = list(
        chat(client, stream=True, stream_options={"include_usage": True}, extra_body={"adaskip": {"skip": False}})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    last, usage = chunks[-2], chunks[-1]
    assert last.choices[0].finish_reason == "length" and last.model_extra["adaskip"]["generated_tokens"] == 12
    assert usage.choices == [] and usage.usage.completion_tokens == 12


def test_the_async_client_streams(server):
    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    assert asyncio.run(run()) == asyncio.run(run())  # greedy: the same text twice


def test_tool_calls_and_structured_output(client):
    full = {"adaskip": {"skip": False}}  # the same model for both answers, which must then be the same
    called = chat(client, tools=[WEATHER], tool_choice="required", max_tokens=64, extra_body=full)
    (call,) = called.choices[0].message.tool_calls
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed = list(chat(client, tools=[WEATHER], tool_choice="required", max_tokens=64, stream=True, extra_body=full))
    (streamed_call,) = streamed[-1].choices[0].delta.tool_calls
    assert streamed_call.function.arguments == call.function.arguments

    # the call's result goes back in the next turn
    history = [
        *QUESTION,
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=8)
    assert reply.choices[0].message.content is not None
    obj = chat(client, response_format={"type": "json_object"}, max_tokens=32)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}}
    City.model_validate_json(chat(client, response_format=schema, max_tokens=48).choices[0].message.content)


@pytest.fixture(scope="module")
def default_server() -> Iterator[Served]:
    """The default model served: a random model's JSON only ends where max_tokens closes it ("length"), which
    the clients' parsers refuse."""
    served = Served(create_app(AdaSkipEngine.shared("default")))
    yield served
    served.stop()


def test_clients_parse_structured_output_of_the_default_model(default_server):
    from langchain_openai import ChatOpenAI

    client = openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "Invent a person with a name and an age. Answer in JSON."}]
    parsed = client.chat.completions.parse(
        model="SmolLM2-135M-Instruct", messages=ask, response_format=Person, max_tokens=64, temperature=0
    )
    assert isinstance(parsed.choices[0].message.parsed, Person)
    llm = ChatOpenAI(base_url=f"{default_server.url}/v1", api_key="unused", model="SmolLM2-135M-Instruct")
    person = llm.with_structured_output(Person, method="json_schema").invoke(ask, temperature=0, max_tokens=64)
    assert isinstance(person, Person)

    from llama_index.core.prompts import PromptTemplate
    from llama_index.llms.openai_like import OpenAILike

    index_llm = OpenAILike(
        model="SmolLM2-135M-Instruct", api_base=f"{default_server.url}/v1", api_key="unused", is_chat_model=True,
        is_function_calling_model=True, temperature=0, max_tokens=64,
    )  # fmt: skip
    prompt = PromptTemplate("Invent a person with a name and an age. Answer in JSON.")
    assert isinstance(index_llm.structured_predict(Person, prompt), Person)


def test_completions_models_health_and_metrics(client, server):
    done = client.completions.create(model=MODEL, prompt="The fox", max_tokens=6, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens == 6 and "adaskip" in done.model_extra
    streamed = client.completions.create(model=MODEL, prompt="The fox", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/no/such/route/{'x' * 50}").status_code == 404
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'route="other",status="404"' in metrics and "xxxxx" not in metrics  # unknown paths share one label
    for name in (
        'adaskip_requests_total{route="/v1/completions",status="200"}',
        "adaskip_prompt_tokens_total",
        "adaskip_time_to_first_token_seconds_bucket",
        "adaskip_time_per_output_token_seconds_count",
        "adaskip_batch_size_count",
        'adaskip_skipped_sublayers_total{collection="default"}',
        'adaskip_estimated_prefill_speedup{collection="default"}',
    ):
        assert name in metrics


BAD = [
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"seed": -5}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "unknown"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"collection": ""}, "collection"),
    ({"collection": "*"}, "collection"),
    ({"adaskip": {"budget": -1}}, "adaskip.budget"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_input_is_a_400_naming_the_field(server, fields, param):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, **fields}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_malformed_json_unknown_model_and_unknown_fields(server):
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=10)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    body = {"model": "gpt-9", "messages": QUESTION}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2, "user": "u1", "store": False, "metadata": {}}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_bodies_over_the_limit_are_refused_whether_declared_or_streamed(engine):
    served = Served(create_app(engine, max_body_bytes=4096))
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 2}
        declared = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=10)
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
        chunks = (b"x" * 1024 for _ in range(1000))  # a megabyte with no declared length
        streamed = httpx.post(f"{served.url}/v1/chat/completions", content=chunks, timeout=10)
        assert streamed.status_code == 413 and streamed.json()["error"]["message"] == "request body over 4096 bytes"
        assert httpx.get(f"{served.url}/v1/nothing").json()["error"]["type"] == "invalid_request_error"  # a 404
        assert chat(openai.OpenAI(base_url=f"{served.url}/v1", api_key="-"), max_tokens=2).usage.completion_tokens == 2
    finally:
        served.stop()


def test_the_api_key_is_required_when_set(engine):
    served = Served(create_app(engine, api_key="secret"))
    try:
        for key in (None, "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = httpx.get(f"{served.url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="secret", max_retries=0)
        assert chat(client, max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{served.url}/health").status_code == 200  # health needs no key
    finally:
        served.stop()


def test_a_full_server_answers_503_and_a_left_stream_frees_its_place(tokenizer, tmp_path_factory, monkeypatch):
    engine = engine_for_server(tokenizer, tmp_path_factory, max_batch_size=1)
    served = Served(create_app(engine, max_waiting=0))
    steps: list[float] = []
    forward = engine.runtime.forward

    def slow(*args, **kwargs):
        time.sleep(0.02)
        steps.append(time.perf_counter())
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.runtime, "forward", slow)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 200, "stream": True, "temperature": 0}
    try:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{served.url}/v1/chat/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                busy = http.post(f"{served.url}/v1/chat/completions", json={**body, "stream": False})
                assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
                assert busy.json()["error"]["code"] == "overloaded"
            left = time.perf_counter()  # the client closed the stream after a few tokens of 200
        time.sleep(0.5)  # long enough for 20 more steps had the answer gone on
        assert len([t for t in steps if t > left]) <= 2
        again = httpx.post(f"{served.url}/v1/chat/completions", json={**body, "max_tokens": 2, "stream": False})
        assert again.status_code == 200  # the place was freed
    finally:
        served.stop()


def test_sixteen_concurrent_clients_are_batched_and_answered_as_alone(client, engine):
    prompts = [[{"role": "user", "content": f"Question {i}: what jumps over the {i} foxes?"}] for i in range(16)]
    alone = [engine.generate(p, max_new_tokens=10, skip=False).text for p in prompts]

    def ask(messages):
        return client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body={"adaskip": {"skip": False}}
        )

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    assert [a.choices[0].message.content for a in answers] == alone
    assert max(max(a.model_extra["adaskip"]["batch_sizes"]) for a in answers) > 1


def test_langchain_chat_openai_against_the_server(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=8,
        include_response_headers=True, extra_body={"adaskip": {"skip": False}},  # the same model for every call
    )  # fmt: skip
    answer = llm.invoke("What jumps?")
    assert isinstance(answer.content, str) and answer.usage_metadata["output_tokens"] == 8
    stats = json.loads(answer.response_metadata["headers"]["x-adaskip-stats"])
    assert stats["mode"] is None and stats["generated_tokens"] == 8  # the full model, as asked
    assert "".join(c.content for c in llm.stream("What jumps?")) == answer.content
    called = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Rome?", max_tokens=64)
    assert called.tool_calls[0]["name"] == "get_weather" and called.tool_calls[0]["args"]["city"] in ("Paris", "Rome")
    assert called.response_metadata["finish_reason"] == "tool_calls"


def test_llamaindex_openai_like_against_the_server(server):
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        model=MODEL, api_base=f"{server.url}/v1", api_key="unused", is_chat_model=True, temperature=0, max_tokens=8,
        additional_kwargs={"extra_body": {"adaskip": {"skip": False}}},  # the same model for every call
    )  # fmt: skip
    answer = llm.chat([ChatMessage(role="user", content="What jumps?")])
    assert answer.message.content and answer.raw.model_extra["adaskip"]["mode"] is None  # skip=False reached it
    assert "".join(r.delta for r in llm.stream_complete("What jumps?")) == llm.complete("What jumps?").text

    def get_weather(city: str, days: int) -> str:
        """Weather of a city."""
        return "sunny"

    tools = OpenAILike(
        model=MODEL, api_base=f"{server.url}/v1", api_key="unused", is_chat_model=True, is_function_calling_model=True,
        max_tokens=64, temperature=0,
    )  # fmt: skip
    response = tools.chat_with_tools([FunctionTool.from_defaults(get_weather)], "Weather in Rome?", tool_required=True)
    (call,) = tools.get_tool_calls_from_response(response)
    assert call.tool_name == "get_weather" and set(call.tool_kwargs) == {"city", "days"}


def test_the_serve_command_serves_a_model_folder(tokenizer, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--profiles", str(tmp_path / "p.sqlite"), "--api-key", "k"]
    with ServerProcess(argv, timeout=120) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == ["model"]
        answer = client.chat.completions.create(model="model", messages=QUESTION, max_tokens=3)
        assert answer.usage.completion_tokens == 3


def test_a_server_process_that_exits_is_reported_at_once():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="adaskip-rag serve exited with status 2"):
        ServerProcess(["--max-batch-size", "many"], timeout=120)  # argparse refuses it
    assert time.monotonic() - start < 60  # not the timeout
