"""Engine speed at the scale people serve RAG with: models shaped like Llama-3.1-8B and Qwen2.5-7B, random
weights (speed does not depend on them), bf16 on CUDA with sdpa attention.

For each shape and prompt length n it prints, as medians of interleaved repeats after a warm-up:
  engine with an empty plan vs ``model.generate``: prefill time ratio and decode tokens/s ratio;
  probes on vs off: prefill overhead (a full prefill, which also records compensation moments);
  plans skipping 8, 12 and 16 sublayers, attention only (the paper's skip: no KV cache) and pooled (half
  attention, half FFN): measured prefill and decode speedups against their FLOP bounds.
and then the issue's targets, met or missed.

    python benchmarks/bench_gpu.py [--lengths 4096 8192 16384 32768] [--repeats 5]
    python benchmarks/bench_gpu.py --device cpu      # small shapes (hidden size / 16), n = 256 and 512
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from adaskip_rag import AdaSkipEngine, SkipPlan
from adaskip_rag.loading import default_model_path

DECODE_TOKENS = 32
BUDGETS = (8, 12, 16)
SHAPES: dict[str, tuple[type, type, dict]] = {
    "Llama-3.1-8B": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            rope_theta=500000.0,
        ),
    ),
    "Qwen2.5-7B": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_theta=1000000.0,
        ),
    ),
}


def build(shape: str, small: bool, device: torch.device, dtype: torch.dtype, window: int) -> PreTrainedModel:
    """A model of ``shape`` with random weights; ``small`` divides the widths by 16 (layers and heads per KV head
    kept), so the CPU can run it."""
    config_cls, model_cls, dims = SHAPES[shape]
    dims = dict(dims, max_position_embeddings=window, tie_word_embeddings=False)
    if small:
        heads = dims["num_attention_heads"] // dims["num_key_value_heads"]
        dims.update(
            hidden_size=dims["hidden_size"] // 16,
            intermediate_size=dims["intermediate_size"] // 16,
            num_attention_heads=heads,
            num_key_value_heads=1,
            vocab_size=dims["vocab_size"] // 16,
        )
    config = config_cls(**dims, attn_implementation="sdpa", dtype=dtype)
    with torch.device(device):
        model = model_cls(config).to(dtype)
    return model.eval()


def plans(layers: int) -> dict[str, SkipPlan]:
    """Plans skipping 8, 12 and 16 sublayers: attention only, and pooled (half attention, half FFN). Which
    sublayers does not change the speed; these are spread over the upper layers, where the paper's skips fall."""
    out = {}
    for k in BUDGETS:
        attn = [layers - 1 - 2 * i for i in range(k)] if k <= layers // 2 else list(range(layers - k, layers))
        out[f"attn-{k}"] = SkipPlan(attn=dict.fromkeys(sorted(attn), 1.0))
        half = k // 2
        out[f"pooled-{k}"] = SkipPlan(
            attn=dict.fromkeys(range(layers - half, layers), 1.0),
            ffn=dict.fromkeys(range(layers - k + half, layers), 1.0),
        )
    return out


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def measure(modes: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each mode, the modes interleaved in every repeat (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    for fn in modes.values():
        fn()
    for _ in range(repeats):
        for name, fn in modes.items():
            times[name].append(fn())
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_shape(engine: AdaSkipEngine, n: int, repeats: int, timed: Callable, report: list) -> None:
    model, device = engine.model, engine.device
    high = min(engine.tokenizer.vocab_size, engine.config.vocab_size)
    ids = torch.randint(100, high, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    prompt = torch.tensor([ids], device=device)
    skip_plans = plans(engine.num_layers)

    def hf(tokens: int) -> Callable[[], float]:
        kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return lambda: timed(lambda: model.generate(prompt, **kwargs))

    def ours(tokens: int, plan: SkipPlan | None = None, probe: bool = False) -> Callable[[], float]:
        return lambda: timed(lambda: engine.generate(ids, plan, max_new_tokens=tokens, ignore_eos=True, probe=probe))

    modes = {
        "hf_prefill": hf(1),
        "hf_total": hf(1 + DECODE_TOKENS),
        "prefill": ours(1),
        "total": ours(1 + DECODE_TOKENS),
        "probe_prefill": ours(1, probe=True),
    }
    for name, plan in skip_plans.items():
        modes[f"{name}_prefill"], modes[f"{name}_total"] = ours(1, plan), ours(1 + DECODE_TOKENS, plan)
    t = measure(modes, repeats)

    def decode(prefix: str) -> float:
        return t[f"{prefix}total"] - t[f"{prefix}prefill"]

    prefill_ratio, decode_ratio = t["prefill"] / t["hf_prefill"], decode("hf_") / decode("")
    probe = t["probe_prefill"] / t["prefill"] - 1
    print(f"  n = {n}: prefill engine/generate {prefill_ratio:.3f}, decode tok/s engine/generate {decode_ratio:.3f}")
    print(f"  probe overhead {probe:+.1%}")
    report.append((engine.name, "empty plan prefill within 3 % of generate", n, prefill_ratio <= 1.03, prefill_ratio))
    report.append(
        (engine.name, "empty plan decode tok/s within 3 % of generate", n, decode_ratio >= 0.97, decode_ratio)
    )
    report.append((engine.name, "probe overhead <= 5 %", n, probe <= 0.05, probe))
    print(
        f"  {'plan':>10} | {'prefill':>8} | {'bound':>6} | {'of bound':>8} | "
        f"{'decode':>7} | {'bound':>6} | {'of bound':>8}"
    )
    for name, plan in skip_plans.items():
        attn, ffn = len(plan.attn), len(plan.ffn)
        pre, dec = t["prefill"] / t[f"{name}_prefill"], decode("") / decode(f"{name}_")
        pre_bound = engine.costs.speedup(n, attn, ffn, "prefill")
        dec_bound = engine.costs.speedup(n + DECODE_TOKENS // 2, attn, ffn, "decode")
        print(
            f"  {name:>10} | {pre:>7.3f}x | {pre_bound:>5.2f}x | {pre / pre_bound:>8.2f} | "
            f"{dec:>6.3f}x | {dec_bound:>5.2f}x | {dec / dec_bound:>8.2f}"
        )
        report.append(
            (engine.name, f"{name} prefill >= 0.9 of its FLOP bound", n, pre / pre_bound >= 0.9, pre / pre_bound)
        )
        if name == "attn-16" and engine.name == "Llama-3.1-8B" and n == 8192:
            report.append((engine.name, "attn-16 prefill >= 1.09x (the paper, LLaMA3.1-8B)", n, pre >= 1.09, pre))
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    small = device.type == "cpu"
    dtype = getattr(torch, args.dtype or ("float32" if small else "bfloat16"))
    lengths = args.lengths or ([256, 512] if small else [4096, 8192, 16384, 32768])
    repeats = args.repeats or (3 if small else 5)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())  # ids only: random weights, any vocabulary

    print(f"command: {' '.join(sys.argv)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    print(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {dtype}, sdpa attention")
    print(f"medians of {repeats} interleaved repeats after a warm-up; decode over {DECODE_TOKENS} tokens\n")
    report: list[tuple[str, str, int, bool, float]] = []
    for shape in args.shapes:
        model = build(shape, small, device, dtype, max(lengths) + 2 * DECODE_TOKENS)
        engine = AdaSkipEngine(model, tokenizer, name=shape + (" (widths / 16)" if small else ""))
        print(f"{engine.name}: {engine.num_layers} layers, hidden {engine.config.hidden_size}")
        for n in lengths:
            bench_shape(engine, n, repeats, timer(device), report)
        del engine, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\ntargets:")
    for shape, target, n, met, value in report:
        print(f"  {'met   ' if met else 'MISSED'} {shape}, n = {n:>5}: {target} ({value:.3f})")


if __name__ == "__main__":
    main()
