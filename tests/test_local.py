"""Local attention in prefill (``SkipPlan.local``) against a reference written here: one pass over the whole
sequence, no cache, every layer with its own explicit mask (prompt tokens before the tail of a local layer see token
0 and the last ``local_window`` tokens; the tail and later tokens see every earlier token), float64."""

import math

import pytest
import torch
from conftest import tiny_model
from test_fidelity import ATOL, RTOL, affine, prompt

from adaskip_rag import AdaSkipEngine, SkipPlan, attention
from adaskip_rag.cache import new_cache
from adaskip_rag.compensation import apply
from adaskip_rag.costs import CostModel
from adaskip_rag.forward import skip_forward
from adaskip_rag.generation import prefill
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.profiles import Profile
from adaskip_rag.scheduler import ServingLimits
from adaskip_rag.skipping import Probe, Sublayer


def reference(model, ids: torch.Tensor, plan: SkipPlan, body: int) -> torch.Tensor:
    """Logits of every row: rows ``plan.head .. body - 1`` take ``plan.prefill_attn``'s skips, and rows before
    ``body`` attend locally in ``plan.local``'s layers; every attention computes keys and values from every row."""
    base = model.model
    T = ids.shape[1]
    h = base.embed_tokens(ids)
    rope = base.rotary_emb(h, position_ids=torch.arange(T)[None])
    query, key = torch.arange(T)[:, None], torch.arange(T)[None]
    causal = key <= query
    local = causal & ((key == 0) | (query - key < plan.local_window) | (query >= body))
    masks = {k: torch.zeros(T, T, dtype=h.dtype).masked_fill(~m, -math.inf)[None, None] for k, m in
             (("causal", causal), ("local", local))}  # fmt: skip
    skipped = slice(plan.head, body)
    for i, layer in enumerate(base.layers):
        mask = masks["local" if i in plan.local else "causal"]
        out = h + layer.self_attn(layer.input_layernorm(h), position_embeddings=rope, attention_mask=mask)[0]
        if i in plan.prefill_attn:
            out[:, skipped] = apply(h[:, skipped], plan.prefill_attn[i])
        h = out + layer.mlp(layer.post_attention_layernorm(out))
    return model.lm_head(base.norm(h))


def local_plan(model, **kw) -> SkipPlan:
    return SkipPlan(prefill_attn={1: affine(model.config.hidden_size, 1)}, local=(2, 4), local_window=3, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_local_prefill_and_the_full_decode_after_it_equal_the_reference(tokenizer, monkeypatch, arch):
    monkeypatch.setattr(attention, "LOCAL_BLOCK", 4)  # several query blocks, each with its own keys
    model = tiny_model(arch, dtype=torch.float64)
    engine = AdaSkipEngine(model, tokenizer)
    ids, plan = prompt(26), local_plan(model, tail=5, head=1)
    cache = new_cache(model)
    logits, _ = prefill(engine.runtime, ids[:, :20], cache, plan, tail=5, logits_to_keep=0)
    with torch.no_grad():
        ref = reference(model, ids, plan, body=15)
    torch.testing.assert_close(logits, ref[:, 15:20], atol=ATOL, rtol=RTOL)
    for pos in range(20, 26):  # decode attends in full over the cache the local prefill wrote
        logits, _ = skip_forward(model, ids[:, pos : pos + 1], pos, cache, plan, "decode")
        torch.testing.assert_close(logits[:, -1], ref[:, pos], atol=ATOL, rtol=RTOL)
    with torch.no_grad():  # and the window matters: attending in full gives other logits
        full = reference(model, ids, SkipPlan(prefill_attn=plan.prefill_attn, head=1), body=15)
    assert not torch.allclose(full[:, 15:], ref[:, 15:], atol=1e-3)


def test_a_prompt_prefilled_in_chunks_attends_locally_across_them(tokenizer, monkeypatch):
    monkeypatch.setattr(attention, "LOCAL_BLOCK", 4)
    model = tiny_model("llama", dtype=torch.float64)
    plan = local_plan(model)  # no tail: every prompt token attends locally
    ids = prompt(23)
    whole = skip_forward(model, ids, 0, new_cache(model), plan, "prefill", logits_to_keep=0)[0]
    with torch.no_grad():
        ref = reference(model, ids, plan, body=23)
    torch.testing.assert_close(whole, ref, atol=ATOL, rtol=RTOL)
    engine = AdaSkipEngine(model, tokenizer, serving=ServingLimits(prefill_chunk=5))
    forced = [int(t) for t in ids[0, 18:]]
    out = engine.generate(tokenizer.decode(ids[0, :18]), plan, max_new_tokens=2, teacher_forced_ids=forced)
    alone = AdaSkipEngine(model, tokenizer).generate(
        tokenizer.decode(ids[0, :18]), plan, max_new_tokens=2, teacher_forced_ids=forced
    )
    torch.testing.assert_close(out.teacher_forced_logits, alone.teacher_forced_logits, atol=ATOL, rtol=RTOL)
    assert out.stats.local_attention == [2, 4] and out.stats.local_window == 3
    assert "local attention [2, 4] (window 3)" in out.stats.summary()


def test_probes_do_not_measure_local_attention(tokenizer):
    model = tiny_model("llama", dtype=torch.float64)
    plan = local_plan(model)
    _, probes = skip_forward(model, prompt(20), 0, new_cache(model), plan, "prefill", probe=True)
    assert probes is not None
    measured = set(probes)
    assert {Sublayer("attn", 2), Sublayer("attn", 4), Sublayer("attn", 1)}.isdisjoint(measured)
    assert Sublayer("attn", 3) in measured and Sublayer("ffn", 2) in measured


def test_the_policy_makes_the_next_most_skippable_attention_sublayers_local(tokenizer):
    model = tiny_model("llama")
    costs = CostModel.from_config(model.config)
    L = model.config.num_hidden_layers
    sims = {Sublayer("attn", i): 0.99 - 0.01 * i for i in range(L)} | {Sublayer("ffn", i): 0.5 for i in range(L)}
    profile = Profile.from_probes("m", "c", L, {s: Probe(v, 1.0, 1.0) for s, v in sims.items()}, 4096)
    policy = AdaSkipPolicy(budget=2, local_attention=2, local_window=64, min_gain=0)
    plan = policy.prefill_plan(profile, 4096, costs, 2)
    assert sorted(plan.prefill_attn) == [0, 1] and plan.local == (2, 3) and plan.local_window == 64
    assert costs.prefill_speedup(plan, 4096, 64) > costs.prefill_speedup(
        SkipPlan(**{**vars(plan), "local": ()}), 4096, 64
    )
    # where a window costs as much as attending to every token, nothing attends locally
    assert policy.prefill_plan(profile, 300, costs, 2).local == ()
    assert AdaSkipPolicy(budget=2, min_gain=0, local_attention=0).prefill_plan(profile, 4096, costs, 2).local == ()
    default = AdaSkipPolicy(budget=2, min_gain=0).prefill_plan(profile, 4096, costs, 2)
    assert default.local == (2, 3, 4, 5)  # all the rest: the default is 24
    assert policy.prefill_plan(profile, 4096, costs, 0).is_empty  # a budget of 0 is the full model


def test_local_attention_costs_the_keys_its_blocks_see():
    costs = CostModel(hidden=64, ffn_hidden=128, kv_ratio=0.5, vocab=100, layers=4)
    projections = 4 * 64**2 * 1.5
    assert costs.local_attention(4096, 256) == projections + 4 * (256 + attention.LOCAL_BLOCK) * 64
    assert costs.local_attention(100, 256) == projections + 4 * 100 * 64
    full = costs.flops(4096)
    assert costs.flops(4096, local=2, window=256) == full - 2 * (
        costs.attention(4096) - costs.local_attention(4096, 256)
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"local": (1,), "prefill_attn": {1: 1.0}}, r"attention layers \[1\] are both skipped and local"),
        ({"local": (1, 1)}, "distinct attention layer indices"),
        ({"local": ("1",)}, "distinct attention layer indices"),
        ({"local": 3}, "distinct attention layer indices"),
        ({"local": (1,), "local_window": 0}, "local_window must be a token count"),
    ],
)
def test_bad_local_plans_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SkipPlan(**bad)


def test_local_layers_are_checked_against_the_model_and_round_trip():
    plan = SkipPlan(local=[3, 1], local_window=16)
    assert plan.local == (1, 3) and not plan.is_empty
    assert SkipPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match=r"SkipPlan.local: layer indices \[3\] out of range"):
        plan.check(3)
    for bad in ({"local_attention": -1}, {"local_window": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AdaSkipPolicy(**bad)
