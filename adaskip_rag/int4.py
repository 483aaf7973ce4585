"""4-bit weights for decode steps. A model whose linear weights lie on a 4-bit grid (the default model ships as Q4_1:
per 32 inputs, ``w = q * d + m`` with ``q`` in 0..15) keeps them packed beside its dense copy; a matrix product of at
most :data:`MAX_ROWS` rows (a decode step) reads the packed weights, a quarter of bf16's bytes, through torch's CPU
int4 weight-only kernel. Prefill keeps the dense weights, where the product is compute-bound."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel

GROUP = 32  # inputs per scale and offset: Q4_1's block
MAX_ROWS = 4  # measured (bf16, 1-2 threads, weights in cache): the kernel is 1.1-2.5x dense up to 4 rows, slower from 8
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_FFN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class Int4Linear(nn.Module):
    """A linear layer with its weight also packed as 4-bit values with a bf16 scale and offset per :data:`GROUP`
    inputs: ``w = (q - 8) * scale + offset``. Rows beyond :data:`MAX_ROWS` use the dense weight. Its parameters and
    state dict are the dense layer's."""

    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        device = linear.weight.device
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(device), 1), False)
        scales = torch.stack([scale, offset + 8 * scale], -1).transpose(0, 1).contiguous()  # (groups, out, 2)
        self.register_buffer("scales", scales.to(device, linear.weight.dtype), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1]
        if rows.numel() > MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        out = matmul(x.reshape(-1, x.shape[-1]), self.packed, self.scales).view(*rows, self.out_features)
        return out if self.bias is None else out + self.bias


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` (rows, in) times the packed weight (out, in), transposed: torch's CPU int4 weight-only kernel."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales)


def on_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(q, scale, offset)`` with ``weight == q * scale + offset`` per :data:`GROUP` inputs (q: int32 in 0..15) to
    fp32 rounding, or None where ``weight`` (fp32, out x in) is not on such a grid."""
    out, inputs = weight.shape
    if inputs % GROUP or weight.dtype != torch.float32:
        return None
    groups = weight.view(out, inputs // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    q = ((groups - low[..., None]) / torch.where(scale == 0, 1.0, scale)[..., None]).round().clamp(0, 15)
    error = (q * scale[..., None] + low[..., None] - groups).abs().amax(-1)
    if bool((error > 16 * torch.finfo(torch.float32).eps * torch.maximum(low.abs(), high.abs())).any()):
        return None
    return q.view(out, inputs).to(torch.int32), scale, low


def pack(model: PreTrainedModel, folder: Path) -> int:
    """Give ``model`` (bf16 on CPU) :class:`Int4Linear` projections and FFN layers where the fp32 weights in
    ``folder``'s safetensors all lie on a 4-bit grid; the number of layers packed (0: left as it was)."""
    if model.dtype != torch.bfloat16 or model.device.type != "cpu":
        return 0  # the kernel's fp32 path is a slow reference, and other devices have their own
    files = sorted(folder.glob("*.safetensors"))
    names = [f"model.layers.{i}.{part}" for i in range(len(model.model.layers)) for part in _PROJECTIONS + _FFN]
    grids = {}
    for file in files:
        with safe_open(file, "pt") as tensors:
            stored = set(tensors.keys())
            for name in names:
                if f"{name}.weight" in stored:
                    grid = on_grid(tensors.get_tensor(f"{name}.weight"))
                    if grid is None:
                        return 0
                    grids[name] = grid
    if len(grids) != len(names):
        return 0
    for name, grid in grids.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, Int4Linear(getattr(owner, attr), *grid))
    return len(grids)
