"""4-bit decode weights: the grid found in fp32 weights, the packed product against a float64 computation written
here, and an engine whose decode steps read them."""

import pytest
import torch
from conftest import tiny_model
from torch import nn

from adaskip_rag import AdaSkipEngine, SkipPlan, int4, loading
from adaskip_rag.skipping import StaticSchedule

BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7: rounding to bf16 moves a value by at most half of it, relatively


def on_a_grid(out: int, inputs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 weights ``q * d + m`` per 32 inputs, as a Q4_1 file de-quantizes (each group uses 0 and 15), and q, d, m."""
    rng = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, inputs), generator=rng)
    q[:, ::32], q[:, 1::32] = 0, 15
    d = torch.rand(out, inputs // 32, generator=rng) * 0.02 + 1e-3
    m = -torch.rand(out, inputs // 32, generator=rng) * 0.1
    w = q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    return w, q, d, m


def effective(linear: int4.Int4Linear, q: torch.Tensor) -> torch.Tensor:
    """The float64 weight a layer that packed ``q`` stands for: (q - 8) * scale + offset, its bf16 scales and
    offsets."""
    groups = linear.scales.double()  # (groups, out, 2)
    scale, offset = groups[..., 0].T.repeat_interleave(32, 1), groups[..., 1].T.repeat_interleave(32, 1)
    return (q.double() - 8) * scale + offset


def test_the_grid_is_found_in_weights_on_it_and_nowhere_else():
    w, q, d, m = on_a_grid(48, 96)
    found = int4.on_grid(w)
    assert found is not None
    assert torch.equal(found[0], q.int())
    torch.testing.assert_close(found[1], d, rtol=1e-6, atol=0)
    torch.testing.assert_close(found[2], m, rtol=0, atol=0)
    assert int4.on_grid(torch.randn(48, 96)) is None  # random weights
    assert int4.on_grid(w + 1e-4 * torch.randn(48, 96)) is None  # near the grid is not on it
    assert int4.on_grid(w.bfloat16()) is None  # rounded to bf16: no longer the file's values
    assert int4.on_grid(w[:, :80]) is None  # inputs not a multiple of 32


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_the_packed_product_is_the_grid_weights_product(rows):
    w, q, d, m = on_a_grid(64, 96)
    dense = nn.Linear(96, 64, bias=True).bfloat16()
    layer = int4.Int4Linear(dense, *int4.on_grid(w))
    x = torch.randn(2, rows, 96).bfloat16()  # two sequences: the rows of a step are counted over both
    if 2 * rows > int4.MAX_ROWS:
        torch.testing.assert_close(layer(x), nn.functional.linear(x, dense.weight, dense.bias), rtol=0, atol=0)
        return
    weight = effective(layer, q)
    expected = x.double() @ weight.T + dense.bias.double()
    # the weights and the products' terms in bf16 at worst, summed in fp32, the result rounded to bf16
    bound = BF16_EPS * ((x.double().abs() @ weight.abs().T) + dense.bias.double().abs() + expected.abs())
    assert ((layer(x).double() - expected).abs() <= bound).all()
    # the weights are the file's but for the bf16 rounding of the scale d and the offset m + 8d of each group
    d, m = d.double().repeat_interleave(32, 1), m.double().repeat_interleave(32, 1)
    assert ((weight - w.double()).abs() <= BF16_EPS / 2 * (8 * d + (m + 8 * d).abs())).all()


def grid_model_folder(tmp_path, tokenizer, off_grid: str | None = None):
    """A tiny llama saved in fp32 with every projection and FFN weight on a 4-bit grid (``off_grid``: one left off)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for i, (name, module) in enumerate(model.model.layers.named_modules()):
            if isinstance(module, nn.Linear) and name != off_grid:
                module.weight.copy_(on_a_grid(*module.weight.shape, seed=i)[0])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_a_bf16_model_on_the_grid_decodes_with_the_packed_weights(tmp_path, tokenizer, monkeypatch):
    folder = grid_model_folder(tmp_path, tokenizer)
    engine = AdaSkipEngine.from_pretrained(folder, dtype=torch.bfloat16)
    layers = engine.model.model.layers
    assert all(isinstance(getattr(layers[0].self_attn, p), int4.Int4Linear) for p in ("q_proj", "k_proj", "o_proj"))
    assert all(isinstance(getattr(layer.mlp, p), int4.Int4Linear) for layer in layers for p in ("up_proj", "down_proj"))
    plain = AdaSkipEngine.from_pretrained(folder, dtype=torch.bfloat16, int4_decode=False)
    assert isinstance(plain.model.model.layers[0].mlp.up_proj, nn.Linear)
    assert engine.model.state_dict().keys() == plain.model.state_dict().keys()  # the checkpoint's layout
    assert loading.fingerprint(engine.model) == loading.fingerprint(plain.model)  # its profiles

    rows_read: list[int] = []
    matmul = int4.matmul
    monkeypatch.setattr(int4, "matmul", lambda x, *a: rows_read.append(len(x)) or matmul(x, *a))
    ids = engine.encode("a prompt of a few words, read in one prefill")
    answer = engine.generate(ids, SkipPlan(), max_new_tokens=5)
    steps = answer.stats.generated_tokens - 1
    assert rows_read == [1] * (7 * len(layers) * steps)  # every decode step, every layer, and no prefill

    # decode steps fed the answer token by token, against the model in float64 with the packed layers' weights
    reference = AdaSkipEngine.from_pretrained(folder, dtype=torch.float64)
    for layer, ref in zip(layers, reference.model.model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, int4.Int4Linear):
                grid = int4.on_grid(ref.get_submodule(name).weight.float())
                ref.get_submodule(name).weight.data = effective(module, grid[0])
    logits = engine.teacher_forced(ids, answer.token_ids, StaticSchedule(SkipPlan()))[0].double()
    expected = reference.teacher_forced(ids, answer.token_ids, StaticSchedule(SkipPlan()))[0]
    # bf16 activations through 6 layers: a few percent of the logits' range
    assert (logits - expected).abs().max() <= 0.05 * expected.abs().max()
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_weights_off_the_grid_or_not_in_bf16_stay_dense(tmp_path, tokenizer):
    folder = grid_model_folder(tmp_path, tokenizer, off_grid="5.mlp.down_proj")
    off = AdaSkipEngine.from_pretrained(folder, dtype=torch.bfloat16)
    assert not any(isinstance(m, int4.Int4Linear) for m in off.model.modules())  # all or nothing
    folder = grid_model_folder(tmp_path / "on", tokenizer)
    fp32 = AdaSkipEngine.from_pretrained(folder, dtype=torch.float32)  # the kernel's fp32 path is slower than dense
    assert not any(isinstance(m, int4.Int4Linear) for m in fp32.model.modules())
