"""fp32 against bf16 on this CPU, default model, in one run: what the engine's choice of precision buys and costs.

For RAG prompts of about n tokens (SQuAD v2 questions with their passage among other paragraphs), per question,
the precisions interleaved:
  prefill    the full model's prefill time in fp32 over bf16 (a ratio > 1: bf16 is faster);
  decode     tokens/s of a greedy answer in bf16 over fp32 (answers of at least 4 tokens in both);
  e2e        prefill and an answer of --max-new-tokens at each precision's decode rate, fp32 over bf16;
  agreement  bf16's teacher-forced top-1 agreement along fp32's greedy answer (full model both);
  first      whether bf16's first answer token is fp32's;
  identical  whether bf16's greedy answer is fp32's.
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


def prefill_seconds(engine: AdaSkipEngine, ids: list[int]) -> float:
    start = time.perf_counter()
    engine.generate(ids, SkipPlan(), max_new_tokens=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engines = {d: AdaSkipEngine.from_pretrained("default", dtype=d) for d in (torch.float32, torch.bfloat16)}
    fp32, bf16 = engines.values()
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
    print(
        f"{'n':>5} | {'prefill fp32/bf16':>22} | {'decode bf16/fp32':>22} | {'e2e fp32/bf16':>22} | "
        f"{'agreement':>22} | first | identical"
    )
    for n in args.lengths:
        prefill, decode, e2e, agreement, first, identical = [], [], [], [], [], []
        for item in items("squad", n, args.questions, fp32.tokenizer):
            ids = fp32.encode(rag_messages(item.document, item.question))
            seconds = {d: [prefill_seconds(e, ids) for _ in range(2)] for d, e in engines.items()}  # interleaved
            prefill.append(min(seconds[torch.float32]) / min(seconds[torch.bfloat16]))
            answers = {d: e.generate(ids, SkipPlan(), max_new_tokens=args.max_new_tokens) for d, e in engines.items()}
            full = answers[torch.float32]
            rates = [answers[d].stats.decode_tokens_per_s for d in (torch.bfloat16, torch.float32)]
            if min(r.stats.generated_tokens for r in answers.values()) >= 4:  # else too few steps to time
                decode.append(rates[0] / rates[1])
                steps = args.max_new_tokens - 1  # an answer of the full length, at each precision's rates
                ends = [min(seconds[d]) + steps / rate for d, rate in zip((torch.bfloat16, torch.float32), rates)]
                e2e.append(ends[1] / ends[0])
            logits, _ = bf16.teacher_forced(ids, full.token_ids, SkipPlan())
            top = logits.argmax(-1).tolist()
            agreement.append(sum(a == b for a, b in zip(top, full.token_ids)) / len(full.token_ids))
            first.append(float(top[0] == full.token_ids[0]))
            identical.append(float(answers[torch.bfloat16].token_ids == full.token_ids))
        print(
            f"{n:>5} | {interval(prefill, statistics.median):>22} | "
            f"{interval(decode or [0.0], statistics.median):>22} | {interval(e2e or [0.0], statistics.median):>22} | "
            f"{interval(agreement, statistics.mean):>22} | {statistics.mean(first):5.2f} | "
            f"{statistics.mean(identical):9.2f}"
        )


if __name__ == "__main__":
    main()
