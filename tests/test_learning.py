"""AdaSkip learning: ranking, warm-up, online decode skips, baselines, refresh, cold start, quality guard."""

import dataclasses
import json
import math
import sqlite3

import pytest
import torch
from conftest import tiny_model

from adaskip_rag import AdaSkipEngine, CostModel, SkipPlan, Sublayer, loading
from adaskip_rag.compensation import fit
from adaskip_rag.learning import Learner, _skip_set
from adaskip_rag.policies import (
    AdaSkipPolicy,
    OnlineSchedule,
    SkipDecode,
    budget_count,
    early_exit,
    rank,
    unified_skipping,
)
from adaskip_rag.profiles import Profile
from adaskip_rag.skipping import Probe
from adaskip_rag.stats import SkipStats
from adaskip_rag.stores import SQLiteProfileStore

QUESTIONS = [
    "Context: the river Rhine flows into the North Sea. Question: where does the Rhine flow?",
    "Context: oxygen has atomic number eight. Question: what is the atomic number of oxygen?",
    "Context: Fresno is a city in California. Question: which state is Fresno in?",
]


PAPER = dict(compensation="scalar", keep_kv=False, tail=0, head=0)  # the paper's plan: scales, no KV cache, no tail


def known_profile() -> Profile:
    """3 layers; means: attn sim .90 .99 .95, ffn sim .80 .97 .60; every sublayer seen twice but ffn 2 once."""
    p = Profile("m", "c", 3, queries=2)
    sims = {"attn": [0.90, 0.99, 0.95], "ffn": [0.80, 0.97, 0.60]}
    for kind in ("attn", "ffn"):
        p.counts[kind] = [2, 2, 1] if kind == "ffn" else [2, 2, 2]
        p.sums[f"{kind}.similarity"] = [s * c for s, c in zip(sims[kind], p.counts[kind])]
        p.sums[f"{kind}.scale"] = [1.5 * c for c in p.counts[kind]]
        p.sums[f"{kind}.scale_no_sink"] = [(1.0 + i / 10) * c for i, c in enumerate(p.counts[kind])]
    return p


def test_ranking_and_scales_equal_hand_computation():
    profile = known_profile()
    costs = CostModel(hidden=8, ffn_hidden=16, kv_ratio=1.0, vocab=10, layers=3)
    plan = AdaSkipPolicy(budget=3, **PAPER).prefill_plan(profile, 100, costs, 3)
    # pooled ranking by mean similarity: attn1 .99, ffn1 .97, attn2 .95
    assert plan.attn == pytest.approx({1: 1.1, 2: 1.2}) and plan.ffn == pytest.approx({1: 1.1})
    paper = AdaSkipPolicy(budget=3, robust_scale=False, **PAPER).prefill_plan(profile, 100, costs, 3)
    assert paper.attn == pytest.approx({1: 1.5, 2: 1.5}) and paper.ffn == pytest.approx({1: 1.5})
    assert AdaSkipPolicy.beta(profile, 3) == pytest.approx(0.95)
    assert AdaSkipPolicy.beta(profile, 7) == math.inf


def test_prompts_too_short_for_the_plan_to_pay_run_in_full():
    costs = CostModel(hidden=8, ffn_hidden=16, kv_ratio=1.0, vocab=10, layers=3)
    policy = AdaSkipPolicy(budget=2, tail=4, head=1, min_gain=1.2)  # skips attn 1 (keeping K/V) and ffn 1

    def by_hand(n: int) -> float:  # FLOPs per token: attention 512 + 16 n (K/V 256 of it), FFN 768
        full = 3 * (512 + 16 * n) + 3 * 768
        body = 2 * (512 + 16 * n) + 256 + 2 * 768
        tail = 3 * (512 + 32 * n) + 3 * 768  # a tail token sees all n keys
        return full * n / (body * (n - 5) + tail * 4 + full * 1)

    assert by_hand(16) < 1.2 < by_hand(32)  # 1.176 and 1.258
    for n in (16, 32):
        plan = policy.prefill_plan(known_profile(), n, costs, 2)
        assert costs.prefill_speedup(plan, n, 4) == pytest.approx(by_hand(n) if n == 32 else 1.0)
    assert policy.prefill_plan(known_profile(), 16, costs, 2).is_empty
    assert set(policy.prefill_plan(known_profile(), 32, costs, 2).prefill_attn) == {1}
    assert not dataclasses.replace(policy, min_gain=0).prefill_plan(known_profile(), 16, costs, 2).is_empty
    with pytest.raises(ValueError, match="min_gain"):
        AdaSkipPolicy(min_gain=-0.5)


def test_cost_aware_ranking_prefers_expensive_sublayers_per_unit_of_importance():
    costs = CostModel(hidden=64, ffn_hidden=128, kv_ratio=0.5, vocab=100, layers=2)
    sims = {Sublayer("ffn", 0): 0.97, Sublayer("attn", 1): 0.96}
    assert rank(sims) == [Sublayer("ffn", 0), Sublayer("attn", 1)]
    n = 4096  # attention costs 4*64^2*1.5 + 2*4096*64 = 548,864 FLOPs, the FFN 49,152
    assert (1 - 0.96) / costs.attention(n) < (1 - 0.97) / costs.ffn()
    assert rank(sims, costs, n) == [Sublayer("attn", 1), Sublayer("ffn", 0)]
    assert rank(sims, costs, 1) == [Sublayer("ffn", 0), Sublayer("attn", 1)]  # at short contexts the FFN is dearer
    # at n = 352 skipping the attention saves 24,576 + 128 * 352 = 69,632 FLOPs, 8,192 less where it keeps K/V:
    # 0.04 / 69,632 < 0.03 / 49,152 < 0.04 / 61,440
    assert rank(sims, costs, 352) == [Sublayer("attn", 1), Sublayer("ffn", 0)]
    assert rank(sims, costs, 352, keep_kv=True) == [Sublayer("ffn", 0), Sublayer("attn", 1)]


def test_budget_counts_and_fractions():
    assert budget_count(8, 30) == 8 and budget_count(0.25, 30) == 15 and budget_count(0.0, 30) == 0
    for bad in (-1, 61, 1.5, -0.1, "8", float("nan"), True):
        with pytest.raises(ValueError, match="budget"):
            budget_count(bad, 30)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": -2}, "budget"),
        ({"budget": 1.0}, "budget"),
        ({"warmup": -1}, "warmup"),
        ({"window": 2.5}, "window"),
        ({"refresh_every": -3}, "refresh_every"),
        ({"quality_target": 1.5}, "quality_target"),
        ({"guard_step": 0}, "guard_step"),
    ],
)
def test_policy_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaSkipPolicy(**kwargs)


def test_online_decode_skips_follow_beta():
    plan = SkipPlan(attn={4: 1.0}, ffn={0: 1.0})
    schedule = OnlineSchedule(plan, beta=0.9, window=3)
    assert schedule.prefill() == (plan, True)
    window_probes = [
        {
            Sublayer("ffn", 1): Probe(0.95, 1.2, 1.2),
            Sublayer("ffn", 2): Probe(0.85, 2.0, 2.0),
            Sublayer("ffn", 3): Probe(0.92, 1.0, 1.0),
            Sublayer("attn", 2): Probe(0.999, 1.0, 1.0),
        },
        {
            Sublayer("ffn", 1): Probe(0.93, 1.4, 1.4),
            Sublayer("ffn", 2): Probe(0.97, 2.0, 2.0),
            Sublayer("ffn", 3): Probe(0.86, 1.0, 1.0),
        },
        {
            Sublayer("ffn", 1): Probe(0.91, 0.9, 0.9),
            Sublayer("ffn", 2): Probe(0.80, 2.0, 2.0),
            Sublayer("ffn", 3): Probe(0.93, 1.3, 1.3),
        },
    ]
    assert schedule.decode(0, None) == (plan, True)
    assert schedule.decode(1, window_probes[0]) == (plan, True)
    assert schedule.decode(2, window_probes[1]) == (plan, True)
    decode_plan, probe = schedule.decode(3, window_probes[2])
    # window means: ffn1 .93 (>= .9, scale 1.1667), ffn2 .873 (< .9), ffn3 .9033 (>= .9, scale 1.1)
    assert not probe
    assert decode_plan.decode_ffn == pytest.approx({1: 3.5 / 3, 3: 3.3 / 3})
    assert decode_plan.attn == plan.attn and decode_plan.ffn == plan.ffn
    assert schedule.decode(4, None) == (decode_plan, False)


@pytest.mark.parametrize(
    "k, ee, us",
    [
        (4, {26, 27, 28, 29}, {1, 8, 15, 22, 29}),
        (6, {24, 25, 26, 27, 28, 29}, {1, 6, 11, 16, 21, 26}),
        (8, set(range(22, 30)), {1, 4, 7, 10, 13, 16, 19, 22, 25, 28}),
    ],
)
def test_baselines_give_the_reference_layer_sets(k, ee, us):
    for schedule, layers in ((early_exit(30, k), ee), (unified_skipping(30, k), us)):
        plan, _ = schedule.prefill()
        assert set(plan.attn) == set(plan.ffn) == layers and set(plan.attn.values()) == {1.0}
    sd = SkipDecode(30, k, max_new_tokens=100)
    assert set(sd.prefill()[0].attn) == {1}
    # m(t) = ceil(t / 100 * (k - 1)) + 1, capped at k
    for step in (0, 9, 49, 99, 150):
        t = step + 1
        m = min(math.ceil(t / 100 * (k - 1)) + 1, k)
        plan, _ = sd.decode(step, None)
        assert set(plan.attn) == set(plan.ffn) == set(range(1, m + 1))


def learning_engine(tokenizer, tmp_path, **policy) -> AdaSkipEngine:
    store = SQLiteProfileStore(tmp_path / "profiles.sqlite")
    policy.setdefault("tail", 0)  # the test prompts are shorter than the default tail
    return AdaSkipEngine(tiny_model("llama"), tokenizer, name="tiny", policy=AdaSkipPolicy(**policy), store=store)


def test_switch_from_full_to_skipping_happens_exactly_at_warmup(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=3, warmup=3, window=0, refresh_every=0)
    modes = []
    for i in range(5):
        stats = engine.generate(QUESTIONS[i % 3], collection="docs", max_new_tokens=4).stats
        modes.append(stats.mode)
        assert stats.queries_seen == i + 1 and stats.collection == "docs"
        assert stats.warming_up == (i < 3)
        assert stats.skipped_sublayers == (0 if i < 3 else 3)
    assert modes == ["warmup"] * 3 + ["skip"] * 2
    profile = engine.learner.store.get(engine.fingerprint, "docs")
    assert profile.queries == 5
    # warm-up queries measured all 12 sublayers; of the skipping ones the 4th (probe_every = 4) the 9 that ran
    assert sum(profile.counts["attn"]) + sum(profile.counts["ffn"]) == 3 * 12 + 1 * 9


def test_online_decode_skips_in_the_engine(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=2, warmup=1, window=2, refresh_every=0, probe_every=1)
    engine.generate(QUESTIONS[0], collection="docs", max_new_tokens=2)
    profile = engine.learner.store.get(engine.fingerprint, "docs")
    beta = AdaSkipPolicy.beta(profile, 2)
    result = engine.generate(QUESTIONS[1], collection="docs", max_new_tokens=6, ignore_eos=True)
    assert len(result.decode_probes) == 2  # the window
    means = {
        layer: sum(p[Sublayer("ffn", layer)].similarity for p in result.decode_probes) / 2
        for layer in range(6)
        if Sublayer("ffn", layer) in result.decode_probes[0]
    }
    expected = sorted(set(result.stats.skipped_ffn_prefill) | {layer for layer, m in means.items() if m >= beta})
    assert result.stats.skipped_ffn_decode == expected


def test_two_collections_interleaved_keep_two_profiles(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=2, warmup=2, window=0, refresh_every=0)
    lengths = {"a": 0, "b": 0}
    for _ in range(4):
        for coll, question in (("a", QUESTIONS[0]), ("b", QUESTIONS[1] * 3)):
            lengths[coll] += engine.generate(question, collection=coll, max_new_tokens=2).stats.prompt_tokens
    store = engine.learner.store
    a, b = store.get(engine.fingerprint, "a"), store.get(engine.fingerprint, "b")
    assert a.queries == b.queries == 4
    assert a.context_tokens == lengths["a"] and b.context_tokens == lengths["b"]
    assert a.mean("similarity") != b.mean("similarity")
    assert store.global_profile(engine.fingerprint).queries == 8


def test_cold_start_uses_the_global_profile(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=2, warmup=2, window=0, refresh_every=0)
    for _ in range(2):
        engine.generate(QUESTIONS[0], collection="old", max_new_tokens=2)
    stats = engine.generate(QUESTIONS[1], collection="new", max_new_tokens=2).stats
    assert stats.mode == "skip" and stats.profile_source == "global" and stats.skipped_sublayers == 2


def test_cold_start_uses_the_shipped_profile_of_the_same_model_only(tokenizer, tmp_path, monkeypatch):
    engine = learning_engine(tokenizer, tmp_path, budget=2, warmup=2, window=0, refresh_every=0)
    profile = Profile(engine.fingerprint, "default-corpus", 6, queries=5)
    for kind in ("attn", "ffn"):
        profile.counts[kind] = [5] * 6
        profile.sums[f"{kind}.similarity"] = [5 * (0.9 if kind == "attn" and i in (2, 3) else 0.5) for i in range(6)]
        profile.sums[f"{kind}.scale"] = profile.sums[f"{kind}.scale_no_sink"] = [5.0] * 6
    monkeypatch.setenv("ADASKIP_PROFILES", str(tmp_path))
    (tmp_path / "tiny.json").write_text(json.dumps(profile.to_dict()))
    stats = engine.generate(QUESTIONS[0], collection="c", max_new_tokens=2).stats
    assert stats.profile_source == "shipped" and stats.skipped_attention == [2, 3]

    other = learning_engine(tokenizer, tmp_path / "other", budget=2, warmup=2, window=0, refresh_every=0)
    other.model.model.layers[0].mlp.down_proj.weight.data.mul_(1.01)  # different weights: another model
    with pytest.warns(UserWarning, match="written for model"):
        stats = other.generate(QUESTIONS[0], collection="c", max_new_tokens=2).stats
    assert stats.mode == "warmup" and stats.profile_source == "none"


def test_the_fingerprint_is_one_for_fp32_and_bf16_loads_and_another_for_other_weights():
    model = tiny_model("llama")
    bf16 = tiny_model("llama", dtype=torch.bfloat16)  # the same weights, rounded as a bf16 load rounds them
    assert loading.fingerprint(model) == loading.fingerprint(bf16)
    assert loading.legacy_fingerprint(model) != loading.legacy_fingerprint(bf16)  # the old one hashed them as loaded
    other = tiny_model("llama")
    other.model.layers[-1].mlp.down_proj.weight.data.mul_(1.01)
    assert loading.fingerprint(other) != loading.fingerprint(model)


def test_profiles_stored_under_the_legacy_fingerprint_move_to_the_new_one_once(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=2, warmup=2, window=0, refresh_every=0)
    for question, collection in ((QUESTIONS[0], "docs"), (QUESTIONS[1], "docs"), (QUESTIONS[2], "other")):
        engine.generate(question, collection=collection, max_new_tokens=2)  # warm-ups: sums, and moments
    new, old = engine.fingerprint, loading.legacy_fingerprint(engine.model)
    store = engine.learner.store
    other, model_sums = store.get(new, "other").to_dict(), store.global_profile(new)
    with sqlite3.connect(store.path) as db:  # as an earlier version stored them
        db.execute(
            "UPDATE profiles SET model = ?, data = json_set(data, '$.model', ?) WHERE model = ?", (old, old, new)
        )
    probes = {Sublayer(k, i): Probe(0.5, 1.0, 1.0) for k in ("attn", "ffn") for i in range(6)}
    store.add(Profile.from_probes(new, "docs", 6, probes, context_tokens=10))  # and the new id has a part already

    again = AdaSkipEngine(engine.model, tokenizer, name="tiny", policy=engine.policy, store=store)
    stats = again.generate(QUESTIONS[0], collection="docs", max_new_tokens=2).stats
    assert stats.mode == "skip" and stats.profile_source == "collection" and stats.queries_seen == 2 + 1 + 1
    assert store.profiles(old) == [] and store.global_profile(old) is None
    assert store.get(new, "other").to_dict() == other
    moved = store.global_profile(new)
    assert moved.queries == 3 + 1 + 1 and torch.equal(moved.moments, model_sums.moments)  # a skip adds no moments
    assert store.migrate(old, new) == 0  # nothing left to move


def test_profile_of_another_model_is_not_used(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=2, warmup=1, window=0, refresh_every=0)
    foreign = Profile("llama-6L-000000000000", "docs", 6, queries=50)
    for kind in ("attn", "ffn"):
        foreign.counts[kind] = [50] * 6
        foreign.sums[f"{kind}.similarity"] = [45.0] * 6
    engine.learner.store.add(foreign)
    stats = engine.generate(QUESTIONS[0], collection="docs", max_new_tokens=2).stats
    assert stats.mode == "warmup" and stats.queries_seen == 1


def test_refresh_measures_speedup_and_fidelity(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=4, warmup=2, window=0, refresh_every=4, probe_every=1)
    runs = [engine.generate(QUESTIONS[i % 3], collection="docs", max_new_tokens=6).stats for i in range(6)]
    assert [s.mode for s in runs] == ["warmup", "warmup", "skip", "refresh", "skip", "skip"]
    refresh = runs[3]
    assert refresh.skipped_sublayers == 0 and refresh.measured_in_this_request
    assert refresh.measured_prefill_speedup > 0 and 0 <= refresh.fidelity <= 1
    assert runs[4].measured_prefill_speedup == refresh.measured_prefill_speedup
    assert not runs[4].measured_in_this_request and runs[2].measured_prefill_speedup is None
    profile = engine.learner.store.get(engine.fingerprint, "docs")
    assert profile.counts["attn"] == [profile.queries - 2 * (i in runs[5].skipped_attention) for i in range(6)]


def test_stats_say_when_the_skip_set_changes(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=3, warmup=1, window=0, refresh_every=0)
    changed = [engine.generate(q, collection="docs", max_new_tokens=2).stats.skip_set_changed for q in QUESTIONS * 2]
    assert changed[0] is False  # the first request has nothing to compare with
    assert changed[1] is True  # warm-up (no skipping) -> the first learned skip set
    profile = engine.learner.store.get(engine.fingerprint, "docs")
    assert profile.state["skip_set"] and len(profile.state["skip_set"]) == 3


class FixedFidelity:
    """Test double of the fidelity and speed measurements of refresh requests (the full prefill takes 1 s)."""

    def __init__(self, learner: Learner):
        self.learner = learner
        assert self.serve(None) == "warmup"  # the collection's first query: nothing to plan from yet

    def serve(self, fidelity: float | None, skip_seconds: float = 0.8) -> str:
        decision = self.learner.decide("docs", 100)
        stats = SkipStats(100, 5, [], [], 0, 0, [], [], [], 1.0, 0.1, 0, 1.0, 1.0, "stop")
        self.learner.record(decision, stats, _all_probes(), fidelity=fidelity, skip_prefill_seconds=skip_seconds)
        return decision.mode

    def refresh(self, fidelity: float, skip_seconds: float = 0.8) -> int:
        assert self.serve(fidelity, skip_seconds) == "refresh"
        return self.learner.decide("docs", 100).budget


def _all_probes():
    return {Sublayer(k, i): Probe(0.9 + i / 100, 1.0, 1.0) for k in ("attn", "ffn") for i in range(6)}


def guarded(tmp_path, **policy) -> tuple[Learner, FixedFidelity]:
    policy = AdaSkipPolicy(warmup=1, window=0, refresh_every=1, quality_target=0.9, tail=0, **policy)
    learner = Learner("m", 6, CostModel(64, 128, 0.5, 100, 6), SQLiteProfileStore(tmp_path / "p.sqlite"), policy)
    return learner, FixedFidelity(learner)


def test_quality_guard_settles_on_the_largest_budget_whose_window_meets_the_target(tmp_path):
    learner, guard = guarded(tmp_path, budget=8, guard_step=2, guard_window=2)  # history: the last 8 refreshes
    assert learner.decide("docs", 100).budget == 8  # budgets not scored yet count as meeting the target
    assert guard.refresh(0.5) == 6
    assert guard.refresh(0.95) == 6
    assert [guard.refresh(0.95) for _ in range(7)] == [6] * 6 + [8]  # 8's miss has left the last 8 refreshes
    assert guard.refresh(0.88) == 6  # a window of one refresh
    assert guard.refresh(0.8) == 4  # 6's window: 0.95 and 0.8, on average 0.875 < 0.9
    reason = learner.decide("docs", 100).budget_reason
    assert reason.startswith("quality guard (target 0.9): lowered to 4; budget 8: agreement 0.880")
    assert "budget 6: agreement 0.875 (0.800-0.950), prefill 1.25x (1.250-1.250) over 2 refreshes" in reason
    assert guard.refresh(1.0) == 4  # never above a budget whose window misses the target


def test_quality_guard_climbs_back_one_step_at_a_time(tmp_path):
    learner, guard = guarded(tmp_path, budget=8, guard_step=2, guard_window=1)  # history: the last 4 refreshes
    assert [guard.refresh(0.5), guard.refresh(0.5)] == [6, 4]
    # 8's miss leaves the history first: the guard tries 6 again before it, never 8 straight from 4
    assert [guard.refresh(0.95) for _ in range(4)] == [4, 4, 4, 6]
    assert guard.refresh(0.95) == 8


def test_quality_guard_needs_a_measured_speedup_above_one(tmp_path):
    learner, guard = guarded(tmp_path, budget=4, guard_step=2, guard_window=2)
    assert guard.refresh(0.95, skip_seconds=1.1) == 2  # faithful, but slower than the full model
    assert guard.refresh(0.95, skip_seconds=0.9) == 2
    assert "budget 4: agreement 0.950 (0.950-0.950), prefill 0.91x" in learner.decide("docs", 100).budget_reason


def test_a_refresh_times_the_full_prefill_without_its_probes(tmp_path):
    learner, guard = guarded(tmp_path, budget=4, guard_step=2, guard_window=1)
    decision = learner.decide("docs", 100)
    assert decision.mode == "refresh"
    stats = SkipStats(100, 5, [], [], 0, 0, [], [], [], 1.0, 0.1, 0, 1.0, 1.0, "stop")
    probes = {sub: dataclasses.replace(p, seconds=0.2 / 12) for sub, p in _all_probes().items()}  # 0.2 s in all
    learned = learner.record(decision, stats, probes, fidelity=0.95, skip_prefill_seconds=0.75)
    assert learned.measured_prefill_speedup == pytest.approx(0.8 / 0.75)  # 1.0 s probed, 0.8 s unprobed
    learned = learner.record(learner.decide("docs", 100), stats, probes, fidelity=0.95, skip_prefill_seconds=0.85)
    assert learned.budget == 4 and learner.decide("docs", 100).budget == 2  # 0.8 / 0.85 < 1: not faster


def test_quality_guard_at_zero_scores_the_smallest_budget_and_can_rise_again(tmp_path):
    learner, guard = guarded(tmp_path, budget=7, guard_step=2, guard_window=2)  # budgets 7, 5, 3 and 1
    assert [guard.refresh(0.5) for _ in range(4)] == [5, 3, 1, 0]
    at_zero = learner.decide("docs", 100)
    skips = len(at_zero.plan.attn) + len(at_zero.plan.prefill_attn) + len(at_zero.plan.ffn)
    assert (at_zero.budget, at_zero.scored_budget, skips) == (0, 1, 1)  # serves budget 0, scores budget 1
    assert guard.refresh(0.5) == 0
    assert "kept at 0" in learner.decide("docs", 100).budget_reason
    assert guard.refresh(0.95) == 0  # budget 1's window: 0.5 and 0.95
    assert guard.refresh(0.95) == 1
    assert learner.store.get("m", "docs").state["measured"]["budget"] == 1  # measured for the plan scored


def test_policies_per_collection(tokenizer, tmp_path):
    engine = AdaSkipEngine(
        tiny_model("llama"),
        tokenizer,
        name="tiny",
        store=SQLiteProfileStore(tmp_path / "p.sqlite"),
        policy=AdaSkipPolicy(budget=2, warmup=1, window=0, refresh_every=0, tail=0),
        collection_policies={
            "fast": AdaSkipPolicy(budget=5, warmup=1, window=0, refresh_every=0, cost_aware=True, tail=0)
        },
    )
    for coll in ("docs", "fast"):
        engine.generate(QUESTIONS[0], collection=coll, max_new_tokens=2)
    profile = engine.learner.store.get(engine.fingerprint, "fast")
    docs = engine.generate(QUESTIONS[1], collection="docs", max_new_tokens=2).stats
    fast = engine.generate(QUESTIONS[1], collection="fast", max_new_tokens=2).stats
    assert docs.skipped_sublayers == 2 and fast.skipped_sublayers == 5
    expected = AdaSkipPolicy(budget=5, cost_aware=True, tail=0).prefill_plan(
        profile, fast.prompt_tokens, engine.costs, 5
    )
    assert fast.skipped_attention == sorted(expected.prefill_attn) and fast.skipped_ffn_prefill == sorted(expected.ffn)
    with pytest.raises(ValueError, match="between 0 and 12"):
        _ = AdaSkipEngine(tiny_model("llama"), tokenizer, policy=AdaSkipPolicy(budget=13)).learner


def test_long_prompts_get_the_long_budget(tokenizer, tmp_path):
    policy = AdaSkipPolicy(budget=8, long_budget=12, long_prompt=4096)
    assert [policy.budget_for(n, 30) for n in (1000, 2048, 3072, 4096, 8000)] == [8, 8, 10, 12, 12]
    assert AdaSkipPolicy(budget=0.1, long_budget=0.2, long_prompt=100).budget_for(75, 30) == 9  # 6 + (12 - 6) / 2
    assert AdaSkipPolicy(budget=8).budget_for(10**6, 30) == 8
    for bad, name in (({"long_budget": -1}, "budget"), ({"long_prompt": 1}, "long_prompt")):
        with pytest.raises(ValueError, match=name):
            AdaSkipPolicy(**bad)
    engine = learning_engine(
        tokenizer, tmp_path, budget=2, long_budget=6, long_prompt=80, warmup=1, window=0, refresh_every=0
    )
    engine.generate(QUESTIONS[0], collection="docs", max_new_tokens=1)
    short, long = QUESTIONS[1], " ".join(QUESTIONS) * 3
    assert len(engine.encode(short)) <= 40 and len(engine.encode(long)) >= 80
    skipped = lambda prompt, **kw: engine.generate(prompt, collection="docs", max_new_tokens=1, **kw).stats  # noqa: E731
    assert skipped(short).skipped_sublayers == 2 and skipped(long).skipped_sublayers == 6
    assert skipped(long, budget=3).skipped_sublayers == 3  # a request's budget holds at any length
    with pytest.raises(ValueError, match="between 0 and 12"):
        _ = AdaSkipEngine(tiny_model("llama"), tokenizer, policy=AdaSkipPolicy(long_budget=13)).learner


def test_a_skip_request_that_skips_nothing_says_why(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=2, warmup=1, window=0, refresh_every=0, tail=64)
    engine.generate(QUESTIONS[0], collection="docs", max_new_tokens=1)
    stats = engine.generate(QUESTIONS[1], collection="docs", max_new_tokens=1).stats
    assert stats.mode == "skip" and stats.skipped_sublayers == 0
    assert stats.budget_reason.endswith(f"the protected head and tail cover all {stats.prompt_tokens} prompt tokens")
    engine.learner.policy = dataclasses.replace(engine.learner.policy, tail=2, min_gain=5.0)
    stats = engine.generate(QUESTIONS[1], collection="docs", max_new_tokens=1).stats
    assert stats.skipped_sublayers == 0 and stats.budget_reason.endswith("estimated prefill speedup is below 5.0")


def test_budget_quality_target_and_skip_per_request(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=2, warmup=1, window=0, refresh_every=0)
    engine.generate(QUESTIONS[0], collection="docs", max_new_tokens=2)
    run = lambda **kw: engine.generate(QUESTIONS[1], collection="docs", max_new_tokens=2, **kw).stats  # noqa: E731
    assert run().skipped_sublayers == 2 and run(budget=5).skipped_sublayers == 5
    assert run(budget=0.25).skipped_sublayers == 3  # a quarter of the 12 sublayers
    guarded = run(quality_target=0.9)
    assert guarded.budget == 2 and "quality guard" in guarded.budget_reason
    full = run(skip=False)
    assert full.skipped_sublayers == 0 and full.mode is None
    assert engine.learner.store.get(engine.fingerprint, "docs").queries == 5  # the full request learned nothing
    for kwargs, name in [
        ({"budget": 13}, "between 0 and 12"),
        ({"budget": "8"}, "budget"),
        ({"quality_target": 1.5}, "quality_target"),
        ({"skip": "no"}, "skip"),
    ]:
        with pytest.raises(ValueError, match=name):
            run(**kwargs)
    with pytest.raises(ValueError, match="collection="):
        engine.generate(QUESTIONS[1], budget=4)
    with pytest.raises(ValueError, match="not two of them"):
        engine.generate(QUESTIONS[1], SkipPlan(ffn={1: 1.0}), skip=False)


def test_learned_plans_use_affine_compensations_fitted_from_the_full_requests(tokenizer, tmp_path):
    engine = learning_engine(tokenizer, tmp_path, budget=3, warmup=2, window=0, refresh_every=0)
    for q in QUESTIONS[:3]:
        engine.generate(q, collection="docs", max_new_tokens=2)
    profile = engine.learner.store.get(engine.fingerprint, "docs")
    assert profile.moments is None  # a collection's record is small: the model's global profile keeps the moments
    moments = engine.learner.store.global_profile(engine.fingerprint)
    full_tokens = sum(len(engine.encode(q)) - 1 for q in QUESTIONS[:2])  # the warm-up requests, token 0 left out
    assert moments.moments is not None and moments.moments[0, :, -1].tolist() == [full_tokens] * 6
    plan = engine.learner.decide("docs", 20).plan
    assert len(plan.prefill_attn) + len(plan.ffn) == 3 and not plan.attn
    for kind, skips in (("attn", plan.prefill_attn), ("ffn", plan.ffn)):
        for layer, compensation in skips.items():
            sub = Sublayer(kind, layer)
            expected = fit(moments.sublayer_moments(sub), "affine", profile.mean("scale_no_sink")[sub])
            torch.testing.assert_close(compensation.scale, expected.scale)
            torch.testing.assert_close(compensation.bias, expected.bias)


def test_skip_requests_probe_every_nth_query_and_learn_the_same_plan(tokenizer, tmp_path):
    skip_sets = {}
    for every in (1, 4):
        engine = learning_engine(
            tokenizer, tmp_path / str(every), budget=3, warmup=3, window=0, refresh_every=0, probe_every=every
        )
        results = [engine.generate(QUESTIONS[i % 3], collection="docs", max_new_tokens=2) for i in range(15)]
        probed = [r.prefill_probes is not None for r in results]
        assert probed == [True] * 3 + [every == 1 or (i + 1) % every == 0 for i in range(3, 15)]
        assert [r.stats.mode for r in results] == ["warmup"] * 3 + ["skip"] * 12
        profile = engine.learner.store.get(engine.fingerprint, "docs")
        assert profile.queries == 15 and max(profile.counts["ffn"]) == 3 + sum(probed[3:])
        skip_sets[every] = _skip_set(engine.learner.decide("docs", 20).plan)
    assert skip_sets[1] == skip_sets[4]
    with pytest.raises(ValueError, match="probe_every"):
        AdaSkipPolicy(probe_every=0)


def test_only_requests_that_probe_measure_their_decode_window(tokenizer, tmp_path):
    """The online decode skips need the request's first ``window`` decode steps measured: a request that does not
    probe its prefill skips in decode what its plan skips, its steps unmeasured (so they can run compiled)."""
    engine = learning_engine(tokenizer, tmp_path, budget=3, warmup=3, window=2, refresh_every=0, probe_every=4)
    results = [engine.generate(QUESTIONS[i % 3], collection="docs", max_new_tokens=6) for i in range(11)]
    for i, result in enumerate(results[3:], start=3):
        probed = (i + 1) % 4 == 0
        assert (result.prefill_probes is not None) == probed
        assert len(result.decode_probes) == (2 if probed else 0)
        if not probed:
            assert result.stats.skipped_ffn_decode == result.stats.skipped_ffn_prefill
