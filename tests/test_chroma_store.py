"""Profiles shared by replicas through a real Chroma server: exact merged counts, one skip set, outages."""

import json
import logging
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

chromadb = pytest.importorskip("chromadb")

from conftest import ChromaServer  # noqa: E402
from replica_worker import CACHE_SECONDS, replica_engine, skip_set  # noqa: E402
from test_sqlite_store import delta  # noqa: E402

from adaskip_rag.stores import SQLiteProfileStore, open_store  # noqa: E402
from adaskip_rag.stores.chroma import ChromaProfileStore  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture
def server(tmp_path):
    srv = ChromaServer(tmp_path / "chroma")
    srv.start()
    yield srv
    srv.stop()


def store(server: ChromaServer, replica: str, **kwargs) -> ChromaProfileStore:
    return ChromaProfileStore("127.0.0.1", server.port, replica=replica, **kwargs)


def test_replicas_write_their_own_records_and_reads_merge_them(server):
    a, b = store(server, "a", cache_seconds=0), store(server, "b", cache_seconds=0)
    for i in range(3):
        a.add(delta(i))
        b.add(delta(10 + i))
    expected = delta(0)
    for d in [delta(1), delta(2), delta(10), delta(11), delta(12)]:
        expected = expected.merge(d)
    for s in (a, b, store(server, "reader")):
        got = s.get("m", "docs")
        assert (got.queries, got.counts) == (6, expected.counts)
        assert {k: pytest.approx(v) for k, v in got.sums.items()} == expected.sums
    assert [p.collection for p in a.profiles("m")] == ["docs"] and a.global_profile("m").queries == 6
    # a replica that comes back under the same name continues its totals
    a_again = store(server, "a", cache_seconds=0)
    a_again.add(delta(3))
    assert store(server, "reader").get("m", "docs").queries == 7
    assert a.delete("m", "docs") == 1 and store(server, "reader").get("m", "docs") is None


def test_every_replicas_records_of_a_legacy_model_id_move_to_the_new_one(server):
    a, b = store(server, "a", cache_seconds=0), store(server, "b", cache_seconds=0)
    a.add_all([delta(0, model="old"), delta(1, model="old"), delta(2, collection="other", model="old")])
    b.add(delta(3, model="old"))
    a.add(delta(4, model="new"))
    assert store(server, "c", cache_seconds=0).migrate("old", "new") == 2
    observer = store(server, "observer", cache_seconds=0)
    assert observer.get("old", "docs") is None and observer.profiles("old") == []
    assert [observer.get("new", c).queries for c in ("docs", "other")] == [4, 1]
    assert observer.global_profile("new").queries == 5
    away = ChromaProfileStore("127.0.0.1", server.port + 1, replica="d")  # no server there: asked again later
    assert away.migrate("new", "newer") is None


def test_cached_reads_do_not_wait_on_the_server(server):
    s = store(server, "a", cache_seconds=60)
    other = store(server, "b", cache_seconds=0)
    assert s.get("m", "docs") is None
    other.add(delta(0))
    assert s.get("m", "docs") is None  # the cached read is reused
    s._others.clear()
    assert s.get("m", "docs").queries == 1


@pytest.mark.slow
def test_two_replica_processes_count_exactly_and_agree_on_the_skip_set(server, tmp_path):
    worker = [sys.executable, str(HERE / "replica_worker.py"), str(server.port)]
    procs = [
        subprocess.Popen([*worker, me, "50", str(tmp_path), other], stdout=subprocess.PIPE, text=True)
        for me, other in (("r1", "r2"), ("r2", "r1"))
    ]
    reports = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)

    engine = replica_engine(server.port, "observer")
    profile = engine.learner.store.get(engine.fingerprint, "shared")
    assert profile.queries == 100 and all(c == 100 for c in profile.counts["attn"][1:])
    warmups = [report["modes"].count("warmup") for report in reports]
    for report, k in zip(reports, warmups):
        assert report["modes"] == ["warmup"] * k + ["skip"] * (50 - k)  # switched once, for good
    # the warm-up of 20 requests is shared: together the replicas ran about 20 in full, not 2 x 20
    # (a little more, since each reads the other's records at most CACHE_SECONDS late)
    assert 20 <= sum(warmups) < 30, warmups
    assert reports[0]["skip_set"] == reports[1]["skip_set"] == skip_set(engine, "shared")
    assert len(reports[0]["skip_set"]) == 2


def test_requests_survive_an_outage_and_buffered_updates_arrive(server, caplog):
    engine = replica_engine(server.port, "r1")
    engine.learner.store.retry_seconds = 0
    ask = lambda i: engine.generate(f"request {i}: what is {i} plus {i}?", collection="shared", max_new_tokens=2)  # noqa: E731
    for i in range(25):
        ask(i)
    before = skip_set(engine, "shared")
    assert ask(25).stats.mode == "skip"

    server.stop()
    with caplog.at_level(logging.WARNING, logger="adaskip_rag.stores.chroma"):
        during = [ask(26 + i).stats for i in range(10)]
    assert engine.learner.store.degraded
    assert all(s.mode == "skip" for s in during) and skip_set(engine, "shared") == before  # last known plan
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # warned once

    server.start()  # no request follows: the replica writes what it held back by itself
    observer, deadline = store(server, "observer", cache_seconds=0), time.monotonic() + 10
    while (stored := observer.get(engine.fingerprint, "shared")) is None or stored.queries < 36:
        assert time.monotonic() < deadline, f"stored {stored and stored.queries} of 36 queries"
        time.sleep(0.1)
    assert stored.queries == 36 and not engine.learner.store.degraded  # nothing lost, nothing twice


def test_a_server_that_stops_answering_costs_one_timeout_and_learning_resumes(server):
    engine = replica_engine(server.port, "r1")
    engine.learner.calls.timeout = 1.0
    ask = lambda i: engine.generate(f"request {i}: what is {i} plus {i}?", collection="shared", max_new_tokens=2)  # noqa: E731
    for i in range(3):
        ask(i)
    server.process.send_signal(signal.SIGSTOP)  # the server stops answering; its connections stay open
    try:
        time.sleep(CACHE_SECONDS + 0.1)  # the cached read has expired: the next one goes to the server
        start = time.monotonic()
        during = [ask(10 + i).stats for i in range(4)]
        assert time.monotonic() - start < 1.0 + 4  # one call waited for the timeout, the others not at all
        assert all(s.store_error for s in during)
    finally:
        server.process.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 30
    while (after := ask(20).stats).store_error and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after.store_error is None  # answering again: learning resumes


def test_a_replica_that_starts_while_the_server_is_down_runs_in_full(tmp_path, caplog):
    srv = ChromaServer(tmp_path / "chroma")  # never started
    engine = replica_engine(srv.port, "r1")
    with caplog.at_level(logging.WARNING, logger="adaskip_rag.stores.chroma"):
        results = [engine.generate("what is 2 plus 2?", collection="shared", max_new_tokens=2) for _ in range(3)]
    assert [r.stats.mode for r in results] == ["warmup"] * 3 and not results[0].stats.skipped_attention
    assert sum("unreachable" in r.message for r in caplog.records) == 1
    srv.start()
    try:
        assert engine.learner.store.flush()  # the buffered totals arrive
        assert store(srv, "observer").get(engine.fingerprint, "shared").queries == 3
    finally:
        srv.stop()


def test_corrupt_records_are_ignored_and_kept(server):
    a = store(server, "a", cache_seconds=0)
    a.add(delta(0))
    raw = chromadb.HttpClient(host="127.0.0.1", port=server.port).get_collection("adaskip_profiles")
    raw.upsert(
        ids=["junk-b"],
        documents=["{not json"],
        embeddings=[[0.0]],
        metadatas=[{"model": "m", "collection": "docs", "replica": "b", "updated": 1.0}],
    )
    with pytest.warns(UserWarning, match="corrupt profile record junk-b"):
        assert a.get("m", "docs").queries == 1
    # this replica's own record, corrupted: ignored, copied aside, then overwritten by its next update
    own_id = a._records.record_id("m", "docs", "a")
    raw.upsert(
        ids=[own_id],
        embeddings=[[0.0]],
        metadatas=[{"model": "m", "collection": "docs", "replica": "a2", "updated": 2.0, "profile": "[]"}],
    )
    a2 = store(server, "a2", cache_seconds=0)
    a2._records.record_id = lambda m, c, r: own_id if c == "docs" else json.dumps([m, c, r])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a2.add(delta(1))
    assert raw.get(ids=["junk-b"])["documents"] == ["{not json"]
    kept = raw.get(where={"model": "__corrupt__"})["documents"]
    assert kept == ["[]"]


def test_records_of_older_versions_with_the_profile_as_document_are_read(server):
    raw = chromadb.HttpClient(host="127.0.0.1", port=server.port).get_or_create_collection("adaskip_profiles")
    raw.upsert(
        ids=["old-b"],
        documents=[json.dumps(delta(0).to_dict())],
        embeddings=[[0.0]],
        metadatas=[{"model": "m", "collection": "docs", "replica": "b", "updated": 1.0}],
    )
    a = store(server, "a", cache_seconds=0)
    a.add(delta(1))
    assert a.get("m", "docs").queries == 2


@pytest.mark.parametrize(
    "url, message",
    [
        ("chroma://", "names no host"),
        ("chroma://localhost:notaport", "bad profile store URL"),
        ("chroma://localhost:8000?colour=red", "unknown profile store options"),
        ("chroma://localhost:8000?cache_seconds=-1", "cache_seconds must be >= 0"),
        ("chroma://localhost:8000?max_pending=0", "max_pending must be >= 1"),
        ("redis://localhost", "unknown profile store"),
    ],
)
def test_bad_store_urls_are_rejected(url, message):
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_store_urls(tmp_path):
    assert isinstance(open_store(tmp_path / "p.sqlite"), SQLiteProfileStore)
    assert open_store(f"sqlite:///{tmp_path}/q.sqlite").path == tmp_path / "q.sqlite"
    s = open_store("chroma://10.0.0.5:8123/team_profiles?replica=api-1&cache_seconds=0.5")
    assert (s.host, s.port, s.profiles_collection, s.replica, s.cache_seconds) == (
        "10.0.0.5",
        8123,
        "team_profiles",
        "api-1",
        0.5,
    )


def test_bad_keys_never_touch_stored_profiles(server):
    a = store(server, "a", cache_seconds=0)
    a.add(delta(0))
    for bad in ("", "x" * 257):
        with pytest.raises(ValueError, match="collection key"):
            a.add(delta(1, bad))
    assert store(server, "reader").get("m", "docs").queries == 1


def test_compensation_moments_of_a_full_size_model_round_trip_and_merge_exactly(server):
    """Two replicas' moments at the default model's size (30 layers, d = 576: 1.1 MB a record) add up exactly."""
    import torch

    from adaskip_rag.profiles import Profile

    def with_moments(seed: int) -> Profile:
        p = Profile("m", "docs", 30, queries=1)
        p.moments = torch.rand(2, 30, 4 * 576 + 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return p

    a, b = store(server, "a", cache_seconds=0), store(server, "b", cache_seconds=0)
    a.add(with_moments(1))
    b.add(with_moments(2))
    reader = store(server, "reader")
    assert reader.get("m", "docs").queries == 2 and reader.get("m", "docs").moments is None
    got = reader.global_profile("m")
    assert got.queries == 2 and torch.equal(got.moments, with_moments(1).moments + with_moments(2).moments)
