"""The run tree both integrations use to find the collection of the nearest enclosing retrieval."""

from adaskip_rag.runs import RunTree, store_collection


def test_nearest_retrieving_ancestor_and_closing():
    tree = RunTree()
    for run, parent in (("root", None), ("chain", "root"), ("branch", "chain"), ("llm-parent", "chain")):
        tree.open(run, parent)
    tree.retrieved("branch", "manuals", "Chroma")  # a retriever ran under "branch"
    assert tree.collection_of("llm-parent") == "manuals" and tree.collection_of("root") == "manuals"
    assert tree.collection_in("chain") == "manuals" and tree.collection_in("llm-parent") is None
    tree.retrieved("llm-parent", "faq", "Chroma")  # the first retrieval of a run wins, nearer runs get their own
    assert tree.collection_of("llm-parent") == "faq" and tree.collection_of("chain") == "manuals"
    tree.close("chain")
    assert tree.collection_of("llm-parent") == "faq" and tree.collection_of("root") == "manuals"
    assert tree.collection_of(None) is None and tree.collection_of("unknown") is None


def test_open_runs_are_bounded():
    tree = RunTree(max_open=3)
    tree.open(0, None)
    tree.retrieved(0, "old", "Chroma")
    for i in range(1, 5):
        tree.open(i, None)
    tree.open("child", 4)
    tree.retrieved("child", "docs", "Chroma")
    assert tree.collection_of("child") == "docs" and tree.collection_of(4) == "docs"
    assert tree.collection_of(0) is None  # the oldest runs were dropped, with what they had retrieved
    assert [tree.collection_of(i) for i in (3, 4)] == [None, "docs"]


def test_retrievals_from_stores_without_a_collection_name_are_noted():
    tree = RunTree()
    tree.open("root", None)
    tree.open("llm", "root")
    tree.retrieved("root", None, "FAISS")
    assert tree.collection_of("llm") is None and tree.unnamed_store("llm") == "FAISS"
    tree.close("root")
    assert tree.unnamed_store("root") is None


def test_store_collection_reads_the_stores_own_name():
    class Chroma:
        class _collection:  # noqa: N801
            name = "manuals"

    class PGVector:
        collection_name = "faq"

    class Elastic:
        index_name = "docs"

    class FAISS:
        index = object()

    assert [store_collection(s()) for s in (Chroma, PGVector, Elastic, FAISS)] == ["manuals", "faq", "docs", None]
