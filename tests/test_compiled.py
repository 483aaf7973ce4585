"""The compiled one-token decode step against plain transformers, and when the engine takes it."""

import pytest
import torch
from conftest import COMMON, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from adaskip_rag import AdaSkipEngine, SkipPlan
from adaskip_rag.cache import new_cache
from adaskip_rag.compiled import CompiledDecode
from adaskip_rag.forward import skip_forward

# float64 models, whose RMSNorms still compute in float32 (transformers' own): compiled, a norm's reduction is
# vectorized otherwise, so results differ by a few float32 roundings (2e-7 relative measured); a wrong path by > 1e-3
EPS = 64 * torch.finfo(torch.float32).eps


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=EPS * float(want.abs().max()), rtol=0)


def prompt_ids(n: int) -> torch.Tensor:
    return torch.randint(3, 49152, (1, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: the Q and K norms
def test_compiled_decode_steps_match_transformers_as_the_room_grows(arch):
    model = tiny_model(arch, dtype=torch.float64)
    compiled = CompiledDecode(model)
    ids = prompt_ids(40)
    with torch.no_grad():
        ref = model(ids, use_cache=True)
    cache = new_cache(model)  # no spare room: the first step grows it, later ones write into it
    skip_forward(model, ids, 0, cache, SkipPlan(), "prefill")
    ref_cache, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1)
    sizes = set()
    for step in range(8):
        with torch.no_grad():
            ref = model(token, past_key_values=ref_cache, use_cache=True)
        logits = compiled(token[0], 40 + step, cache)
        close(logits, ref.logits[0])
        for layer, ref_layer in zip(cache.layers, ref_cache.layers):
            close(layer.keys, ref_layer.keys)
            close(layer.values, ref_layer.values)
        sizes.add(cache.layers[0].room[0].shape[2])
        ref_cache, token = ref.past_key_values, ref.logits[:, -1:].argmax(-1)
    assert sizes == {82}  # grown once, to twice the tokens it needed, at the first step


def test_models_of_the_same_cache_shape_keep_their_own_compiled_steps():
    """Each compiled step skips the checks on its model's modules, so it must be its own: a second model whose
    cache has the same shape (only its width differs) gets a step of its own, and both stay right."""
    wide = LlamaForCausalLM(LlamaConfig(**{**COMMON, "hidden_size": 128, "num_attention_heads": 8})).double().eval()
    models = [tiny_model("llama", dtype=torch.float64), wide]
    steps = [CompiledDecode(model) for model in models]
    for model, compiled in [*zip(models, steps), *zip(models, steps)]:
        ids = prompt_ids(12)
        cache = new_cache(model)
        skip_forward(model, ids, 0, cache, SkipPlan(), "prefill")
        with torch.no_grad():
            want = model(torch.cat([ids, torch.tensor([[7]])], 1)).logits[0, -1:]
        close(compiled(torch.tensor([7]), 12, cache), want)


def test_the_engine_decodes_compiled_where_the_plan_runs_every_sublayer(tokenizer, monkeypatch):
    eager = AdaSkipEngine(tiny_model("llama", dtype=torch.float64), tokenizer, name="tiny")
    engine = AdaSkipEngine(tiny_model("llama", dtype=torch.float64), tokenizer, name="tiny", compile_decode=True)
    assert engine.compiled_decode is not None and engine.compiled_decode.warmup_seconds > 0
    calls = []
    step = CompiledDecode.__call__
    monkeypatch.setattr(CompiledDecode, "__call__", lambda self, *a: calls.append(1) or step(self, *a))
    prompt = "The engine decodes every answer token here"
    for plan, compiled_steps in (
        (SkipPlan(), 7),  # 8 tokens: the prefill gives the first
        (SkipPlan(prefill_attn={2: 1.0}), 7),  # skips in prefill only, its keys and values kept
        (SkipPlan(ffn={3: 0.9}), 0),  # skips in decode too: the eager step
    ):
        calls.clear()
        want = eager.generate(prompt, plan, max_new_tokens=8, ignore_eos=True)
        got = engine.generate(prompt, plan, max_new_tokens=8, ignore_eos=True)
        assert got.token_ids == want.token_ids
        assert len(calls) == compiled_steps
    calls.clear()
    engine.generate(prompt, SkipPlan(), max_new_tokens=8, ignore_eos=True, probe=True)
    assert not calls  # probed steps measure every sublayer: the eager step


def test_a_model_with_sliding_window_layers_is_refused():
    with pytest.raises(ValueError, match="compile_decode: the model has sliding-window layers"):
        CompiledDecode(tiny_model("mistral"))


def test_a_room_holds_zeros_past_its_tokens():
    """The compiled step reads the whole room under a mask: a masked entry weighs 0, and 0 times a value read
    from uninitialized memory (NaN, inf) would not be 0."""
    model = tiny_model("llama")
    cache = new_cache(model, capacity=8)
    skip_forward(model, prompt_ids(5), 0, cache, SkipPlan(), "prefill")
    for capacity_left in (3, 20):  # the room as made, then grown
        keys, values = cache.layers[0].reserve(capacity_left)
        assert keys[:, :, 5:].eq(0).all() and values[:, :, 5:].eq(0).all()


def test_a_step_that_does_not_compile_is_a_clear_error(monkeypatch):
    """Where inductor fails (no C++ compiler on the machine, say), the error says it was the compiled decode step."""

    def failing(fn, **options):
        def step(*args):
            raise OSError("no C++ compiler found")

        return step

    monkeypatch.setattr(torch, "compile", failing)
    with pytest.raises(RuntimeError, match=r"compile_decode: the decode step did not compile \(OSError: no C\+\+"):
        CompiledDecode(tiny_model("llama"))
