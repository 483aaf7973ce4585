"""Leave streams early, then let the interpreter exit: forks children for every way of leaving (each leaves one
stream and ends the script, a normal interpreter exit) and prints every child's exit code as JSON. The model
loads and runs once before the first fork, on one thread (a forked child inherits no busy thread pool), and each
child runs on two.

python tests/exit_worker.py STORE_PATH RUNS_ASYNC RUNS_SYNC
"""

import asyncio
import gc
import json
import os
import sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from adaskip_rag import AdaSkipEngine
from adaskip_rag.loading import default_model_path
from adaskip_rag.stores import SQLiteProfileStore
from langchain_adaskip import ChatAdaSkip
from llama_index.llms.adaskip import AdaSkipLLM

# a random model large enough that a step of this prompt is still running when the interpreter exits
CONFIG = dict(vocab_size=49152, hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4)
PROMPT = "Tell me everything about the history of Rome. " * 60


def leave(way: str, engine: AdaSkipEngine) -> None:
    """Start a stream the ``way`` names and leave it after its first piece."""
    sync = {
        "engine": lambda: engine.stream(PROMPT, max_new_tokens=24),
        "langchain": lambda: ChatAdaSkip(engine=engine, max_tokens=24).stream(PROMPT),
        "llamaindex": lambda: AdaSkipLLM(engine=engine, max_tokens=24).stream_complete(PROMPT),
    }
    if way in sync:
        for _ in sync[way]():
            break
        return

    async def main() -> None:
        if way == "engine-async":
            stream = engine.astream(PROMPT, max_new_tokens=24)
        elif way == "langchain-async":
            stream = ChatAdaSkip(engine=engine, max_tokens=24).astream(PROMPT)
        else:
            stream = await AdaSkipLLM(engine=engine, max_tokens=24).astream_complete(PROMPT)
        async for _ in stream:
            break

    asyncio.run(main())


WAYS = ["engine", "engine-async", "langchain", "langchain-async", "llamaindex", "llamaindex-async"]

if __name__ == "__main__":
    store, runs_async, runs_sync = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    engine = AdaSkipEngine(model, tokenizer, "exit", store=SQLiteProfileStore(store))
    engine.generate(PROMPT, max_new_tokens=2)  # what a first request sets up, done once
    gc.freeze()  # children exit sooner: finalization does not walk what is frozen here
    codes: dict[str, list[int]] = {}
    for way in WAYS:
        for _ in range(runs_async if way.endswith("async") else runs_sync):
            pid = os.fork()
            if pid == 0:
                torch.set_num_threads(2)
                leave(way, engine)
                break  # the child ends the script here
            codes.setdefault(way, []).append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        else:
            continue
        break
    else:
        print(json.dumps(codes))
