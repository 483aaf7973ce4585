"""fp32, bf16 and bf16 with 4-bit decode weights on this CPU, default model, in one run: what the engine's choice of
precision and decode weights buys and costs.

First, decode alone: tokens/s of a 64-token greedy answer to a short chat prompt, each mode --repeats times,
interleaved (medians, and the median of the per-round ratios to fp32). Then, for RAG prompts of about n tokens
(SQuAD v2 questions with their passage among other paragraphs), per question, the modes interleaved:
  prefill    the full model's prefill time in fp32 over bf16 (> 1: bf16 is faster; the 4-bit weights serve decode
             steps only, so bf16's prefill is the default's);
  decode     tokens/s of a greedy answer in bf16, and with the 4-bit decode weights (int4), over fp32's;
  e2e        prefill and an answer of --max-new-tokens at each mode's decode rate, fp32 over the default (int4);
  agreement  teacher-forced top-1 agreement along fp32's greedy answer: bf16 (the answer fed as one chunk, as a
             prefill computes it) and int4 (fed token by token, as decode steps compute it);
  identical  whether the default's greedy answer is fp32's.
Medians and means over the questions, with 90 % bootstrap intervals; then the precision
``loading.default_cpu_dtype`` chooses here, and its matrix-product measurement.

    python benchmarks/bench_precision.py [--lengths 1000 2000 4000] [--questions 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from bench_data import items
from bench_quality import interval

from adaskip_rag import AdaSkipEngine, SkipPlan, loading
from adaskip_rag.corpora import rag_messages
from adaskip_rag.skipping import StaticSchedule


def prefill_seconds(engine: AdaSkipEngine, ids: list[int]) -> float:
    start = time.perf_counter()
    engine.generate(ids, SkipPlan(), max_new_tokens=1)
    return time.perf_counter() - start


def agreement(engine: AdaSkipEngine, ids: list[int], answer: list[int], token_by_token: bool) -> float:
    plan = StaticSchedule(SkipPlan()) if token_by_token else SkipPlan()
    top = engine.teacher_forced(ids, answer, plan)[0].argmax(-1).tolist()
    return sum(a == b for a, b in zip(top, answer)) / len(answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engines = {
        "fp32": AdaSkipEngine.from_pretrained("default", dtype=torch.float32),
        "bf16": AdaSkipEngine.from_pretrained("default", dtype=torch.bfloat16, int4_decode=False),
        "int4": AdaSkipEngine.from_pretrained("default", dtype=torch.bfloat16),
    }
    fp32, bf16, default = engines.values()
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"model: {fp32.name}; {args.threads} threads, torch {torch.__version__}, {platform.machine()}; "
        f"{args.questions} questions per length, greedy answers of up to {args.max_new_tokens} tokens"
    )
    caps = torch.cpu.get_capabilities()
    native = [flag for flag in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16") if caps.get(flag)]
    config = fp32.config
    print(
        f"CPU {caps.get('cpu_name', '?')}: native bf16 {native or 'none'}; bf16 matrix product "
        f"{loading._bf16_speedup(config.hidden_size, config.intermediate_size):.2f}x fp32; "
        f"default precision here: {loading.default_cpu_dtype(config)}\n"
    )

    short = fp32.encode([{"role": "user", "content": "Write a long story about a cat who travels the world."}])
    rates: dict[str, list[float]] = {mode: [] for mode in engines}
    for _ in range(args.repeats):
        for mode, engine in engines.items():
            rates[mode].append(engine.generate(short, SkipPlan(), max_new_tokens=64).stats.decode_tokens_per_s)
    print(f"decode, short prompt ({len(short)} tokens), 64 tokens, {args.repeats} rounds interleaved:")
    for mode, rate in rates.items():
        ratio = statistics.median(a / b for a, b in zip(rate, rates["fp32"]))
        print(f"  {mode:>4}: {statistics.median(rate):6.1f} tokens/s, {ratio:.2f}x fp32")
    print()

    print(
        f"{'n':>5} | {'prefill fp32/bf16':>22} | {'decode bf16/fp32':>22} | {'decode int4/fp32':>22} | "
        f"{'e2e fp32/int4':>22} | {'agreement bf16':>22} | {'agreement int4':>22} | identical"
    )
    for n in args.lengths:
        prefill, decode, decode4, e2e, agree, agree4, identical = [], [], [], [], [], [], []
        for item in items("squad", n, args.questions, fp32.tokenizer):
            ids = fp32.encode(rag_messages(item.document, item.question))
            seconds = {m: [prefill_seconds(e, ids) for _ in range(2)] for m, e in engines.items() if m != "int4"}
            prefill.append(min(seconds["fp32"]) / min(seconds["bf16"]))
            answers = {m: e.generate(ids, SkipPlan(), max_new_tokens=args.max_new_tokens) for m, e in engines.items()}
            full = answers["fp32"]
            rate = {m: a.stats.decode_tokens_per_s for m, a in answers.items()}
            if min(a.stats.generated_tokens for a in answers.values()) >= 4:  # else too few steps to time
                decode.append(rate["bf16"] / rate["fp32"])
                decode4.append(rate["int4"] / rate["fp32"])
                steps = args.max_new_tokens - 1  # an answer of the full length, at each mode's rates
                e2e.append(
                    (min(seconds["fp32"]) + steps / rate["fp32"]) / (min(seconds["bf16"]) + steps / rate["int4"])
                )
            agree.append(agreement(bf16, ids, full.token_ids, token_by_token=False))
            agree4.append(agreement(default, ids, full.token_ids, token_by_token=True))
            identical.append(float(answers["int4"].token_ids == full.token_ids))
        cells = [
            interval(prefill, statistics.median),
            interval(decode or [0.0], statistics.median),
            interval(decode4 or [0.0], statistics.median),
            interval(e2e or [0.0], statistics.median),
            interval(agree, statistics.mean),
            interval(agree4, statistics.mean),
        ]
        print(f"{n:>5} | " + " | ".join(f"{c:>22}" for c in cells) + f" | {statistics.mean(identical):9.2f}")


if __name__ == "__main__":
    main()
