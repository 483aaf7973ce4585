"""Batched serving: rows with different plans in one forward step, chunked prefill, and the scheduler that runs
concurrent requests together (limits, failures, cancellation)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import tiny_model

from adaskip_rag import AdaSkipEngine, SkipPlan
from adaskip_rag.cache import new_cache
from adaskip_rag.compensation import Affine
from adaskip_rag.forward import Row, forward_rows, skip_forward
from adaskip_rag.probes import Probes
from adaskip_rag.scheduler import ServingLimits

LAYERS = 6  # of the tiny models


def plans(hidden: int) -> list[SkipPlan]:
    """Different plans: attention skipped in layer 0 and in the last layer, KV-keeping skips with a protected head,
    FFN skips with an affine compensation, decode-only skips, local attention, and the empty plan."""
    affine = Affine(torch.linspace(0.8, 1.1, hidden), torch.full((hidden,), 0.02))
    return [
        SkipPlan(attn={0: 1.0}),
        SkipPlan(attn={LAYERS - 1: 0.9}, ffn={2: 1.0}),
        SkipPlan(prefill_attn={1: 1.0, 3: affine}, head=2),
        SkipPlan(),
        SkipPlan(ffn={0: affine, LAYERS - 1: 1.0}, decode_ffn={3: 1.0}),
        SkipPlan(attn={2: 1.0, 4: 1.0}, ffn={4: 0.95}),
        SkipPlan(prefill_attn={0: 1.0, LAYERS - 1: 1.0}, head=1, local=(2, 3), local_window=5),
        SkipPlan(decode_ffn={1: 1.0, 2: 1.0}),
    ]


def ids_of(n: int, seed: int) -> torch.Tensor:
    return torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_rows_with_different_plans_in_one_step_equal_each_row_alone(arch):
    model = tiny_model(arch, dtype=torch.float64)  # exact up to reassociation (~1e-13), on any CPU
    cases = list(zip(plans(model.config.hidden_size), [20, 9, 24, 13, 30, 7, 18, 11]))
    prompts = [ids_of(n, seed) for seed, (_, n) in enumerate(cases)]
    follow = [ids_of(3, 100 + seed) for seed in range(len(cases))]  # fed one by one as decode steps

    alone = []
    for (plan, _), ids, more in zip(cases, prompts, follow):
        cache = new_cache(model)
        logits = [skip_forward(model, ids[None], 0, cache, plan, "prefill", logits_to_keep=0)[0][0]]
        for step, token in enumerate(more):
            logits.append(skip_forward(model, token.view(1, 1), len(ids) + step, cache, plan, "decode")[0][0])
        alone.append(logits)

    caches = [new_cache(model) for _ in cases]
    rows = [Row(ids, 0, c, plan, "prefill", logits_to_keep=0) for (plan, _), ids, c in zip(cases, prompts, caches)]
    together = [[out] for out in forward_rows(model, rows)]
    for step in range(3):
        rows = [
            Row(more[step : step + 1], len(ids) + step, c, plan, "decode")
            for (plan, _), ids, more, c in zip(cases, prompts, follow, caches)
        ]
        for k, out in enumerate(forward_rows(model, rows)):
            together[k].append(out)
    for k in range(len(cases)):
        for a, b in zip(alone[k], together[k]):
            torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9, msg=f"{arch}: row {k}")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_chunked_prefill_gives_the_logits_and_probes_of_one_chunk(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids = ids_of(40, 7)
    some = plans(model.config.hidden_size)
    for plan in (SkipPlan(), *some[:3], some[6]):
        whole_probes = Probes.of(plan, "prefill")
        (whole,) = forward_rows(model, [Row(ids, 0, new_cache(model), plan, "prefill", whole_probes, 0)])
        cache, probes, parts = new_cache(model), Probes.of(plan, "prefill"), []
        for start in range(0, 40, 9):  # chunks of 9 (the last of 4), as the scheduler feeds a prompt
            row = Row(ids[start : start + 9], start, cache, plan, "prefill", probes, 0)
            parts.extend(forward_rows(model, [row]))
        torch.testing.assert_close(torch.cat(parts), whole, atol=1e-9, rtol=1e-9)
        chunked, one = probes.result(), whole_probes.result()
        assert set(chunked) == set(one)
        for sub, p in one.items():
            q = chunked[sub]
            assert q.similarity == pytest.approx(p.similarity, abs=1e-5)
            assert q.scale == pytest.approx(p.scale, rel=1e-5)
            assert q.scale_no_sink == pytest.approx(p.scale_no_sink, rel=1e-5)
            if p.moments is not None:
                torch.testing.assert_close(q.moments, p.moments, rtol=1e-4, atol=1e-3)


@pytest.fixture
def serving(tokenizer):
    def make(**limits) -> AdaSkipEngine:
        model = tiny_model("llama", dtype=torch.float64)  # batched and alone agree to ~1e-13 on any CPU
        return AdaSkipEngine(model, tokenizer, name="tiny-serving", serving=ServingLimits(**limits))

    return make


PROMPTS = [f"request {k}: " + "the quick brown fox jumps over the lazy dog " * (1 + k % 4) for k in range(8)]


def concurrently(calls) -> list:
    """Run every call in its own thread at once; their results (or exceptions) in order."""
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(k: int) -> None:
        barrier.wait()
        try:
            results[k] = calls[k]()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            results[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_eight_concurrent_requests_with_different_plans_equal_each_served_alone(serving):
    engine = serving(max_batch_size=8, prefill_chunk=16)
    cases = list(zip(PROMPTS, plans(engine.config.hidden_size)))
    forced = [engine.encode(f"answer {k} is here") for k in range(len(cases))]

    def call(k: int):
        prompt, plan = cases[k]
        return engine.generate(prompt, plan, max_new_tokens=12, ignore_eos=True, teacher_forced_ids=forced[k])

    alone = [call(k) for k in range(len(cases))]
    together = concurrently([lambda k=k: call(k) for k in range(len(cases))])
    for k, (a, b) in enumerate(zip(alone, together)):
        assert not isinstance(b, Exception), b
        assert b.token_ids == a.token_ids, f"request {k}"
        torch.testing.assert_close(b.teacher_forced_logits, a.teacher_forced_logits, atol=1e-9, rtol=1e-9)
        assert set(a.stats.batch_sizes) == {1}
    sizes = [s for r in together for s in r.stats.batch_sizes]
    assert max(sizes) >= 4, sizes  # they really ran together
    assert all(r.stats.waited_seconds < 1.0 for r in together)


class Failing:
    """A plan schedule (user code, run inside the request) that fails at decode step 3."""

    def prefill(self):
        return SkipPlan(), False

    def decode(self, step, probes):
        if step == 3:
            raise RuntimeError("schedule failed")
        return SkipPlan(), False


def test_a_request_that_fails_mid_batch_fails_alone(serving):
    engine = serving()
    alone = [engine.generate(p, max_new_tokens=10, ignore_eos=True).token_ids for p in PROMPTS[:4]]
    calls = [lambda p=p: engine.generate(p, max_new_tokens=10, ignore_eos=True) for p in PROMPTS[:4]]
    calls.insert(2, lambda: engine.generate(PROMPTS[5], Failing(), max_new_tokens=10, ignore_eos=True))
    results = concurrently(calls)
    assert isinstance(results[2], RuntimeError) and "schedule failed" in str(results[2])
    others = [r for k, r in enumerate(results) if k != 2]
    assert [r.token_ids for r in others] == alone
    assert max(s for r in others for s in r.stats.batch_sizes) >= 3


def test_cancelling_a_stream_frees_its_place_for_a_waiting_request(serving):
    engine = serving(max_batch_size=2)
    first, second = (engine.stream(p, max_new_tokens=200, ignore_eos=True) for p in PROMPTS[:2])
    next(first), next(second)  # both admitted and answering: the engine is full
    waiting: list = []
    thread = threading.Thread(target=lambda: waiting.append(engine.generate(PROMPTS[2], max_new_tokens=3)))
    thread.start()
    time.sleep(0.3)
    for _ in range(3):
        next(first), next(second)
    assert not waiting  # still waiting for a place
    second.close()  # cancelled: its place goes to the waiting request
    thread.join(5)
    assert waiting and waiting[0].stats.waited_seconds >= 0.3
    first.close()


def test_max_batch_size_and_max_tokens_in_flight_hold(serving):
    engine = serving(max_batch_size=3, max_tokens_in_flight=119, prefill_chunk=8)
    steps: list[tuple[int, int, int, bool]] = []  # rows, admitted tokens, prompt tokens, any answering row
    run = engine.scheduler.run

    def counted(rows):
        held = sum(t.tokens for t in engine.scheduler._active)
        answering = any(len(r.ids) == 1 for r in rows)
        steps.append((len(rows), held, sum(len(r.ids) for r in rows if len(r.ids) > 1), answering))
        return run(rows)

    engine.scheduler.run = counted
    # 30 prompt tokens and 10 to 25 answer tokens: any two fit in 119 tokens, no three do. The lengths differ, so
    # whatever order the requests arrive in, a row finishes while another answers and a waiting prompt joins it.
    requests = [(ids_of(30, k).tolist(), 10 + 3 * k) for k in range(6)]
    calls = [lambda p=p, m=m: engine.generate(p, max_new_tokens=m, ignore_eos=True) for p, m in requests]
    results = concurrently(calls)
    assert [len(r.token_ids) for r in results] == [m for _, m in requests]
    assert max(rows for rows, *_ in steps) == 2
    assert max(held for _, held, *_ in steps) <= 119
    beside = [prompt for _, _, prompt, answering in steps if prompt and answering]
    assert beside and max(beside) <= 8  # a prompt arriving while others answer is fed in chunks


def test_limits_are_checked(tokenizer):
    for kwargs, name in (
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_tokens_in_flight": -1}, "max_tokens_in_flight"),
        ({"prefill_chunk": 1.5}, "prefill_chunk"),
        ({"batch_wait": -0.1}, "batch_wait"),
    ):
        with pytest.raises(ValueError, match=name):
            ServingLimits(**kwargs)


def test_framework_batches_and_async_calls_run_together(serving):
    from langchain_adaskip import ChatAdaSkip
    from llama_index.llms.adaskip import AdaSkipLLM

    engine = serving()
    questions = [f"question {k}: where does the fox sleep?" for k in range(4)]
    chat = ChatAdaSkip(engine=engine, max_tokens=8, collection="batching")
    for answers in (chat.batch(questions), asyncio.run(chat.abatch(questions))):
        sizes = [s for a in answers for s in a.response_metadata["adaskip"]["batch_sizes"]]
        assert max(sizes) >= 2, sizes

    llm = AdaSkipLLM(engine=engine, max_tokens=8, collection="batching")

    async def ask_all() -> list:
        return await asyncio.gather(*(llm.acomplete(q) for q in questions))

    sizes = [s for r in asyncio.run(ask_all()) for s in r.additional_kwargs["adaskip"]["batch_sizes"]]
    assert max(sizes) >= 2, sizes


def test_the_cache_writes_new_tokens_into_the_room_it_keeps():
    import copy

    cache = new_cache(tiny_model("llama"), capacity=8)
    layer = cache.layers[0]
    parts = [torch.randn(1, 2, q, 16) for q in (5, 3, 4)]
    layer.update(parts[0], parts[0] + 1)
    room = layer.keys.data_ptr()
    layer.update(parts[1], parts[1] + 1)
    assert layer.keys.data_ptr() == room  # written in place: nothing copied
    torch.testing.assert_close(layer.keys, torch.cat(parts[:2], dim=-2), rtol=0, atol=0)
    layer.update(parts[2], parts[2] + 1)  # past the capacity: more room, the same contents
    torch.testing.assert_close(layer.keys, torch.cat(parts, dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(layer.values, torch.cat(parts, dim=-2) + 1, rtol=0, atol=0)
    assert cache.get_seq_length(0) == 12
    forked = copy.deepcopy(cache)  # as teacher forcing forks a generation's cache
    forked.layers[0].update(parts[0], parts[0])
    assert forked.get_seq_length(0) == 17 and cache.get_seq_length(0) == 12
    torch.testing.assert_close(cache.layers[0].keys, torch.cat(parts, dim=-2), rtol=0, atol=0)
