"""What replaces a skipped sublayer's output, fitted in closed form from running sums over prompt tokens.

A skipped sublayer with input x (one token's hidden state, d channels) outputs f(x) instead of its output y:

* ``scalar`` (the paper): f(x) = s x, s = ||y|| / ||x|| over the prompt (see ``AdaSkipPolicy.robust_scale``);
* ``bias``: f(x) = s x + b with b = mean(y) - s mean(x);
* ``affine``: f(x)_c = a_c x_c + b_c per channel c, the least-squares fit of y_c on x_c.

Every fit needs only the :func:`moments` of a sublayer: per-channel sums of x, y, x^2 and x*y, the total of
||y||^2 and the token count (token 0, the attention sink, left out). They add across requests and replicas,
so merged profiles give exactly the fit of one pass over all their tokens. The same sums give each fit's
relative residual error ||y - f(x)||^2 / ||y||^2 (:func:`residual_error`), which ranks sublayers by how well
their compensation reproduces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Mode = Literal["scalar", "bias", "affine"]
MODES: tuple[Mode, ...] = ("scalar", "bias", "affine")


def moments_width(hidden: int) -> int:
    """Length of one sublayer's moments vector: [sum x, sum y, sum x^2, sum x*y] (d each), sum ||y||^2, tokens."""
    return 4 * hidden + 2


def moments(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The moments (float64, :func:`moments_width` long) of input ``x`` and output ``y``, both (tokens, d).

    Sums of squares and products are taken around the means in the input's precision and shifted back in
    float64, so channels with a large mean and a small spread keep their variance."""
    n, d = x.shape
    if n == 0:
        return torch.zeros(moments_width(d), dtype=torch.float64, device=x.device)
    x, y = x.float(), y.float()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    cxx, cxy = (xc * xc).sum(0).double(), (xc * yc).sum(0).double()
    cyy = torch.linalg.vector_norm(yc).double().square()
    mx, my = mx.double(), my.double()
    per_channel = torch.stack([n * mx, n * my, cxx + n * mx * mx, cxy + n * mx * my]).flatten()
    count = torch.tensor(float(n), dtype=torch.float64, device=x.device)
    return torch.cat([per_channel, torch.stack([cyy + n * my.square().sum(), count])])


def _split(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    sx, sy, sxx, sxy = m[:-2].view(4, -1)
    return sx, sy, sxx, sxy, float(m[-2]), float(m[-1])


@dataclass(frozen=True, eq=False)
class Affine:
    """f(x) = scale * x + bias, per channel (``scale`` and ``bias`` are (d,) tensors)."""

    scale: torch.Tensor
    bias: torch.Tensor
    _cast: dict = field(default_factory=dict, init=False, repr=False)  # (device, dtype) -> (scale, bias) there

    def __post_init__(self) -> None:
        scale, bias = torch.as_tensor(self.scale).float(), torch.as_tensor(self.bias).float()
        if scale.dim() != 1 or scale.shape != bias.shape:
            raise ValueError(
                f"Affine: scale and bias must be vectors of one length, got {tuple(scale.shape)} "
                f"and {tuple(bias.shape)}"
            )
        if not (torch.isfinite(scale).all() and torch.isfinite(bias).all()):
            raise ValueError("Affine: scale and bias must be finite")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "bias", bias)

    @property
    def hidden(self) -> int:
        return self.scale.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._cast:
            self._cast[key] = (self.scale.to(x), self.bias.to(x))
        scale, bias = self._cast[key]
        return torch.addcmul(bias, x, scale)


Compensation = float | Affine


def apply(x: torch.Tensor, compensation: Compensation) -> torch.Tensor:
    """The output that replaces a skipped sublayer with input ``x``."""
    return compensation(x) if isinstance(compensation, Affine) else x * compensation


def fit(m: torch.Tensor, mode: Mode, scale: float) -> Compensation:
    """The ``mode`` compensation from moments ``m``; ``scale`` is the scalar s (used by ``scalar`` and ``bias``, and
    by ``affine`` for channels whose input does not vary). Without measured tokens every mode falls back to s."""
    if mode not in MODES:
        raise ValueError(f"compensation must be one of {MODES}, got {mode!r}")
    sx, sy, sxx, sxy, _, n = _split(m)
    if mode == "scalar" or n == 0:
        return scale
    if mode == "bias":
        return Affine(torch.full_like(sx, scale), (sy - scale * sx) / n)
    var = sxx - sx * sx / n  # n times the variance of each input channel
    cov = sxy - sx * sy / n
    flat = var <= 1e-12 * var.abs().max().clamp_min(1e-30)
    a = torch.where(flat, torch.full_like(var, scale), cov / torch.where(flat, torch.ones_like(var), var))
    return Affine(a, (sy - a * sx) / n)


def residual_error(m: torch.Tensor, compensation: Compensation) -> float:
    """||y - f(x)||^2 / ||y||^2 summed over the tokens of moments ``m`` (0 when nothing was measured)."""
    sx, sy, sxx, sxy, yy, n = _split(m)
    if n == 0 or yy <= 0:
        return 0.0
    if isinstance(compensation, Affine):
        a, b = compensation.scale.double(), compensation.bias.double()
    else:
        a, b = torch.full_like(sx, compensation), torch.zeros_like(sx)
    sse = (
        yy - 2 * (a * sxy).sum() - 2 * (b * sy).sum() + (a * a * sxx).sum() + 2 * (a * b * sx).sum() + n * (b * b).sum()
    )
    return max(0.0, float(sse)) / yy


def check_moments(m: torch.Tensor) -> bool:
    """Whether every row of ``m`` (..., width) can be moments: at least one channel, finite, non-negative squares,
    sums of ||y||^2 and token counts."""
    width = m.shape[-1] if m.dim() else 0
    if width < moments_width(1) or (width - 2) % 4:
        return False
    d = (width - 2) // 4
    squares = m[..., 2 * d : 3 * d]
    return bool(torch.isfinite(m).all() and (squares >= 0).all() and (m[..., -2:] >= 0).all())
