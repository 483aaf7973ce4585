"""The real default model (SmolLM2-135M-Instruct from its PyPI package), loaded offline."""

import pytest

from adaskip_rag import SkipPlan

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_model_answers_paris(default_engine):
    assert default_engine.name == "SmolLM2-135M-Instruct" and default_engine.num_layers == 30
    result = default_engine.generate(QUESTION, max_new_tokens=30)
    assert "Paris" in result.text
    assert result.stats.finish_reason == "stop"


def test_default_model_answers_paris_with_a_light_plan(default_engine):
    probed = default_engine.generate(QUESTION, max_new_tokens=30, probe=True)
    attn = sorted(
        (p.similarity, s.layer, p.scale_no_sink) for s, p in probed.prefill_probes.items() if s.kind == "attn"
    )
    plan = SkipPlan(attn={layer: scale for _, layer, scale in attn[-4:]})  # the four most redundant attentions
    result = default_engine.generate(QUESTION, plan, max_new_tokens=30)
    assert "Paris" in result.text
    assert result.stats.skipped_attention == sorted(plan.attn)
    assert result.stats.estimated_prefill_speedup > 1.0


def test_ignore_eos_generates_the_full_budget(default_engine):
    result = default_engine.generate(QUESTION, max_new_tokens=24, ignore_eos=True)
    assert result.stats.generated_tokens == 24 and result.stats.finish_reason == "length"
    assert result.text.startswith("The capital of France is Paris.")


def test_quality_guard_lowers_the_budget_on_the_real_model(default_engine, tmp_path, monkeypatch):
    from adaskip_rag import AdaSkipEngine
    from adaskip_rag.corpora import rag_messages, squad_questions
    from adaskip_rag.policies import AdaSkipPolicy
    from adaskip_rag.stores import SQLiteProfileStore

    monkeypatch.setenv("ADASKIP_PROFILES", str(tmp_path))  # no shipped profile: learn from this collection only
    policy = AdaSkipPolicy(  # short prompts: min_gain 0 skips in them all the same
        budget=16, warmup=1, window=0, refresh_every=2, quality_target=0.99, guard_step=4, min_gain=0
    )
    engine = AdaSkipEngine(
        default_engine.model,
        default_engine.tokenizer,
        default_engine.name,
        policy=policy,
        store=SQLiteProfileStore(tmp_path / "p.sqlite"),
    )
    runs = [
        engine.generate(rag_messages(doc, q), collection="squad", max_new_tokens=16, ignore_eos=True).stats
        for doc, q in squad_questions(3, paragraphs=1)
    ]
    assert [s.mode for s in runs] == ["warmup", "refresh", "skip"]
    assert runs[1].fidelity < 0.99 and runs[1].measured_in_this_request and runs[1].measured_prefill_speedup > 0
    assert runs[2].budget == 12 and runs[2].skipped_sublayers == 12
    assert "lowered to 12" in runs[2].budget_reason


def test_new_collection_starts_from_the_shipped_profile(default_engine, tmp_path):
    from adaskip_rag import AdaSkipEngine
    from adaskip_rag.compensation import Affine
    from adaskip_rag.corpora import rag_messages, squad_questions
    from adaskip_rag.stores import SQLiteProfileStore

    engine = AdaSkipEngine(
        default_engine.model,
        default_engine.tokenizer,
        default_engine.name,
        store=SQLiteProfileStore(tmp_path / "p.sqlite"),
    )
    ((doc, question),) = squad_questions(1, paragraphs=8)  # long enough for the default plan to pay (~1.3k tokens)
    stats = engine.generate(rag_messages(doc, question), collection="fresh", max_new_tokens=8).stats
    assert stats.profile_source == "shipped" and stats.mode == "skip" and not stats.warming_up
    assert stats.skipped_sublayers == engine.policy.budget
    assert (stats.protected_head, stats.protected_tail) == (1, 64) and stats.attention_kv_kept
    plan = engine.learner.decide("fresh", stats.prompt_tokens).plan  # fitted from the shipped profile's moments
    assert all(isinstance(c, Affine) for c in [*plan.prefill_attn.values(), *plan.ffn.values()])
