"""Question-aware evidence recompute against a reference written here: the skipped body's keys and values from
the layer inputs, the tail's attention weights over them by hand, the chosen tokens run again through every
sublayer over the body's cache, then the tail; no cache, explicit masks, float64."""

import concurrent.futures
import math

import pytest
import torch
from conftest import tiny_model
from test_fidelity import ATOL, RTOL, plan_for, prompt, reference, rotate_half

from adaskip_rag import AdaSkipEngine, SkipPlan, attention
from adaskip_rag.cache import new_cache
from adaskip_rag.compensation import apply
from adaskip_rag.generation import prefill, recompute_evidence
from adaskip_rag.policies import AdaSkipPolicy


def rotated(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = model.model.rotary_emb(x, position_ids=positions[None])
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def projections(model, i: int, h: torch.Tensor, positions: torch.Tensor):
    """Queries, keys and values (1, heads, tokens, head_dim) of layer ``i`` from its input ``h``."""
    attn = model.model.layers[i].self_attn
    x = model.model.layers[i].input_layernorm(h)
    shape = (1, h.shape[1], -1, attn.head_dim)
    q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return rotated(model, q, positions), rotated(model, k, positions), v


def attend(model, i, q, keys, values, query_pos, key_pos):
    """Layer ``i``'s attention output for queries at ``query_pos`` over keys at ``key_pos``, and its weights."""
    attn = model.model.layers[i].self_attn
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = q @ keys.transpose(-1, -2) * attn.head_dim**-0.5
    scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], -math.inf)
    weights = scores.softmax(-1)
    out = (weights @ values).transpose(1, 2).reshape(1, q.shape[2], -1)
    return attn.o_proj(out), weights


def run_tokens(model, plan, ids, positions, cache_kv, key_pos, append=False, collect=None):
    """Tokens ``ids`` at ``positions`` through every sublayer but ``plan.attn`` (compensated), each attention over
    ``cache_kv[i]`` (keys, values at ``key_pos``) with the tokens' own keys and values written over those at their
    positions, or appended after them (``collect``: add up the weights paid to the cached tokens). The final hidden
    state and every layer's keys and values with the tokens' in."""
    h = model.model.embed_tokens(ids)
    written = {}
    for i, layer in enumerate(model.model.layers):
        if i in plan.attn:
            h = apply(h, plan.attn[i])
        else:
            q, k, v = projections(model, i, h, positions)
            keys, values = cache_kv[i]
            if not append:
                keys, values = keys.clone(), values.clone()
                keys[:, :, positions], values[:, :, positions] = k, v
                pos = key_pos
            else:
                keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
                pos = torch.cat([key_pos, positions])
            written[i] = (keys, values)
            out, weights = attend(model, i, q, keys, values, positions, pos)
            if collect is not None:
                collect += weights.sum((0, 1, 2))[: len(collect)]
            h = h + out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, written


def body_cache(model, ids, plan, body, head):
    """The keys and values the skipped prefill of the first ``body`` tokens caches, from each layer's input."""
    with torch.no_grad():
        _, inputs = reference(model, ids[:, :body], plan, body=body, decode_from=body, head=head)
        positions = torch.arange(body)
        return {
            i: projections(model, i, inputs[i], positions)[1:]
            for i in range(model.config.num_hidden_layers)
            if i not in plan.attn
        }


def evidence_plan(model, recompute: float, head: int = 1) -> SkipPlan:
    return SkipPlan(**{**vars(plan_for(model)), "tail": 6, "head": head, "recompute": recompute})


@pytest.mark.parametrize("arch, block", [("llama", 64), ("qwen3", 64), ("llama", 3)])
def test_recompute_chooses_the_tokens_the_tail_attends_to_and_equals_the_reference(tokenizer, arch, block, monkeypatch):
    monkeypatch.setattr(attention, "REWRITE_BLOCK", block)  # 3: the 8 recomputed tokens attend in blocks of 3, 3, 2
    model = tiny_model(arch, dtype=torch.float64)
    engine = AdaSkipEngine(model, tokenizer)
    n, tail, plan = 40, 6, evidence_plan(model, 0.25)
    body = n - tail
    ids = prompt(n, seed=4)
    kv = body_cache(model, ids, plan, body, plan.head)
    protected = plan.protected_plan()
    key_pos = torch.arange(body)
    with torch.no_grad():
        weights = torch.zeros(body, dtype=torch.float64)
        run_tokens(model, protected, ids[:, body:], torch.arange(body, n), kv, key_pos, True, weights)
        count = plan.recomputed_tokens(body)
        assert count == round(0.25 * (body - 1)) == 8
        ranked = weights[1:].sort(descending=True).values
        assert ranked[count - 1] - ranked[count] > 1e-6  # the choice is not a near tie
        chosen = (weights[1:].topk(count).indices + 1).sort().values
        _, repaired = run_tokens(model, protected, ids[:, chosen], chosen, kv, key_pos)
        h, _ = run_tokens(model, protected, ids[:, body:], torch.arange(body, n), repaired, key_pos, True)
        ref_logits = model.lm_head(model.model.norm(h))

    cache = new_cache(model)
    engine.runtime.forward(ids[:, :body], 0, cache, plan, "prefill")
    assert recompute_evidence(engine.runtime, ids, body, cache, plan) == chosen.tolist()
    for i, (keys, values) in repaired.items():
        torch.testing.assert_close(cache.layers[i].keys, keys, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(cache.layers[i].values, values, atol=ATOL, rtol=RTOL)

    cache = new_cache(model)
    logits, _ = prefill(engine.runtime, ids, cache, plan, tail=tail, logits_to_keep=0)
    torch.testing.assert_close(logits[0], ref_logits[0, -tail:], atol=ATOL, rtol=RTOL)
    assert cache.get_seq_length(0) == n
    # and recomputing changed the answer's logits: the test can tell
    plain, _ = prefill(engine.runtime, ids, new_cache(model), evidence_plan(model, 0.0), tail=tail, logits_to_keep=0)
    assert not torch.allclose(plain, logits, atol=1e-3)


def test_recomputing_every_body_token_gives_the_full_model_for_ffn_and_kv_keeping_skips(tokenizer):
    """With every body token past the head recomputed and no attention skipped without its cache, each cached key
    and value is the full model's, so the tail's logits are the full model's."""
    model = tiny_model("llama", dtype=torch.float64)
    engine = AdaSkipEngine(model, tokenizer)
    plan = SkipPlan(prefill_attn={1: 0.9, 3: 1.1}, ffn={2: 0.8, 5: 1.2}, tail=4, head=1, recompute=0.999)
    ids = prompt(30, seed=5)
    assert plan.recomputed_tokens(26) == 25
    logits, _ = prefill(engine.runtime, ids, new_cache(model), plan, tail=4, logits_to_keep=0)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(logits[0], full[0, -4:], atol=ATOL, rtol=RTOL)


def test_recompute_serves_batched_with_other_requests_as_alone(tokenizer):
    model = tiny_model("llama", dtype=torch.float64)
    engine = AdaSkipEngine(model, tokenizer)
    plan = evidence_plan(model, 0.2)
    ids = prompt(48, seed=6)[0].tolist()
    alone = engine.generate(ids, plan, max_new_tokens=5, ignore_eos=True)
    other = prompt(30, seed=7)[0].tolist()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(engine.generate, p, plan, max_new_tokens=5, ignore_eos=True) for p in (ids, other, ids)]
        results = [f.result() for f in futures]
    assert results[0].token_ids == results[2].token_ids == alone.token_ids


def test_recompute_is_checked():
    with pytest.raises(ValueError, match="needs a tail"):
        SkipPlan(ffn={1: 1.0}, recompute=0.1)
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="recompute must be a fraction"):
            SkipPlan(ffn={1: 1.0}, tail=4, recompute=bad)
    plan = SkipPlan(ffn={1: 1.0}, tail=4, recompute=0.1)
    assert SkipPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match="needs a tail"):
        AdaSkipPolicy(tail=0, recompute=0.1)
    with pytest.raises(ValueError, match="recompute must be a fraction"):
        AdaSkipPolicy(recompute=1.5)


def test_stats_count_the_recomputed_tokens_and_their_cost(tokenizer):
    model = tiny_model("llama", dtype=torch.float64)
    engine = AdaSkipEngine(model, tokenizer)
    ids = prompt(46, seed=8)[0].tolist()
    plain = engine.generate(ids, evidence_plan(model, 0.0), max_new_tokens=2).stats
    stats = engine.generate(ids, evidence_plan(model, 0.1), max_new_tokens=2).stats
    assert (plain.recomputed_tokens, stats.recomputed_tokens) == (0, round(0.1 * (40 - 1)))
    c, kept = engine.costs, len(stats.attention_kv_kept)
    args = (46, len(stats.skipped_attention), len(stats.skipped_ffn_prefill), "prefill", kept, 6, 1, 1)
    assert plain.estimated_prefill_speedup == c.speedup(*args)
    assert stats.estimated_prefill_speedup == c.speedup(*args, recomputed=4) < plain.estimated_prefill_speedup
    assert "4 they attend to most recomputed" in stats.summary()


def test_recompute_is_refused_on_a_model_with_sliding_window_layers(tokenizer):
    engine = AdaSkipEngine(tiny_model("mistral"), tokenizer)
    with pytest.raises(ValueError, match="without sliding-window layers"):
        engine.generate(prompt(40)[0].tolist(), evidence_plan(engine.model, 0.1), max_new_tokens=2)
    # without recompute the same plan serves
    assert engine.generate(prompt(40)[0].tolist(), evidence_plan(engine.model, 0.0), max_new_tokens=2).token_ids
