"""What probes cost a full prefill, and how much of it a refresh's timing leaves in, on the default model.

A refresh times the full model's prefill with its probes on and subtracts the time the probes say they took
(``Probe.seconds``), so that it compares like with like against the plan's unprobed prefill. Per repeat, a
probed full prefill is bracketed by two unprobed ones; it prints medians of the per-repeat ratios:
  overhead          probed / unprobed - 1
  less probes       (probed - sum of Probe.seconds) / unprobed - 1   (0 = the refresh's timing is unbiased)
  probes' share     sum of Probe.seconds / probed

    python benchmarks/bench_probes.py [--lengths 2048 4096] [--repeats 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import torch
from bench_engine import document_ids

from adaskip_rag import AdaSkipEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = AdaSkipEngine.from_pretrained("default")
    print(f"command: {' '.join(sys.argv)}")
    print(f"model: {engine.name}, {engine.model.dtype}, {args.threads} threads, torch {torch.__version__}")
    print(f"machine: {platform.machine()}")
    print(f"medians of {args.repeats} per-repeat ratios; stats.prefill_seconds\n")
    print(f"{'n':>5} | {'unprobed s':>10} | {'overhead':>8} | {'less probes':>11} | {'probes share':>12}")
    for n in args.lengths:
        ids = document_ids(engine, n)
        engine.generate(ids, max_new_tokens=1, probe=True)  # warm-up at this n

        def unprobed(ids: list[int] = ids) -> float:
            return engine.generate(ids, max_new_tokens=1).stats.prefill_seconds

        base, overhead, left, share = [], [], [], []
        for _ in range(args.repeats):
            before = unprobed()
            result = engine.generate(ids, max_new_tokens=1, probe=True)
            full = (before + unprobed()) / 2
            probed, measuring = result.stats.prefill_seconds, sum(p.seconds for p in result.prefill_probes.values())
            base.append(full)
            overhead.append(probed / full - 1)
            left.append((probed - measuring) / full - 1)
            share.append(measuring / probed)
        print(
            f"{n:>5} | {statistics.median(base):>10.3f} | {statistics.median(overhead):>8.1%} | "
            f"{statistics.median(left):>11.1%} | {statistics.median(share):>12.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
