"""Serving concurrent requests: the engine's batched steps against serving the same requests one by one, in one run.

Default model, in the precision the engine chooses on this CPU. Every request runs in its own thread, as LangChain
``batch`` and concurrent ``ainvoke`` calls do; served one by one, they run in turn in one thread (off the main
thread too, where torch runs slower here).
Scenarios, each at 1, 2, 4 and 8 concurrent requests:
  rag        ~2k-token RAG prompts (SQuAD v2 dev articles and questions), 64-token answers, the learned plan of
             one collection (the shipped profile's, default policy);
  rag-mixed  the same with the plans of different collections (budgets 0, 4, 8 and 12, round robin);
  decode     short prompts, 128-token answers.
It prints total throughput (generated tokens/s) concurrent vs one by one (with ``--repeats``, medians of the
alternating runs and of their ratios), and p50 / p95 time to first token (TTFT) and time per output token (TPOT)
of the concurrent runs. Then: three streams answering while a 2k prompt
arrives, at several prefill chunk sizes: p95 TPOT of the streams while the prompt is read, against one stream's
TPOT alone.

    python benchmarks/bench_serving.py [--quick] [--repeats 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from adaskip_rag import AdaSkipEngine, SkipPlan
from adaskip_rag.corpora import rag_messages, squad
from adaskip_rag.learning import shipped_profile
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.scheduler import ServingLimits
from adaskip_rag.skipping import PlanSchedule, Probe, StaticSchedule, Sublayer

RAG_TOKENS, RAG_ANSWER, DECODE_ANSWER = 2000, 64, 128


class Timed:
    """A plan schedule that notes when each decode step starts: right after the previous token was chosen."""

    def __init__(self, schedule: PlanSchedule):
        self.schedule, self.marks = schedule, [time.perf_counter()]

    def prefill(self) -> tuple[SkipPlan, bool]:
        return self.schedule.prefill()

    def decode(self, step: int, probes: dict[Sublayer, Probe] | None) -> tuple[SkipPlan, bool]:
        self.marks.append(time.perf_counter())
        return self.schedule.decode(step, probes)

    def ttft(self) -> float:
        return self.marks[1] - self.marks[0]

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.marks[1:], self.marks[2:])]


Request = tuple[Any, Callable[[], PlanSchedule], int]  # prompt, a fresh schedule, answer tokens


def serve(engine: AdaSkipEngine, requests: list[Request], together: bool) -> tuple[float, list[Timed]]:
    """Seconds to serve ``requests`` (concurrently, or one by one) and their timings."""
    timed = [Timed(schedule()) for _, schedule, _ in requests]

    def one(k: int) -> None:
        prompt, _, tokens = requests[k]
        timed[k].marks[0] = time.perf_counter()
        engine.generate(prompt, timed[k], max_new_tokens=tokens, ignore_eos=True)

    def in_turn() -> None:
        for k in range(len(requests)):
            one(k)

    start = time.perf_counter()  # one by one in one thread: both modes run off the main thread, as a server does
    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(requests))] if together else []
    threads = threads or [threading.Thread(target=in_turn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, timed


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def rag_requests(engine: AdaSkipEngine, count: int, budgets: list[int]) -> list[Request]:
    """``count`` RAG requests of about RAG_TOKENS prompt tokens; request k skips under the learned plan at budget
    ``budgets[k % len(budgets)]``."""
    profile = shipped_profile(engine.fingerprint, engine.name)
    policy = AdaSkipPolicy()
    requests: list[Request] = []
    for k, article in enumerate(squad()[:count]):
        text = "\n\n".join(p["context"] for p in article["paragraphs"])
        document = engine.tokenizer.decode(engine.tokenizer(text)["input_ids"][:RAG_TOKENS])
        question = next(q["question"] for p in article["paragraphs"] for q in p["qas"] if not q.get("is_impossible"))
        messages = rag_messages(document, question)
        n, budget = len(engine.encode(messages)), budgets[k % len(budgets)]

        def schedule(n: int = n, budget: int = budget) -> PlanSchedule:
            return (
                policy.schedule(profile, n, engine.costs, budget) if budget and profile else StaticSchedule(SkipPlan())
            )

        requests.append((messages, schedule, RAG_ANSWER))
    return requests


def decode_requests(engine: AdaSkipEngine, count: int) -> list[Request]:
    questions = [q["question"] for a in squad()[:count] for q in a["paragraphs"][0]["qas"][:1]]
    return [([{"role": "user", "content": q}], lambda: StaticSchedule(SkipPlan()), DECODE_ANSWER) for q in questions]


def scenario(
    engine: AdaSkipEngine, name: str, make: Callable[[int], list[Request]], counts: list[int], repeats: int
) -> None:
    """Each count served one by one and together, alternating, ``repeats`` times: medians of the throughputs and
    of the per-repeat ratios; TTFT and TPOT of every concurrent run pooled."""
    print(f"\n{name}")
    print(
        f"  {'N':>2} | {'tok/s 1-by-1':>12} | {'tok/s together':>14} | {'ratio':>6} | {'TTFT p50/p95 s':>15} | "
        f"{'TPOT p50/p95 ms':>16}"
    )
    for count in counts:
        requests = make(count)
        tokens = sum(t for _, _, t in requests)
        alone, together, ttft, tpot = [], [], [], []
        for _ in range(repeats):
            alone.append(serve(engine, requests, together=False)[0])
            seconds, timed = serve(engine, requests, together=True)
            together.append(seconds)
            ttft += [t.ttft() for t in timed]
            tpot += [g * 1000 for t in timed for g in t.gaps()]
        ratio = statistics.median(a / t for a, t in zip(alone, together))
        serial, concurrent = tokens / statistics.median(alone), tokens / statistics.median(together)
        print(
            f"  {count:>2} | {serial:>12.1f} | {concurrent:>14.1f} | {ratio:>5.2f}x | "
            f"{p(ttft, 50):>7.2f}/{p(ttft, 95):<7.2f} | {p(tpot, 50):>7.1f}/{p(tpot, 95):<8.1f}"
        )
        sys.stdout.flush()


def prefill_interference(engine: AdaSkipEngine, chunks: list[int]) -> None:
    """Three streams answering while a ~2k-token prompt arrives: their p95 TPOT while it is read vs one alone."""
    print("\nstreams answering while a 2k prompt arrives (TPOT of the streams, ms)")
    streams = decode_requests(engine, 3)
    arriving = rag_requests(engine, 1, [0])[0]
    _, alone = serve(engine, streams[:1], together=False)
    single = statistics.median(alone[0].gaps()) * 1000
    print(f"  one stream alone: median TPOT {single:.1f} ms")
    for chunk in chunks:
        engine.scheduler.limits = ServingLimits(prefill_chunk=chunk)
        timed = [Timed(schedule()) for _, schedule, _ in streams]
        window: list[float] = []

        def stream(k: int, timed: list[Timed] = timed) -> None:
            prompt, _, tokens = streams[k]
            engine.generate(prompt, timed[k], max_new_tokens=tokens, ignore_eos=True)

        def arrive(timed: list[Timed] = timed, window: list[float] = window) -> None:
            while len(timed[0].marks) < 16:  # the streams are answering
                time.sleep(0.005)
            prompt, schedule, _ = arriving
            late = Timed(schedule())
            window.append(time.perf_counter())
            engine.generate(prompt, late, max_new_tokens=2, ignore_eos=True)
            window.append(late.marks[1])  # its first token: the prompt has been read

        threads = [threading.Thread(target=stream, args=(k,)) for k in range(3)] + [threading.Thread(target=arrive)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        during = [
            (b - a) * 1000 for t in timed for a, b in zip(t.marks[1:], t.marks[2:]) if window[0] <= b and a <= window[1]
        ]
        p95 = p(during, 95)
        print(
            f"  prefill_chunk {chunk:>4}: prompt read in {window[1] - window[0]:.2f} s, p95 TPOT during it "
            f"{p95:.1f} ms = {p95 / single:.2f}x alone ({len(during)} steps)"
        )
        sys.stdout.flush()
    engine.scheduler.limits = ServingLimits()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="N = 1 and 4 only, one chunk size")
    parser.add_argument("--repeats", type=int, default=1, help="serial / concurrent runs per N (medians)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [1, 4] if args.quick else [1, 2, 4, 8]
    engine = AdaSkipEngine.from_pretrained("default")
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"model: {engine.name}, {engine.model.dtype}, "
        f"{args.threads} threads, torch {torch.__version__}, {platform.machine()}"
    )
    print(f"serving limits: {engine.scheduler.limits}")
    engine.generate("warm-up", max_new_tokens=4)
    scenario(
        engine,
        f"rag: ~{RAG_TOKENS}-token prompts, {RAG_ANSWER}-token answers, one collection's learned plan (budget 8)",
        lambda c: rag_requests(engine, c, [8]),
        counts,
        args.repeats,
    )
    scenario(
        engine,
        "rag-mixed: the same, plans of budgets 0, 4, 8, 12 (different collections)",
        lambda c: rag_requests(engine, c, [8, 0, 12, 4]),
        counts,
        args.repeats,
    )
    scenario(
        engine,
        f"decode: short prompts, {DECODE_ANSWER}-token answers, no skipping",
        lambda c: decode_requests(engine, c),
        counts,
        args.repeats,
    )
    prefill_interference(engine, [512] if args.quick else [512, 128, 64, 32, 16])


if __name__ == "__main__":
    main()
