"""adaskip-rag on Ray Serve: a local Ray instance (2 CPUs), 2 replicas of a tiny model with 1 torch thread each,
profiles shared through a `chroma run` server started here; real clients against the one endpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import yaml
from conftest import ChromaServer, free_port, tiny_model
from test_constrained import WEATHER

from adaskip_rag.chat_templates import SMOLLM2_TOOLS
from adaskip_rag.server import ray_app
from adaskip_rag.stores.chroma import ChromaProfileStore

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
QUESTION = [{"role": "user", "content": "Retrieved context: the fox jumps. Question: what jumps?"}]


@pytest.fixture(scope="module")
def cluster(tokenizer, tmp_path_factory):
    """(endpoint URL, the model's name, the Chroma server) of 2 replicas on a local Ray instance."""
    folder = tmp_path_factory.mktemp("ray") / "tiny-ray"
    tiny_model("llama").save_pretrained(folder)
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = SMOLLM2_TOOLS
    tok.save_pretrained(folder)
    chroma = ChromaServer(tmp_path_factory.mktemp("chroma"))
    chroma.start()
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = ray_app.RayOptions(model=str(folder), profiles=f"chroma://127.0.0.1:{chroma.port}", replicas=2)
    serve.run(ray_app.deployment(options), name="adaskip", route_prefix="/")
    yield f"http://127.0.0.1:{port}", folder.name, chroma
    serve.shutdown()
    ray.shutdown()
    chroma.stop()


def test_clients_stream_and_call_tools_through_both_replicas(cluster):
    from langchain_openai import ChatOpenAI

    url, model, _ = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def ask(_: int):
        return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, temperature=0)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(16)))
    assert all(a.usage.completion_tokens == 4 for a in answers)
    assert len({a.model_extra["adaskip"]["replica"] for a in answers}) == 2  # both replicas served
    full = {"adaskip": {"skip": False}}
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=6, temperature=0, stream=True, extra_body=full
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model_extra["adaskip"]["replica"]
    called = client.chat.completions.create(
        model=model, messages=QUESTION, tools=[WEATHER], tool_choice="required", max_tokens=64
    )
    assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
    llm = ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model=model, temperature=0, max_tokens=4)
    assert llm.invoke("What jumps?").usage_metadata["output_tokens"] == 4


def test_both_replicas_learn_into_the_one_store_exactly(cluster):
    url, model, chroma = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    counts = {"ray-a": 7, "ray-b": 5}
    jobs = [name for name, n in counts.items() for _ in range(n)]

    def ask(collection: str):
        answer = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=2, extra_body={"collection": collection}
        )
        return answer.model_extra["adaskip"]["replica"]

    with ThreadPoolExecutor(4) as pool:
        replicas = set(pool.map(ask, jobs))
    assert len(replicas) == 2
    reader = ChromaProfileStore("127.0.0.1", chroma.port, replica="reader", cache_seconds=0)
    profiles = {p.collection: p.queries for p in reader.profiles() if p.collection in counts}
    assert profiles == counts  # every answered request counted once, whichever replica answered it


def test_a_collection_named_in_the_header_stays_on_one_replica(cluster):
    url, model, _ = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def replica(collection: str) -> str:
        answer = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=2, extra_body={"collection": collection},
            extra_headers={"serve_multiplexed_model_id": collection},
        )  # fmt: skip
        return answer.model_extra["adaskip"]["replica"]

    for collection in ("ray-route-a", "ray-route-b", "ray-route-c"):
        first = replica(collection)
        time.sleep(3)  # the replica's report that it holds the collection reaches Serve's router (asynchronously)
        assert {replica(collection) for _ in range(8)} == {first}  # unrouted, 8 requests would reach both


def test_a_killed_replica_fails_cleanly_is_restarted_and_loses_no_update(cluster):
    url, model, chroma = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    done: list[str] = []

    def ask(_: int) -> str:
        try:
            answer = client.chat.completions.create(
                model=model, messages=QUESTION, max_tokens=48, extra_body={"collection": "ray-kill"}
            )
        except openai.APIStatusError as error:  # a clean 5xx the client can retry
            assert error.status_code >= 500
            return "failed"
        done.append(answer.model_extra["adaskip"]["replica"])
        return "answered"

    with ThreadPoolExecutor(4) as pool:
        results = [pool.submit(ask, i) for i in range(24)]
        while len(done) < 4:
            time.sleep(0.05)
        (victim,) = [a for a in _replicas()][:1]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        outcomes = [r.result() for r in results]
    answered = outcomes.count("answered")
    assert answered + outcomes.count("failed") == 24 and answered >= 4
    deadline = time.monotonic() + 120
    while len(_replicas()) < 2 or _running() < 2:  # Serve starts a replacement
        assert time.monotonic() < deadline, "Serve did not restart the killed replica"
        time.sleep(0.5)
    reader = ChromaProfileStore("127.0.0.1", chroma.port, replica="reader", cache_seconds=0)
    (stored,) = [p.queries for p in reader.profiles() if p.collection == "ray-kill"]
    assert answered <= stored <= 24  # no answered request lost, none counted twice
    again = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
    assert again.usage.completion_tokens == 2


def test_answers_keep_flowing_while_the_chroma_server_is_down_and_profiles_catch_up(cluster):
    url, model, chroma = cluster
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(_: int) -> int:
        answer = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=2, extra_body={"collection": "ray-outage"}
        )
        return answer.usage.completion_tokens

    def stored() -> int | None:
        reader = ChromaProfileStore("127.0.0.1", chroma.port, replica="reader", cache_seconds=0)
        return next((p.queries for p in reader.profiles() if p.collection == "ray-outage"), None)

    chroma.stop()
    try:
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(ask, range(8))) == [2] * 8  # every request answered while the store is away
    finally:
        chroma.start()
    deadline = time.monotonic() + 60
    while (count := stored()) != 8:  # each replica writes what it held back by itself: no request follows
        assert time.monotonic() < deadline, f"stored queries {count}, expected 8"
        time.sleep(0.5)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(4))) == [2] * 4
    assert stored() == 12  # and learning goes on


def _replicas() -> list[dict]:
    return [
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::adaskip")
    ]


def _running() -> int:
    deployment = serve.status().applications["adaskip"].deployments["adaskip"]
    return deployment.replica_states.get("RUNNING", 0)


def test_a_serve_config_builds_the_application():
    config = yaml.safe_load((Path(__file__).parent.parent / "examples" / "ray_serve.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "adaskip_rag.server.ray_app:build"
    assert isinstance(ray_app.build(app["args"]), serve.Application)
    with pytest.raises(ValueError, match=r"unknown adaskip-rag Ray options \['replica'\]"):
        ray_app.build({"replica": 2})


def test_the_serve_command_starts_replicas_on_a_local_ray_instance(tokenizer, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "cli-ray")
    tokenizer.save_pretrained(tmp_path / "cli-ray")
    port = free_port()
    argv = ["--threads", "1", "serve", "--ray", "--replicas", "2", "--model", str(tmp_path / "cli-ray")]
    argv += ["--port", str(port), "--profiles", str(tmp_path / "p.sqlite")]
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "adaskip_rag.cli", *argv], stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        # the proxy answers once one replica runs; the command reports when both do
        while f"serving 2 replicas on http://127.0.0.1:{port}" not in log.read_text():
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        replicas = {
            client.chat.completions.create(model="cli-ray", messages=QUESTION, max_tokens=2).model_extra["adaskip"][
                "replica"
            ]
            for _ in range(16)  # both replicas hit, unless routing picked one 16 times (2 in 10^5)
        }
        assert len(replicas) == 2
    finally:
        server.send_signal(signal.SIGINT)  # even one sent while Serve still deploys: it shuts down once up
        assert server.wait(60) == 0  # the application shut down and the local Ray instance left
