"""Closed-form compensation fits against hand computations; moments from probes; moments in stored profiles."""

import base64
import json
import warnings

import pytest
import torch
from conftest import tiny_model

from adaskip_rag.cache import new_cache
from adaskip_rag.compensation import Affine, apply, fit, moments, residual_error
from adaskip_rag.costs import CostModel
from adaskip_rag.forward import skip_forward
from adaskip_rag.policies import AdaSkipPolicy
from adaskip_rag.profiles import Profile
from adaskip_rag.skipping import SkipPlan, Sublayer
from adaskip_rag.stores import SQLiteProfileStore


def data(tokens: int = 300, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An input with channels of different means and spreads, and an output that is a noisy per-channel affine
    map of it (plus a cross-channel term no per-channel map can fit)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, d) + torch.arange(d)
    y = x * torch.linspace(0.8, 1.2, d) + 0.3 + 0.2 * x.roll(1, -1) + 0.1 * torch.randn(tokens, d, generator=g)
    return x, y


def test_affine_fit_is_the_per_channel_least_squares_solution():
    x, y = data()
    got = fit(moments(x, y), "affine", scale=1.0)
    assert isinstance(got, Affine)
    for c in range(x.shape[1]):
        design = torch.stack([x[:, c], torch.ones_like(x[:, c])], dim=1)
        a, b = torch.linalg.lstsq(design, y[:, c : c + 1]).solution.flatten()
        assert got.scale[c].item() == pytest.approx(a.item(), rel=1e-5)
        assert got.bias[c].item() == pytest.approx(b.item(), rel=1e-5, abs=1e-5)


def test_bias_fit_keeps_the_scale_and_matches_the_means():
    x, y = data()
    got = fit(moments(x, y), "bias", scale=0.9)
    torch.testing.assert_close(got.scale, torch.full((8,), 0.9))
    torch.testing.assert_close(got.bias, (y.mean(0) - 0.9 * x.mean(0)).float())
    assert fit(moments(x, y), "scalar", scale=0.9) == 0.9


def test_constant_input_channel_falls_back_to_the_scale():
    x, y = data()
    x[:, 2] = 5.0
    got = fit(moments(x, y), "affine", scale=1.1)
    assert got.scale[2].item() == pytest.approx(1.1)
    assert got.bias[2].item() == pytest.approx((y[:, 2].mean() - 1.1 * 5.0).item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["scalar", "bias", "affine"])
def test_residual_error_equals_direct_computation(mode):
    x, y = data()
    compensation = fit(moments(x, y), mode, scale=1.05)
    direct = (y - apply(x.float(), compensation).double()).square().sum() / y.square().sum()
    assert residual_error(moments(x, y), compensation) == pytest.approx(direct.item(), rel=1e-4)


def test_affine_fit_has_the_smallest_residual_error():
    x, y = data()
    m = moments(x, y)
    errors = [residual_error(m, fit(m, mode, scale=1.0)) for mode in ("scalar", "bias", "affine")]
    assert errors[0] > errors[1] > errors[2] > 0


def test_affine_with_scale_s_and_no_bias_reproduces_scalar_exactly():
    x = torch.randn(2, 7, 16)
    assert torch.equal(apply(x, Affine(torch.full((16,), 0.83), torch.zeros(16))), apply(x, 0.83))


def test_merged_moments_give_the_fit_of_one_pass():
    x, y = data(seed=3)
    parts = moments(x[:100], y[:100]) + moments(x[100:250], y[100:250]) + moments(x[250:], y[250:])
    torch.testing.assert_close(parts, moments(x, y), rtol=1e-6, atol=1e-6)  # sums in float32 per request
    one, merged = fit(moments(x, y), "affine", 1.0), fit(parts, "affine", 1.0)
    torch.testing.assert_close(merged.scale, one.scale)
    torch.testing.assert_close(merged.bias, one.bias)


def test_full_prefill_probes_carry_the_moments_of_each_sublayer_without_the_sink_token():
    model = tiny_model("llama")
    ids = torch.randint(3, 49152, (1, 20), generator=torch.Generator().manual_seed(1))
    h1: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: h1.__setitem__(i, a[0]))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    _, probes = skip_forward(model, ids, 0, new_cache(model), SkipPlan(), "prefill", probe=True)
    for i in range(6):
        for kind, (x, y) in {"attn": (hs[i], h1[i]), "ffn": (h1[i], hs[i + 1] if i < 5 else None)}.items():
            if y is None:  # the last layer's output is normed in hidden_states
                continue
            expected = moments(x[0, 1:].double(), y[0, 1:].double())
            torch.testing.assert_close(probes[Sublayer(kind, i)].moments, expected, rtol=1e-5, atol=1e-3)
    _, decode = skip_forward(model, ids[:, -1:], 20, new_cache(model), SkipPlan(), "decode", probe=True)
    assert all(p.moments is None for p in decode.values())
    _, skipping = skip_forward(model, ids, 0, new_cache(model), SkipPlan(ffn={2: 1.0}), "prefill", probe=True)
    assert all(p.moments is None for p in skipping.values())  # fits come from the full model only


# ----------------------------------------------------------------- profiles and policies


def profile_with_moments(d: int = 8, seed: int = 0) -> Profile:
    """3 layers, similarity attn .90 .95 .97, ffn .91 .92 .96, scales 1; moments of ``data`` (a seed per sublayer)."""
    num_layers = 3
    p = Profile("m", "c", num_layers, queries=1)
    p.moments = torch.zeros(2, num_layers, 4 * d + 2, dtype=torch.float64)
    for k, kind in enumerate(("attn", "ffn")):
        p.counts[kind] = [1] * num_layers
        p.sums[f"{kind}.similarity"] = [[0.90, 0.95, 0.97], [0.91, 0.92, 0.96]][k]
        p.sums[f"{kind}.scale"] = p.sums[f"{kind}.scale_no_sink"] = [1.0] * num_layers
        for layer in range(num_layers):
            p.moments[k, layer] = moments(*data(d=d, seed=seed + 10 * k + layer))
    return p


def test_policy_plans_with_the_fitted_compensation_and_keeps_kv():
    profile = profile_with_moments()
    costs = CostModel(hidden=8, ffn_hidden=16, kv_ratio=0.5, vocab=10, layers=3)
    plan = AdaSkipPolicy(budget=3, tail=0).prefill_plan(profile, 100, costs, 3)
    # ranked by similarity: attn 2 (.97), ffn 2 (.96), attn 1 (.95)
    assert set(plan.ffn) == {2} and set(plan.prefill_attn) == {1, 2} and not plan.attn
    expected = fit(profile.sublayer_moments(Sublayer("attn", 2)), "affine", 1.0)
    torch.testing.assert_close(plan.prefill_attn[2].scale, expected.scale)
    torch.testing.assert_close(plan.prefill_attn[2].bias, expected.bias)

    paper = AdaSkipPolicy(budget=3, compensation="scalar", keep_kv=False, tail=0).prefill_plan(profile, 100, costs, 3)
    assert paper.attn == {1: 1.0, 2: 1.0} and paper.ffn == {2: 1.0} and not paper.prefill_attn


def test_policy_ranks_by_residual_error_when_asked():
    profile = profile_with_moments()
    costs = CostModel(hidden=8, ffn_hidden=16, kv_ratio=0.5, vocab=10, layers=3)
    errors = {
        sub: residual_error(profile.sublayer_moments(sub), fit(profile.sublayer_moments(sub), "affine", 1.0))
        for sub in profile.mean()
    }
    best = sorted(errors, key=lambda s: (errors[s], s))[:2]
    assert set(best) != {Sublayer("attn", 2), Sublayer("ffn", 2)}, "the similarity ranking's top 2: no test"
    plan = AdaSkipPolicy(budget=2, rank_by="error", tail=0).prefill_plan(profile, 100, costs, 2)
    assert {Sublayer("attn", i) for i in plan.prefill_attn} | {Sublayer("ffn", i) for i in plan.ffn} == set(best)


def test_policy_tail_protects_short_prompts_entirely_and_is_carried_by_the_plan():
    profile = profile_with_moments()
    costs = CostModel(hidden=8, ffn_hidden=16, kv_ratio=0.5, vocab=10, layers=3)
    assert AdaSkipPolicy(budget=2, tail=64, head=1).prefill_plan(profile, 65, costs, 2) == SkipPlan()
    # one token left to skip in saves less than the protected ones cost: min_gain 0 plans it anyway
    assert AdaSkipPolicy(budget=2, tail=64, head=1).prefill_plan(profile, 66, costs, 2) == SkipPlan()
    plan = AdaSkipPolicy(budget=2, tail=64, head=1, min_gain=0).prefill_plan(profile, 66, costs, 2)
    assert (plan.head, plan.tail) == (1, 64)
    policy = AdaSkipPolicy(budget=2, tail="last_user_turn")
    assert policy.prefill_plan(profile, 65, costs, 2).tail == "last_user_turn"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compensation": "linear"}, "compensation must be one of"),
        ({"rank_by": "speed"}, "rank_by"),
        ({"keep_kv": "yes"}, "keep_kv"),
        ({"tail": -1}, "tail"),
        ({"tail": "question"}, "tail"),
        ({"head": 1.5}, "head"),
    ],
)
def test_policy_rejects_bad_fidelity_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaSkipPolicy(**kwargs)


def test_old_profiles_load_and_plan_with_scalar_compensation():
    old = profile_with_moments().to_dict()
    del old["moments"]
    profile = Profile.from_dict(json.loads(json.dumps(old)))
    assert profile.moments is None
    costs = CostModel(hidden=8, ffn_hidden=16, kv_ratio=0.5, vocab=10, layers=3)
    plan = AdaSkipPolicy(budget=3, tail=0).prefill_plan(profile, 100, costs, 3)
    assert plan.prefill_attn == {1: 1.0, 2: 1.0} and plan.ffn == {2: 1.0}
    # an old profile merged with a new one keeps the new one's moments
    assert torch.equal(profile.merge(profile_with_moments()).moments, profile_with_moments().moments)


def test_moments_round_trip_through_sqlite_and_add_up(tmp_path):
    store = SQLiteProfileStore(tmp_path / "p.sqlite")
    first, second = profile_with_moments(seed=0), profile_with_moments(seed=5)
    store.add(first)
    assert store.add(second).moments is None  # a collection's record keeps no moments: the model's global one does
    torch.testing.assert_close(store.global_profile("m").moments, first.moments + second.moments, rtol=0, atol=0)


def corrupt(profile: Profile, how: str) -> dict:
    data = profile.to_dict()
    raw = bytearray(base64.b64decode(data["moments"]["float64"]))
    if how == "nan":
        raw[:8] = torch.tensor([float("nan")], dtype=torch.float64).numpy().tobytes()
    elif how == "negative square":
        d = (profile.moments.shape[-1] - 2) // 4
        raw[8 * 2 * d : 8 * 2 * d + 8] = torch.tensor([-1.0], dtype=torch.float64).numpy().tobytes()
    elif how == "truncated":
        raw = raw[:-8]
    data["moments"]["float64"] = base64.b64encode(bytes(raw)).decode()
    if how == "shape":
        data["moments"]["shape"] = [2, 4, 34]
    if how == "not base64":
        data["moments"]["float64"] = "***"
    return data


@pytest.mark.parametrize("how", ["nan", "negative square", "truncated", "shape", "not base64"])
def test_profile_with_corrupt_moments_is_skipped_with_a_warning(tmp_path, how):
    with pytest.raises(ValueError, match="malformed profile"):
        Profile.from_dict(corrupt(profile_with_moments(), how))
    store = SQLiteProfileStore(tmp_path / "p.sqlite")
    store.add(profile_with_moments())
    with store._connect() as db:
        db.execute("UPDATE profiles SET data = ?", (json.dumps(corrupt(profile_with_moments(), how)),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.get("m", "c") is None
    assert any("collection 'c' (model m) moved aside" in str(w.message) and "moments" in str(w.message) for w in caught)
