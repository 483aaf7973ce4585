"""Engine overheads and the speed of skipping, measured in one run on the default model.

For each context length n it prints, as medians of interleaved repeats after a warm-up:
  (a) engine with an empty plan vs plain ``model.generate``: prefill time ratio and decode tokens/s ratio;
  (b) probes on vs off: prefill overhead (of a full prefill, which also records compensation moments);
  (c) a plan skipping the 16 attention sublayers with the highest IO similarity at this n (the paper's skip:
      no KV cache): measured prefill speedup vs its FLOP bound;
  (d) the same 16 skipped in the default policy's way: KV cache kept, first token and last 64 tokens in full;
  (e) the learned plan as served: the default policy's schedule from a profile of this prompt's full run (what a
      collection's skip request runs), unprobed (as 3 in 4 of them are) and probed: measured prefill speedup vs
      the FLOP estimate its stats report.

    python benchmarks/bench_engine.py [--quick] [--threads 2] [--lengths 1024 2048 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from adaskip_rag import AdaSkipEngine, SkipPlan
from adaskip_rag.corpora import squad_article
from adaskip_rag.policies import AdaSkipPolicy, plan_from_probes
from adaskip_rag.profiles import Profile

DECODE_TOKENS = 32


def document_ids(engine: AdaSkipEngine, n: int) -> list[int]:
    """The first n tokens of real text (SQuAD v2 dev articles, concatenated)."""
    text = "\n\n".join(squad_article(t)[0] for t in ("Normans", "Steam_engine"))
    ids = engine.tokenizer(text)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"corpus has only {len(ids)} tokens, fewer than n = {n}")
    return ids[:n]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(modes: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each mode, the modes interleaved in every repeat."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, fn in modes.items():
            times[name].append(fn())
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="n = 1024, 2048 and 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats = [1024, 2048], 3
    torch.set_num_threads(args.threads)
    engine = AdaSkipEngine.from_pretrained("default")
    model = engine.model

    print(f"command: {' '.join(sys.argv)}")
    print(
        f"model: {engine.name}, {engine.model.dtype}, "
        f"{args.threads} threads, torch {torch.__version__}, {platform.machine()}"
    )
    print(f"medians of {args.repeats} interleaved repeats; decode over {DECODE_TOKENS} tokens\n")
    header = (
        f"{'n':>5} | {'prefill engine/HF':>17} | {'decode tok/s engine/HF':>22} | {'probe overhead':>14} | "
        f"{'skip-16-attn prefill':>20} | {'FLOP bound':>10} | {'of bound':>8} | "
        f"{'kv+head+tail prefill':>20} | {'FLOP bound':>10} | {'of bound':>8} | "
        f"{'learned, as served':>18} | {'estimated':>9} | {'of estimate':>11} | {'probed: of estimate':>19}"
    )
    print(header)
    print("-" * len(header))
    for n in args.lengths:
        ids = document_ids(engine, n)
        prompt = torch.tensor([ids])
        calibration = engine.generate(ids, max_new_tokens=1, probe=True)  # also the warm-up at this n
        attn_probes = {s: p for s, p in calibration.prefill_probes.items() if s.kind == "attn"}
        plan16 = plan_from_probes(attn_probes, 16)
        faithful16 = SkipPlan(prefill_attn=plan16.attn, head=1, tail=64)
        profile = Profile.from_probes(engine.fingerprint, "bench", engine.num_layers, calibration.prefill_probes, n)
        served = functools.partial(AdaSkipPolicy().schedule, profile, n, engine.costs, 8)  # (probe) -> schedule
        estimated = engine.generate(ids, served(False), max_new_tokens=1).stats.estimated_prefill_speedup

        def hf(tokens: int, prompt: torch.Tensor = prompt) -> Callable[[], float]:
            kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=2)
            return lambda: timed(lambda: model.generate(prompt, **kwargs))

        def ours(tokens: int, plan: object = None, probe: bool = False, ids: list[int] = ids) -> Callable[[], float]:
            def run() -> object:
                schedule = plan() if callable(plan) else plan  # a learned schedule is new for every request
                return engine.generate(ids, schedule, max_new_tokens=tokens, ignore_eos=True, probe=probe)

            return lambda: timed(run)

        t = measure(
            {
                "hf_prefill": hf(1),
                "hf_total": hf(1 + DECODE_TOKENS),
                "engine_prefill": ours(1),
                "engine_total": ours(1 + DECODE_TOKENS),
                "probe_prefill": ours(1, probe=True),
                "skip_prefill": ours(1, plan16),
                "faithful_prefill": ours(1, faithful16),
                "served_prefill": ours(1, functools.partial(served, False)),
                "served_probed_prefill": ours(1, functools.partial(served, True)),
            },
            args.repeats,
        )
        prefill_ratio = t["engine_prefill"] / t["hf_prefill"]
        decode_ratio = (t["hf_total"] - t["hf_prefill"]) / (t["engine_total"] - t["engine_prefill"])
        probe_overhead = t["probe_prefill"] / t["engine_prefill"] - 1
        speedup = t["engine_prefill"] / t["skip_prefill"]
        bound = engine.costs.speedup(n, 16, 0, "prefill")
        faithful = t["engine_prefill"] / t["faithful_prefill"]
        faithful_bound = engine.costs.speedup(n, 16, 0, "prefill", kept_kv=16, tail=64, head=1)
        learned = t["engine_prefill"] / t["served_prefill"]
        probed = t["engine_prefill"] / t["served_probed_prefill"]
        print(
            f"{n:>5} | {prefill_ratio:>17.3f} | {decode_ratio:>22.3f} | {probe_overhead:>13.1%} | "
            f"{speedup:>19.2f}x | {bound:>9.2f}x | {speedup / bound:>8.2f} | "
            f"{faithful:>19.2f}x | {faithful_bound:>9.2f}x | {faithful / faithful_bound:>8.2f} | "
            f"{learned:>17.2f}x | {estimated:>8.2f}x | {learned / estimated:>11.2f} | {probed / estimated:>19.2f}"
        )
        sys.stdout.flush()
    print("\nprefill engine/HF < 1 and decode tok/s engine/HF > 1 mean the engine is faster than model.generate")


if __name__ == "__main__":
    main()
