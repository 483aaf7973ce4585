"""4-bit weights for decode steps. A model whose linear weights lie on a GGUF grid keeps them packed beside its
dense copy: per 32 inputs, ``w = q * d + m`` with ``q`` in 0..15 (Q4_1, the default model's layers) or ``w = q * d``
with ``q`` in -127..127 (Q8_0, its embedding and output head), the latter as two 4-bit planes (``q = 16 * hi + lo``).
A matrix product of at most :data:`MAX_ROWS` rows (a decode step) reads the packed weights, a quarter (Q4_1) or
five eighths (Q8_0) of bf16's bytes, through torch's CPU int4 weight-only kernel. Prefill keeps the dense weights,
where the product is compute-bound."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel

GROUP = 32  # inputs per scale: the GGUF block
MAX_ROWS = 4  # measured (bf16, 1-2 threads, weights in cache): the kernel is 1.1-2.5x dense up to 4 rows, slower from 8
_LAYER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

Grid = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q (out, in) in 0..15, scale and offset (out, in / GROUP)


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x`` (rows, in) times a packed weight (out, in), transposed: torch's CPU int4 weight-only kernel."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales)


class Int4Linear(nn.Module):
    """A linear layer whose weight is also held as the sum of 4-bit planes (one for Q4_1, two for Q8_0), packed for
    the kernel one above the other as one weight of ``planes * out`` outputs; rows beyond :data:`MAX_ROWS` use the
    dense weight. The kernel reads a plane ``w = q * scale + offset`` as ``(q - 8) * scale + zero``, its scale and
    zero in the activations' precision. Its parameters and state dict are the dense layer's."""

    packed: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: nn.Linear, planes: list[Grid]) -> None:
        super().__init__()
        self.in_features, self.out_features, self.planes = linear.in_features, linear.out_features, len(planes)
        self.weight, self.bias = linear.weight, linear.bias
        like = linear.weight
        q = torch.cat([q for q, _, _ in planes]).to(like.device)
        scale, offset = torch.cat([s for _, s, _ in planes]), torch.cat([m for _, _, m in planes])
        scales = torch.stack([scale, offset + 8 * scale], -1).transpose(0, 1).contiguous()  # (groups, out, 2)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), False)
        self.register_buffer("scales", scales.to(like.device, like.dtype), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a decode step's tensor ops cost as much as its
        if len(flat) > MAX_ROWS:  # products: none is spent on shapes that are already right
            return F.linear(x, self.weight, self.bias)
        out = matmul(flat, self.packed, self.scales)
        if self.planes > 1:
            out = out.view(-1, self.planes, self.out_features).sum(1)
        if x.dim() != 2:
            out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def packed(model: nn.Module) -> bool:
    """Whether ``model`` has :class:`Int4Linear` layers (its decode steps read 4-bit weights)."""
    return any(isinstance(m, Int4Linear) for m in model.modules())


def grid_planes(weight: torch.Tensor) -> list[Grid] | None:
    """The 4-bit planes whose sum is ``weight`` (fp32, out x in) to fp32 rounding: one where it lies on a Q4_1 grid,
    two on a Q8_0 grid; None on neither."""
    out, inputs = weight.shape
    if inputs % GROUP or weight.dtype != torch.float32:
        return None
    groups = weight.view(out, inputs // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    tolerance = 16 * torch.finfo(torch.float32).eps * torch.maximum(low.abs(), high.abs())
    q4 = _on_grid(groups, (high - low) / 15, low, tolerance)
    if q4 is not None:
        return [(q4, (high - low) / 15, low)]
    scale = torch.maximum(low.abs(), high.abs()) / 127
    q8 = _on_grid(groups, scale, torch.zeros_like(scale), tolerance)
    if q8 is None:
        return None
    high_nibble = torch.div(q8, 16, rounding_mode="floor")  # -8..7
    return [(high_nibble + 8, 16 * scale, -128 * scale), (q8 - 16 * high_nibble, scale, torch.zeros_like(scale))]


def _on_grid(
    groups: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, tolerance: torch.Tensor
) -> torch.Tensor | None:
    """``q`` (int32, out x in) with ``groups == q * scale + offset`` to ``tolerance``, or None."""
    q = ((groups - offset[..., None]) / torch.where(scale == 0, 1.0, scale)[..., None]).round()
    if bool(((q * scale[..., None] + offset[..., None] - groups).abs().amax(-1) > tolerance).any()):
        return None
    return q.flatten(1).to(torch.int32)


def pack(model: PreTrainedModel, folder: Path) -> int:
    """Give ``model`` (bf16 on CPU) :class:`Int4Linear` layers where the fp32 weights in ``folder``'s safetensors
    all lie on a GGUF grid (its decoder layers' projections and FFN; its output head too where it does): the number of
    layers packed, 0 where it was left as it was."""
    if model.dtype != torch.bfloat16 or model.device.type != "cpu":
        return 0  # the kernel's fp32 path is a slow reference, and other devices have their own
    names = [f"model.layers.{i}.{linear}" for i in range(len(model.model.layers)) for linear in _LAYER_LINEARS]
    head = "model.embed_tokens" if model.config.tie_word_embeddings else "lm_head"  # where the head's weight is stored
    grids: dict[str, list[Grid]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as tensors:
            stored = set(tensors.keys())
            for name in (*names, head):
                if f"{name}.weight" in stored:
                    planes = grid_planes(tensors.get_tensor(f"{name}.weight"))
                    if planes is None and name != head:
                        return 0
                    if planes is not None:
                        grids["lm_head" if name == head else name] = planes
    if not all(name in grids for name in names):
        return 0
    for name, planes in grids.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, Int4Linear(getattr(owner, attr), planes))
    return len(grids)
