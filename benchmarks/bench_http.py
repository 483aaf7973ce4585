"""What the HTTP server costs: the same N concurrent RAG requests in-process (engine.stream in N threads) and through
``adaskip-rag serve`` (the openai client streaming over HTTP + SSE from N threads, the server in its own process),
default model, full model on both sides (``skip=False``: the server's overhead alone), greedy answers of up to
--max-tokens tokens to SQuAD v2 questions with their passage among other paragraphs (about --tokens tokens).

Per N and side, over --rounds rounds, the sides alternating (one idle while the other runs, --pause seconds
between): throughput (tokens generated / the round's seconds), and p50 / p95 over the requests of time to first
token (submit to first text) and time per output token (first to last text, per token after the first). Printed:
the medians, and the server's throughput over in-process's and its added TTFT (medians of the per-round ratios and
differences).
Targets: the server keeps >= 95 % of in-process throughput at N = 4 and adds < 20 ms to TTFT.

    python benchmarks/bench_http.py [--concurrency 1 4 8] [--rounds 3] [--tokens 1000] [--threads 2] [--pause 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import torch
from bench_data import items

from adaskip_rag import AdaSkipEngine
from adaskip_rag.corpora import rag_messages
from adaskip_rag.server.process import ServerProcess


def timed(deltas: Iterator[str], start: float) -> tuple[float, float, int]:
    """(time to first text, time per output token after it, pieces) of a stream of text pieces."""
    times = [time.perf_counter() for piece in deltas if piece]
    if not times:
        return float("nan"), float("nan"), 0
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    return times[0] - start, tpot, len(times)


def round_of(ask: Callable[[list[dict]], tuple[float, float, int]], prompts: list[list[dict]]) -> dict[str, object]:
    """All ``prompts`` at once, one thread each: the round's seconds and the requests' timings."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(ask, prompts))
    return {"seconds": time.perf_counter() - start, "results": results}


def percentile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between the sides' rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = AdaSkipEngine.from_pretrained("default")
    server = ServerProcess(["--max-batch-size", str(max(args.concurrency))], cli_args=["--threads", str(args.threads)])
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    questions = items("squad", args.tokens, max(args.concurrency), engine.tokenizer)
    prompts = [rag_messages(q.document, q.question) for q in questions]

    def in_process(messages: list[dict]) -> tuple[float, float, int]:
        start = time.perf_counter()
        return timed(engine.stream(messages, max_new_tokens=args.max_tokens, skip=False), start)

    def over_http(messages: list[dict]) -> tuple[float, float, int]:
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model=engine.name, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,
            extra_body={"adaskip": {"skip": False}},
        )  # fmt: skip
        return timed((c.choices[0].delta.content or "" for c in stream if c.choices), start)

    try:
        in_process(prompts[0]), over_http(prompts[0])  # warm-up of both sides
        print(f"command: {' '.join(sys.argv)}")
        print(
            f"model: {engine.name}, {engine.model.dtype}, {args.threads} threads per side; prompts of about "
            f"{args.tokens} tokens, answers up to {args.max_tokens} tokens; {args.rounds} rounds, sides taking turns\n"
        )
        header = (
            f"{'N':>2} | {'side':>10} | {'tokens/s':>8} | {'TTFT p50':>8} | {'TTFT p95':>8} | {'TPOT p50':>8} | "
            f"{'TPOT p95':>8}"
        )
        print(header + f" || {'server / in-process throughput':>30} | {'server TTFT added (p50)':>23}")
        print("-" * (len(header) + 60))
        for n in args.concurrency:
            rounds: dict[str, list[dict]] = {"in-process": [], "HTTP": []}
            for _ in range(args.rounds):
                for side, ask in (("in-process", in_process), ("HTTP", over_http)):
                    time.sleep(args.pause)  # the other side's idle threads stop spinning before this side runs
                    rounds[side].append(round_of(ask, prompts[:n]))
            rates = {s: [sum(r[2] for r in x["results"]) / x["seconds"] for x in rs] for s, rs in rounds.items()}
            ttft50 = {s: [percentile([r[0] for r in x["results"]], 0.5) for x in rs] for s, rs in rounds.items()}
            ratio = statistics.median(h / p for h, p in zip(rates["HTTP"], rates["in-process"]))
            added = statistics.median(h - p for h, p in zip(ttft50["HTTP"], ttft50["in-process"]))
            for side, rs in rounds.items():
                every = [r for x in rs for r in x["results"]]
                ttft, tpot = [r[0] for r in every], [r[1] for r in every]
                tail = f" || {ratio:>29.3f}x | {added * 1000:>20.1f} ms" if side == "HTTP" else ""
                print(
                    f"{n:>2} | {side:>10} | {statistics.median(rates[side]):>8.1f} | {percentile(ttft, 0.5):>7.3f}s | "
                    f"{percentile(ttft, 0.95):>7.3f}s | {percentile(tpot, 0.5) * 1000:>6.1f}ms | "
                    f"{percentile(tpot, 0.95) * 1000:>6.1f}ms{tail}"
                )
            sys.stdout.flush()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
