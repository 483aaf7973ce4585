"""The `adaskip-rag profiles` commands on a store filled by a tiny model."""

import json

import pytest
from conftest import tiny_model

from adaskip_rag import AdaSkipEngine
from adaskip_rag.cli import main
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.stores import SQLiteProfileStore


@pytest.fixture
def store_path(tmp_path, tokenizer):
    path = tmp_path / "p.sqlite"
    engine = AdaSkipEngine(
        tiny_model(), tokenizer, store=SQLiteProfileStore(path), policy=AdaSkipPolicy(budget=3, warmup=2)
    )
    for i in range(3):
        engine.generate(f"Question {i}: what is in the documents?", collection="docs", max_new_tokens=2)
    engine.generate("Another collection", collection="notes", max_new_tokens=2)
    return path


def run(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_list_show_and_plot(store_path, tmp_path, capsys):
    out = run(capsys, "profiles", "--store", str(store_path), "list")
    assert "docs  3 queries" in out and "notes  1 queries" in out
    out = run(capsys, "profiles", "--store", str(store_path), "show", "docs", "--budget", "3")
    assert "3 queries" in out and out.count("*") == 3 + 1  # three marked sublayers and the legend
    png = tmp_path / "heat.png"
    run(capsys, "profiles", "--store", str(store_path), "plot", "docs", "-o", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_import_and_reset(store_path, tmp_path, capsys):
    exported = tmp_path / "profiles.json"
    run(capsys, "profiles", "--store", str(store_path), "export", "-o", str(exported))
    assert {p["collection"] for p in json.loads(exported.read_text())} == {"docs", "notes"}
    other = tmp_path / "other.sqlite"
    assert "imported 2 profiles" in run(capsys, "profiles", "--store", str(other), "import", str(exported))
    assert "removed 1 profiles" in run(capsys, "profiles", "--store", str(other), "reset", "docs")
    assert [p.collection for p in SQLiteProfileStore(other).profiles()] == ["notes"]
    assert "removed 1 profiles" in run(capsys, "profiles", "--store", str(other), "reset", "--all")


def test_unknown_collection_is_a_clear_error(store_path):
    with pytest.raises(SystemExit, match="no profile for collection 'nope'"):
        main(["profiles", "--store", str(store_path), "show", "nope"])


@pytest.mark.parametrize(
    "argv, name",
    [
        (["ask", "q", "--squad", "X", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["ask", "q", "--squad", "X", "--budget", "-1"], "--budget"),
        (["ask", "q", "--squad", "X", "--budget", "two"], "--budget"),
        (["--threads", "0", "demo"], "--threads"),
        (["demo", "--max-new-tokens", "1.5"], "--max-new-tokens"),
        (["profiles", "show", "docs", "--budget", "nan"], "--budget"),
        (["profiles", "build-default", "--questions", "0"], "--questions"),
        (["profiles", "import"], "file"),
        (["frobnicate"], "command"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_naming_them(argv, name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and name in err, err


def test_bad_import_files_exit_2_with_one_line_and_write_nothing(store_path, tmp_path, capsys):
    other = tmp_path / "other.sqlite"
    for text in ("[" * 100_000, '[{"format": 1}]', "not json", "{}"):
        (tmp_path / "bad.json").write_text(text)
        assert main(["profiles", "--store", str(other), "import", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:"), err
    assert SQLiteProfileStore(other).profiles() == []
    assert main(["profiles", "--store", str(other), "import", str(tmp_path / "missing.json")]) == 2


def test_serve_compiles_the_decode_step_before_it_serves(tokenizer, tmp_path, monkeypatch, capsys):
    import uvicorn

    tiny_model().save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    assert main(["serve", "--model", str(tmp_path / "m"), "--compile-decode"]) == 0
    assert len(served) == 1
    assert "decode step compiled in" in capsys.readouterr().err
