"""One replica of a service for the shared-profile tests: serves requests of one collection on a tiny model,
learning into a Chroma server, then reports what it ran and the skip set it would use now.

python tests/replica_worker.py PORT NAME REQUESTS DONE_DIR OTHER_NAME
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from adaskip_rag import AdaSkipEngine  # noqa: E402
from adaskip_rag.learning import _skip_set  # noqa: E402
from adaskip_rag.loading import default_model_path  # noqa: E402
from adaskip_rag.policies import AdaSkipPolicy  # noqa: E402
from adaskip_rag.stores.chroma import ChromaProfileStore  # noqa: E402

CACHE_SECONDS = 0.2


def replica_engine(port: int, name: str) -> AdaSkipEngine:
    store = ChromaProfileStore("127.0.0.1", port, replica=name, cache_seconds=CACHE_SECONDS, retry_seconds=0)
    return AdaSkipEngine(
        tiny_model("llama"),
        AutoTokenizer.from_pretrained(default_model_path()),
        "tiny",
        store=store,
        policy=AdaSkipPolicy(budget=2, warmup=20, refresh_every=0, probe_every=1, tail=0),  # every query measured
    )


def skip_set(engine: AdaSkipEngine, collection: str) -> list[str]:
    """The skip set the learner would use now, as the profile state names it."""
    return _skip_set(engine.learner.decide(collection, 24).plan)


if __name__ == "__main__":
    port, name, requests, done, other = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
    engine = replica_engine(port, name)
    modes = []
    for i in range(requests):
        result = engine.generate(
            f"Replica {name}, request {i}: what is {i} plus {i}?", collection="shared", max_new_tokens=2
        )
        modes.append(result.stats.mode)
    (done / name).touch()
    deadline = time.time() + 300
    while not (done / other).exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2 * CACHE_SECONDS)  # the other replica's last records are now in any fresh read
    print(json.dumps({"modes": modes, "skip_set": skip_set(engine, "shared")}))
