"""Does a skip profile learned on one corpus transfer to another? (the paper's Table 1, on our corpora)

The full model answers questions from three corpora (SQuAD v2 paragraphs, Paul Graham essay chunks, HotpotQA
distractor paragraphs; about 1k tokens each) with every sublayer probed in prefill and at every decoded
token. Printed:

  prefill: for two profiles A and B, the hit rate |top-k(A) & top-k(B)| / k of the k attention (and FFN)
           sublayers with the highest mean IO similarity, k = 4, 6, 10; the two halves of one corpus are the
           within-corpus reference.
  decode:  per answer, the hit rate of the FFNs ranked highest over the first W decoded tokens (W = 10, 20,
           40) against those a full decode pass of all the tokens ranks highest.

    python benchmarks/bench_transfer.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch
from bench_data import Item, essay_chunks, items

from adaskip_rag import AdaSkipEngine, Sublayer
from adaskip_rag.corpora import rag_messages
from adaskip_rag.profiles import Profile

KS = (4, 6, 10)
WINDOWS = (10, 20, 40)


def top(means: dict[Sublayer, float], kind: str, k: int) -> set[int]:
    ranked = sorted((s for s in means if s.kind == kind), key=lambda s: means[s], reverse=True)
    return {s.layer for s in ranked[:k]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8, help="per corpus")
    parser.add_argument("--tokens", type=int, default=1000, help="context length")
    parser.add_argument("--decode", type=int, default=64, help="tokens of the full decode pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 questions per corpus, 48 decoded tokens")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.decode = 4, 48
    torch.set_num_threads(args.threads)
    engine = AdaSkipEngine.from_pretrained("default")
    tok = engine.tokenizer
    corpora: dict[str, list[Item]] = {
        "squad": items("squad", args.tokens, args.questions, tok),
        "paul-graham": essay_chunks(args.questions, args.tokens, tok),
        "hotpotqa": items("hotpotqa", args.tokens, args.questions, tok),
    }
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"model: {engine.name}, {engine.model.dtype}, "
        f"{args.threads} threads; {args.questions} questions per corpus at about "
        f"{args.tokens} tokens; full decode pass of {args.decode} tokens\n"
    )

    profiles: dict[str, Profile] = {}
    window_hits: dict[tuple[int, int], list[float]] = {(w, k): [] for w in WINDOWS for k in KS}
    for name, corpus in corpora.items():
        halves = [Profile(engine.fingerprint, f"{name} {h}", engine.num_layers) for h in ("a", "b")]
        for i, item in enumerate(corpus):
            result = engine.generate(
                rag_messages(item.document, item.question), max_new_tokens=args.decode, ignore_eos=True, probe=True
            )
            delta = Profile.from_probes(
                engine.fingerprint, name, engine.num_layers, result.prefill_probes, result.stats.prompt_tokens
            )
            halves[i % 2] = halves[i % 2].merge(delta)
            steps = result.decode_probes
            full = {s: statistics.fmean(p[s].similarity for p in steps) for s in steps[0] if s.kind == "ffn"}
            for w, k in window_hits:
                window = {s: statistics.fmean(p[s].similarity for p in steps[:w]) for s in full}
                window_hits[(w, k)].append(len(top(window, "ffn", k) & top(full, "ffn", k)) / k)
            print(f"  {name}: {i + 1}/{len(corpus)}", file=sys.stderr)
        profiles[f"{name} (half a)"], profiles[f"{name} (half b)"] = halves
        profiles[name] = halves[0].merge(halves[1])

    pairs = [(f"{c} (half a)", f"{c} (half b)") for c in corpora] + list(itertools.combinations(corpora, 2))
    header = f"{'profile A':<20} {'profile B':<20} | " + " | ".join(
        f"{kind:<4} k={k:<2}" for kind in ("attn", "FFN") for k in KS
    )
    print("Prefill: hit rate of the top-k sublayers (|A & B| / k)")
    print(header)
    print("-" * len(header))
    for a, b in pairs:
        ma, mb = profiles[a].mean(), profiles[b].mean()
        cells = [len(top(ma, kind, k) & top(mb, kind, k)) / k for kind in ("attn", "ffn") for k in KS]
        print(f"{a:<20} {b:<20} | " + " | ".join(f"{c:>9.2f}" for c in cells))

    print(
        f"\nDecode: hit rate of the top-k FFNs over the first W tokens vs over all {args.decode} "
        f"(mean over {len(window_hits[(WINDOWS[0], KS[0])])} answers)"
    )
    print(f"{'window':<8} | " + " | ".join(f"k={k:<3}" for k in KS))
    for w in WINDOWS:
        print(f"W={w:<6} | " + " | ".join(f"{statistics.fmean(window_hits[(w, k)]):>5.2f}" for k in KS))


if __name__ == "__main__":
    main()
