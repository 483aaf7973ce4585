"""Every reader of stored profiles validates them field by field: bad ones are skipped with one warning, moved
aside, and never reach merging or learning; serving goes on."""

import base64
import copy
import json
import random
import sqlite3
import warnings

import pytest
import torch
from conftest import tiny_model

from adaskip_rag import AdaSkipEngine
from adaskip_rag.learning import shipped_profile
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.profiles import Profile, parse_profile
from adaskip_rag.stores import SQLiteProfileStore

PROMPT = "Retrieved context: the quick brown fox jumps over the lazy dog. Question: what jumps?"
DEEP = "[" * 100_000 + "]" * 100_000


def _set(path, value):
    def mutate(d):
        *keys, last = path
        for k in keys:
            d = d[k]
        d[last] = value

    return mutate


def _moments_bytes(d, raw):
    d["moments"]["float64"] = base64.b64encode(raw).decode()


BAD = {
    "context_tokens is text": _set(["context_tokens"], "x"),
    "max_context is null": _set(["max_context"], None),
    "max_context above the total": _set(["max_context"], 10**9),
    "num_layers not the model's": _set(["num_layers"], 5),
    "queries negative": _set(["queries"], -1),
    "queries a bool": _set(["queries"], True),
    "state.measured a number": _set(["state"], {"measured": 1}),
    "state unknown key": _set(["state"], {"colour": "red"}),
    "state.guard without budget": _set(["state"], {"guard": {"reason": "x", "fidelity": 0.5}}),
    "state.guard history of numbers": _set(["state"], {"guard": {"budget": 2, "reason": "x", "history": [1, 2]}}),
    "state.guard speedup negative": _set(
        ["state"], {"guard": {"budget": 2, "reason": "x", "history": [[2, 0.9, -1.0]]}}
    ),
    "sums a string": _set(["sums", "attn.scale"], "1,2,3"),
    "sums NaN": lambda d: d["sums"]["ffn.similarity"].__setitem__(0, float("nan")),
    "counts above queries": lambda d: d["counts"]["attn"].__setitem__(1, 10**6),
    "counts missing kind": lambda d: d["counts"].pop("ffn"),
    "model empty": _set(["model"], ""),
    "extra field": _set(["colour"], "red"),
    "moments wrong shape": _set(["moments", "shape"], [2, 6, 3]),
    "moments not base64": _set(["moments", "float64"], "***"),
    "moments NaN": lambda d: _moments_bytes(
        d, torch.full(tuple(d["moments"]["shape"]), float("nan"), dtype=torch.float64).numpy().tobytes()
    ),
}
TEXT_BAD = {"deep nesting": DEEP, "not JSON": '{"format": 1, "model": ', "a list": "[1, 2]"}


@pytest.fixture(scope="module")
def valid(tokenizer, tmp_path_factory):
    """A real profile of the tiny engine's model (with moments), as the JSON dict a store keeps."""
    engine = AdaSkipEngine(
        tiny_model("llama"),
        tokenizer,
        "tiny",
        store=SQLiteProfileStore(tmp_path_factory.mktemp("v") / "p.sqlite"),
        policy=AdaSkipPolicy(warmup=10**9, refresh_every=0, tail=0),
    )
    engine.generate(PROMPT, collection="seed", max_new_tokens=2)
    data = {**engine.learner.store.global_profile(engine.fingerprint).to_dict(), "collection": "seed"}
    assert data["moments"] is not None
    return data


def bad_texts(valid: dict, collection: str) -> dict[str, str]:
    texts = {}
    for name, mutate in BAD.items():
        data = copy.deepcopy(valid)
        data["collection"] = collection
        mutate(data)
        texts[name] = json.dumps(data)
    return {**texts, **TEXT_BAD}


def test_each_malformed_profile_raises_a_value_error_naming_the_field(valid):
    for name, text in bad_texts(valid, "bad").items():
        with pytest.raises(ValueError, match="malformed profile") as err:
            parse_profile(text)
        field = name.split()[0].split(".")[0]
        if field in valid:
            assert repr(field)[1:-1] in str(err.value) or field in str(err.value), (name, err.value)
    assert parse_profile(json.dumps(valid)).to_dict() == valid


def fuzzed(valid: dict, count: int, seed: int = 0) -> list[dict]:
    """``count`` copies of ``valid`` with one to three random field deletions or type swaps each."""
    rng = random.Random(seed)
    swaps = [None, "x", -1, 1.5, float("nan"), float("inf"), True, [], {}, [[[]]], 10**30]
    out = []
    for _ in range(count):
        data = copy.deepcopy(valid)
        for _ in range(rng.randint(1, 3)):
            parent, key, node = None, None, data
            while isinstance(node, (dict, list)) and node and (parent is None or rng.random() > 0.3):
                key = rng.choice(list(node) if isinstance(node, dict) else range(len(node)))
                parent, node = node, node[key]  # walk down to a random leaf or container
            if parent is None:
                continue
            if rng.random() < 0.3 and isinstance(parent, dict):
                parent.pop(key)
            else:
                parent[key] = rng.choice(swaps)
        out.append(data)
    return out


def test_fuzzed_profiles_parse_into_valid_profiles_or_raise_value_error(valid):
    for data in fuzzed(valid, 400):
        try:
            profile = parse_profile(json.dumps(data))
        except ValueError:
            continue
        profile.merge(profile)  # what parses is usable: merging and serialising work
        parse_profile(json.dumps(profile.to_dict()))


def test_fuzzed_rows_never_stop_a_sqlite_reader(valid, tmp_path):
    store = SQLiteProfileStore(tmp_path / "p.sqlite")
    rows = [
        json.dumps(dict(d, collection=f"c{i}") if isinstance(d.get("collection"), str) else d)
        for i, d in enumerate(fuzzed(valid, 60, seed=1))
    ]
    with sqlite3.connect(store.path) as db:
        db.executemany(
            "INSERT INTO profiles VALUES (?, ?, ?, 0)", [(valid["model"], f"c{i}", row) for i, row in enumerate(rows)]
        )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        kept = store.profiles(valid["model"])
        assert [p.collection for p in store.profiles(valid["model"])] == [
            p.collection for p in kept
        ]  # no more warnings
    with sqlite3.connect(store.path) as db:
        aside = db.execute("SELECT count(*) FROM corrupt_profiles").fetchone()[0]
    assert aside == len(seen) == len(rows) - len(kept) > 30
    store.global_profile(valid["model"])


@pytest.fixture(params=["sqlite", "chroma"])
def serving(request, tokenizer, tmp_path):
    """An engine over a store of the given kind, and a function that writes a raw profile row into it."""
    if request.param == "sqlite":
        store = SQLiteProfileStore(tmp_path / "p.sqlite")

        def write_raw(model, collection, text):
            with sqlite3.connect(store.path) as db:
                db.execute("INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, 0)", (model, collection, text))

        def aside():
            with sqlite3.connect(store.path) as db:
                return [row[0] for row in db.execute("SELECT collection FROM corrupt_profiles")]
    else:
        chromadb = pytest.importorskip("chromadb")
        from conftest import ChromaServer

        from adaskip_rag.stores.chroma import ChromaProfileStore

        server = ChromaServer(tmp_path / "chroma")
        server.start()
        request.addfinalizer(server.stop)
        store = ChromaProfileStore("127.0.0.1", server.port, replica="a", cache_seconds=0)
        raw = chromadb.HttpClient(host="127.0.0.1", port=server.port).get_or_create_collection("adaskip_profiles")

        def write_raw(model, collection, text):  # as this replica's own earlier record
            raw.upsert(
                ids=[store._records.record_id(model, collection, "a")],
                documents=[text],
                embeddings=[[0.0]],
                metadatas=[{"model": model, "collection": collection, "replica": "a", "updated": 1.0}],
            )

        def aside():
            return raw.get(where={"model": "__corrupt__"})["ids"]

    engine = AdaSkipEngine(
        tiny_model("llama"),
        tokenizer,
        "tiny",
        store=store,
        policy=AdaSkipPolicy(warmup=1, refresh_every=0, tail=0, budget=2),
    )
    return engine, write_raw, aside


@pytest.mark.parametrize("case", [*BAD, *TEXT_BAD])
def test_serving_goes_on_past_a_bad_stored_profile(serving, valid, case):
    engine, write_raw, aside = serving
    engine.generate(PROMPT, collection="existing", max_new_tokens=2)
    write_raw(engine.fingerprint, "bad", bad_texts(valid, "bad")[case])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        new = engine.generate(PROMPT, collection="new", max_new_tokens=2)  # reads every row (global profile)
        existing = engine.generate(PROMPT, collection="existing", max_new_tokens=2)
        again = engine.generate(PROMPT, collection="bad", max_new_tokens=2)
        engine.generate(PROMPT, collection="new", max_new_tokens=2)
    assert new.stats.profile_source == "global" and existing.stats.profile_source == "collection"
    assert again.stats.queries_seen == 1  # the bad collection started afresh
    about = [str(w.message) for w in seen if "'bad'" in str(w.message)]
    assert 1 <= len(about) <= 2 and len(seen) == len(about), [str(w.message) for w in seen]
    assert aside(), "the bad profile was not kept aside"


@pytest.mark.parametrize("case", [*BAD, *TEXT_BAD])
def test_a_bad_shipped_profile_is_ignored_with_a_warning(valid, case, tmp_path, monkeypatch):
    (tmp_path / "tiny.json").write_text(bad_texts(valid, "bad")[case])
    monkeypatch.setenv("ADASKIP_PROFILES", str(tmp_path))
    with pytest.warns(UserWarning, match="ignoring shipped profile"):
        assert shipped_profile(valid["model"], "tiny") is None


@pytest.mark.parametrize("case", [*BAD, *TEXT_BAD])
def test_import_with_a_bad_last_item_writes_nothing(valid, case, tmp_path):
    store = SQLiteProfileStore(tmp_path / "p.sqlite")
    good = dict(valid, collection="good")
    bad = bad_texts(valid, "bad")[case]
    with pytest.raises(ValueError, match="profile 1 of 2" if case not in TEXT_BAD else "malformed profile"):
        store.import_json(f"[{json.dumps(good)}, {bad}]")
    assert store.profiles() == []
    assert store.import_json(json.dumps([good])) == 1


def test_import_that_cannot_merge_with_the_store_writes_nothing(valid, tmp_path):
    store = SQLiteProfileStore(tmp_path / "p.sqlite")
    store.import_json(json.dumps([dict(valid, collection="x")]))
    narrow = Profile.from_dict(dict(valid, collection="x"))
    narrow.moments = narrow.moments[:, :, :10].clone()
    items = [dict(valid, collection="y"), narrow.to_dict()]
    with pytest.raises(ValueError, match="profile 1 of 2"):
        store.import_json(json.dumps(items))
    assert [p.collection for p in store.profiles()] == ["x"]


def test_a_damaged_sqlite_file_is_moved_aside_and_serving_goes_on(tokenizer, tmp_path):
    path = tmp_path / "p.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.warns(UserWarning, match="damaged.*moved to"):
        store = SQLiteProfileStore(path)
    engine = AdaSkipEngine(tiny_model("llama"), tokenizer, "tiny", store=store)
    assert engine.generate(PROMPT, collection="docs", max_new_tokens=2).stats.collection == "docs"
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    truncated = tmp_path / "t.sqlite"
    SQLiteProfileStore(truncated).add(Profile.from_dict(valid_free(tmp_path)))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.warns(UserWarning, match="damaged"):
        assert SQLiteProfileStore(truncated).profiles() == []


def valid_free(tmp_path) -> dict:
    """A small valid profile without moments."""
    return Profile("m", "docs", 2, queries=1, context_tokens=5, max_context=5).to_dict()
