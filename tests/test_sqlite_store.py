"""Profiles and the SQLite store: exact merges, concurrent writers, crashes, corrupt rows, JSON."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from adaskip_rag import Sublayer
from adaskip_rag.profiles import Profile, check_collection
from adaskip_rag.skipping import Probe
from adaskip_rag.stores import SQLiteProfileStore

ROOT = Path(__file__).resolve().parent.parent


def delta(i: int, collection: str = "docs", model: str = "m") -> Profile:
    probes = {
        Sublayer(k, layer): Probe(0.5 + layer / 10, 1.0 + i % 3, 1.0) for k in ("attn", "ffn") for layer in range(4)
    }
    return Profile.from_probes(model, collection, 4, probes, context_tokens=100 + i)


def test_merge_is_exact_and_order_free():
    parts = [delta(i) for i in range(5)]
    forward, backward = Profile("m", "docs", 4), Profile("m", "docs", 4)
    for p in parts:
        forward = forward.merge(p)
    for p in reversed(parts):
        backward = backward.merge(p)
    assert forward.to_dict() == backward.to_dict()
    assert forward.queries == 5 and forward.context_tokens == sum(100 + i for i in range(5))
    assert forward.mean("scale")[Sublayer("ffn", 2)] == pytest.approx(sum(1.0 + i % 3 for i in range(5)) / 5)
    with pytest.raises(ValueError, match="cannot merge"):
        forward.merge(delta(0, model="other"))


def test_eight_threads_then_four_processes_lose_no_update(tmp_path):
    path = tmp_path / "p.sqlite"
    store = SQLiteProfileStore(path)

    def writer(t):
        for i in range(50):
            store.add(delta(t * 50 + i))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("m", "docs").queries == 400

    script = (
        "import sys; sys.path.insert(0, sys.argv[2]); from test_sqlite_store import delta; "
        "from adaskip_rag.stores import SQLiteProfileStore; s = SQLiteProfileStore(sys.argv[1]); "
        "[s.add(delta(i)) for i in range(50)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(ROOT / "tests")]) for _ in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    profile = store.get("m", "docs")
    assert profile.queries == 600 and profile.counts["attn"] == [600] * 4


def test_writer_killed_mid_way_leaves_every_committed_update(tmp_path):
    path = tmp_path / "p.sqlite"
    SQLiteProfileStore(path)
    script = (
        "import sys; sys.path.insert(0, sys.argv[2]); from test_sqlite_store import delta; "
        "from adaskip_rag.stores import SQLiteProfileStore; s = SQLiteProfileStore(sys.argv[1])\n"
        "for i in range(100000):\n    s.add(delta(i)); print(i, flush=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(ROOT / "tests")], stdout=subprocess.PIPE, text=True
    )
    committed = 0
    for line in proc.stdout:
        committed = int(line) + 1
        if committed >= 60:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    profile = SQLiteProfileStore(path).get("m", "docs")
    assert committed <= profile.queries <= committed + 2  # kill may land between a commit and its print
    assert profile.counts["ffn"] == [profile.queries] * 4
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_corrupt_row_is_ignored_with_a_warning_and_kept_aside(tmp_path):
    store = SQLiteProfileStore(tmp_path / "p.sqlite")
    store.add(delta(0, "good"))
    with sqlite3.connect(store.path) as db:
        db.execute("INSERT INTO profiles VALUES ('m', 'bad', '{\"format\": 1, \"model\": ', 0)")
    with pytest.warns(UserWarning, match=r"collection 'bad' \(model m\) moved aside.*not JSON"):
        assert store.get("m", "bad") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning: the row is aside now
        assert [p.collection for p in store.profiles("m")] == ["good"]
        assert store.add(delta(1, "bad")).queries == 1  # starts afresh ...
    with sqlite3.connect(store.path) as db:  # ... and the corrupt row is kept for inspection
        assert db.execute("SELECT data FROM corrupt_profiles").fetchall() == [('{"format": 1, "model": ',)]
    assert store.get("m", "good").queries == 1


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format=99),
        lambda d: d.pop("sums"),
        lambda d: d["sums"]["attn.similarity"].append(1.0),
        lambda d: d["counts"]["ffn"].__setitem__(0, 10**6),
        lambda d: d["sums"]["ffn.scale"].__setitem__(1, float("nan")),
    ],
)
def test_malformed_profiles_are_rejected(mutate):
    data = json.loads(json.dumps(delta(0).to_dict()))
    mutate(data)
    with pytest.raises(ValueError, match="profile"):
        Profile.from_dict(data)


def test_json_export_import_round_trip_and_all_or_nothing(tmp_path):
    a = SQLiteProfileStore(tmp_path / "a.sqlite")
    for i in range(3):
        a.add(delta(i, "x"))
    a.add(delta(9, "y", model="other"))
    text = a.export_json()
    b = SQLiteProfileStore(tmp_path / "b.sqlite")
    assert b.import_json(text) == 2
    assert [p.to_dict() for p in b.profiles()] == [p.to_dict() for p in a.profiles()]
    assert b.import_json(a.export_json("m")) == 1 and b.get("m", "x").queries == 6  # imports add up

    broken = json.loads(text)
    broken[1]["counts"] = {}
    with pytest.raises(ValueError):
        b.import_json(json.dumps(broken))
    assert b.get("m", "x").queries == 6 and b.get("other", "y").queries == 1  # nothing was written


def test_collection_keys_are_checked(tmp_path):
    store = SQLiteProfileStore(tmp_path / "p.sqlite")
    for bad in ("", "   ", "x" * 257, None):
        with pytest.raises(ValueError, match="collection key"):
            check_collection(bad)
    with pytest.raises(ValueError, match="collection key"):
        store.add(delta(0, ""))
    assert store.delete("m") == 0
    store.add(delta(0, "a"))
    store.add(delta(0, "b"))
    assert store.delete("m", "a") == 1 and [p.collection for p in store.profiles()] == ["b"]


def with_moments(i: int, collection: str, layers: int = 4, d: int = 8) -> Profile:
    p = delta(i, collection) if layers == 4 else Profile("m", collection, layers, queries=1)
    p.moments = torch.rand(2, layers, 4 * d + 2, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
    return p


def test_the_global_profile_is_the_running_sum_of_every_update(tmp_path):
    store = SQLiteProfileStore(tmp_path / "p.sqlite")
    updates = [with_moments(i, f"c{i % 3}") for i in range(7)]
    for u in updates:
        store.add(u)
    model = store.global_profile("m")
    expected = Profile("m", "*", 4)
    for u in updates:
        expected = expected.merge(u)
    assert model.queries == 7 and model.collection == "*"
    assert model.sums == expected.sums and model.counts == expected.counts
    assert torch.equal(model.moments, expected.moments)  # exact: sums add
    assert all(p.moments is None for p in store.profiles("m")) and len(store.profiles("m")) == 3
    store.delete("m", "c0")  # a collection's reset: what the model learned from it stays
    assert store.global_profile("m").queries == 7
    store.delete("m")
    assert store.global_profile("m") is None
    with pytest.raises(ValueError, match="reserved for the model's global profile"):
        store.add(delta(0, "*"))


def test_a_store_written_before_global_profiles_adds_them_up_once(tmp_path):
    path = tmp_path / "p.sqlite"
    store = SQLiteProfileStore(path)
    old = [with_moments(i, f"c{i}") for i in range(3)]
    with sqlite3.connect(path) as db:  # rows as they were written: a collection's record with its moments
        for p in old:
            db.execute("INSERT INTO profiles VALUES (?, ?, ?, 0)", (p.model, p.collection, json.dumps(p.to_dict())))
    model = store.global_profile("m")
    assert model.queries == 3 and torch.equal(model.moments, old[0].moments + old[1].moments + old[2].moments)
    store.add(with_moments(3, "c0"))
    model = store.global_profile("m")
    assert model.queries == 4 and torch.equal(model.moments, sum(p.moments for p in old) + with_moments(3, "c").moments)
    assert store.get("m", "c0").queries == 2 and store.get("m", "c0").moments is None


def test_a_collection_record_of_a_full_size_model_is_small(tmp_path):
    path = tmp_path / "p.sqlite"
    store = SQLiteProfileStore(path)
    for i in range(3):
        store.add(with_moments(i, "docs", layers=30, d=576))
    with sqlite3.connect(path) as db:
        sizes = dict(db.execute("SELECT collection, length(data) FROM profiles").fetchall())
    assert sizes["docs"] < 200_000 and sizes["*"] > 1_000_000  # the moments live once per model
