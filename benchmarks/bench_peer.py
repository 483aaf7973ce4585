"""The engine beside llama.cpp on the same weights (the default model's GGUF), in one run, on this CPU.

The same token ids go to both sides: the engine's tokenization of each prompt, fed to llama.cpp as ids; the script
checks that llama.cpp's own tokenizer gives the same ids and prints the result. Modes, interleaved in every repeat:
  fp32        the engine in fp32;
  bf16        the engine in bf16 with dense decode weights;
  default     the engine as loaded by default here (bf16 where native, the GGUF's 4-bit weights in decode steps);
  compiled    the default engine with its decode step compiled (``compile_decode=True``; decode only, its prefill is
              the default's); the seconds compiling took, and the teacher-forced top-1 agreement of its decode
              steps with the default's greedy answers (bf16 roundings differ once operations are fused);
  learned     the default engine with a learned plan as served to 3 requests in 4 (the default policy's unprobed
              schedule at budget 8, from a profile of this prompt's full run);
  learned c   the same schedule on the compiled engine (decode only);
  probed      the default engine with the schedule of the 4th request, which probes its prefill and its first
              ``window`` decode steps (the online decode skips);
  llama.cpp   llama-cpp-python on the GGUF file (Q4_1 layers, Q8_0 embedding), threads = --threads.
Printed: prefill seconds at each length (medians of --repeats), decode tokens/s after a short prompt (64 tokens)
and after each long prompt (32 tokens), and the ratios to llama.cpp; then the hardware bound: the bytes a decode
step must read and the FLOPs a prefill token takes, over this CPU's measured memory bandwidth and matrix-product
throughput.

    pip install -e ".[peer]"   # llama-cpp-python, built from source with native CPU flags
    python benchmarks/bench_peer.py [--lengths 1000 2000 4000] [--repeats 3] [--threads 2]
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
from bench_data import items
from llama_cpp import Llama

from adaskip_rag import AdaSkipEngine, SkipPlan, loading
from adaskip_rag.corpora import rag_messages
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.profiles import Profile

SHORT = [{"role": "user", "content": "Write a long story about a cat who travels the world."}]


class Peer:
    """llama.cpp on the default model's GGUF: prefill of given ids, then greedy decode steps."""

    def __init__(self, threads: int, context: int) -> None:
        self.llm = Llama(
            str(loading.default_gguf()), n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads,
            logits_all=False, verbose=False,
        )  # fmt: skip

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - start

    def decode(self, ids: list[int], tokens: int) -> float:
        """Tokens/s of ``tokens`` greedy steps after a prefill of ``ids`` (from the first token to the last)."""
        self.llm.reset()
        times = []
        for _ in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) > tokens:
                break
        return tokens / (times[-1] - times[0])


def engine_prefill(engine: AdaSkipEngine, ids: list[int], plan: Callable[[], object] | None = None) -> float:
    start = time.perf_counter()
    engine.generate(ids, plan() if plan else SkipPlan(), max_new_tokens=1)
    return time.perf_counter() - start


def engine_decode(
    engine: AdaSkipEngine, ids: list[int], tokens: int, plan: Callable[[], object] | None = None
) -> float:
    result = engine.generate(ids, plan() if plan else SkipPlan(), max_new_tokens=tokens + 1, ignore_eos=True)
    return result.stats.decode_tokens_per_s


def agreement(engine: AdaSkipEngine, reference: AdaSkipEngine, ids: list[int], tokens: int) -> float:
    """Teacher-forced top-1 agreement of ``engine`` with the greedy answer of ``reference`` to ``ids``."""
    answer = reference.generate(ids, SkipPlan(), max_new_tokens=tokens, ignore_eos=True).token_ids
    logits, _ = engine.teacher_forced(ids, answer, SkipPlan())
    return float((logits.argmax(-1) == torch.tensor(answer)).float().mean())


def hardware(threads: int) -> tuple[float, float]:
    """This CPU's measured memory bandwidth (bytes/s, reading 512 MB) and bf16 and fp32 matrix-product FLOP/s
    (the better of the two), with ``threads`` threads."""
    big = torch.ones(128 * 2**20)  # 512 MB of fp32
    seconds = min(_timed(lambda: big.sum()) for _ in range(5))
    flops = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048).to(dtype)
        flops = max(flops, 2 * 2048**3 / min(_timed(functools.partial(torch.mm, a, a)) for _ in range(5)))
    return big.numel() * 4 / seconds, flops


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engines = {
        "fp32": AdaSkipEngine.from_pretrained("default", dtype=torch.float32),
        "bf16": AdaSkipEngine.from_pretrained("default", dtype=torch.bfloat16, int4_decode=False),
        "default": AdaSkipEngine.from_pretrained("default"),
    }
    default = engines["default"]
    compiled = AdaSkipEngine.from_pretrained("default", compile_decode=True)
    assert compiled.compiled_decode is not None
    peer = Peer(args.threads, context=max(args.lengths) + 512)
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"model: {default.name} ({loading.default_gguf().name}); engine default {default.model.dtype}; "
        f"{args.threads} threads, torch {torch.__version__}, {platform.machine()}, "
        f"CPU {torch.cpu.get_capabilities().get('cpu_name', '?')}; medians of {args.repeats} interleaved repeats"
    )
    print(f"compiled decode step: compiled in {compiled.compiled_decode.warmup_seconds:.1f} s at load\n")

    prompts = {"short": default.encode(SHORT)}
    for n in args.lengths:
        item = next(iter(items("squad", n, 1, default.tokenizer)))
        prompts[str(n)] = default.encode(rag_messages(item.document, item.question))
    text = default.tokenizer.decode(prompts["short"])
    same = peer.llm.tokenize(text.encode(), add_bos=False, special=True) == prompts["short"]
    print(f"llama.cpp's tokenizer gives the engine's ids for the short prompt: {same} (the ids fed are the engine's)\n")

    header = f"{'prompt':>6} | {'tokens':>6} | {'mode':>9} | {'prefill s':>9} | {'x llama.cpp':>11} | "
    print(header + f"{'decode tok/s':>12} | {'x llama.cpp':>11}")
    print("-" * (len(header) + 27))
    for name, ids in prompts.items():
        decode_tokens = 64 if name == "short" else 32
        profile_run = default.generate(ids, max_new_tokens=1, probe=True)
        profile = Profile.from_probes(
            default.fingerprint, "bench", default.num_layers, profile_run.prefill_probes, len(ids)
        )
        served = functools.partial(AdaSkipPolicy().schedule, profile, len(ids), default.costs, 8, False)
        probed = functools.partial(AdaSkipPolicy().schedule, profile, len(ids), default.costs, 8, True)
        modes = (*engines, "compiled", "learned", "learned c", "probed", "llama.cpp")
        prefill: dict[str, list[float]] = {m: [] for m in (*engines, "learned", "probed", "llama.cpp")}
        decode: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode, engine in engines.items():
                prefill[mode].append(engine_prefill(engine, ids))
                decode[mode].append(engine_decode(engine, ids, decode_tokens))
            decode["compiled"].append(engine_decode(compiled, ids, decode_tokens))
            prefill["learned"].append(engine_prefill(default, ids, served))
            decode["learned"].append(engine_decode(default, ids, decode_tokens, served))
            decode["learned c"].append(engine_decode(compiled, ids, decode_tokens, served))
            prefill["probed"].append(engine_prefill(default, ids, probed))
            decode["probed"].append(engine_decode(default, ids, decode_tokens, probed))
            prefill["llama.cpp"].append(peer.prefill(ids))
            decode["llama.cpp"].append(peer.decode(ids, decode_tokens))
        ref_prefill, ref_decode = statistics.median(prefill["llama.cpp"]), statistics.median(decode["llama.cpp"])
        for mode in modes:
            p = statistics.median(prefill[mode]) if mode in prefill else None
            d = statistics.median(decode[mode]) if mode in decode else None
            time_ = f"{p:>9.3f} | {ref_prefill / p:>10.2f}x" if p else f"{'':>9} | {'':>11}"
            rate = f"{d:>12.1f} | {d / ref_decode:>10.2f}x" if d else f"{'':>12} | {'':>11}"
            print(f"{name:>6} | {len(ids):>6} | {mode:>9} | {time_} | {rate}")
        agreed = agreement(compiled, default, ids, decode_tokens)
        print(f"{'':>6}   compiled decode's teacher-forced top-1 agreement with the default's answer: {agreed:.3f}")
        sys.stdout.flush()

    bandwidth, flops = hardware(args.threads)
    config = default.config
    params = sum(p.numel() for p in default.model.model.layers.parameters())
    head = config.vocab_size * config.hidden_size
    print(f"\nhardware, measured: memory {bandwidth / 1e9:.1f} GB/s, matrix products {flops / 1e9:.0f} GFLOP/s")
    for label, layer_bytes, head_bytes in (
        ("fp32 weights", 4.0, 4.0),
        ("bf16 weights", 2.0, 2.0),
        ("4-bit layers, the head as two 4-bit planes (the default's decode)", 20 / 32, 40 / 32),
        ("Q4_1 layers, Q8_0 head (llama.cpp)", 20 / 32, 34 / 32),
    ):
        step = params * layer_bytes + head * head_bytes
        print(f"  decode bound, {label}: {step / 1e6:.0f} MB a step -> {bandwidth / step:.0f} tokens/s")
    token = 2 * params  # the layers' matrix products; attention scores and the one head product of a prompt aside
    print(f"  prefill bound: {token / 1e6:.0f} MFLOP a token -> {flops / token:.0f} tokens/s")


if __name__ == "__main__":
    main()
