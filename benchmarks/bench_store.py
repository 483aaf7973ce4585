"""Profile stores at many collections: what a request's profile read costs and what a collection stores.

Fills a SQLite store and a Chroma server (``chroma run``, started here on 127.0.0.1) with the profiles of N
collections of a model of the default model's size (30 layers, d = 576, random sums and compensation moments),
then times the learner's reads: a warming request (a collection the store has not seen: its record and the model's
global profile) and a warm one (its own record and the global profile's moments), each the median of ``--reads``.
SQLite reads the file every time; the Chroma store reads the server for what it has not read in the last
``cache_seconds`` (2 s): the new collection's record every time, the global profile (1.4 MB) every 2 s. Prints bytes
stored per collection and for the global profile.

    python benchmarks/bench_store.py [--collections 10 100 1000] [--reads 20] [--stores sqlite chroma]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adaskip_rag import Sublayer
from adaskip_rag.costs import CostModel
from adaskip_rag.learning import Learner
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.profiles import Profile
from adaskip_rag.skipping import Probe
from adaskip_rag.stores import ProfileStore, SQLiteProfileStore

LAYERS, HIDDEN, FFN = 30, 576, 1536
MODEL = f"bench-{LAYERS}L-0"


def update(collection: str, seed: int) -> Profile:
    """One full request's contribution: probes of every sublayer, with compensation moments."""
    g = torch.Generator().manual_seed(seed)
    probes = {
        Sublayer(kind, layer): Probe(
            0.9 + 0.1 * float(torch.rand(1, generator=g)),
            1.0,
            1.0,
            moments=torch.rand(4 * HIDDEN + 2, generator=g, dtype=torch.float64) * 100,
        )
        for kind in ("attn", "ffn")
        for layer in range(LAYERS)
    }
    return Profile.from_probes(MODEL, collection, LAYERS, probes, context_tokens=2000)


def fill(store: ProfileStore, have: int, want: int) -> None:
    """Add collections ``have .. want - 1``, 21 queries each as one update (written 100 collections at a time)."""
    for start in range(have, want, 100):
        batch = []
        for c in range(start, min(want, start + 100)):
            u = update(f"c{c}", c)
            u.queries = 21  # warmed up
            batch.append(u)
        store.add_all(batch)


def median_ms(call, reads: int) -> float:
    times = []
    for _ in range(reads):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(learner: Learner, reads: int) -> tuple[float, ...]:
    """Milliseconds of a warming read, a warm read and a warm decision; KB a collection and the global profile
    store."""
    store, fresh = learner.store, iter(range(10**9))
    tag = time.monotonic_ns()  # names no read has cached
    read = lambda collection: (store.get(MODEL, collection), store.global_profile(MODEL))  # noqa: E731
    warming = median_ms(lambda: read(f"new-{tag}-{next(fresh)}"), reads)
    warm = median_ms(lambda: read("c0"), reads)
    plan = median_ms(lambda: learner.decide("c0", 2000), reads)
    own, total = stored_bytes(store)
    return warming, warm, plan, own / 1024, total / 1024


def chroma_server(path: Path) -> tuple[subprocess.Popen, int]:
    import chromadb

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chroma = Path(sys.executable).parent / "chroma"
    process = subprocess.Popen(
        [str(chroma), "run", "--host", "127.0.0.1", "--port", str(port), "--path", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            chromadb.HttpClient(host="127.0.0.1", port=port).heartbeat()
            return process, port
        except Exception:
            if time.time() > deadline:
                process.terminate()
                raise
            time.sleep(0.2)


def stored_bytes(store: ProfileStore) -> tuple[float, int]:
    """Mean bytes of a collection's record, and of the global profile's records."""
    if isinstance(store, SQLiteProfileStore):
        import sqlite3

        with sqlite3.connect(store.path) as db:
            rows = db.execute("SELECT collection, length(data) FROM profiles WHERE model = ?", (MODEL,)).fetchall()
    else:
        remote = store._records.collection()  # type: ignore[attr-defined]
        found = remote.get(where={"model": MODEL}, include=["metadatas"])
        rows = [(m["collection"], len(m["profile"])) for m in found["metadatas"]]
    own = [n for c, n in rows if c != "*"]
    return statistics.mean(own), sum(n for c, n in rows if c == "*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--collections", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--reads", type=int, default=20)
    parser.add_argument("--stores", nargs="+", default=["sqlite", "chroma"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    costs = CostModel(hidden=HIDDEN, ffn_hidden=FFN, kv_ratio=3 / 9, vocab=49152, layers=LAYERS)
    policy = AdaSkipPolicy()
    print(f"model of {LAYERS} layers, d = {HIDDEN}; medians of {args.reads} calls, ms")
    print("read: a request's profile reads (its collection's record, the model's global profile); plan: the")
    print("learner's whole decision (reads and planning); warming: a collection the store has not seen")
    columns = ("warming read", "warm read", "warm plan", "KB/collection", "global KB")
    print(f"{'store':8} {'collections':>11} " + " ".join(f"{c:>13}" for c in columns))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.stores:
            server = None
            if kind == "sqlite":
                store: ProfileStore = SQLiteProfileStore(Path(tmp) / "p.sqlite")
            else:
                from adaskip_rag.stores.chroma import ChromaProfileStore

                server, port = chroma_server(Path(tmp) / "chroma")
                store = ChromaProfileStore("127.0.0.1", port, replica="bench")  # reads cached for 2 s
            try:
                learner = Learner(MODEL, LAYERS, costs, store, policy)
                have = 0
                for n in sorted(args.collections):
                    fill(store, have, n)
                    have = n
                    print(f"{kind:8} {n:>11} " + " ".join(f"{v:>13.1f}" for v in measure(learner, args.reads)))
            finally:
                if server is not None:
                    server.terminate()
                    server.wait(30)


if __name__ == "__main__":
    main()
