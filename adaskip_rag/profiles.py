"""Per-collection profiles of sublayer importance: the data, merging and validation (no storage).

A :class:`Profile` holds, for one (model fingerprint, collection), running *sums and counts* of the prefill
IO similarity and scale of every sublayer and the moments its compensation is fitted from
(``compensation.py``), so merging profiles (collections into a global profile, or replicas into one) is exact
and order-free. Where profiles are kept is ``stores/``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from .checks import check_text
from .compensation import check_moments
from .skipping import Probe, Sublayer

FORMAT = 1
KINDS = ("attn", "ffn")
METRICS = ("similarity", "scale", "scale_no_sink")
MAX_COLLECTION_KEY = 256
GLOBAL = "*"  # the collection key of a model's global profile: every collection's sums, and the moments


def check_collection(key: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"collection key must be a non-empty string, got {key!r}")
    if len(key) > MAX_COLLECTION_KEY:
        raise ValueError(f"collection key is {len(key)} characters long; the limit is {MAX_COLLECTION_KEY}")
    if key == GLOBAL:
        raise ValueError(f"collection key {GLOBAL!r} is reserved for the model's global profile")
    check_text("collection key", key)
    return key


@dataclass
class Profile:
    """Sums and counts of prefill probes of one (model, collection), plus what the learner keeps beside them.

    ``sums[f"{kind}.{metric}"][layer]`` and ``counts[kind][layer]``; ``moments[k, layer]`` (k = 0 attention,
    1 FFN; float64, shape (2, num_layers, 4 d + 2)) the sums compensations are fitted from, None in profiles
    written before they were kept (those plan with the scalar compensation). ``state`` holds per-collection
    settings that are not sums (the quality guard's budget, the latest measured speedup): last writer wins.
    """

    model: str
    collection: str
    num_layers: int
    queries: int = 0
    context_tokens: int = 0
    max_context: int = 0
    sums: dict[str, list[float]] = field(default_factory=dict)
    counts: dict[str, list[int]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    moments: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for kind in KINDS:
            self.counts.setdefault(kind, [0] * self.num_layers)
            for metric in METRICS:
                self.sums.setdefault(f"{kind}.{metric}", [0.0] * self.num_layers)

    @classmethod
    def from_probes(
        cls, model: str, collection: str, num_layers: int, probes: Mapping[Sublayer, Probe], context_tokens: int
    ) -> Profile:
        """The contribution of one served query: its prompt length and the probes of the sublayers it ran."""
        delta = cls(model, collection, num_layers, queries=1, context_tokens=context_tokens, max_context=context_tokens)
        for (kind, layer), probe in probes.items():
            delta.counts[kind][layer] += 1
            for metric in METRICS:
                delta.sums[f"{kind}.{metric}"][layer] += getattr(probe, metric)
            if probe.moments is not None:
                if delta.moments is None:
                    delta.moments = torch.zeros(len(KINDS), num_layers, probe.moments.numel(), dtype=torch.float64)
                delta.moments[KINDS.index(kind), layer] += probe.moments
        return delta

    def merge(self, other: Profile) -> Profile:
        """A new profile with both profiles' sums and counts added (``other.state`` wins on conflicts)."""
        if other.model != self.model or other.num_layers != self.num_layers:
            raise ValueError(f"cannot merge a profile of {other.model} into one of {self.model}")
        return Profile(
            model=self.model,
            collection=self.collection,
            num_layers=self.num_layers,
            queries=self.queries + other.queries,
            context_tokens=self.context_tokens + other.context_tokens,
            max_context=max(self.max_context, other.max_context),
            sums={k: [a + b for a, b in zip(v, other.sums[k])] for k, v in self.sums.items()},
            counts={k: [a + b for a, b in zip(v, other.counts[k])] for k, v in self.counts.items()},
            state={**self.state, **other.state},
            moments=_add(self.moments, other.moments),
        )

    def split(self) -> tuple[Profile, Profile]:
        """This profile as stored: its collection's part without the moments (a few KB), and its part of the model's
        global profile (``collection`` :data:`GLOBAL`), which keeps the moments (~1 MB for a 30-layer model with
        d = 576). Compensations are fitted from the model's moments; collections differ in their importance."""
        return dataclasses.replace(self, moments=None), dataclasses.replace(self, collection=GLOBAL, state={})

    def mean(self, metric: str = "similarity") -> dict[Sublayer, float]:
        """Mean of ``metric`` for every sublayer measured at least once."""
        return {
            Sublayer(kind, layer): self.sums[f"{kind}.{metric}"][layer] / count  # type: ignore[arg-type]
            for kind in KINDS
            for layer, count in enumerate(self.counts[kind])
            if count
        }

    def sublayer_moments(self, sub: Sublayer) -> torch.Tensor | None:
        """The compensation moments of one sublayer (None if this profile keeps none)."""
        return None if self.moments is None else self.moments[KINDS.index(sub.kind), sub.layer]

    @property
    def mean_context(self) -> float:
        return self.context_tokens / self.queries if self.queries else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "moments"}}
        if self.moments is not None:  # little-endian float64, base64: 1.1 MB for a 30-layer model with d = 576
            raw = self.moments.numpy().astype("<f8").tobytes()
            data["moments"] = {"shape": list(self.moments.shape), "float64": base64.b64encode(raw).decode()}
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        """Parse and validate field by field: types, ranges, finiteness, list lengths equal to ``num_layers`` (and
        to the layer count in a fingerprint's ``-<L>L-``), the layout of ``state``; ValueError naming the field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"malformed profile: not a JSON object but {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"malformed profile: unknown format {data.get('format')!r}")
        names = {f.name for f in fields(cls)}
        missing, unknown = names - {"moments"} - set(data), set(data) - names - {"format"}
        if missing or unknown:
            raise ValueError(f"malformed profile: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
        for name in ("model", "collection"):
            if not isinstance(data[name], str) or not data[name].strip() or len(data[name]) > MAX_COLLECTION_KEY:
                raise _field(name, f"must be a non-empty string of at most {MAX_COLLECTION_KEY} characters")
        for name in ("num_layers", "queries", "context_tokens", "max_context"):
            if not _is_int(data[name]) or data[name] < (1 if name == "num_layers" else 0):
                raise _field(name, f"must be an integer >= {1 if name == 'num_layers' else 0}, got {data[name]!r}")
        L, queries = data["num_layers"], data["queries"]
        declared = re.search(r"-(\d+)L-", data["model"])
        if declared and int(declared.group(1)) != L:
            raise _field("num_layers", f"is {L}, but the model {data['model']} has {declared.group(1)} layers")
        if data["max_context"] > data["context_tokens"]:
            raise _field("max_context", "exceeds context_tokens, the sum of all prompt lengths")
        sums, counts = data["sums"], data["counts"]
        if not isinstance(sums, Mapping) or set(sums) != {f"{k}.{m}" for k in KINDS for m in METRICS}:
            raise _field("sums", f"must map exactly {[f'{k}.{m}' for k in KINDS for m in METRICS]} to lists")
        if not isinstance(counts, Mapping) or set(counts) != set(KINDS):
            raise _field("counts", f"must map exactly {list(KINDS)} to lists")
        for key, values in sums.items():
            if not _numbers(
                values, L, lambda x: not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)
            ):
                raise _field(f"sums.{key}", f"must be {L} finite numbers")
        for key, values in counts.items():
            if not _numbers(values, L, lambda x: _is_int(x) and 0 <= x <= queries):
                raise _field(f"counts.{key}", f"must be {L} integers in [0, queries = {queries}]")
        _check_state(data["state"])
        try:
            moments = _moments(data.get("moments"), L)
        except (KeyError, TypeError, AttributeError) as exc:
            raise _field("moments", f"malformed ({exc!r})") from None
        return cls(
            model=data["model"],
            collection=data["collection"],
            num_layers=L,
            queries=queries,
            context_tokens=data["context_tokens"],
            max_context=data["max_context"],
            sums={k: list(v) for k, v in sums.items()},
            counts={k: list(v) for k, v in counts.items()},
            state=dict(data["state"]),
            moments=moments,
        )


def parse_profile(text: str | bytes) -> Profile:
    """A profile from its JSON text (what every reader uses): ValueError for anything that does not parse or
    validate, nesting too deep for the JSON parser included."""
    return Profile.from_dict(load_json(text))


def load_json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("malformed profile: JSON nested too deeply") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed profile: not JSON ({exc})") from None


def _field(name: str, problem: str) -> ValueError:
    return ValueError(f"malformed profile: field {name!r} {problem}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numbers(values: Any, length: int, ok: Any) -> bool:
    return isinstance(values, list) and len(values) == length and all(ok(x) for x in values)


def _check_state(state: Any) -> None:
    """The learner's per-collection state: ``skip_set`` (sublayer names), ``measured`` (the latest refresh) and
    ``guard`` (the quality guard's budget)."""
    if not isinstance(state, Mapping) or set(state) - {"skip_set", "measured", "guard"}:
        raise _field("state", "must be an object with only skip_set, measured and guard")
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
    fraction = lambda x: x is None or number(x) and 0 <= x <= 1  # noqa: E731
    if "skip_set" in state and not (
        isinstance(state["skip_set"], list) and all(isinstance(x, str) for x in state["skip_set"])
    ):
        raise _field("state.skip_set", "must be a list of sublayer names")
    measured = state.get("measured")
    if measured is not None and not (
        isinstance(measured, Mapping)
        and set(measured) == {"speedup", "prompt_tokens", "budget", "fidelity"}
        and number(measured["speedup"])
        and measured["speedup"] > 0
        and _is_int(measured["prompt_tokens"])
        and _is_int(measured["budget"])
        and measured["budget"] >= 0
        and fraction(measured["fidelity"])
    ):
        raise _field("state.measured", "must hold a positive finite speedup, prompt_tokens, budget and fidelity")
    guard = state.get("guard")
    if guard is not None and not (
        isinstance(guard, Mapping)
        and {"budget", "reason"} <= set(guard) <= {"budget", "reason", "history", "fidelity"}  # fidelity: older
        and _is_int(guard["budget"])
        and guard["budget"] >= 0
        and isinstance(guard["reason"], str)
        and fraction(guard.get("fidelity"))
        and isinstance(guard.get("history", []), list)
        and len(guard.get("history", [])) <= 1000
        and all(
            isinstance(h, list)
            and len(h) == 3
            and _is_int(h[0])
            and h[0] >= 0
            and fraction(h[1])
            and number(h[2])
            and h[2] > 0
            for h in guard.get("history", [])
        )
    ):
        raise _field(
            "state.guard", "must hold an integer budget >= 0, a reason and a history of [budget, fidelity, speedup]"
        )


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return None if b is None else b.clone()  # a merge owns its result
    if b is None:
        return a.clone()
    if a.shape != b.shape:
        raise ValueError(f"cannot merge compensation moments of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return a + b


def _moments(data: Any, num_layers: Any) -> torch.Tensor | None:
    """Decode and validate the ``moments`` of a profile's JSON; ValueError if they are malformed."""
    if data is None:
        return None
    shape = data["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or shape[:2] != [len(KINDS), num_layers]
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    ):
        raise ValueError(f"malformed profile: moments of shape {shape!r} for {num_layers!r} layers")
    try:
        raw = base64.b64decode(data["float64"], validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed profile: moments are not base64 ({exc})") from None
    if len(raw) != 8 * math.prod(shape):
        raise ValueError(f"malformed profile: {len(raw)} bytes of moments for shape {shape}")
    moments = torch.from_numpy(np.frombuffer(raw, dtype="<f8").astype(np.float64)).reshape(shape)
    if not check_moments(moments):
        raise ValueError("malformed profile: moments are not finite, or have negative squares or token counts")
    return moments


def merged(profiles: Iterable[Profile], collection: str) -> Profile | None:
    """All profiles added into one under the name ``collection`` (None when there are none)."""
    total: Profile | None = None
    for p in profiles:
        total = Profile(p.model, collection, p.num_layers).merge(p) if total is None else total.merge(p)
    return total
