"""Fidelity to the full model vs measured prefill speedup, for AdaSkip variants and the baselines.

A profile is learned from the full model's probes on calibration questions; disjoint evaluation questions
(SQuAD v2 dev, each with its paragraph and the ones after it, about 1k tokens) are then answered by the full
model, and every mode is teacher-forced along the full model's greedy answer:

  agreement     share of answer tokens where the mode's top-1 equals the full model's token
  first token   the first answer token agrees
  identical     every token agrees, i.e. the mode's greedy answer is the full model's
  KL            KL(full || mode) of the next-token distribution at the last prompt position
  speedup       full prefill seconds / mode prefill seconds (median over questions, modes interleaved)

Modes at equal budgets: AdaSkip (robust scale, paper scale), cost-aware AdaSkip, Early Exit, SkipDecode and
Unified Skipping (k layers = 2k sublayers).

    python benchmarks/bench_fidelity.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable

import torch

from adaskip_rag import AdaSkipEngine
from adaskip_rag.corpora import rag_messages, squad_questions
from adaskip_rag.history import Profile
from adaskip_rag.policies import AdaSkipPolicy, SkipDecode, early_exit, unified_skipping
from adaskip_rag.skipping import PlanSchedule, SkipPlan, StaticSchedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=int, default=12, help="questions the profile is learned from")
    parser.add_argument("--questions", type=int, default=12, help="evaluation questions")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="6 calibration and 4 evaluation questions")
    args = parser.parse_args()
    if args.quick:
        args.calibration, args.questions = 6, 4
    torch.set_num_threads(args.threads)
    engine = AdaSkipEngine.from_pretrained("default")
    L = engine.num_layers
    pairs = squad_questions(args.calibration + args.questions)
    calibration, evaluation = pairs[: args.calibration], pairs[args.calibration :]

    profile = Profile(engine.fingerprint, "calibration", L)
    for document, question in calibration:
        result = engine.generate(rag_messages(document, question), max_new_tokens=1, probe=True)
        profile = profile.merge(
            Profile.from_probes(engine.fingerprint, "calibration", L, result.prefill_probes, result.stats.prompt_tokens)
        )

    def adaskip(budget: int, **policy) -> Callable[[int, int], PlanSchedule]:
        p = AdaSkipPolicy(budget=budget, **policy)
        return lambda n, tokens: p.schedule(profile, n, engine.costs, budget)

    modes = {"full": lambda n, tokens: StaticSchedule(SkipPlan())}
    for budget in (8, 16):
        modes[f"AdaSkip {budget}"] = adaskip(budget)
        modes[f"AdaSkip {budget} paper scale"] = adaskip(budget, robust_scale=False)
        modes[f"cost-aware {budget}"] = adaskip(budget, cost_aware=True)
    for k in (4, 8):
        modes[f"Early Exit {k}L"] = lambda n, tokens, k=k: early_exit(L, k)
        modes[f"SkipDecode {k}L"] = lambda n, tokens, k=k: SkipDecode(L, k, tokens)
        modes[f"Unified {k}L"] = lambda n, tokens, k=k: unified_skipping(L, k)

    print(f"command: {' '.join(sys.argv)}")
    print(f"model: {engine.name}, fp32, {args.threads} threads; profile from {len(calibration)} calibration questions "
          f"(mean {profile.mean_context:.0f} tokens); {len(evaluation)} evaluation questions; greedy answers of up "
          f"to {args.max_new_tokens} tokens\n")
    metrics: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for document, question in evaluation:
        prompt = engine.encode(rag_messages(document, question))
        answer = engine.generate(prompt, max_new_tokens=args.max_new_tokens).token_ids
        reference = None
        for name, make in modes.items():
            schedule = make(len(prompt), args.max_new_tokens)
            first_plan, _ = schedule.prefill()
            logits, prefill = engine.teacher_forced(prompt, answer, schedule)  # token by token, as decoding
            if reference is None:
                reference, full_prefill = logits, prefill
            agree = (logits.argmax(-1) == torch.tensor(answer)).float()
            log_full, log_mode = reference[0].log_softmax(-1), logits[0].log_softmax(-1)
            m = metrics[name]
            m["agreement"].append(agree.mean().item())
            m["first"].append(agree[0].item())
            m["identical"].append(float(agree.all()))
            m["kl"].append((log_full.exp() * (log_full - log_mode)).sum().item())
            m["speedup"].append(full_prefill / prefill)
            m["skipped"].append(len(first_plan.attn) + len(first_plan.ffn))
        print(f"  {len(metrics['full']['kl'])}/{len(evaluation)} questions done ({len(prompt)} tokens)", file=sys.stderr)

    header = (f"{'mode':<26} | {'prefill skips':>13} | {'agreement':>9} | {'first tok':>9} | {'identical':>9} | "
              f"{'KL last pos':>11} | {'prefill speedup':>15}")
    print(header)
    print("-" * len(header))
    for name, m in metrics.items():
        mean = lambda key: sum(m[key]) / len(m[key])  # noqa: E731
        print(f"{name:<26} | {mean('skipped'):>13.1f} | {mean('agreement'):>9.3f} | {mean('first'):>9.2f} | "
              f"{mean('identical'):>9.2f} | {mean('kl'):>11.4f} | {statistics.median(m['speedup']):>14.2f}x")


if __name__ == "__main__":
    main()
