"""IO-similarity probes (AdaSkip, arXiv 2501.02336): what the forward steps of a sequence measure at each sublayer
they run, cosine of its input and output and their norm ratio, and the moments compensations are fitted from."""

from __future__ import annotations

from typing import Literal

import torch

from .compensation import moments
from .skipping import Probe, SkipPlan, Sublayer

Phase = Literal["prefill", "decode"]


class Probes:
    """What the forward steps of one sequence measured at every sublayer they ran (a prompt may take several
    steps): the sums that IO similarity and norm ratios come from, and, in a prefill with the full model, the
    moments compensations are fitted from (``compensation.moments``). Token 0, the attention sink, is left out of
    ``scale_no_sink`` and the moments."""

    def __init__(self, fit_moments: bool):
        self.fit_moments = fit_moments
        # per step: its sublayers and their [sum of cosines, tokens, sum |x|^2, |y|^2, both without the sink]
        self.steps: list[tuple[list[Sublayer], torch.Tensor]] = []
        self.moments: dict[Sublayer, torch.Tensor] = {}
        self.seconds: dict[Sublayer, float] = {}  # host time spent measuring each sublayer

    def spent(self, subs: list[Sublayer], seconds: float) -> None:
        """Add ``seconds`` of measuring, shared evenly by the sublayers ``subs``."""
        for sub in subs:
            self.seconds[sub] = self.seconds.get(sub, 0.0) + seconds / len(subs)

    @classmethod
    def of(cls, plan: SkipPlan, phase: Phase) -> Probes:
        """The probes of a forward under ``plan`` in ``phase``: moments only in a prefill with the full model."""
        return cls(fit_moments=phase == "prefill" and plan.is_empty)

    def add(self, subs: list[Sublayer], stats: torch.Tensor, first: int) -> None:
        """Add one step's per-token ``stats`` (sublayers, tokens, 3: x.y, |x|^2, |y|^2) of the sublayers ``subs``;
        ``first`` = 1 when the tokens start with token 0."""
        dot, sx, sy = stats.float().unbind(-1)
        cosines = (dot / (sx * sy).sqrt().clamp_min(1e-12)).sum(1)
        tokens = torch.full_like(cosines, stats.shape[1])
        no_sink = (sx[:, first:].sum(1), sy[:, first:].sum(1))
        self.steps.append((subs, torch.stack([cosines, tokens, sx.sum(1), sy.sum(1), *no_sink], 1)))

    def add_moments(self, sub: Sublayer, x: torch.Tensor, y: torch.Tensor, first: int) -> None:
        m = moments(x[first:], y[first:])
        self.moments[sub] = self.moments[sub] + m if sub in self.moments else m

    def result(self) -> dict[Sublayer, Probe]:
        """The probes, read back to the host in one transfer (on a GPU, the only synchronisation they cost)."""
        if not self.steps:
            return {}
        subs = [sub for step, _ in self.steps for sub in step]
        fitted = list(self.moments)
        host = torch.cat([torch.cat([t for _, t in self.steps]).double().flatten(), *self.moments.values()]).cpu()
        totals: dict[Sublayer, list[float]] = {}
        for sub, values in zip(subs, host[: 6 * len(subs)].view(-1, 6).tolist()):
            totals[sub] = [a + b for a, b in zip(totals.get(sub, [0.0] * 6), values)]
        sums = dict(zip(fitted, host[6 * len(subs) :].view(len(fitted), -1))) if fitted else {}
        out = {}
        for sub, (cosines, tokens, sx, sy, sx_ns, sy_ns) in totals.items():
            scale = (sy / sx) ** 0.5 if sx > 0 else 0.0
            no_sink = (sy_ns / sx_ns) ** 0.5 if sx_ns > 0 else scale
            out[sub] = Probe(
                cosines / tokens, scale, no_sink, moments=sums.get(sub), seconds=self.seconds.get(sub, 0.0)
            )
        return out


def token_stats(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per token of a sublayer's input ``x`` and output ``y`` (tokens, d): x.y, |x|^2 and |y|^2, (tokens, 3)."""
    x, y = x.float(), y.float()
    return torch.stack([torch.einsum("td,td->t", x, y), x.square().sum(-1), y.square().sum(-1)], -1)
