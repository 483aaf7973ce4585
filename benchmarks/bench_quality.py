"""Quality vs speed of AdaSkip, its fidelity variants and the baselines, on long-context QA.

Settings: SQuAD v2 (answerable) and HotpotQA (distractor) questions, their gold passage placed among other
paragraphs up to about 2k and 4k tokens (and an easy setting, the SQuAD gold paragraph with a few others, about
1k tokens). Per setting a profile is learned from the full model on calibration questions disjoint from the
evaluation ones, and the quality guard picks its budget on them (target: 95 % teacher-forced agreement).

Configurations, each at budgets 4, 8, 12, 16 and 24 sublayers (cumulative: each adds one thing to the previous):

  paper       AdaSkip as published: scalar compensation s*x, no KV cache for skipped attention
  +bias       s*x + b
  +affine     per-channel a*x + b
  +kv         skipped attention keeps its KV cache (prefill-only skip; decode runs it)
  +tail       the last 64 prompt tokens run every sublayer
  +sink       so does the first token (the attention sink)
  +error      ranked by the residual error of the compensation instead of IO similarity
  tail 256    +sink with the last 256 prompt tokens protected (only with --configs)
  +evidence r +error, and the r % (5, 10, 20) of the other prompt tokens the tail attends to most recomputed
              through every sublayer before the tail runs (only with --configs)
  +error tail t  +error with the last t (128, 256) prompt tokens protected (only with --configs)
  default     AdaSkipPolicy()'s defaults: +sink with local attention in the attention sublayers ranked next after
              the skipped ones; "default +evidence r" adds evidence recompute, "default tail t" protects the last t
              (128, 256) prompt tokens (all only with --configs)

The configurations before "default" run no local attention. "served (default policy)" is a collection served as
users get it: an engine with the default policy warms up on the calibration questions through ``collection=``,
then answers the evaluation questions with the plan it learned (refreshes off); --served adds engines with other
policies over the same profile (other budgets, cost-aware ranking, other local attention counts and windows).
--probe-check also compares the skip set learned probing every 4th skip request (the default) with the one
probing every request (two engines, each with its own store).
and the baselines Early Exit, SkipDecode and Unified Skipping at 4 and 8 layers (8 and 16 sublayers;
--baseline-layers), the guarded budget (default configuration) and the full model. Per mode:

  F1          token F1 of its greedy answer against the gold answers (SQuAD normalisation)
  agreement   teacher-forced along the full model's answer: share of tokens whose top-1 is the full model's
  first       the first answer token agrees;   identical: the greedy answer is the full model's
  KL          KL(full || mode) of the next-token distribution at the last prompt position
  prefill     measured prefill speedup over the full model (median over questions; modes interleaved). Each
              mode prefills once (its teacher forcing runs on a copy of its generation's cache); the full
              model's time is the faster of two prefills, so the ratios lean conservative
  e2e         measured end-to-end speedup for an answer as long as the full model's (prefill + that many
              tokens at the mode's measured decode rate)

Prints a table per setting and a frontier summary (agreement / KL / prefill speedup per configuration and
budget), and writes a plot: agreement and KL vs measured prefill speedup, one line per configuration.

    python benchmarks/bench_quality.py [--quick] [--threads 2] [--plot quality_vs_speed.png] [--questions 8]
        [--max-new-tokens 24] [--configs ...] [--budgets ...] [--baseline-layers 4 8] [--guard-budget 24]
        [--guard-passes 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import statistics
import string
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from bench_data import Item, items

from adaskip_rag import AdaSkipEngine
from adaskip_rag.corpora import rag_messages
from adaskip_rag.policies import AdaSkipPolicy, SkipDecode, early_exit, unified_skipping
from adaskip_rag.profiles import Profile
from adaskip_rag.skipping import PlanSchedule, SkipPlan, StaticSchedule
from adaskip_rag.stores import SQLiteProfileStore

SETTINGS = {  # name: (dataset, context tokens)
    "easy squad 1k": ("squad", 1000),
    "squad 2k": ("squad", 2000),
    "hotpotqa 2k": ("hotpotqa", 2000),
    "squad 4k": ("squad", 4000),
    "hotpotqa 4k": ("hotpotqa", 4000),
}
DEFAULT_SETTINGS = ("hotpotqa 4k", "squad 4k", "hotpotqa 2k", "squad 2k")
QUICK_SETTINGS = ("hotpotqa 2k",)
GUARD_TARGET = 0.95
SERVED: dict[str, dict] = {  # a collection served through ``collection=``, with these changes to the default policy
    "served (default policy)": {},
    "served budget 10": {"budget": 10},
    "served budget 12": {"budget": 12},
    "served cost-aware": {"cost_aware": True},
    "served cost-aware 12": {"cost_aware": True, "budget": 12},
    "served local 8": {"local_attention": 8},
    "served local 12": {"local_attention": 12},
    "served local 16": {"local_attention": 16},
    "served budget 4 local 16": {"budget": 4, "local_attention": 16},
    "served local 16 window 128": {"local_window": 128},
    "served budget 2 local 16": {"budget": 2, "local_attention": 16},
    "served budget 2 local 24": {"budget": 2, "local_attention": 24},
    "served budget 4 local 24": {"budget": 4, "local_attention": 24},
    "served budget 4 local 24 window 512": {"budget": 4, "local_attention": 24, "local_window": 512},
}
PAPER = dict(compensation="scalar", keep_kv=False, tail=0, head=0, local_attention=0)
SINK = dict(compensation="affine", keep_kv=True, tail=64, head=1, local_attention=0)
CONFIGS: dict[str, dict] = {  # cumulative, without local attention but in "default" and its variants
    "paper": PAPER,
    "+bias": {**PAPER, "compensation": "bias"},
    "+affine": {**PAPER, "compensation": "affine"},
    "+kv": {**PAPER, "compensation": "affine", "keep_kv": True},
    "+tail": {**SINK, "head": 0},
    "+sink": SINK,
    "+error": {**SINK, "rank_by": "error"},
    "tail 256": {**SINK, "tail": 256},
    "default": {},
}
ERROR = CONFIGS["+error"]
for _r in (5, 10, 20):  # question-aware evidence recompute of r % of the body, over +error and over the default
    CONFIGS[f"+evidence {_r}"] = {**ERROR, "recompute": _r / 100}
    CONFIGS[f"default +evidence {_r}"] = {"recompute": _r / 100}
for _t in (128, 256):
    CONFIGS[f"+error tail {_t}"] = {**ERROR, "tail": _t}
    CONFIGS[f"default tail {_t}"] = {"tail": _t}
DEFAULT_CONFIGS = ("paper", "+bias", "+affine", "+kv", "+tail", "+sink", "+error")
BUDGETS = (4, 8, 12, 16, 24)


def normalize(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1(prediction: str, answers: list[str]) -> float:
    def one(gold: str) -> float:
        pred, ref = normalize(prediction), normalize(gold)
        common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
        if not common:
            return 0.0
        precision, recall = common / len(pred), common / len(ref)
        return 2 * precision * recall / (precision + recall)

    return max(one(a) for a in answers)


def guarded_budget(
    engine: AdaSkipEngine, calibration: list[Item], tmp: str, start: int, target: float, passes: int
) -> tuple[int, str]:
    """The budget the quality guard serves (default configuration) after ``passes`` passes over the
    ``calibration`` questions, each a refresh that scores the plan it serves (windows of 3 refreshes), starting
    from ``start``, for the quality ``target``."""
    policy = AdaSkipPolicy(budget=start, warmup=0, refresh_every=1, quality_target=target, guard_step=2, guard_window=3)
    guard = AdaSkipEngine(
        engine.model,
        engine.tokenizer,
        engine.name,
        policy=policy,
        store=SQLiteProfileStore(Path(tmp) / f"guard-{len(calibration)}-{id(calibration)}.sqlite"),
    )
    trail = [policy.budget]
    for item in calibration * passes:
        guard.generate(rag_messages(item.document, item.question), collection="calibration", max_new_tokens=16)
        state = guard.learner.store.get(guard.fingerprint, "calibration").state
        trail.append(state.get("guard", {}).get("budget", trail[-1]))  # unchanged by a refresh that scored nothing
    reason = state.get("guard", {}).get("reason", "quality guard: no refresh scored")
    return trail[-1], f"budgets {' -> '.join(map(str, trail))}; {reason}"


def served_engines(
    engine: AdaSkipEngine, calibration: list[Item], collection: str, tmp: str, variants: list[str]
) -> dict[str, AdaSkipEngine]:
    """Engines with the policies of ``variants`` (of :data:`SERVED`) over one profile store, where the first has
    served the ``calibration`` questions for ``collection`` (its warm-up: the full model, learning; no shipped
    profile to start from): their later requests are skip requests with the collection's learned plan, as users
    get them (no refreshes, to compare like with like)."""
    os.environ["ADASKIP_PROFILES"] = tmp  # no shipped profile: the collection learns from its own queries only
    store = SQLiteProfileStore(Path(tmp) / f"served-{collection}.sqlite")
    served = {
        name: AdaSkipEngine(
            engine.model,
            engine.tokenizer,
            engine.name,
            policy=AdaSkipPolicy(warmup=len(calibration), refresh_every=0, **SERVED[name]),
            store=store,
        )
        for name in variants
    }
    for item in calibration:
        first = served[variants[0]]
        first.generate(rag_messages(item.document, item.question), collection=collection, max_new_tokens=1)
    return served


def probe_sampling_check(
    engine: AdaSkipEngine, calibration: list[Item], evaluation: list[Item], collection: str, tmp: str
) -> str:
    """Whether probing a sample of skip requests (the default, every 4th) learns the skip set that probing every
    one does: two engines, each with its own store, warm up on ``calibration`` and serve ``evaluation``; then
    each plans a prompt of the evaluation's mean length."""
    learned = {}
    for every in (4, 1):
        served = AdaSkipEngine(
            engine.model,
            engine.tokenizer,
            engine.name,
            policy=AdaSkipPolicy(warmup=len(calibration), refresh_every=0, probe_every=every),
            store=SQLiteProfileStore(Path(tmp) / f"probe-{every}-{collection}.sqlite"),
        )
        for item in calibration + evaluation:
            served.generate(rag_messages(item.document, item.question), collection=collection, max_new_tokens=1)
        n = round(statistics.mean(len(engine.encode(rag_messages(i.document, i.question))) for i in evaluation))
        plan = served.learner.decide(collection, n).plan
        learned[every] = sorted(plan.prefill_attn | plan.attn), sorted(plan.ffn)
    same = "the same as" if learned[4] == learned[1] else "different from"
    return (
        f"probe sampling ({len(calibration)} warm-up and {len(evaluation)} skip requests): the skip set learned "
        f"probing every 4th skip request is {same} probing every one's: attention, FFN {learned[4]} vs {learned[1]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(DEFAULT_SETTINGS))
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(DEFAULT_CONFIGS))
    parser.add_argument(
        "--baseline-layers",
        nargs="*",
        type=int,
        default=[4, 8],
        help="layer counts of the baselines (Early Exit, SkipDecode, Unified Skipping)",
    )
    parser.add_argument(
        "--guard-budget", type=int, default=24, help="the budget the quality guard starts from (0: no guard)"
    )
    parser.add_argument(
        "--guard-passes", type=int, default=2, help="passes over the calibration questions the guard refreshes on"
    )
    parser.add_argument(
        "--guard-target", type=float, default=GUARD_TARGET, help="the quality guard's teacher-forced agreement target"
    )
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    parser.add_argument(
        "--probe-check", action="store_true", help="also compare the skip sets probe sampling and full probing learn"
    )
    parser.add_argument(
        "--served", nargs="+", choices=list(SERVED), default=list(SERVED)[:1], help="collections served with policies"
    )
    parser.add_argument("--calibration", type=int, default=8, help="questions per setting the profile is learned from")
    parser.add_argument("--questions", type=int, default=8, help="evaluation questions per setting")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=Path("quality_vs_speed.png"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"settings {', '.join(QUICK_SETTINGS)}; 4 calibration and 2 evaluation questions each, budgets 8 and 16",
    )
    args = parser.parse_args()
    if args.quick:
        args.settings, args.calibration, args.questions, args.budgets = list(QUICK_SETTINGS), 4, 2, [8, 16]
    torch.set_num_threads(args.threads)
    engine = AdaSkipEngine.from_pretrained("default")
    L = engine.num_layers
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"model: {engine.name}, {engine.model.dtype}, "
        f"{args.threads} threads; per setting {args.calibration} calibration and "
        f"{args.questions} evaluation questions; greedy answers of up to {args.max_new_tokens} tokens\n"
    )

    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            dataset, tokens = SETTINGS[setting]
            calibration = items(dataset, tokens, args.calibration, engine.tokenizer, offset=1000, seed=1)
            evaluation = items(dataset, tokens, args.questions, engine.tokenizer)
            profile = Profile(engine.fingerprint, setting, L)
            for item in calibration:
                r = engine.generate(rag_messages(item.document, item.question), max_new_tokens=1, probe=True)
                profile = profile.merge(
                    Profile.from_probes(engine.fingerprint, setting, L, r.prefill_probes, r.stats.prompt_tokens)
                )
            guard_budget, guard_reason = (
                guarded_budget(engine, calibration, tmp, args.guard_budget, args.guard_target, args.guard_passes)
                if args.guard_budget
                else (0, "quality guard: not run")
            )

            def adaskip(budget: int, profile: Profile = profile, **policy) -> Callable[[int], PlanSchedule]:
                p = AdaSkipPolicy(budget=budget, **policy)
                return lambda n: p.schedule(profile, n, engine.costs, budget)

            served = served_engines(engine, calibration, setting, tmp, args.served)
            modes: dict[str, Callable[[int], PlanSchedule]] = {"full": lambda n: StaticSchedule(SkipPlan())}
            for config in args.configs:
                for budget in args.budgets:
                    modes[f"{config} {budget}"] = adaskip(budget, **CONFIGS[config])
            for name in served:
                modes[name] = modes["full"]  # served by ``served[name]`` for the collection
            if args.guard_budget:
                modes[f"guarded (budget {guard_budget})"] = adaskip(guard_budget)
            for k in args.baseline_layers:
                modes[f"Early Exit {k}L"] = lambda n, k=k: early_exit(L, k)
                modes[f"SkipDecode {k}L"] = lambda n, k=k: SkipDecode(L, k, args.max_new_tokens)
                modes[f"Unified {k}L"] = lambda n, k=k: unified_skipping(L, k)

            metrics: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
            for q, item in enumerate(evaluation):
                messages = rag_messages(item.document, item.question)
                prompt = engine.encode(messages)
                full = engine.generate(prompt, max_new_tokens=args.max_new_tokens)
                full_logits, again = engine.teacher_forced(prompt, full.token_ids, SkipPlan())
                reference = full_logits[0].log_softmax(-1)
                full_prefill = min(full.stats.prefill_seconds, again)  # the less disturbed of two full prefills
                for name, make in modes.items():
                    # one prefill per mode: the greedy answer and the teacher forcing along the full answer
                    how = {"collection": setting} if name in served else {"plan": make(len(prompt))}
                    out = (
                        full
                        if name == "full"
                        else served.get(name, engine).generate(
                            messages, max_new_tokens=args.max_new_tokens, teacher_forced_ids=full.token_ids, **how
                        )
                    )
                    logits = full_logits if name == "full" else out.teacher_forced_logits
                    agree = (logits.argmax(-1) == torch.tensor(full.token_ids)).float()
                    log_mode = logits[0].log_softmax(-1)
                    m = metrics[name]
                    m["f1"].append(f1(out.text, item.answers))
                    m["agreement"].append(agree.mean().item())
                    m["first"].append(agree[0].item())
                    m["identical"].append(float(out.token_ids == full.token_ids))
                    m["kl"].append((reference.exp() * (reference - log_mode)).sum().item())
                    # end to end is for the full answer's length, whatever length the mode's had
                    prefill = full_prefill if name == "full" else out.stats.prefill_seconds
                    per_token = out.stats.decode_seconds / max(1, out.stats.generated_tokens - 1)
                    m["prefill"].append(full_prefill / prefill)
                    m["e2e"].append(
                        (full_prefill + full.stats.decode_seconds)
                        / (prefill + per_token * max(0, len(full.token_ids) - 1))
                    )
                    m["skipped"].append(out.stats.skipped_sublayers)
                    m["tokens"].append(len(prompt))
                print(f"  {setting}: {q + 1}/{len(evaluation)} questions ({len(prompt)} tokens)", file=sys.stderr)
            results[setting] = metrics
            print_table(setting, metrics, guard_reason)
            print_frontier(metrics, args.configs, args.budgets)
            if args.probe_check:
                print(probe_sampling_check(engine, calibration, evaluation, setting, tmp))
    plot(results, args.plot)
    print(f"plot: {args.plot}")


def bootstrap(
    values: list[float], statistic: Callable[[list[float]], float], level: float = 0.9
) -> tuple[float, float, float]:
    """``statistic`` of ``values`` and the bounds of its bootstrap ``level`` interval over the questions (2,000
    resamples)."""
    rng, rounds = random.Random(0), 2000
    resampled = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(rounds))
    return statistic(values), resampled[int((1 - level) / 2 * rounds)], resampled[int((1 + level) / 2 * rounds) - 1]


def interval(values: list[float], statistic: Callable[[list[float]], float], level: float = 0.9) -> str:
    """``statistic`` of ``values`` with its bootstrap ``level`` interval, as text."""
    value, low, high = bootstrap(values, statistic, level)
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


def print_table(setting: str, metrics: dict[str, dict[str, list[float]]], guard_reason: str) -> None:
    mean_tokens = statistics.fmean(metrics["full"]["tokens"])
    print(f"{setting} (mean {mean_tokens:.0f} prompt tokens); {guard_reason}")
    print("agreement: mean [90 % bootstrap interval]; prefill, e2e: median speedup [90 % interval]")
    header = (
        f"{'mode':<22} | {'skips':>5} | {'F1':>5} | {'agreement':>19} | {'first':>5} | {'identical':>9} | "
        f"{'KL':>7} | {'prefill':>19} | {'e2e':>19}"
    )
    print(header)
    print("-" * len(header))
    for name, m in metrics.items():
        mean = lambda key, m=m: statistics.fmean(m[key])
        print(
            f"{name:<22} | {mean('skipped'):>5.1f} | {mean('f1'):>5.2f} | "
            f"{interval(m['agreement'], statistics.fmean):>19} | {mean('first'):>5.2f} | {mean('identical'):>9.2f} | "
            f"{mean('kl'):>7.3f} | {interval(m['prefill'], statistics.median):>19} | "
            f"{interval(m['e2e'], statistics.median):>19}"
        )
    print()


def print_frontier(metrics: dict[str, dict[str, list[float]]], configs: list[str], budgets: list[int]) -> None:
    """Per configuration and budget: agreement, KL and measured prefill speedup, with 90 % intervals."""
    print(f"{'frontier':<15} | {'budget':>6} | {'agreement':>19} | {'KL':>6} | {'prefill speedup':>19}")
    for config in configs:
        for b in budgets:
            m = metrics[f"{config} {b}"]
            print(
                f"{config:<15} | {b:>6} | {interval(m['agreement'], statistics.fmean):>19} | "
                f"{statistics.fmean(m['kl']):>6.3f} | {interval(m['prefill'], statistics.median):>19}"
            )
    print()


def plot(results: dict[str, dict[str, dict[str, list[float]]]], out: Path) -> None:
    """Agreement and KL vs measured prefill speedup per setting, with their 90 % bootstrap intervals as error bars:
    a line per configuration over its budgets, the other modes as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 8), squeeze=False)
    for col, (setting, metrics) in enumerate(results.items()):
        for row, key in enumerate(("agreement", "kl")):
            ax = axes[row][col]
            lines: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
            for name, m in metrics.items():
                x, x_low, x_high = bootstrap(m["prefill"], statistics.median)
                y, y_low, y_high = bootstrap(m[key], statistics.fmean)
                config, _, budget = name.rpartition(" ")
                lined = config in CONFIGS and budget.isdigit()
                ax.errorbar(
                    x,
                    y,
                    xerr=[[x - x_low], [x_high - x]],
                    yerr=[[y - y_low], [y_high - y]],
                    fmt="none",
                    ecolor="grey",
                    elinewidth=0.6,
                    alpha=0.6,
                )
                if lined:
                    lines[config].append((x, y))
                else:
                    ax.scatter(x, y, marker="x" if name != "full" else "o", color="black")
                    ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            for config, points in lines.items():
                ax.plot(*zip(*sorted(points)), marker="o", label=config)
            ax.set_xlabel("measured prefill speedup (x)")
            ax.set_ylabel("teacher-forced agreement" if key == "agreement" else "KL(full || mode), first token")
            if key == "kl":
                ax.set_yscale("symlog", linthresh=0.01)
            ax.set_title(setting, fontsize=9)
            if lines:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
