"""The GPU path: no host reads on the hot path (checked on any device), half precision, and CUDA runs when a GPU is
present (skipped otherwise)."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import tiny_model
from torch.overrides import TorchFunctionMode

from adaskip_rag import AdaSkipEngine, SkipPlan
from adaskip_rag.cache import new_cache
from adaskip_rag.compensation import Affine
from adaskip_rag.forward import skip_forward

# Tensor methods that read a tensor's data into Python: on a GPU each one waits for the device
HOST_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero", "__repr__"}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class HostReads(TorchFunctionMode):
    """Counts the calls that would synchronise a GPU with the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        to_host = (
            name == "to"
            and isinstance(args[0], torch.Tensor)
            and args[0].device.type != "cpu"
            and any(str(a) == "cpu" for a in [*args[1:], *(kwargs or {}).values()])
        )
        if name in HOST_READS or to_host:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _plans(hidden: int) -> dict[str, SkipPlan]:
    affine = Affine(torch.full((hidden,), 0.9), torch.full((hidden,), 0.01))
    return {
        "empty": SkipPlan(),
        "attn": SkipPlan(attn={0: 1.0, 3: 0.8}),
        "kept kv with head": SkipPlan(prefill_attn={1: 1.0, 2: affine}, head=2),
        "ffn, affine": SkipPlan(ffn={1: affine, 3: 1.0}, decode_ffn={2: 1.0}, head=1),
    }


@pytest.mark.parametrize("name", list(_plans(64)))
def test_a_forward_reads_nothing_back_without_probes_and_once_with_them(tiny_engine, name):
    model = tiny_engine.model
    plan = _plans(model.config.hidden_size)[name]
    ids = torch.randint(5, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    for probe, expected in ((False, {}), (True, {"cpu": 1, "tolist": 1})):
        cache = new_cache(model)
        with HostReads() as prefill_reads:
            skip_forward(model, ids, 0, cache, plan, "prefill", probe=probe)
        with HostReads() as decode_reads:
            skip_forward(model, ids[:, :1], 24, cache, plan, "decode", probe=probe)
        assert dict(prefill_reads.calls) == expected, name
        assert dict(decode_reads.calls) == expected, name


def test_a_greedy_decode_step_reads_back_one_token(tiny_engine):
    plan = SkipPlan(attn={2: 1.0}, ffn={1: 0.9})
    with HostReads() as short:
        tiny_engine.generate("the cat sat on", plan, max_new_tokens=2, ignore_eos=True)
    with HostReads() as long:
        tiny_engine.generate("the cat sat on", plan, max_new_tokens=12, ignore_eos=True)
    extra = long.calls - short.calls
    assert dict(extra) == {"__int__": 10}  # the sampled token of each of the 10 more steps, nothing else


def test_probe_moments_come_back_to_the_host_with_the_measures(tiny_engine):
    cache = new_cache(tiny_engine.model)
    ids = torch.randint(5, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    _, probes = skip_forward(tiny_engine.model, ids, 0, cache, SkipPlan(), "prefill", probe=True)
    assert len(probes) == 2 * tiny_engine.num_layers
    for probe in probes.values():
        assert probe.moments.device.type == "cpu" and probe.moments.dtype == torch.float64
        assert isinstance(probe.similarity, float)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_empty_plan_matches_transformers_and_skips_run(tokenizer, dtype):
    model = tiny_model("llama").to(dtype)
    engine = AdaSkipEngine(model, tokenizer, name=f"tiny-{dtype}")
    ids = engine.encode("the quick brown fox jumps over the lazy dog")
    ours = engine.generate(ids, max_new_tokens=6, ignore_eos=True).token_ids
    ref = model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ours == ref[0, len(ids) :].tolist()
    for plan in _plans(model.config.hidden_size).values():
        result = engine.generate(ids, plan, max_new_tokens=4, ignore_eos=True, probe=True)
        assert len(result.token_ids) == 4 and result.prefill_probes


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_engine_matches_transformers_without_syncs_per_sublayer(tokenizer, dtype):
    model = tiny_model("llama").to("cuda", dtype)
    engine = AdaSkipEngine(model, tokenizer, name=f"tiny-cuda-{dtype}")
    ids = engine.encode("the quick brown fox jumps over the lazy dog")
    ours = engine.generate(ids, max_new_tokens=6, ignore_eos=True).token_ids
    ref = model.generate(
        torch.tensor([ids], device="cuda"), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert ours == ref[0, len(ids) :].tolist()
    prompt = torch.tensor([ids], device="cuda")
    for plan in _plans(model.config.hidden_size).values():
        cache = new_cache(model)
        skip_forward(model, prompt, 0, cache, plan, "prefill")  # warm-up: first uses may copy to the device
        cache = new_cache(model)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            skip_forward(model, prompt, 0, cache, plan, "prefill")
            skip_forward(model, prompt[:, :1], len(ids), cache, plan, "decode")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        result = engine.generate(ids, plan, max_new_tokens=4, ignore_eos=True, probe=True)
        assert len(result.token_ids) == 4


@cuda
def test_cuda_collection_learning_and_langchain(tokenizer, tmp_path):
    from adaskip_rag.stores import SQLiteProfileStore
    from langchain_adaskip import ChatAdaSkip

    model = tiny_model("llama").to("cuda", torch.bfloat16)
    engine = AdaSkipEngine(model, tokenizer, name="tiny-cuda", store=SQLiteProfileStore(tmp_path / "p.db"))
    for _ in range(3):
        result = engine.generate("the cat sat on the mat", collection="docs", max_new_tokens=4)
        assert result.stats.generated_tokens >= 1
    answer = ChatAdaSkip(engine=engine, max_tokens=4).invoke("hello")
    assert answer.response_metadata["adaskip"]["prompt_tokens"] > 0


def test_adapters_share_one_engine_in_the_dtype_they_name():
    from langchain_adaskip import ChatAdaSkip
    from llama_index.llms.adaskip import AdaSkipLLM

    chat, llm = ChatAdaSkip(dtype="bfloat16", max_tokens=2), AdaSkipLLM(dtype="bfloat16", max_tokens=2)
    assert chat.get_engine() is llm.engine is not AdaSkipEngine.shared("default")
    assert llm.engine.model.dtype == torch.bfloat16
    assert llm.engine.fingerprint == AdaSkipEngine.shared("default").fingerprint  # profiles serve either precision
    assert llm.engine.learner.default_profile is not None  # the shipped one, learned in fp32
    assert chat.invoke("Hi", collection="bf16-check").response_metadata["adaskip"]["generated_tokens"] >= 1
