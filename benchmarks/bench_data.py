"""Benchmark questions in retrieved contexts of a target length, from the built-in SQuAD v2, HotpotQA and
Paul Graham data: the gold passage(s) among other documents, as a retriever would return them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from adaskip_rag.corpora import hotpotqa, paul_graham_essays, squad


@dataclass
class Item:
    document: str
    question: str
    answers: list[str]


def squad_gold(articles: list[dict] | None = None) -> list[tuple[str, str, list[str]]]:
    """(paragraph, question, gold answers) for the first answerable question of each paragraph of ``articles``
    (default: all of SQuAD v2 dev)."""
    out = []
    for article in squad() if articles is None else articles:
        for para in article["paragraphs"]:
            qa = next((q for q in para["qas"] if not q.get("is_impossible")), None)
            if qa:
                out.append((para["context"], qa["question"], [a["text"] for a in qa["answers"]]))
    return out


def _hotpot_gold() -> list[tuple[str, str, list[str]]]:
    """(the question's ten paragraphs: two gold and eight distractors, question, [answer])."""
    return [
        (
            "\n\n".join(f"{title}: {''.join(sentences)}" for title, sentences in item["context"]),
            item["question"],
            [item["answer"]],
        )
        for item in hotpotqa()
    ]


def _filler() -> list[str]:
    """Paragraphs that pad a context: SQuAD paragraphs of every article."""
    return [p["context"] for article in squad() for p in article["paragraphs"]]


def items(dataset: str, target_tokens: int, count: int, tokenizer, offset: int = 0, seed: int = 0) -> list[Item]:
    """``count`` questions (from ``offset``, every 7th, so neighbours do not share an article) of ``dataset``
    ("squad" or "hotpotqa"), each with its gold passage placed at a random position among filler paragraphs up
    to about ``target_tokens`` tokens."""
    gold = squad_gold() if dataset == "squad" else _hotpot_gold()
    filler = _filler()
    rng = random.Random(seed)
    out = []
    for i in range(offset, offset + count):
        passage, question, answers = gold[(7 * i) % len(gold)]
        parts = [passage]
        size = len(tokenizer.encode(passage, add_special_tokens=False))
        while size < target_tokens:
            extra = filler[rng.randrange(len(filler))]
            if extra != passage:
                parts.insert(rng.randrange(len(parts) + 1), extra)
                size += len(tokenizer.encode(extra, add_special_tokens=False)) + 2
        out.append(Item("\n\n".join(parts), question, answers))
    return out


def essay_chunks(count: int, tokens: int, tokenizer) -> list[Item]:
    """``count`` consecutive chunks of about ``tokens`` tokens of the Paul Graham essays, each asked for a summary."""
    ids = tokenizer.encode(paul_graham_essays()[: count * tokens * 6], add_special_tokens=False)
    return [
        Item(tokenizer.decode(ids[i * tokens : (i + 1) * tokens]), "What is the main point of this text?", [])
        for i in range(count)
    ]
