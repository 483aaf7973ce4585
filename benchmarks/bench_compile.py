"""What torch.compile buys the default model here, in one run: a prompt's prefill through transformers' own
forward (bf16, dense weights, as the engine's prefill computes) eager against compiled (inductor, default mode), and
the engine's decode step eager against ``compile_decode=True``; the seconds each compilation took. Interleaved,
medians of per-repeat ratios.

    python benchmarks/bench_compile.py [--length 2000] [--repeats 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from bench_data import items

from adaskip_rag import AdaSkipEngine, SkipPlan
from adaskip_rag.corpora import rag_messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"command: {' '.join(sys.argv)}")
    engine = AdaSkipEngine.from_pretrained("default")
    start = time.perf_counter()
    compiled = AdaSkipEngine.from_pretrained("default", compile_decode=True)
    decode_compile = time.perf_counter() - start
    dense = AdaSkipEngine.from_pretrained("default", int4_decode=False).model
    item = items("squad", args.length, 1, engine.tokenizer)[0]
    ids = engine.encode(rag_messages(item.document, item.question))
    prompt = torch.tensor([ids])

    def forward() -> torch.Tensor:
        return dense(prompt, use_cache=False, logits_to_keep=1).logits

    compiled_forward = torch.compile(forward)
    with torch.inference_mode():
        start = time.perf_counter()
        compiled_forward()
        prefill_compile = time.perf_counter() - start
        prefill = []
        for _ in range(args.repeats):
            eager_s, compiled_s = _timed(forward), _timed(compiled_forward)
            prefill.append(eager_s / compiled_s)
    decode = []
    for _ in range(args.repeats):
        eager_rate = engine.generate(ids, SkipPlan(), max_new_tokens=33, ignore_eos=True).stats.decode_tokens_per_s
        rate = compiled.generate(ids, SkipPlan(), max_new_tokens=33, ignore_eos=True).stats.decode_tokens_per_s
        decode.append(rate / eager_rate)
    print(
        f"{engine.name}, {engine.model.dtype}, {args.threads} threads, a {len(ids)}-token prompt, "
        f"medians of {args.repeats} interleaved repeats"
    )
    print(
        f"prefill, transformers' forward: compiled / eager speed {statistics.median(prefill):.2f}x "
        f"({min(prefill):.2f}-{max(prefill):.2f}), compiled in {prefill_compile:.0f} s"
    )
    print(
        f"decode, 32 tokens: compile_decode / eager speed {statistics.median(decode):.2f}x "
        f"({min(decode):.2f}-{max(decode):.2f}), engine loaded and compiled in {decode_compile:.0f} s"
    )


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
