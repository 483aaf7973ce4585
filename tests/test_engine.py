"""Generation, streaming, stop handling, thread safety, stats and bad input of AdaSkipEngine (tiny model)."""

import asyncio
import gc
import json
import threading
import time

import pytest
import torch
from conftest import steps_around_a_cancel, tiny_model

from adaskip_rag import AdaSkipEngine, CostModel, SkipPlan

PROMPT = "Retrieved context: the quick brown fox jumps over the lazy dog. Question: what jumps?"
NO_EOS = {"max_new_tokens": 24}


def test_greedy_matches_model_generate(tiny_engine):
    ids = tiny_engine.encode(PROMPT)
    result = tiny_engine.generate(ids, max_new_tokens=20)
    with torch.no_grad():
        out = tiny_engine.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=2)
    assert result.token_ids == out[0, len(ids) :].tolist()
    assert result.text == tiny_engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.stats.prompt_tokens == len(ids) and result.stats.generated_tokens == len(result.token_ids)


def test_sampling_is_seeded_and_uses_the_processors(tiny_engine):
    a = tiny_engine.generate(PROMPT, temperature=1.5, seed=7, **NO_EOS)
    b = tiny_engine.generate(PROMPT, temperature=1.5, seed=7, **NO_EOS)
    c = tiny_engine.generate(PROMPT, temperature=1.5, seed=8, **NO_EOS)
    assert a.token_ids == b.token_ids != c.token_ids
    greedy = tiny_engine.generate(PROMPT, **NO_EOS)
    assert tiny_engine.generate(PROMPT, temperature=5.0, top_k=1, seed=3, **NO_EOS).token_ids == greedy.token_ids
    assert tiny_engine.generate(PROMPT, temperature=5.0, top_p=1e-6, seed=3, **NO_EOS).token_ids == greedy.token_ids
    penalised = tiny_engine.generate(PROMPT, repetition_penalty=50.0, **NO_EOS).token_ids
    assert len(set(penalised)) == len(penalised)  # a huge penalty never repeats a token


def test_stop_strings_cut_the_text_and_the_stream(tiny_engine):
    full = tiny_engine.generate(PROMPT, max_new_tokens=40)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), "the tiny model's text should be long enough to pick a stop string from"
    expected = full.text[: full.text.find(stop)]
    result = tiny_engine.generate(PROMPT, max_new_tokens=40, stop=[stop, "never-appears"])
    assert result.text == expected and result.stats.finish_reason == "stop"
    deltas = list(tiny_engine.stream(PROMPT, max_new_tokens=40, stop=stop))
    assert "".join(deltas) == expected and all(stop not in d for d in deltas)


def test_stop_token_ids_end_generation_without_their_text(tiny_engine):
    full = tiny_engine.generate(PROMPT, max_new_tokens=30)
    stop_token = full.token_ids[5]
    first = full.token_ids.index(stop_token)
    result = tiny_engine.generate(PROMPT, max_new_tokens=30, stop_token_ids=[stop_token])
    assert result.token_ids == full.token_ids[: first + 1]
    assert result.text == tiny_engine.tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)
    assert result.stats.finish_reason == "stop"


def test_stream_deltas_join_to_generated_text(tiny_engine):
    plan = SkipPlan(attn={1: 1.0}, ffn={4: 0.9})
    result = tiny_engine.generate(PROMPT, plan, max_new_tokens=30)
    stream = tiny_engine.stream(PROMPT, plan, max_new_tokens=30)
    deltas = list(stream)
    assert len(deltas) > 3 and "".join(deltas) == result.text
    assert stream.result.token_ids == result.token_ids


class CountingEngine:
    """Counts forward steps of an engine and optionally fails at one of them."""

    def __init__(self, engine: AdaSkipEngine, monkeypatch, fail_at: int | None = None):
        self.calls = 0
        forward = engine.runtime.forward

        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls == fail_at:
                raise RuntimeError("injected failure")
            return forward(*args, **kwargs)

        monkeypatch.setattr(engine.runtime, "forward", counted)


def test_stopping_to_read_stops_generation(tiny_engine, monkeypatch):
    counter = CountingEngine(tiny_engine, monkeypatch)
    stream = tiny_engine.stream(PROMPT, max_new_tokens=200)
    for _ in range(3):
        next(stream)
    stream.close()
    calls = counter.calls
    assert calls < 10
    time.sleep(0.2)
    assert counter.calls == calls
    with pytest.raises(StopIteration):
        next(stream)


def test_error_in_generation_reaches_the_consumer(tiny_engine, monkeypatch):
    CountingEngine(tiny_engine, monkeypatch, fail_at=4)
    with pytest.raises(RuntimeError, match="injected failure"):
        for _ in tiny_engine.stream(PROMPT, max_new_tokens=50):
            pass


def test_async_stream_joins_cancels_and_raises(tiny_engine, monkeypatch):
    expected = tiny_engine.generate(PROMPT, max_new_tokens=30).text

    async def collect(**kwargs):
        return [d async for d in tiny_engine.astream(PROMPT, **kwargs)]

    assert "".join(asyncio.run(collect(max_new_tokens=30))) == expected
    assert asyncio.run(tiny_engine.agenerate(PROMPT, max_new_tokens=30)).text == expected

    counter = CountingEngine(tiny_engine, monkeypatch)

    async def read_two():
        stream = tiny_engine.astream(PROMPT, max_new_tokens=200)
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()  # returns once the worker has stopped

    asyncio.run(read_two())
    calls = counter.calls
    assert calls < 200
    time.sleep(0.2)
    assert counter.calls == calls

    async def break_early():
        async for _ in tiny_engine.astream(PROMPT, max_new_tokens=200):
            break  # the stream is dropped here; nothing calls aclose
        gc.collect()
        await asyncio.sleep(0.5)

    counter.calls = 0
    asyncio.run(break_early())
    calls = counter.calls
    assert calls < 200
    time.sleep(0.2)
    assert counter.calls == calls

    monkeypatch.undo()
    CountingEngine(tiny_engine, monkeypatch, fail_at=3)
    with pytest.raises(RuntimeError, match="injected failure"):
        asyncio.run(asyncio.wait_for(collect(max_new_tokens=50), timeout=60))


def test_eight_threads_with_different_plans_reproduce_serial_outputs(tiny_engine):
    plans = [
        SkipPlan(),
        SkipPlan(attn={0: 1.0}),
        SkipPlan(attn={2: 0.9, 5: 1.1}),
        SkipPlan(ffn={1: 1.0, 3: 0.8}),
        SkipPlan(attn={4: 1.0}, ffn={4: 1.0}),
        SkipPlan(decode_ffn={2: 1.2}),
        SkipPlan(attn={1: 1.0, 3: 1.0}, decode_ffn={5: 0.9}),
        SkipPlan(ffn={0: 1.0}),
    ]
    requests = [dict(plan=p, max_new_tokens=20, probe=i % 2 == 0) for i, p in enumerate(plans)]
    requests[3].update(temperature=1.0, seed=11)
    serial = [tiny_engine.generate(PROMPT, **r) for r in requests]
    assert len({tuple(r.token_ids) for r in serial}) > 4, "the plans should lead to different outputs"

    results: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def run(i):
        barrier.wait()
        results[i] = tiny_engine.generate(PROMPT, **requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        assert got.token_ids == want.token_ids
        assert got.prefill_probes == want.prefill_probes


def test_chat_messages_use_the_chat_template(tiny_engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tiny_engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tiny_engine.encode(messages) == tiny_engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_stats_are_json_and_count_what_was_skipped(tiny_engine):
    plan = SkipPlan(attn={0: 1.0, 5: 1.0}, ffn={2: 1.0}, decode_ffn={3: 1.0})
    result = tiny_engine.generate(PROMPT, plan, max_new_tokens=10, ignore_eos=True)
    stats = json.loads(json.dumps(result.stats.to_dict()))
    n, g = stats["prompt_tokens"], stats["generated_tokens"]
    assert g == 10 and stats["finish_reason"] == "length"
    assert stats["skipped_attention"] == [0, 5]
    assert stats["skipped_ffn_prefill"] == [2] and stats["skipped_ffn_decode"] == [2, 3]
    cfg = tiny_engine.config  # 2 layers x (K and V) x kv heads x head dim x fp32, for every cached token
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert stats["kv_bytes_saved"] == 2 * 2 * cfg.num_key_value_heads * head_dim * 4 * (n + g - 1)
    costs = CostModel.from_config(cfg)
    assert stats["estimated_prefill_speedup"] == pytest.approx(costs.speedup(n, 2, 1, "prefill"))
    assert stats["estimated_decode_speedup"] == pytest.approx(costs.speedup(n, 2, 2, "decode"))
    assert stats["prefill_seconds"] > 0 and stats["decode_tokens_per_s"] > 0


def test_cost_model_matches_hand_computation():
    class SmolLM2:  # the default model's shape
        hidden_size, intermediate_size, num_attention_heads, num_key_value_heads = 576, 1536, 9, 3
        vocab_size, num_hidden_layers = 49152, 30

    costs = CostModel.from_config(SmolLM2)
    d, dff, n = 576, 1536, 2048
    attn = 4 * d * d * (1 + 3 / 9) + 2 * n * d
    assert costs.attention(n) == pytest.approx(attn)
    assert costs.ffn() == 6 * d * dff
    full = 30 * (attn + 6 * d * dff)
    assert costs.speedup(n, 16, 0) == pytest.approx(full / (full - 16 * attn))
    assert costs.speedup(2048, 16, 0) == pytest.approx(1.30, abs=0.01)
    assert costs.speedup(4096, 16, 0) == pytest.approx(1.42, abs=0.01)
    decode_attn = 4 * d * d * (1 + 3 / 9) + 4 * n * d
    decode_full = 30 * (decode_attn + 6 * d * dff) + 2 * d * 49152
    assert costs.speedup(n, 0, 4, "decode") == pytest.approx(decode_full / (decode_full - 4 * 6 * d * dff))
    # 16 attention sublayers skipped keeping K/V, a head of 1 and a tail of 64 in full, 100 tokens recomputed after
    # the tail looked once: per-token FLOPs of each part, weighted by its tokens
    body = full - 16 * attn + 16 * 4 * d * d * (3 / 9)
    tail = 30 * (decode_attn + 6 * d * dff)  # a tail token sees about n keys
    left = (body * (n - 65) + tail * 2 * 64 + full * (1 + 100)) / n
    assert costs.speedup(n, 16, 0, kept_kv=16, tail=64, head=1, recomputed=100) == pytest.approx(full / left)


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ("", {}, "prompt is empty"),
        ("   ", {}, "prompt is empty"),
        ([], {}, "prompt is empty"),
        ([10**9], {}, "out of range for vocabulary"),
        ([{"role": "user"}, 3], {}, "prompt must be"),
        (None, {}, "prompt must be"),
        (5, {}, "prompt must be"),
        (b"hello", {}, "prompt must be"),
        ([{"content": "hi"}], {}, "needs a string 'role'"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens must be an integer in \\[1, 512\\]"),
        ("hi", {"max_new_tokens": True}, "max_new_tokens"),
        ("hi", {"max_new_tokens": 10**9}, "max_new_tokens"),
        ("hi", {"max_new_tokens": 2.0}, "max_new_tokens"),
        ("hi", {"temperature": -1.0}, "temperature"),
        ("hi", {"temperature": float("nan")}, "temperature"),
        ("hi", {"temperature": float("inf")}, "temperature"),
        ("hi", {"temperature": "0.5"}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_k": -2}, "top_k"),
        ("hi", {"top_k": 1.5}, "top_k"),
        ("hi", {"repetition_penalty": float("inf")}, "repetition_penalty"),
        ("hi", {"seed": "abc"}, "seed"),
        ("hi", {"seed": True}, "seed"),
        ("hi", {"stop": [""]}, "stop must be"),
        ("hi", {"stop": 5}, "stop must be"),
        ("hi", {"stop_token_ids": [-1]}, "stop_token_ids"),
        ("hi", {"stop_token_ids": [1.5]}, "stop_token_ids"),
        ("hi", {"stop_token_ids": 7}, "stop_token_ids"),
        ("hi", {"probe": "yes"}, "probe"),
        ("hi", {"plan": {"attn": {1: 1.0}}}, "plan must be a SkipPlan"),
        ("hi", {"plan": SkipPlan(attn={6: 1.0})}, "out of range for a 6-layer model"),
        ("hi", {"truncation": "middle"}, "truncation"),
        ("hi", {"collection": 5}, "collection key"),
        ("word " * 600, {}, "context window is 512"),
    ],
)
def test_bad_input_raises_value_error(tiny_engine, prompt, kwargs, message):
    kwargs = dict(kwargs)
    plan = kwargs.pop("plan", None)
    with pytest.raises(ValueError, match=message):
        tiny_engine.generate(prompt, plan, **kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_engine.stream(prompt, plan, **kwargs)  # before any work is done


@pytest.mark.parametrize(
    "field, value",
    [("attn", {1: None}), ("ffn", {1: "x"}), ("attn", True), ("ffn", {1: True}), ("attn", {1: {"scale": [1.0]}})],
)
def test_bad_skip_plans_raise_value_error_at_construction(field, value):
    with pytest.raises(ValueError, match=f"SkipPlan.{field}"):
        SkipPlan(**{field: value})


def test_left_truncation_keeps_the_prompt_end(tiny_engine):
    ids = tiny_engine.encode("word " * 600)
    result = tiny_engine.generate(ids, max_new_tokens=8, truncation="left")
    assert result.stats.prompt_tokens == 512 - 8
    assert result.stats.generated_tokens <= 8


def test_generation_stops_at_the_context_window(tiny_engine):
    ids = [100] * 508
    result = tiny_engine.generate(ids, max_new_tokens=50, ignore_eos=True)
    assert result.stats.generated_tokens == 512 - 508 and result.stats.finish_reason == "length"


def test_engine_rejects_models_it_cannot_drive(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="not a decoder-only causal LM"):
        AdaSkipEngine(model, tokenizer)


def test_one_model_serves_many_architectures(tokenizer):
    for arch in ("qwen2", "mistral", "qwen3"):
        engine = AdaSkipEngine(tiny_model(arch), tokenizer)
        ids = engine.encode(PROMPT)
        result = engine.generate(ids, SkipPlan(attn={0: 1.0}), max_new_tokens=5)
        assert result.stats.generated_tokens >= 1 and result.stats.skipped_attention == [0]


@pytest.fixture(scope="module")
def exact_engine(tokenizer):
    """The tiny model in float64: one chunk and step by step agree to ~1e-13 on any CPU."""
    return AdaSkipEngine(tiny_model("llama", dtype=torch.float64), tokenizer, name="tiny-float64")


def test_teacher_forcing_reproduces_greedy_decoding_in_one_chunk_and_step_by_step(exact_engine):
    from adaskip_rag.skipping import StaticSchedule

    plan = SkipPlan(attn={0: 1.0, 3: 0.9}, ffn={5: 1.1})
    prompt = exact_engine.encode(PROMPT)
    answer = exact_engine.generate(prompt, plan, max_new_tokens=12, ignore_eos=True).token_ids
    chunk, seconds = exact_engine.teacher_forced(prompt, answer, plan)
    steps, _ = exact_engine.teacher_forced(prompt, answer, StaticSchedule(plan))
    assert chunk.shape == steps.shape == (12, exact_engine.config.vocab_size) and seconds > 0
    torch.testing.assert_close(chunk, steps, atol=1e-9, rtol=1e-9)
    assert chunk.argmax(-1).tolist() == answer == steps.argmax(-1).tolist()


def test_generation_scores_a_given_answer_from_its_own_prefill(exact_engine):
    from adaskip_rag.policies import OnlineSchedule, SkipDecode

    prompt = exact_engine.encode(PROMPT)
    answer = torch.randint(
        0, exact_engine.config.vocab_size, (10,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    probed = exact_engine.generate(prompt, max_new_tokens=4, probe=True, ignore_eos=True).decode_probes
    ffn = sorted(p.similarity for step in probed for s, p in step.items() if s.kind == "ffn")
    plans = {
        "static": lambda: SkipPlan(attn={0: 1.0, 3: 0.9}, ffn={5: 1.1}),
        # from step 3 skips the FFNs above the median similarity: which ones depends on the tokens it saw
        "online": lambda: OnlineSchedule(SkipPlan(attn={2: 1.0}), beta=ffn[len(ffn) // 2], window=3),
        "skipdecode": lambda: SkipDecode(exact_engine.num_layers, 2, 10),
    }
    for name, make in plans.items():
        schedules = make(), make()
        alone = exact_engine.generate(prompt, schedules[0], max_new_tokens=10, ignore_eos=True)
        both = exact_engine.generate(
            prompt, schedules[1], max_new_tokens=10, ignore_eos=True, teacher_forced_ids=answer
        )
        expected, _ = exact_engine.teacher_forced(prompt, answer, make())
        # scoring works on copies: the generation, and what the online schedule learned in it, are as they were
        assert both.token_ids == alone.token_ids, name
        if name == "online":
            assert schedules[1].decode_plan == schedules[0].decode_plan and schedules[0].decode_plan.decode_ffn
        assert alone.teacher_forced_logits is None
        torch.testing.assert_close(both.teacher_forced_logits, expected, atol=1e-9, rtol=1e-9, msg=name)
    with pytest.raises(ValueError, match="teacher_forced_ids"):
        exact_engine.generate(prompt, max_new_tokens=2, teacher_forced_ids=[exact_engine.config.vocab_size])


def test_a_cancelled_agenerate_stops_its_worker_within_one_decode_step(tiny_engine, monkeypatch):
    ran, after = steps_around_a_cancel(
        tiny_engine, monkeypatch, lambda: tiny_engine.agenerate(PROMPT, max_new_tokens=400, ignore_eos=True)
    )
    assert 5 < ran < 100
    assert after <= 1  # the step running at the cancel, at most


def test_a_plan_that_skips_every_sublayer_generates_and_says_so(tiny_engine):
    L = tiny_engine.num_layers
    everything = SkipPlan(attn=dict.fromkeys(range(L), 1.0), ffn=dict.fromkeys(range(L), 1.0))
    result = tiny_engine.generate(PROMPT, everything, max_new_tokens=4, ignore_eos=True)
    stats = result.stats.to_dict()
    assert result.stats.generated_tokens == 4 and stats["skipped_every_sublayer"] is True
    assert stats["estimated_prefill_speedup"] is None and stats["estimated_decode_speedup"] > 1
    json.dumps(stats, allow_nan=False)
    assert "every sublayer skipped" in result.stats.summary()
    kv_kept = SkipPlan(prefill_attn=dict.fromkeys(range(L), 1.0), ffn=dict.fromkeys(range(L), 1.0))
    stats = tiny_engine.generate(PROMPT, kv_kept, max_new_tokens=4).stats
    assert stats.skipped_every_sublayer and 1 < stats.estimated_prefill_speedup < float("inf")


def test_max_new_tokens_beyond_the_window_left_is_clamped_and_reported(tiny_engine):
    ids = [100] * 500
    stats = tiny_engine.generate(ids, max_new_tokens=300, ignore_eos=True).stats
    assert stats.max_new_tokens == 12 == stats.generated_tokens and stats.finish_reason == "length"
    assert tiny_engine.generate(ids, max_new_tokens=5).stats.max_new_tokens == 5


def test_a_policy_that_skips_all_2l_sublayers_serves(tokenizer, tmp_path):
    from adaskip_rag.policies import AdaSkipPolicy
    from adaskip_rag.stores import SQLiteProfileStore

    model = tiny_model("llama")
    L = model.config.num_hidden_layers
    engine = AdaSkipEngine(
        model,
        tokenizer,
        "tiny",
        store=SQLiteProfileStore(tmp_path / "p.sqlite"),
        policy=AdaSkipPolicy(budget=2 * L, warmup=1, refresh_every=0, tail=0, head=0),
    )
    engine.generate(PROMPT, collection="all", max_new_tokens=2)  # warm-up: the full model, measured
    stats = engine.generate(PROMPT, collection="all", max_new_tokens=3).stats
    assert stats.mode == "skip" and stats.skipped_every_sublayer
    json.dumps(stats.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="quality_target"):
        AdaSkipPolicy(quality_target="0.9")


def test_min_new_tokens_holds_back_every_stop_token(tiny_engine):
    first = tiny_engine.generate(PROMPT, max_new_tokens=4, ignore_eos=True).token_ids[0]
    assert tiny_engine.generate(PROMPT, max_new_tokens=4, stop_token_ids=[first]).token_ids == [first]
    held = tiny_engine.generate(PROMPT, max_new_tokens=4, stop_token_ids=[first], min_new_tokens=2)
    stops = sorted(tiny_engine.eos_token_ids | {first})
    with torch.no_grad():  # the model's own choice with the stop tokens taken out
        logits = tiny_engine.model(torch.tensor([tiny_engine.encode(PROMPT)])).logits[0, -1]
    assert held.token_ids[0] == int(logits.index_fill(0, torch.tensor(stops), -torch.inf).argmax())
    assert first not in held.token_ids[:2]
    with pytest.raises(ValueError, match="min_new_tokens"):
        tiny_engine.generate(PROMPT, max_new_tokens=4, min_new_tokens=5)
