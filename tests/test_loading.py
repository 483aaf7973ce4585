"""Model loading: local folders, unsupported architectures, atomic conversion of the default model."""

import math
import threading
import time

import pytest
import torch
from conftest import tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from adaskip_rag import AdaSkipEngine, SkipPlan, loading
from adaskip_rag.loading import SUPPORTED_ARCHITECTURES, build_atomically


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_local_folder_of_each_supported_family_loads(tmp_path, tokenizer, arch):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = AdaSkipEngine.from_pretrained(tmp_path)
    assert engine.model.dtype == torch.float32 and engine.device.type == "cpu"
    ids = engine.encode("a local model")
    expected = AdaSkipEngine(model, tokenizer).generate(ids, SkipPlan(attn={1: 1.0}), max_new_tokens=6)
    assert engine.generate(ids, SkipPlan(attn={1: 1.0}), max_new_tokens=6).token_ids == expected.token_ids


def test_dtype_and_device_map_pass_through(tmp_path, tokenizer):
    tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert AdaSkipEngine.from_pretrained(tmp_path, dtype=torch.bfloat16).model.dtype == torch.bfloat16
    mapped = AdaSkipEngine.from_pretrained(tmp_path, device_map="cpu")
    assert mapped.device.type == "cpu" and mapped.generate("hi", max_new_tokens=2).stats.generated_tokens >= 1


def test_the_cpu_precision_is_bf16_only_where_the_cpu_has_it_natively_and_it_measures_faster(
    tmp_path, tokenizer, monkeypatch
):
    config = tiny_model("llama").config
    monkeypatch.delenv("ADASKIP_DTYPE")
    speedups = []
    monkeypatch.setattr(loading, "_bf16_speedup", lambda hidden, ffn: speedups.pop())
    for caps, speedup, expected in (
        ({"avx2": True, "avx512_bf16": False}, None, torch.float32),  # no native bf16: not even measured
        ({"avx512_bf16": True}, 2.0, torch.bfloat16),
        ({"amx_bf16": True}, 1.1, torch.float32),  # native, but not faster enough here
        ({"architecture": "aarch64", "bf16": True}, 1.6, torch.bfloat16),
    ):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        speedups[:] = [] if speedup is None else [speedup]
        assert loading.default_cpu_dtype(config) == expected and speedups == []
    tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    speedups[:] = [2.0]
    assert AdaSkipEngine.from_pretrained(tmp_path).model.dtype == torch.bfloat16  # the aarch64 CPU above
    monkeypatch.setenv("ADASKIP_DTYPE", "float32")
    assert AdaSkipEngine.from_pretrained(tmp_path).model.dtype == torch.float32
    monkeypatch.setenv("ADASKIP_DTYPE", "half")
    with pytest.raises(ValueError, match="ADASKIP_DTYPE must be 'float32' or 'bfloat16', got 'half'"):
        AdaSkipEngine.from_pretrained(tmp_path)


def test_the_bf16_measurement_compares_the_two_precisions_and_leaves_the_global_generator_alone():
    state = torch.get_rng_state()
    assert 0 < loading._bf16_speedup.__wrapped__(64, 128) < math.inf
    assert torch.equal(torch.get_rng_state(), state)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: " + ", ".join(SUPPORTED_ARCHITECTURES)):
        AdaSkipEngine.from_pretrained(tmp_path)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        AdaSkipEngine.from_pretrained(tmp_path / "nowhere")


def test_crash_during_build_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "m"

    def crash(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atomically(target, crash)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_concurrent_builds_leave_one_complete_folder(tmp_path):
    target = tmp_path / "m"
    errors = []

    def build(out):
        (out / "a").write_text("1")
        time.sleep(0.2)
        (out / "config.json").write_text("{}")

    def run():
        try:
            build_atomically(target, build)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in target.iterdir()) == ["a", "config.json"]
