"""Per-collection learning: decide how each request of a collection runs, and learn from how it ran.

Every request of a collection is one of:

* ``warmup``: the collection (and its cold-start fallbacks) has too few queries; the full model runs and
  every sublayer is measured;
* ``skip``: the policy's plan from the best profile available (the collection's own, else the model's global
  profile of all collections, else the shipped default profile); the sublayers that run are measured;
* ``refresh``: every ``refresh_every``-th query runs in full to measure every sublayer and to time the full
  prefill; the current plan is then timed and scored against the full answer (teacher-forced top-1
  agreement), which gives a measured speedup and drives the quality guard.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .costs import CostModel
from .history import Profile, ProfileStore, check_collection
from .policies import AdaSkipPolicy, budget_count
from .skipping import PlanSchedule, SkipPlan, StaticSchedule
from .stats import SkipStats

Mode = Literal["warmup", "skip", "refresh"]
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


def shipped_profile(model_id: str, name: str) -> Profile | None:
    """The default profile shipped for this model in ``$ADASKIP_PROFILES`` or ``profiles/`` (if its fingerprint
    matches; a profile of another model is ignored with a warning)."""
    folder = Path(os.environ.get("ADASKIP_PROFILES", PROFILES_DIR))
    path = folder / f"{name}.json"
    if not path.is_file():
        return None
    try:
        profile = Profile.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        warnings.warn(f"ignoring shipped profile {path}: {exc}", stacklevel=2)
        return None
    if profile.model != model_id:
        warnings.warn(f"ignoring shipped profile {path}: written for model {profile.model}, not {model_id}", stacklevel=2)
        return None
    return profile


@dataclass
class Decision:
    """How one request of a collection runs, and why."""

    collection: str
    mode: Mode
    schedule: PlanSchedule
    plan: SkipPlan  # the skip plan in force for the collection (what a refresh scores)
    source: str  # which profile chose the plan: collection, global, default, or none
    queries_seen: int
    budget: int
    budget_reason: str
    previous_skip_set: list[str] | None


def _skip_set(plan: SkipPlan) -> list[str]:
    return [f"attn.{i}" for i in plan.attn] + [f"ffn.{i}" for i in plan.ffn]


class Learner:
    """Chooses plans for the requests of each collection and records what they measured."""

    def __init__(
        self, model_id: str, num_layers: int, costs: CostModel, store: ProfileStore, policy: AdaSkipPolicy,
        default_profile: Profile | None = None,
    ):
        self.model_id, self.num_layers, self.costs = model_id, num_layers, costs
        self.store, self.policy, self.default_profile = store, policy, default_profile
        self.max_budget = budget_count(policy.budget, num_layers)

    def _budget(self, profile: Profile | None) -> tuple[int, str]:
        if self.policy.quality_target is None:
            return self.max_budget, f"fixed budget {self.max_budget}"
        guard = (profile.state.get("guard") if profile else None) or {}
        budget = guard.get("budget", self.max_budget)
        return budget, guard.get("reason", f"quality guard: starting at the maximum budget {budget}")

    def decide(self, collection: str, n: int) -> Decision:
        check_collection(collection)
        own = self.store.get(self.model_id, collection)
        seen = own.queries if own else 0
        budget, reason = self._budget(own)
        previous = own.state.get("skip_set") if own else None
        profile, source = self._profile(own)
        plan = self.policy.prefill_plan(profile, n, self.costs, budget) if profile else SkipPlan()
        refresh_every = self.policy.refresh_every
        if profile is None:
            mode: Mode = "warmup"
            schedule: PlanSchedule = StaticSchedule(SkipPlan(), probe=True)
        elif refresh_every and (seen + 1) % refresh_every == 0:
            mode, schedule = "refresh", StaticSchedule(SkipPlan(), probe=True)
        else:
            mode, schedule = "skip", self.policy.schedule(profile, n, self.costs, budget)
            plan = schedule.plan
        return Decision(collection, mode, schedule, plan, source, seen, budget, reason, previous)

    def _profile(self, own: Profile | None) -> tuple[Profile | None, str]:
        """The profile to plan from: the collection's own once warmed up, else the cold-start fallbacks."""
        warm = lambda p: p is not None and p.queries >= self.policy.warmup  # noqa: E731
        if warm(own):
            return own, "collection"
        merged_all = self.store.global_profile(self.model_id)
        if warm(merged_all):
            return merged_all, "global"
        if warm(self.default_profile):
            return self.default_profile, "default"
        return None, "none"

    def record(
        self, decision: Decision, stats: SkipStats, probes, fidelity: float | None = None,
        skip_prefill_seconds: float | None = None,
    ) -> Profile:
        """Add this request's probes to the collection's profile and fill the learning fields of ``stats``."""
        delta = Profile.from_probes(
            self.model_id, decision.collection, self.num_layers, probes or {}, stats.prompt_tokens
        )
        skip_set = _skip_set(decision.plan)
        own = self.store.get(self.model_id, decision.collection)
        measured = (own.state.get("measured") if own else None) or {}
        guard = (own.state.get("guard") if own else None) or {}
        delta.state["skip_set"] = skip_set
        if decision.mode == "refresh" and skip_prefill_seconds:
            measured = {
                "speedup": stats.prefill_seconds / skip_prefill_seconds, "prompt_tokens": stats.prompt_tokens,
                "budget": decision.budget, "fidelity": fidelity,
            }
            delta.state["measured"] = measured
            if self.policy.quality_target is not None and fidelity is not None:
                guard = self._guard(decision.budget, fidelity)
                delta.state["guard"] = guard
        self.store.add(delta)

        stats.collection = decision.collection
        stats.mode = decision.mode
        stats.profile_source = decision.source
        stats.queries_seen = decision.queries_seen + 1
        stats.warming_up = decision.mode == "warmup"
        stats.budget = decision.budget
        stats.budget_reason = guard.get("reason", decision.budget_reason)
        stats.skip_set_changed = decision.previous_skip_set is not None and decision.previous_skip_set != skip_set
        stats.fidelity = fidelity
        stats.measured_prefill_speedup = measured.get("speedup")
        stats.measured_in_this_request = decision.mode == "refresh" and skip_prefill_seconds is not None
        return delta

    def _guard(self, budget: int, fidelity: float) -> dict:
        target, step = self.policy.quality_target, self.policy.guard_step
        new = max(0, budget - step) if fidelity < target else min(self.max_budget, budget + step)
        verb = "lowered to" if new < budget else "raised to" if new > budget else "kept at"
        relation = "<" if fidelity < target else ">="
        reason = f"quality guard: agreement {fidelity:.3f} {relation} target {target} at budget {budget}, {verb} {new}"
        return {"budget": new, "reason": reason, "fidelity": fidelity}
