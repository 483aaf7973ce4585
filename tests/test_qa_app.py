"""The long-document QA example app, end to end: ingest, ask (both frameworks, two collections), profiles."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("chromadb")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import qa_app  # noqa: E402
from conftest import COLLECTIONS, ChromaServer  # noqa: E402


def corpus_folder(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    for i, doc in enumerate(COLLECTIONS[name]["docs"]):
        (folder / f"note{i}.md" if i % 2 else folder / f"note{i}.txt").write_text(doc + "\n")
    return folder


def ask(full_engine, argv: list[str]) -> list[dict]:
    return qa_app.ask(qa_app.parser().parse_args(argv), engine=full_engine)


@pytest.mark.slow
def test_ingest_and_ask_over_two_collections_with_both_frameworks(full_engine, tmp_path, capsys):
    chroma = ["--chroma-dir", str(tmp_path / "chroma")]
    for name, framework in (("harbor-notes", "langchain"), ("orchard-notes", "llamaindex")):
        folder = corpus_folder(tmp_path, name)
        qa_app.main([*chroma, "--framework", framework, "ingest", "--collection", name, "--path", str(folder)])
        assert f"into Chroma collection {name!r}" in capsys.readouterr().out

    store = full_engine.learner.store
    for name, framework in (("harbor-notes", "langchain"), ("orchard-notes", "llamaindex")):
        case = COLLECTIONS[name]
        results = ask(
            full_engine,
            [
                *chroma,
                "--framework",
                framework,
                "ask",
                "--collection",
                name,
                "-k",
                "2",
                "--max-tokens",
                "24",
                case["question"],
                case["question"],
            ],
        )
        out = capsys.readouterr().out
        assert all(case["answer"] in r["answer"] for r in results)
        assert [r["stats"]["collection"] for r in results] == [name, name]  # found by the integration
        assert all(len(r["chunks"]) == 2 for r in results)
        assert out.count("time to first token") == 2 and out.count("retrieved 2 chunks") == 2
        assert store.get(full_engine.fingerprint, name).queries == 2
    assert store.get(full_engine.fingerprint, "default") is None


@pytest.mark.slow
def test_app_over_a_chroma_server(full_engine, tmp_path, capsys):
    server = ChromaServer(tmp_path / "server")
    server.start()
    try:
        remote = ["--chroma-host", "127.0.0.1", "--chroma-port", str(server.port)]
        folder = corpus_folder(tmp_path, "harbor-notes")
        qa_app.main([*remote, "ingest", "--collection", "harbor-notes", "--path", str(folder)])
        case = COLLECTIONS["harbor-notes"]
        [result] = ask(
            full_engine,
            [*remote, "ask", "--collection", "harbor-notes", "-k", "2", "--max-tokens", "24", case["question"]],
        )
        assert case["answer"] in result["answer"] and result["stats"]["collection"] == "harbor-notes"
    finally:
        server.stop()


def test_bad_input_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no .txt, .md or .pdf files under"):
        qa_app.main(["--chroma-dir", str(tmp_path / "c"), "ingest", "--collection", "abc", "--path", str(empty)])
    with pytest.raises(SystemExit, match="no Chroma collection 'nope': ingest it first"):
        qa_app.main(["--chroma-dir", str(tmp_path / "c"), "ask", "--collection", "nope", "why?"])
