"""Per-collection learning: decide how each request of a collection runs, and learn from how it ran.

Every request of a collection is one of:

* ``warmup``: the collection (and its cold-start fallbacks) has too few queries; the full model runs and
  every sublayer is measured;
* ``skip``: the policy's plan from the best profile available (the collection's own, else the model's global
  profile of all collections, else the shipped default profile); the sublayers that run are measured while
  the plan comes from a fallback, then on every ``probe_every``-th query;
* ``refresh``: every ``refresh_every``-th query runs in full to measure every sublayer and to time the full
  prefill; the current plan is then timed and scored against the full answer (teacher-forced top-1
  agreement), which gives a measured speedup and drives the quality guard (at budget 0 it scores the plan
  one guard step up instead).

Every store call has a bounded time (``stores/bounded.py``): while the store fails or does not answer, requests
are planned from the shipped default profile (else run in full) and answered without learning
(``SkipStats.store_error`` says why), and learning resumes once the store answers again.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .costs import CostModel
from .generation import GenerationResult
from .policies import AdaSkipPolicy, OnlineSchedule
from .profiles import Profile, check_collection, parse_profile
from .skipping import PlanSchedule, SkipPlan
from .stats import SkipStats
from .stores.bounded import BoundedCalls, StoreUnavailable

if TYPE_CHECKING:
    from .stores import ProfileStore

log = logging.getLogger(__name__)

Mode = Literal["warmup", "skip", "refresh"]


def _shipped_folder() -> Path:
    """The shipped profiles: the installed package's ``profiles/`` (a wheel maps the repository's top-level
    ``profiles/`` there), else, in a source checkout, that top-level folder."""
    packaged = Path(str(importlib.resources.files("adaskip_rag") / "profiles"))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "profiles"


PROFILES = _shipped_folder()


def shipped_profile(model_id: str, name: str) -> Profile | None:
    """The default profile shipped for this model in ``$ADASKIP_PROFILES`` or :data:`PROFILES` (if its
    fingerprint matches; a profile of another model is ignored with a warning)."""
    folder = Path(os.environ["ADASKIP_PROFILES"]) if os.environ.get("ADASKIP_PROFILES") else PROFILES
    path = folder / f"{name}.json"
    if not path.is_file():
        return None
    try:
        profile = parse_profile(path.read_bytes())
    except (ValueError, OSError) as exc:
        warnings.warn(f"ignoring shipped profile {path}: {exc}", stacklevel=2)
        return None
    if profile.model != model_id:
        warnings.warn(
            f"ignoring shipped profile {path}: written for model {profile.model}, not {model_id}", stacklevel=2
        )
        return None
    return profile


@dataclass
class Decision:
    """How one request of a collection runs, and why."""

    collection: str
    mode: Mode
    schedule: PlanSchedule
    plan: SkipPlan  # the skip plan in force for the collection (what a refresh scores)
    source: str  # which profile chose the plan: collection, global, shipped, or none
    queries_seen: int
    budget: int
    scored_budget: int  # the budget of ``plan``: ``budget``, or the guard's next step up while it stands at 0
    top_budget: int  # the policy's budget for this prompt's length (the guard's highest)
    budget_reason: str
    policy: AdaSkipPolicy
    state: dict  # the collection's profile state when the request started
    store_error: str | None = None  # the store failed when the request started: it does not learn


def _skip_set(plan: SkipPlan) -> list[str]:
    skipped = [f"attn.{i}" for i in sorted({**plan.attn, **plan.prefill_attn})] + [f"ffn.{i}" for i in plan.ffn]
    return skipped + [f"local.{i}" for i in plan.local]


class Learner:
    """Chooses plans for the requests of each collection and records what they measured.

    ``policy`` applies to every collection but those given their own in ``policies``.
    """

    def __init__(
        self,
        model_id: str,
        num_layers: int,
        costs: CostModel,
        store: ProfileStore,
        policy: AdaSkipPolicy,
        default_profile: Profile | None = None,
        policies: Mapping[str, AdaSkipPolicy] | None = None,
        legacy_id: str | None = None,
    ):
        self.model_id, self.num_layers, self.costs = model_id, num_layers, costs
        self.legacy_id = legacy_id if legacy_id != model_id else None  # profiles to move here, at the first read
        self._migrating = threading.Lock()
        self.store, self.policy = store, policy
        self.calls = BoundedCalls(type(store).__name__, store.timeout, store.retry_seconds)
        self.policies = dict(policies or {})
        for p in (policy, *self.policies.values()):
            p.budget_for(p.long_prompt, num_layers)  # a budget this model cannot meet fails here, not per request
        self._warned: set[str] = set()
        self.default_profile = self._usable(default_profile)

    def _usable(self, profile: Profile | None) -> Profile | None:
        """``profile`` if it fits this model (its layer count, and moments as wide as the hidden size needs),
        else None, with one warning per collection."""
        if profile is None:
            return None
        width = 4 * self.costs.hidden + 2
        problem = (
            f"{profile.num_layers} layers, the model has {self.num_layers}"
            if profile.num_layers != self.num_layers
            else f"moments of width {profile.moments.shape[2]}, the model needs {width}"
            if profile.moments is not None and profile.moments.shape[2] != width
            else None
        )
        if problem is None:
            return profile
        if profile.collection not in self._warned:
            self._warned.add(profile.collection)
            warnings.warn(f"ignoring the profile of collection {profile.collection!r}: {problem}", stacklevel=3)
        return None

    def _migrate(self) -> None:
        """Move the profiles stored under the model's fingerprint of earlier versions (``legacy_id``) to its own,
        once; a store that cannot now (a call that fails, a server away) is asked again at the next read."""
        with self._migrating:
            if self.legacy_id is not None:
                moved = self.calls(self.store.migrate, self.legacy_id, self.model_id)
                if moved:
                    log.info(
                        "moved %d collection profiles from model id %s to %s", moved, self.legacy_id, self.model_id
                    )
                if moved is not None:
                    self.legacy_id = None

    def policy_for(self, collection: str) -> AdaSkipPolicy:
        return self.policies.get(collection, self.policy)

    def decide(self, collection: str, n: int, **policy_changes: Any) -> Decision:
        """How the next request of ``collection`` (a prompt of ``n`` tokens) runs; ``policy_changes`` (fields of
        :class:`AdaSkipPolicy`) change the collection's policy for this request."""
        check_collection(collection)
        policy = self.policy_for(collection)
        if policy_changes:
            policy = dataclasses.replace(policy, **policy_changes)
        try:
            self._migrate()
            own = self._usable(self.calls(self.store.get, self.model_id, collection))
            model = self._usable(self.calls(self.store.global_profile, self.model_id))
            store_error = None
        except StoreUnavailable as exc:  # planned from the shipped profile, or in full
            own = model = None
            store_error = str(exc)
        profile, source = self._profile(own, model, policy.warmup)
        state = own.state if own else {}
        seen = own.queries if own else 0
        max_budget = policy.budget_for(n, self.num_layers)
        guard = state.get("guard") or {}
        if policy.quality_target is None:
            budget, reason = max_budget, f"fixed budget {max_budget}"
        else:
            budget = min(guard.get("budget", max_budget), max_budget)
            reason = guard.get("reason", f"quality guard: starting at the maximum budget {budget}")

        full = OnlineSchedule(SkipPlan(), beta=math.inf, window=0)  # the full model, prefill probed
        scored = budget
        if profile is None:
            mode: Mode = "warmup"
            schedule: PlanSchedule = full
            plan = SkipPlan()
        elif policy.refresh_every and (seen + 1) % policy.refresh_every == 0:
            if policy.quality_target is not None and budget == 0:  # else a guard at 0 could never rise again
                scored = min(policy.guard_budgets(max_budget), default=0)
            mode, schedule = "refresh", full
            plan = policy.prefill_plan(profile, n, self.costs, scored)
        else:
            # a collection warming up on a fallback profile measures every request; then a sample does
            probe = source != "collection" or (seen + 1) % policy.probe_every == 0
            mode, schedule = "skip", policy.schedule(profile, n, self.costs, budget, probe)
            plan = schedule.plan
            if plan.is_empty and budget:
                reason += f"; {policy.why_full(n)}"
        return Decision(
            collection,
            mode,
            schedule,
            plan,
            source,
            seen,
            budget,
            scored,
            max_budget,
            reason,
            policy,
            state,
            store_error,
        )

    def _profile(self, own: Profile | None, model: Profile | None, warmup: int) -> tuple[Profile | None, str]:
        """The profile to plan from: the collection's ``own`` once warmed up (with the compensation moments of the
        ``model``'s global profile), else the cold-start fallbacks."""
        warm = lambda p: p is not None and p.queries >= warmup  # noqa: E731
        if warm(own):
            assert own is not None
            moments = model.moments if model is not None and model.moments is not None else own.moments
            return dataclasses.replace(own, moments=moments), "collection"
        if warm(model):
            return model, "global"
        if warm(self.default_profile):
            return self.default_profile, "shipped"
        return None, "none"

    def learn(
        self, decision: Decision, result: GenerationResult, rescore: Callable[[SkipPlan], tuple[torch.Tensor, float]]
    ) -> SkipStats:
        """Record a finished request of ``decision``; its stats with what it learned. A refresh first scores the
        collection's plan against the full model's answer: ``rescore(plan)`` gives the plan's teacher-forced logits
        over that answer and its prefill seconds, hence the top-1 agreement and the measured speedup."""
        fidelity = skip_seconds = None
        if decision.mode == "refresh" and not decision.plan.is_empty and decision.store_error is None:
            logits, skip_seconds = rescore(decision.plan)
            answer = torch.tensor(result.token_ids, device=logits.device)
            fidelity = (logits.argmax(-1) == answer).float().mean().item()
        return self.record(decision, result.stats, result.prefill_probes, fidelity, skip_seconds)

    def record(
        self,
        decision: Decision,
        stats: SkipStats,
        probes,
        fidelity: float | None = None,
        skip_prefill_seconds: float | None = None,
    ) -> SkipStats:
        """Add this request's probes to the collection's profile (unless the store failed); ``stats`` with the
        learning fields of the request."""
        delta = Profile.from_probes(
            self.model_id, decision.collection, self.num_layers, probes or {}, stats.prompt_tokens
        )
        skip_set = _skip_set(decision.plan)
        measured = decision.state.get("measured") or {}
        reason = decision.budget_reason
        delta.state["skip_set"] = skip_set
        if decision.mode == "refresh" and skip_prefill_seconds:
            # the full prefill as an unprobed one runs: its probes' measuring left out (the plan's is unprobed)
            measuring = sum(p.seconds for p in (probes or {}).values())
            measured = {
                "speedup": (stats.prefill_seconds - measuring) / skip_prefill_seconds,
                "prompt_tokens": stats.prompt_tokens,
                "budget": decision.scored_budget,
                "fidelity": fidelity,
            }
            delta.state["measured"] = measured
            if decision.policy.quality_target is not None and fidelity is not None:
                guard = decision.state.get("guard") or {}
                delta.state["guard"] = self._guard(decision, guard.get("history", []), fidelity, measured["speedup"])
                reason = delta.state["guard"]["reason"]
        store_error = decision.store_error
        if store_error is None:
            try:
                self.calls(self.store.add, delta)
            except StoreUnavailable as exc:
                store_error = str(exc)
        previous = decision.state.get("skip_set")
        return dataclasses.replace(
            stats,
            store_error=store_error,
            collection=decision.collection,
            mode=decision.mode,
            profile_source=decision.source,
            queries_seen=decision.queries_seen + 1,
            warming_up=decision.mode == "warmup",
            budget=decision.budget,
            budget_reason=reason,
            skip_set_changed=previous is not None and previous != skip_set,
            fidelity=fidelity,
            measured_prefill_speedup=measured.get("speedup"),
            measured_in_this_request=decision.mode == "refresh" and skip_prefill_seconds is not None,
        )

    def _guard(self, decision: Decision, history: list, fidelity: float, speedup: float) -> dict:
        """The guard after a refresh that scored the plan of ``decision.scored_budget`` (its agreement ``fidelity``
        and measured prefill ``speedup``): the largest of the policy's budgets, at most one ``guard_step`` above the
        one served, whose last ``guard_window`` refreshes meet the quality target on average with an average
        speedup above 1, budgets not scored in the last ``4 * guard_window`` refreshes counting as meeting it (so
        they are tried, one step up at a time); 0 when none does."""
        policy = decision.policy
        target = policy.quality_target
        assert target is not None  # the guard runs only with a quality target
        history = [*history, [decision.scored_budget, fidelity, speedup]][-4 * policy.guard_window :]
        windows = {b: [h for h in history if h[0] == b][-policy.guard_window :] for b in {h[0] for h in history}}
        mean = lambda w, k: sum(h[k] for h in w) / len(w)  # noqa: E731
        meets = lambda b: b not in windows or mean(windows[b], 1) >= target and mean(windows[b], 2) > 1  # noqa: E731
        budgets = [b for b in policy.guard_budgets(decision.top_budget) if b <= decision.budget + policy.guard_step]
        new = next((b for b in budgets if meets(b)), 0)
        verb = "lowered to" if new < decision.budget else "raised to" if new > decision.budget else "kept at"
        judged = [f"budget {b}: {_window_text(windows[b])}" for b in sorted(windows, reverse=True)]
        reason = f"quality guard (target {target}): {verb} {new}; " + "; ".join(judged)
        return {"budget": new, "reason": reason, "history": history}


def _window_text(window: list) -> str:
    """A guard window's agreement and measured speedup: mean (least - most) over its refreshes."""
    spread = lambda k: f"{min(h[k] for h in window):.3f}-{max(h[k] for h in window):.3f}"  # noqa: E731
    fidelity, speedup = (sum(h[k] for h in window) / len(window) for k in (1, 2))
    return (
        f"agreement {fidelity:.3f} ({spread(1)}), prefill {speedup:.2f}x ({spread(2)}) over {len(window)} "
        f"refresh{'es' if len(window) > 1 else ''}"
    )
