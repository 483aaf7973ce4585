"""Prefill-only attention skips that keep the KV cache, and the protected prompt tail, against references
written here: one pass over the whole sequence with an explicit causal mask and no cache."""

import math

import pytest
import torch
from conftest import tiny_model

from adaskip_rag import AdaSkipEngine, SkipPlan
from adaskip_rag.cache import new_cache
from adaskip_rag.compensation import Affine, apply
from adaskip_rag.forward import skip_forward
from adaskip_rag.generation import prefill

# float64 models: the engine and the reference differ by reassociation only (~1e-13 on logits of size ~10), while
# a wrong path differs by > 1e-3; these bounds hold whichever CPU kernels run
ATOL, RTOL = 1e-9, 1e-9


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 49152, (1, n), generator=torch.Generator().manual_seed(seed))


def affine(d: int, seed: int) -> Affine:
    g = torch.Generator().manual_seed(seed)
    return Affine(1 + 0.1 * torch.randn(d, generator=g), 0.05 * torch.randn(d, generator=g))


def reference(model, ids: torch.Tensor, plan: SkipPlan, body: int, decode_from: int, head: int = 0):
    """Logits of every row and the input of every layer. Rows ``head .. body - 1`` take the plan's prefill skips;
    rows before ``head`` (the protected head) and rows ``body .. decode_from - 1`` (the protected tail) skip only
    ``plan.attn``; later rows take the decode skips. Every attention that is not in ``plan.attn`` computes keys and
    values from every row's own input."""
    base = model.model
    T = ids.shape[1]
    h = base.embed_tokens(ids)
    rope = base.rotary_emb(h, position_ids=torch.arange(T)[None])
    mask = torch.full((T, T), -math.inf, dtype=h.dtype).triu(1)[None, None]
    inputs = []
    prefill, decode = slice(head, body), slice(decode_from, T)
    for i, layer in enumerate(base.layers):
        inputs.append(h)
        if i in plan.attn:
            h = apply(h, plan.attn[i])
        else:
            out = h + layer.self_attn(layer.input_layernorm(h), position_embeddings=rope, attention_mask=mask)[0]
            if i in plan.prefill_attn:
                out[:, prefill] = apply(h[:, prefill], plan.prefill_attn[i])
            h = out
        out = h + layer.mlp(layer.post_attention_layernorm(h))
        for rows, skips in ((prefill, plan.ffn), (decode, {**plan.ffn, **plan.decode_ffn})):
            if i in skips:
                out[:, rows] = apply(h[:, rows], skips[i])
        h = out
    return model.lm_head(base.norm(h)), inputs


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def plan_for(model) -> SkipPlan:
    d = model.config.hidden_size
    return SkipPlan(prefill_attn={1: affine(d, 1), 3: 0.9}, attn={4: 1.05}, ffn={2: affine(d, 2)}, decode_ffn={5: 0.95})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_kept_cache_equals_keys_and_values_computed_from_the_layer_input(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids, plan = prompt(20), plan_for(model)
    cache = new_cache(model)
    skip_forward(model, ids, 0, cache, plan, "prefill")
    with torch.no_grad():
        _, inputs = reference(model, ids, plan, body=20, decode_from=20)
        for i in plan.prefill_attn:
            attn = model.model.layers[i].self_attn
            x = model.model.layers[i].input_layernorm(inputs[i])
            shape = (1, 20, -1, attn.head_dim)
            k = attn.k_proj(x).view(shape)
            if arch == "qwen3":
                k = attn.k_norm(k)
            k, v = k.transpose(1, 2), attn.v_proj(x).view(shape).transpose(1, 2)
            cos, sin = model.model.rotary_emb(x, position_ids=torch.arange(20)[None])
            k = k * cos[:, None] + rotate_half(k) * sin[:, None]
            torch.testing.assert_close(cache.layers[i].keys, k, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(cache.layers[i].values, v, atol=ATOL, rtol=RTOL)
    assert cache.get_seq_length(4) == 0  # skipped without its cache


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_decode_after_a_kv_keeping_prefill_equals_the_reference(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids, plan = prompt(26), plan_for(model)
    cache = new_cache(model)
    logits, _ = skip_forward(model, ids[:, :20], 0, cache, plan, "prefill", logits_to_keep=0)
    with torch.no_grad():
        ref, _ = reference(model, ids, plan, body=20, decode_from=20)
    torch.testing.assert_close(logits, ref[:, :20], atol=ATOL, rtol=RTOL)
    for pos in range(20, 26):  # layers 1 and 3 run in full over the cache their prefill kept
        logits, _ = skip_forward(model, ids[:, pos : pos + 1], pos, cache, plan, "decode")
        torch.testing.assert_close(logits[:, -1], ref[:, pos], atol=ATOL, rtol=RTOL)
    with torch.no_grad():  # and it is not what the paper's skip gives
        paper, _ = reference(model, ids, SkipPlan(attn={**plan.attn, **plan.prefill_attn}, ffn=plan.ffn), 20, 20)
    assert not torch.allclose(paper[:, 20:], ref[:, 20:], atol=1e-3)


@pytest.mark.parametrize("head", [0, 2])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_protected_head_and_tail_logits_and_decode_equal_the_reference(tokenizer, arch, head):
    model = tiny_model(arch, dtype=torch.float64)
    engine = AdaSkipEngine(model, tokenizer)
    ids, plan = prompt(26), SkipPlan(**{**vars(plan_for(model)), "tail": 6, "head": head})
    cache = new_cache(model)
    logits, _ = prefill(engine.runtime, ids[:, :20], cache, plan, tail=6, logits_to_keep=0)
    with torch.no_grad():
        ref, _ = reference(model, ids, plan, body=14, decode_from=20, head=head)
    assert logits.shape[1] == 6
    torch.testing.assert_close(logits, ref[:, 14:20], atol=ATOL, rtol=RTOL)
    for pos in range(20, 26):
        logits, _ = skip_forward(model, ids[:, pos : pos + 1], pos, cache, plan, "decode")
        torch.testing.assert_close(logits[:, -1], ref[:, pos], atol=ATOL, rtol=RTOL)


def test_generate_with_kept_cache_and_tail_is_greedy_over_the_reference(tokenizer):
    model = tiny_model("llama", dtype=torch.float64)
    engine = AdaSkipEngine(model, tokenizer)
    ids, plan = prompt(24, seed=3), SkipPlan(**{**vars(plan_for(model)), "tail": 5, "head": 1})
    result = engine.generate(ids[0].tolist(), plan, max_new_tokens=6, ignore_eos=True)
    sequence = torch.cat([ids, torch.tensor([result.token_ids[:-1]])], dim=1)
    with torch.no_grad():
        ref, _ = reference(model, sequence, plan, body=19, decode_from=24, head=1)
    assert result.token_ids == ref[0, 23:].argmax(-1).tolist()

    stats = result.stats
    assert stats.skipped_attention == [1, 3, 4] and stats.attention_kv_kept == [1, 3]
    assert (stats.protected_head, stats.protected_tail) == (1, 5)
    assert stats.skipped_attention_decode == [4]
    assert stats.kv_bytes_saved == engine.runtime.kv_bytes_per_token() * (24 + 6 - 1)  # layer 4 only
    c = engine.costs
    attn, ffn, kv = c.attention(24), c.ffn(), c.keys_values()
    body = 3 * attn + 2 * kv + 5 * ffn  # attention 1, 3 (keys and values kept) and 4 skipped; FFN 2 skipped
    tail = 5 * c.attention(24, "decode") + 6 * ffn  # a tail token sees all 24 keys; attention 4 has no cache
    head = 5 * attn + 6 * ffn
    assert stats.estimated_prefill_speedup == pytest.approx(6 * (attn + ffn) * 24 / (18 * body + 5 * tail + head))


def test_tail_not_shorter_than_the_prompt_is_an_error(tiny_engine):
    ids = prompt(12)[0].tolist()
    with pytest.raises(ValueError, match="head of 0 and tail of 12 tokens leave nothing of the 12-token prompt"):
        tiny_engine.stream(ids, SkipPlan(prefill_attn={1: 1.0}, tail=12))
    with pytest.raises(ValueError, match="head of 2 and tail of 10 tokens leave nothing"):
        tiny_engine.stream(ids, SkipPlan(prefill_attn={1: 1.0}, tail=10, head=2))
    with pytest.raises(ValueError, match="needs a prompt of chat messages"):
        tiny_engine.stream("a plain prompt", SkipPlan(prefill_attn={1: 1.0}, tail="last_user_turn"))
    with pytest.raises(ValueError, match="do not have the model's 64 channels"):
        tiny_engine.stream(ids, SkipPlan(prefill_attn={1: Affine(torch.ones(8), torch.zeros(8))}))
    with pytest.raises(ValueError, match="both attn and prefill_attn"):
        SkipPlan(attn={1: 1.0}, prefill_attn={1: 1.0})


def test_last_user_turn_tail_starts_at_the_last_user_message(tiny_engine):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Document:\nsome text here.\n\nQuestion: where?"},
    ]
    ids = tiny_engine.encode(messages)
    m = tiny_engine.prompts.user_turn_tokens(messages)
    assert tiny_engine.tokenizer.decode(ids[-m:]).startswith("Document:\nsome text")
    assert "Document" not in tiny_engine.tokenizer.decode(ids[:-m])
    plan = SkipPlan(prefill_attn={1: 1.0}, tail="last_user_turn")
    assert tiny_engine.generate(messages, plan, max_new_tokens=2).stats.protected_tail == m
