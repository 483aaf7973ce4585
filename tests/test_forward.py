"""Exact correctness of the skip-aware forward pass against plain transformers and hand computations."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, tiny_model
from transformers.cache_utils import DynamicLayer

from adaskip_rag import SkipPlan, Sublayer, forward
from adaskip_rag.cache import new_cache
from adaskip_rag.forward import skip_forward

# float64 models: a prompt run in one pass and token by token, or by transformers and by the engine, differ by
# reassociation only (~1e-13 on logits of size ~10), a wrong path by > 1e-3, on any CPU
ATOL = RTOL = 1e-9


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 49152, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_empty_plan_matches_transformers_prefill_and_decode(arch, attn_impl):
    model = tiny_model(arch, dtype=torch.float64)
    model.config._attn_implementation = attn_impl
    ids = prompt(40)
    with torch.no_grad():
        ref = model(ids, use_cache=True)
    cache = new_cache(model)
    logits, _ = skip_forward(model, ids, 0, cache, SkipPlan(), "prefill", logits_to_keep=0)
    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)

    ref_cache, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1)
    for step in range(6):  # step-by-step decode, each step against transformers with its own cache
        with torch.no_grad():
            ref = model(token, cache=ref_cache, use_cache=True)
        logits, _ = skip_forward(model, token, 40 + step, cache, SkipPlan(), "decode")
        torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)
        ref_cache, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1)


def test_a_token_step_sees_only_the_window_whatever_its_cache_holds():
    """A sliding-window layer's cache keeps no more than the window, so a one-token step never meets more keys; one
    that holds every key (a full-attention layer's cache) must give the same logits all the same."""
    model = tiny_model("mistral", dtype=torch.float64)  # window 16
    ids = prompt(40)
    with torch.no_grad():
        ref = model(ids).logits
    cache = new_cache(model)
    cache.layers = [DynamicLayer() for _ in cache.layers]  # full-attention layers: every key kept
    for t in range(40):
        logits, _ = skip_forward(model, ids[:, t : t + 1], t, cache, SkipPlan(), "decode")
        torch.testing.assert_close(logits[:, -1], ref[:, t], atol=ATOL, rtol=0)
    assert cache.get_seq_length(0) == 40


def test_a_decode_token_takes_the_one_token_path(monkeypatch):
    model = tiny_model("llama")
    cache = new_cache(model)
    skip_forward(model, prompt(8), 0, cache, SkipPlan(), "prefill")

    def no_step(*args):
        raise AssertionError("a one-token row went through the rows' step")

    monkeypatch.setattr(forward, "_Step", no_step)
    skip_forward(model, prompt(1), 8, cache, SkipPlan(ffn={1: 0.5}), "decode")
    with pytest.raises(AssertionError, match="rows' step"):  # a probed token measures: it needs the step
        skip_forward(model, prompt(1), 9, cache, SkipPlan(), "decode", probe=True)


EDGE_PLAN = SkipPlan(attn={0: 0.9, 3: 1.1, 5: 1.0}, ffn={2: 0.8, 5: 1.05})


@pytest.mark.parametrize("arch", list(ARCHS))
def test_incremental_decode_equals_full_recompute_under_plan(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids = prompt(30)
    cache = new_cache(model)
    logits, _ = skip_forward(model, ids[:, :20], 0, cache, EDGE_PLAN, "decode")
    for pos in range(20, 30):
        full, _ = skip_forward(model, ids[:, :pos], 0, new_cache(model), EDGE_PLAN, "prefill")
        torch.testing.assert_close(logits, full, atol=ATOL, rtol=RTOL)
        logits, _ = skip_forward(model, ids[:, pos : pos + 1], pos, cache, EDGE_PLAN, "decode")


def reference_logits(model, ids: torch.Tensor, plan: SkipPlan) -> torch.Tensor:
    """Skip-aware forward written out here: no cache, an explicit causal mask, the paper's equations."""
    base = model.model
    n = ids.shape[1]
    h = base.embed_tokens(ids)
    rope = base.rotary_emb(h, position_ids=torch.arange(n)[None])
    mask = torch.full((n, n), -math.inf, dtype=h.dtype).triu(1)[None, None]
    for i, layer in enumerate(base.layers):
        if i in plan.attn:
            h = plan.attn[i] * h
        else:
            h = h + layer.self_attn(layer.input_layernorm(h), position_embeddings=rope, attention_mask=mask)[0]
        if i in plan.ffn:
            h = plan.ffn[i] * h
        else:
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(base.norm(h))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_edge_plan_matches_reference_and_keeps_no_cache_for_skipped_attention(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids = prompt(24)
    cache = new_cache(model)
    logits, _ = skip_forward(model, ids[:, :20], 0, cache, EDGE_PLAN, "prefill", logits_to_keep=0)
    with torch.no_grad():
        ref = reference_logits(model, ids, EDGE_PLAN)
    torch.testing.assert_close(logits, ref[:, :20], atol=ATOL, rtol=RTOL)
    for pos in range(20, 24):  # decode keeps positions and masks right without layers 0 and 5 in the cache
        logits, _ = skip_forward(model, ids[:, pos : pos + 1], pos, cache, EDGE_PLAN, "decode")
        torch.testing.assert_close(logits[:, -1], ref[:, pos], atol=ATOL, rtol=RTOL)
    for i in range(model.config.num_hidden_layers):
        assert cache.get_seq_length(i) == (0 if i in EDGE_PLAN.attn else 24), i


def test_skipped_sublayer_outputs_input_times_scale_and_never_runs():
    model = tiny_model("llama")
    layers = model.model.layers
    seen: dict[str, torch.Tensor] = {}
    calls: list[str] = []

    def output_hook(name):
        def hook(module, args, output):
            calls.append(name)
            seen[name] = output[0] if isinstance(output, tuple) else output

        return hook

    for i, layer in enumerate(layers):
        layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"h0.{i}", a[0]))
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"h1.{i}", a[0]))
        layer.self_attn.register_forward_hook(output_hook(f"attn.{i}"))
        layer.mlp.register_forward_hook(output_hook(f"ffn.{i}"))
    plan = SkipPlan(attn={3: 0.75}, ffn={1: 1.25})
    skip_forward(model, prompt(16), 0, new_cache(model), plan, "prefill")

    assert "ffn.1" not in calls and "attn.3" not in calls and len(calls) == 2 * 6 - 2
    # FFN 1 skipped: layer 2 receives 1.25 * h1 of layer 1 (h0 + attention output)
    assert torch.equal(seen["h0.2"], (seen["h0.1"] + seen["attn.1"]) * 1.25)
    # attention 3 skipped: its FFN receives 0.75 * the output of layer 2 (h1 + FFN output)
    assert torch.equal(seen["h1.3"], (seen["h1.2"] + seen["ffn.2"]) * 0.75)


def test_decode_ffn_skips_apply_to_decode_only():
    model = tiny_model("llama")
    ids = prompt(12)
    plan = SkipPlan(decode_ffn={2: 0.9})
    logits_prefill, _ = skip_forward(model, ids, 0, new_cache(model), plan, "prefill")
    plain, _ = skip_forward(model, ids, 0, new_cache(model), SkipPlan(), "prefill")
    assert torch.equal(logits_prefill, plain)
    decode, _ = skip_forward(model, ids, 0, new_cache(model), plan, "decode")
    expected, _ = skip_forward(model, ids, 0, new_cache(model), SkipPlan(ffn={2: 0.9}), "prefill")
    assert torch.equal(decode, expected)


def test_probes_equal_independent_computation():
    model = tiny_model("qwen2")
    ids = prompt(20)
    h1: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: h1.__setitem__(i, a[0]))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[i] enters layer i (hs[-1] is normed)
    outputs = list(hs[1:-1])
    _, probes = skip_forward(model, ids, 0, new_cache(model), SkipPlan(ffn={5: 1.0}), "prefill", probe=True)

    assert set(probes) == {Sublayer(k, i) for i in range(6) for k in ("attn", "ffn")} - {Sublayer("ffn", 5)}
    for i in range(6):
        pairs = {"attn": (hs[i], h1[i])} | ({"ffn": (h1[i], outputs[i])} if i < 5 else {})
        for kind, (x, y) in pairs.items():
            p = probes[Sublayer(kind, i)]
            assert p.similarity == pytest.approx(F.cosine_similarity(x, y, dim=-1).mean().item(), abs=1e-5)
            assert p.scale == pytest.approx((y.norm() / x.norm()).item(), rel=1e-5)
            assert p.scale_no_sink == pytest.approx((y[:, 1:].norm() / x[:, 1:].norm()).item(), rel=1e-5)


def test_probes_say_how_long_measuring_each_sublayer_took():
    model = tiny_model("llama")
    start = time.perf_counter()
    _, probes = skip_forward(model, prompt(64), 0, new_cache(model), SkipPlan(ffn={2: 1.0}), "prefill", probe=True)
    wall = time.perf_counter() - start
    assert len(probes) == 11 and all(p.seconds > 0 for p in probes.values())
    assert sum(p.seconds for p in probes.values()) < wall


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attn": {0: float("nan")}}, "finite"),
        ({"ffn": {1: -0.5}}, ">= 0"),
        ({"attn": {"x": 1.0}}, "not an integer"),
        ({"ffn": {1: 1.0}, "decode_ffn": {1: 1.0}}, "both"),
    ],
)
def test_plan_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SkipPlan(**kwargs)


def test_plan_range_check_and_json_round_trip():
    with pytest.raises(ValueError, match=r"attn: layer indices \[6\] out of range for a 6-layer model"):
        SkipPlan(attn={6: 1.0}).check(6)
    with pytest.raises(ValueError, match="out of range"):
        SkipPlan(decode_ffn={-1: 1.0}).check(6)
    plan = SkipPlan(attn={4: 0.5, 1: 1.0}, ffn={2: 1.5}, decode_ffn={3: 0.25}, prefill_attn={2: 0.75}, tail=9, head=1)
    assert SkipPlan.from_dict(plan.to_dict()) == plan
    assert list(plan.attn) == [1, 4]
