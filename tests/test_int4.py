"""4-bit decode weights: the GGUF grids found in fp32 weights, the packed product against a float64 computation
written here, and an engine whose decode steps read them."""

import pytest
import torch
from conftest import tiny_model
from torch import nn

from adaskip_rag import AdaSkipEngine, SkipPlan, int4, loading
from adaskip_rag.skipping import StaticSchedule

U = torch.finfo(torch.bfloat16).eps / 2  # 2**-8: rounding to bf16 moves a value by at most this much, relatively


def q4_1(out: int, inputs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 weights ``q * d + m`` per 32 inputs as a Q4_1 file de-quantizes (each group uses 0 and 15), q, d, m."""
    rng = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, inputs), generator=rng)
    q[:, ::32], q[:, 1::32] = 0, 15
    d = torch.rand(out, inputs // 32, generator=rng) * 0.02 + 1e-3
    m = -torch.rand(out, inputs // 32, generator=rng) * 0.1
    return q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1), q, d, m


def q8_0(out: int, inputs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 weights ``q * d`` per 32 inputs as a Q8_0 file de-quantizes (each group reaches 127 or -127), q, d."""
    rng = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out, inputs), generator=rng)
    q[:, ::32] = 127 * (1 - 2 * torch.randint(0, 2, (out, inputs // 32), generator=rng))
    d = torch.rand(out, inputs // 32, generator=rng) * 0.01 + 1e-4
    return q.float() * d.repeat_interleave(32, 1), q, d


def effective(layer: int4.Int4Linear, planes: list) -> torch.Tensor:
    """The float64 weight a packed layer stands for: the sum over its planes of (q - 8) * scale + zero, with the
    planes' bf16 scales and zeros (``planes``: the 4-bit values each plane packed)."""
    weight = 0
    for p, (q, _, _) in enumerate(planes):
        scales = layer.scales[:, p * len(q) : (p + 1) * len(q)].double()  # (groups, out, 2): plane p's outputs
        scale, zero = scales[..., 0].T.repeat_interleave(32, 1), scales[..., 1].T.repeat_interleave(32, 1)
        weight = weight + (q.double() - 8) * scale + zero
    return weight


def test_the_grids_are_found_in_weights_on_them_and_nowhere_else():
    w, q, d, m = q4_1(48, 96)
    ((found, scale, offset),) = int4.grid_planes(w)
    assert torch.equal(found, q.int())
    torch.testing.assert_close(scale, d, rtol=1e-6, atol=0)
    torch.testing.assert_close(offset, m, rtol=0, atol=0)

    w8, q8, d8 = q8_0(48, 96)
    (hi, scale_hi, offset_hi), (lo, scale_lo, offset_lo) = int4.grid_planes(w8)
    assert hi.min() >= 0 and hi.max() <= 15 and lo.min() >= 0 and lo.max() <= 15
    assert torch.equal(16 * (hi - 8) + lo, q8.int())  # q = 16 * hi + lo, hi stored with 8 added
    torch.testing.assert_close(scale_lo, d8, rtol=1e-6, atol=0)
    torch.testing.assert_close(scale_hi, 16 * scale_lo, rtol=0, atol=0)
    assert torch.equal(offset_hi, -128 * scale_lo) and not offset_lo.any()

    assert int4.grid_planes(torch.randn(48, 96)) is None  # random weights
    assert int4.grid_planes(w + 1e-4 * torch.randn(48, 96)) is None  # near a grid is not on it
    assert int4.grid_planes(w8.bfloat16()) is None  # rounded to bf16: no longer the file's values
    assert int4.grid_planes(w[:, :80]) is None  # inputs not a multiple of 32


@pytest.mark.parametrize("grid", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_the_packed_product_is_the_grid_weights_product(grid, rows):
    w = q4_1(64, 96)[0] if grid == "q4_1" else q8_0(64, 96)[0]
    planes = int4.grid_planes(w)
    dense = nn.Linear(96, 64, bias=True).bfloat16()
    layer = int4.Int4Linear(dense, planes)
    x = torch.randn(2, rows, 96).bfloat16()  # two sequences: the rows of a step are counted over both
    if 2 * rows > int4.MAX_ROWS:
        torch.testing.assert_close(layer(x), nn.functional.linear(x, dense.weight, dense.bias), rtol=0, atol=0)
        return
    weight = effective(layer, planes)
    expected = x.double() @ weight.T + dense.bias.double()
    # per plane: the weights and the products' terms in bf16 at worst, summed in fp32, the result rounded to bf16
    bound = 2 * U * len(planes) * ((x.double().abs() @ weight.abs().T) + dense.bias.double().abs() + expected.abs())
    assert ((layer(x).double() - expected).abs() <= bound).all()
    # the weights are the file's but for the bf16 rounding of each plane's scale s and zero z = offset + 8 s
    rounding = sum(
        U * (8 * s.double().abs() + (m + 8 * s).double().abs()).repeat_interleave(32, 1) for _, s, m in planes
    )
    assert ((weight - w.double()).abs() <= rounding).all()


def grid_model_folder(folder, tokenizer, off_grid: str | None = None):
    """A tiny llama saved in fp32 with its layers' weights on a Q4_1 grid and its head on a Q8_0 grid (``off_grid``:
    a module left off)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for i, (name, module) in enumerate(model.named_modules()):
            if isinstance(module, nn.Linear) and name != off_grid:
                grid = q8_0 if name == "lm_head" else q4_1
                module.weight.copy_(grid(*module.weight.shape, seed=i)[0] * (40 if name == "lm_head" else 1))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_bf16_model_on_the_grids_decodes_with_the_packed_weights(tmp_path, tokenizer, monkeypatch):
    folder = grid_model_folder(tmp_path, tokenizer)
    engine = AdaSkipEngine.from_pretrained(folder, dtype=torch.bfloat16)
    layers = engine.model.model.layers
    linears = [(n, m) for n, m in engine.model.named_modules() if isinstance(m, (nn.Linear, int4.Int4Linear))]
    assert len(linears) == 7 * len(layers) + 1 and all(isinstance(m, int4.Int4Linear) for _, m in linears)
    assert engine.model.lm_head.planes == 2 and layers[0].mlp.up_proj.planes == 1
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
    # the prefill's layers read the dense weights, its head (one row) and every decode step the packed ones
    assert rows_read == [1] * (1 + (7 * len(layers) + 1) * steps)

    # teacher forcing reads the packed weights too, token by token as decode steps do
    rows_read.clear()
    long = engine.generate(ids, SkipPlan(), max_new_tokens=11, min_new_tokens=11).token_ids
    rows_read.clear()
    engine.teacher_forced(ids, long, SkipPlan())
    assert rows_read == [1] + [1] * (7 * len(layers) + 1) * 10  # the prefill's head, then 10 tokens fed
    forced = engine.teacher_forced(ids, long, SkipPlan())[0]
    assert forced.argmax(-1).tolist() == long  # computed as the greedy answer was: it agrees with itself exactly

    # decode steps fed the answer token by token, against the model in float64 with the packed layers' weights
    reference = AdaSkipEngine.from_pretrained(folder, dtype=torch.float64)
    for name, module in engine.model.named_modules():
        if isinstance(module, int4.Int4Linear):
            weight = reference.model.get_submodule(name).weight
            weight.data = effective(module, int4.grid_planes(weight.float()))
    logits = engine.teacher_forced(ids, answer.token_ids, StaticSchedule(SkipPlan()))[0].double()
    expected = reference.teacher_forced(ids, answer.token_ids, StaticSchedule(SkipPlan()))[0]
    # bf16 activations through 6 layers: a few percent of the logits' range
    assert (logits - expected).abs().max() <= 0.05 * expected.abs().max()
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_weights_off_the_grids_or_not_in_bf16_stay_dense(tmp_path, tokenizer):
    folder = grid_model_folder(tmp_path / "layer", tokenizer, off_grid="model.layers.5.mlp.down_proj")
    off = AdaSkipEngine.from_pretrained(folder, dtype=torch.bfloat16)
    assert not any(isinstance(m, int4.Int4Linear) for m in off.model.modules())  # the layers: all or nothing
    folder = grid_model_folder(tmp_path / "head", tokenizer, off_grid="lm_head")
    head_off = AdaSkipEngine.from_pretrained(folder, dtype=torch.bfloat16)
    assert isinstance(head_off.model.lm_head, nn.Linear)  # the head on its own
    assert isinstance(head_off.model.model.layers[5].mlp.down_proj, int4.Int4Linear)
    fp32 = AdaSkipEngine.from_pretrained(folder, dtype=torch.float32)  # the kernel's fp32 path is slower than dense
    assert not any(isinstance(m, int4.Int4Linear) for m in fp32.model.modules())
