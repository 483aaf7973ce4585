"""Which sublayers to skip: AdaSkip (offline + online importance learning), cost-aware AdaSkip, baselines.

A policy turns a profile (mean IO similarity and scale of every sublayer and the moments compensations are
fitted from, see ``profiles.py``) into a :class:`~adaskip_rag.skipping.PlanSchedule` for one request.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .checks import check_int, check_real
from .compensation import MODES, Compensation, Mode, fit, moments_width, residual_error
from .costs import CostModel
from .profiles import Profile
from .skipping import Probe, SkipPlan, StaticSchedule, Sublayer, Tail


def check_quality_target(target: float | None) -> None:
    """ValueError unless ``target`` is None or an agreement in (0, 1]."""
    if target is not None:
        check_real("quality_target", target, lambda q: 0 < q <= 1, "a number in (0, 1]")


def budget_count(budget: int | float, num_layers: int) -> int:
    """A budget as a number of sublayers: an int count, or a float fraction of all 2L sublayers."""
    total = 2 * num_layers
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget):
        raise ValueError(f"budget must be a sublayer count or a fraction in [0, 1), got {budget!r}")
    if isinstance(budget, float):
        if not 0 <= budget < 1:
            raise ValueError(f"a fractional budget must be in [0, 1), got {budget}")
        return int(budget * total)
    if not 0 <= budget <= total:
        raise ValueError(f"budget must be between 0 and {total} sublayers, got {budget}")
    return budget


def rank(
    similarity: Mapping[Sublayer, float], costs: CostModel | None = None, n: int = 0, keep_kv: bool = False
) -> list[Sublayer]:
    """Sublayers, most skippable first.

    AdaSkip: by IO similarity, highest first (attention and FFN pooled). Cost-aware (``costs`` given): by
    importance per FLOP saved at context length ``n`` (``keep_kv``: skipped attention still computes its keys and
    values), lowest first, where importance = 1 - similarity, so among equally redundant sublayers the ones that
    save more go first.
    """
    if costs is None:
        return sorted(similarity, key=lambda s: (-similarity[s], s))
    per_flop = lambda s: (1.0 - similarity[s]) / costs.saving(s.kind, n, keep_kv)  # noqa: E731
    return sorted(similarity, key=lambda s: (per_flop(s), s))


def top_k_plan(
    similarity: Mapping[Sublayer, float],
    scales: Mapping[Sublayer, Compensation],
    budget: int,
    costs: CostModel | None = None,
    n: int = 0,
    keep_kv: bool = False,
) -> SkipPlan:
    """Skip the first ``budget`` sublayers of :func:`rank`, each replaced by its compensation in ``scales``."""
    chosen: dict[str, dict[int, Compensation]] = {"attn": {}, "ffn": {}}
    for sub in rank(similarity, costs, n, keep_kv)[:budget]:
        chosen[sub.kind][sub.layer] = scales[sub]
    return SkipPlan(attn=chosen["attn"], ffn=chosen["ffn"])


def plan_from_probes(probes: Mapping[Sublayer, Probe], budget: int, robust_scale: bool = True) -> SkipPlan:
    """AdaSkip's plan from one request's own probes (the demo's calibration)."""
    similarity = {s: p.similarity for s, p in probes.items()}
    scales = {s: p.scale_no_sink if robust_scale else p.scale for s, p in probes.items()}
    return top_k_plan(similarity, scales, budget)


class OnlineSchedule:
    """AdaSkip's decode phase: probe the FFNs still running for the first ``window`` tokens, then also skip
    every FFN whose window-mean similarity is at least ``beta``, with the scale measured in the window. The
    prefill runs ``plan``, probed if ``probe_prefill``."""

    def __init__(self, plan: SkipPlan, beta: float, window: int, probe_prefill: bool = True):
        self.plan, self.beta, self.window, self.probe_prefill = plan, beta, window, probe_prefill
        self._sums: dict[int, list[float]] = {}  # FFN layer -> [similarity sum, scale sum, count]
        self.decode_plan = plan

    def prefill(self) -> tuple[SkipPlan, bool]:
        return self.plan, self.probe_prefill

    def decode(self, step: int, probes: Mapping[Sublayer, Probe] | None) -> tuple[SkipPlan, bool]:
        for sub, p in (probes or {}).items():
            if sub.kind == "ffn":
                acc = self._sums.setdefault(sub.layer, [0.0, 0.0, 0])
                acc[0] += p.similarity
                acc[1] += p.scale
                acc[2] += 1
        if step < self.window:
            return self.plan, True
        if step == self.window and self.window > 0:
            extra = {
                layer: s_sum / count
                for layer, (sim_sum, s_sum, count) in self._sums.items()
                if count and sim_sum / count >= self.beta and layer not in self.plan.ffn
            }
            self.decode_plan = dataclasses.replace(self.plan, decode_ffn=extra)
        return self.decode_plan, False


@dataclass(frozen=True)
class AdaSkipPolicy:
    """AdaSkip with the settings of one engine or collection.

    ``budget``: sublayers to skip in prefill (count, or fraction of all 2L). ``warmup``: queries a collection
    runs in full before skipping. ``window``: decoded tokens probed before the online decode skips (0 = none), in
    the requests that probe (see ``probe_every``).
    ``refresh_every``: every n-th query of a collection runs in full to re-measure and time it (0 = never).
    ``probe_every``: once a collection plans from its own profile, a skip request's prefill is probed (the
    sublayers it runs measured for the profile) on every n-th query only (1 = every one): probes cost 3-10 % of a
    prefill, and the profile's means need few samples. The other queries skip no more in decode than their plan
    (their decode steps are not measured, so there are no online decode skips). Warm-up and refresh requests are
    always probed.
    ``cost_aware``: rank by importance per FLOP saved at the request's context length. ``robust_scale``: scales
    without the attention-sink token 0 (else the paper's whole-prompt ratio). ``quality_target``: if set, a
    teacher-forced top-1 agreement with the full model (0..1) for the quality guard: each refresh scores a budget,
    and the guard serves the largest budget (from ``budget`` down in ``guard_step`` s) whose last ``guard_window``
    refreshes meet the target on average with a measured prefill speedup above 1, climbing back at most one step
    at a time (``learning.py``).

    Fidelity (see docs/fidelity.md for what each costs and keeps): ``compensation``: what replaces a skipped
    sublayer, ``"scalar"`` (the paper), ``"bias"`` or ``"affine"`` (``compensation.py``; profiles without
    moments fall back to scalar). ``keep_kv``: skipped attention sublayers still cache their keys and values and
    run in decode (else the paper: no cache, skipped in decode too). ``tail``: the last prompt tokens that run
    every sublayer (a count, or ``"last_user_turn"``); ``head``: the first prompt tokens that do (token 0 is the
    attention sink); no skipping for prompts not longer than head and integer tail together. ``recompute``: the
    fraction of the other prompt tokens that the tail attends to most, recomputed through every sublayer before the
    tail runs (question-aware evidence recompute, ``SkipPlan.recompute``; 0 = off).
    ``rank_by``: ``"similarity"`` (the paper's IO similarity) or ``"error"`` (the residual error of the
    sublayer's compensation, where the profile has moments).

    ``long_budget``: the budget of prompts of ``long_prompt`` tokens or more, where each skipped sublayer saves more
    and the protected tokens weigh less; ``budget`` holds up to half that length, and in between the budget grows
    linearly (None: ``budget`` at every length).

    ``local_attention``: how many attention sublayers, the most skippable after those the budget skips, attend
    over a local window in prefill (``SkipPlan.local``: each prompt token before the tail sees the attention sink
    and the last ``local_window`` tokens; the tail and decode attend in full), at prompt lengths where that costs
    less than full attention, in plans that skip (a budget of 0, which the quality guard never serves, runs in
    full). A local sublayer runs, so it changes the hidden state far less than a skip does, and at 4k tokens it
    costs about half of a full one (``costs.py``).

    ``min_gain``: a prompt is skipped in only where the cost model estimates at least this prefill speedup for its
    plan at the prompt's length (the protected head and integer tail, the K/V projections of skipped attention and
    any recompute counted); shorter prompts, where these cost more than the skips save, run in full (0 = always
    skip, as planned).
    """

    budget: int | float = 4
    warmup: int = 20
    window: int = 20
    refresh_every: int = 10
    probe_every: int = 4
    cost_aware: bool = False
    robust_scale: bool = True
    quality_target: float | None = None
    guard_step: int = 2
    guard_window: int = 5
    compensation: Mode = "affine"
    keep_kv: bool = True
    tail: Tail = 64
    head: int = 1
    recompute: float = 0.0
    rank_by: Literal["similarity", "error"] = "similarity"
    min_gain: float = 1.05
    long_budget: int | float | None = None
    long_prompt: int = 4096
    local_attention: int = 24
    local_window: int = 256

    def __post_init__(self) -> None:
        if self.compensation not in MODES:
            raise ValueError(f"compensation must be one of {MODES}, got {self.compensation!r}")
        if self.rank_by not in ("similarity", "error"):
            raise ValueError(f"rank_by must be 'similarity' or 'error', got {self.rank_by!r}")
        for name in ("keep_kv", "cost_aware", "robust_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        SkipPlan(tail=self.tail, head=self.head, recompute=self.recompute)  # their types and ranges
        budget_count(self.budget, 10**6)  # type and range of the value itself
        for name in ("warmup", "window", "refresh_every"):
            check_int(name, getattr(self, name), 0)
        check_int("probe_every", self.probe_every, 1)
        check_quality_target(self.quality_target)
        check_int("guard_step", self.guard_step, 1)
        check_int("guard_window", self.guard_window, 1)
        check_real("min_gain", self.min_gain, lambda g: 0 <= g < 10, "a number in [0, 10)")
        if self.long_budget is not None:
            budget_count(self.long_budget, 10**6)
        check_int("long_prompt", self.long_prompt, 2)
        check_int("local_attention", self.local_attention, 0)
        check_int("local_window", self.local_window, 1)

    def budget_for(self, n: int, num_layers: int) -> int:
        """The budget (a sublayer count) of a prompt of ``n`` tokens: ``budget`` up to ``long_prompt / 2`` tokens,
        ``long_budget`` from ``long_prompt`` on, linear in between."""
        short = budget_count(self.budget, num_layers)
        if self.long_budget is None:
            return short
        long = budget_count(self.long_budget, num_layers)
        half = self.long_prompt / 2
        return round(short + (long - short) * min(max((n - half) / half, 0.0), 1.0))

    def prefill_plan(self, profile: Profile, n: int, costs: CostModel, budget: int) -> SkipPlan:
        """The prefill plan for a prompt of ``n`` tokens: the ``budget`` most skippable sublayers, compensated, where
        that pays (``min_gain``)."""
        if n <= self.head + (self.tail if isinstance(self.tail, int) else 0):
            return SkipPlan()  # the whole prompt is protected
        scales = profile.mean("scale_no_sink" if self.robust_scale else "scale")
        has_moments = profile.moments is not None and profile.moments.shape[-1] == moments_width(costs.hidden)
        compensation = lambda sub: (  # noqa: E731
            fit(profile.sublayer_moments(sub), self.compensation, scales[sub]) if has_moments else scales[sub]  # type: ignore[arg-type]
        )
        if self.rank_by == "error" and has_moments:
            fitted = {sub: compensation(sub) for sub in scales}
            score = {
                sub: 1.0 - residual_error(profile.sublayer_moments(sub), c)  # type: ignore[arg-type]
                for sub, c in fitted.items()
            }
        else:
            score = profile.mean("similarity")
        ranking = costs if self.cost_aware else None
        ranked = rank(score, ranking, n, self.keep_kv)
        chosen = ranked[:budget]  # only the chosen sublayers are fitted
        plan = top_k_plan(score, {sub: compensation(sub) for sub in chosen}, budget, ranking, n, self.keep_kv)
        if self.keep_kv:
            plan = SkipPlan(prefill_attn=plan.attn, ffn=plan.ffn)
        if self.local_attention and budget and costs.local_attention(n, self.local_window) < costs.attention(n):
            local = [sub.layer for sub in ranked[budget:] if sub.kind == "attn"][: self.local_attention]
            plan = dataclasses.replace(plan, local=tuple(local), local_window=self.local_window)
        if plan.is_empty:
            return plan
        plan = dataclasses.replace(plan, tail=self.tail, head=self.head, recompute=self.recompute)
        tail = self.tail if isinstance(self.tail, int) else 0
        return plan if costs.prefill_speedup(plan, n, tail) >= self.min_gain else SkipPlan()

    def why_full(self, n: int) -> str:
        """Why :meth:`prefill_plan` skips nothing in a prompt of ``n`` tokens at a budget above 0."""
        protected = self.head + (self.tail if isinstance(self.tail, int) else 0)
        if n <= protected:
            return f"nothing skipped: the protected head and tail cover all {n} prompt tokens"
        return f"nothing skipped: at {n} prompt tokens the plan's estimated prefill speedup is below {self.min_gain}"

    def guard_budgets(self, top: int) -> list[int]:
        """The budgets the quality guard chooses from, largest first: ``top``, then ``guard_step`` fewer each."""
        return list(range(top, 0, -self.guard_step))

    @staticmethod
    def beta(profile: Profile, budget: int) -> float:
        """The ``budget``-th largest historical mean similarity (pooled); infinite when there is none."""
        ranked = sorted(profile.mean("similarity").values(), reverse=True)
        return ranked[budget - 1] if 0 < budget <= len(ranked) else math.inf

    def schedule(self, profile: Profile, n: int, costs: CostModel, budget: int, probe: bool = True) -> OnlineSchedule:
        """The schedule of a skip request: the prefill plan, then the online decode skips; both only if ``probe``
        (a request that does not measure its prefill does not measure its first ``window`` decode steps either:
        they cost more than their skips save, and a measured step cannot run compiled, ``compiled.py``)."""
        plan = self.prefill_plan(profile, n, costs, budget)
        return OnlineSchedule(plan, self.beta(profile, budget), self.window if probe else 0, probe)


# ----------------------------------------------------------------- baselines (whole layers, scale 1)


def _layers_plan(layers: set[int]) -> SkipPlan:
    return SkipPlan(attn={i: 1.0 for i in layers}, ffn={i: 1.0 for i in layers})


def early_exit(num_layers: int, k: int) -> StaticSchedule:
    """Early Exit: skip the last k layers."""
    return StaticSchedule(_layers_plan({i for i in range(num_layers) if num_layers - i <= k}))


def unified_skipping(num_layers: int, k: int) -> StaticSchedule:
    """Unified Skipping: skip the layers with index % (L // k) == 1 (the reference definition)."""
    if k < 1:
        return StaticSchedule(SkipPlan())
    return StaticSchedule(_layers_plan({i for i in range(num_layers) if i % (num_layers // k) == 1}))


class SkipDecode:
    """SkipDecode: skip layers 1 .. m, where m grows with the decode step t from 1 towards k:
    m(t) = ceil(t / max_new_tokens * (k - 1)) + 1, capped at k (the reference definition)."""

    def __init__(self, num_layers: int, k: int, max_new_tokens: int):
        self.num_layers, self.k, self.max_new_tokens = num_layers, k, max_new_tokens

    def layers(self, t: int) -> set[int]:
        m = math.ceil(t / self.max_new_tokens * (self.k - 1)) + 1
        return set(range(1, min(m, self.k, self.num_layers - 1) + 1)) if self.k >= 1 else set()

    def prefill(self) -> tuple[SkipPlan, bool]:
        return _layers_plan(self.layers(0)), False

    def decode(self, step: int, probes: Mapping[Sublayer, Probe] | None) -> tuple[SkipPlan, bool]:
        return _layers_plan(self.layers(step + 1)), False
