"""A request, checked: its prompt tokens, plan schedule and generation settings; and its next-token sampler."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .checks import check_int, check_real
from .constrained import Constraint, JSONSchema, SchemaLimits, check_tools, json_grammar, tool_grammar
from .constrained import tool_choice as as_tool_choice
from .profiles import check_collection
from .runtime import Runtime
from .skipping import PlanSchedule, SkipPlan, StaticSchedule

if TYPE_CHECKING:
    from .prompts import Prompt

Sampler = Callable[[torch.Tensor, torch.Tensor], int]
GREEDY_BELOW = 1e-3  # a temperature below this is greedy (sampling there is greedy in effect, and overflows)
REPETITION_PENALTY = (1e-2, 1e2)  # the range of repetition_penalty (outside it the logits overflow)


@dataclass(frozen=True)
class Request:
    """A validated request: prompt tokens plus generation settings."""

    input_ids: list[int]
    schedule: PlanSchedule
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    teacher_forced_ids: tuple[int, ...] = ()
    messages: tuple[Mapping[str, Any], ...] | None = None  # the chat prompt, for a tail of "last_user_turn"
    grammar: Any = None  # xgrammar.Grammar the answer must follow
    tools: bool = False  # the answer may hold tool calls
    closes: bool = False  # the grammar is JSON all through: close it early rather than let max_new_tokens cut it


def policy_overrides(
    plan: SkipPlan | PlanSchedule | None,
    collection: str | None,
    skip: bool,
    budget: int | float | None,
    quality_target: float | None,
) -> dict[str, Any]:
    """Check how a request asks to be served (a ``plan``, a ``collection`` to learn a plan for, or ``skip=False``);
    the collection policy's fields this request's ``budget`` and ``quality_target`` override."""
    if not isinstance(skip, bool):
        raise ValueError(f"skip must be True or False, got {skip!r}")
    policy: dict[str, Any] = {
        k: v for k, v in (("budget", budget), ("quality_target", quality_target)) if v is not None
    }
    if budget is not None:
        policy["long_budget"] = None  # a request's budget holds at any prompt length
    if policy and collection is None:
        raise ValueError("budget and quality_target set a collection's learned plan: pass collection= too")
    if plan is not None and (collection is not None or not skip):
        raise ValueError("pass a plan, or a collection to learn a plan for, or skip=False, not two of them")
    if collection is not None:
        check_collection(collection)
    return policy


def build_request(
    rt: Runtime,
    prompt: Prompt,
    plan: SkipPlan | PlanSchedule | None = None,
    *,
    max_new_tokens: int = 256,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    probe: bool = False,
    truncation: Literal["error", "left"] = "error",
    ignore_eos: bool = False,
    teacher_forced_ids: Sequence[int] | None = None,
    json_schema: JSONSchema | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | None = None,
    parallel_tool_calls: bool = False,
) -> Request:
    """Check every argument of :meth:`AdaSkipEngine.generate` (ValueError naming the first bad one) and encode
    the prompt."""
    _check_sampling(rt.context_window, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    check_int("min_new_tokens", min_new_tokens, 0, max_new_tokens)
    _check_flags(truncation, probe=probe, ignore_eos=ignore_eos, parallel_tool_calls=parallel_tool_calls)
    schedule = _schedule(rt, plan, probe)
    stops = (stop,) if isinstance(stop, str) else sequence("stop", stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    forced = token_ids("teacher_forced_ids", teacher_forced_ids, rt.config.vocab_size)
    stop_ids = token_ids("stop_token_ids", stop_token_ids, rt.config.vocab_size)
    grammar, tools = _grammar(json_schema, tools, tool_choice, parallel_tool_calls, ignore_eos, rt.schema_limits)
    ids = _prompt_ids(rt, prompt, tools, truncation, max_new_tokens)
    messages = None if isinstance(prompt, str) else tuple(m for m in prompt if isinstance(m, Mapping)) or None
    if isinstance(schedule, StaticSchedule):
        rt.prompts.protected_tail(schedule.plan, len(ids), messages)  # a head and tail that fit the prompt
    return Request(
        input_ids=ids,
        schedule=schedule,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=float(temperature) if temperature >= GREEDY_BELOW else 0.0,
        top_p=float(top_p),
        top_k=top_k,
        repetition_penalty=float(repetition_penalty),
        seed=seed,
        stop=stops,
        stop_token_ids=frozenset((set() if ignore_eos else rt.eos_token_ids) | set(stop_ids)),
        teacher_forced_ids=forced,
        messages=messages,
        grammar=grammar,
        tools=tools is not None,
        closes=json_schema is not None or tool_choice not in (None, "auto", "none"),
    )


def _prompt_ids(
    rt: Runtime, prompt: Prompt, tools: list[dict[str, Any]] | None, truncation: str, max_new_tokens: int
) -> list[int]:
    """The prompt's token ids, its first ones cut off with ``truncation="left"`` when it does not fit the window."""
    ids = rt.prompts.encode(prompt, tools)
    if len(ids) >= rt.context_window:
        if truncation == "error":
            raise ValueError(
                f"prompt has {len(ids)} tokens, the model's context window is {rt.context_window}; "
                "shorten it or pass truncation='left' to keep its last tokens"
            )
        ids = ids[-max(1, rt.context_window - max_new_tokens) :]
    return ids


def _check_sampling(
    window: int, max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any, seed: Any
) -> None:
    """ValueError naming the first sampling setting of the wrong type or out of range."""
    check_int("max_new_tokens", max_new_tokens, 1, window)
    check_real("temperature", temperature, lambda t: t >= 0, "a finite number >= 0")
    check_real("top_p", top_p, lambda p: 0 < p <= 1, "a number in (0, 1]")
    check_int("top_k", top_k, 0)
    low, high = REPETITION_PENALTY
    check_real("repetition_penalty", repetition_penalty, lambda r: low <= r <= high, f"a number in [{low}, {high}]")
    if seed is not None:
        check_int("seed", seed, 0, 2**64 - 1)


def _check_flags(truncation: Any, **flags: Any) -> None:
    """ValueError naming the first flag that is not a bool, or a bad ``truncation``."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if truncation not in ("error", "left"):
        raise ValueError(f"truncation must be 'error' or 'left', got {truncation!r}")


def _schedule(rt: Runtime, plan: Any, probe: bool) -> PlanSchedule:
    if plan is not None and not isinstance(plan, (SkipPlan, PlanSchedule)):
        raise ValueError(f"plan must be a SkipPlan or a PlanSchedule, got {type(plan).__name__}")
    plan = plan or SkipPlan()
    if isinstance(plan, SkipPlan):
        plan.check(rt.num_layers, rt.config.hidden_size)
        return StaticSchedule(plan, probe)
    return plan


def _grammar(
    json_schema: JSONSchema | None,
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any,
    parallel: bool,
    ignore_eos: bool,
    limits: SchemaLimits,
) -> tuple[Any, list[dict[str, Any]] | None]:
    """The grammar constrained decoding follows (None: free text), and the checked tools."""
    tool_choice = as_tool_choice(tool_choice)
    grammar, checked = None, None
    if tools is not None:
        if json_schema is not None:
            raise ValueError("pass json_schema or tools, not both")
        checked = check_tools(tools, limits)
        grammar = tool_grammar(checked, "auto" if tool_choice is None else tool_choice, parallel)
    elif tool_choice is not None:
        raise ValueError("tool_choice needs tools")
    elif json_schema is not None:
        grammar = json_grammar(json_schema, limits)
    if grammar is not None and ignore_eos:
        raise ValueError("ignore_eos cannot be combined with json_schema or tools: a finished answer ends with EOS")
    return grammar, checked


def sequence(name: str, values: Any) -> tuple:
    """``values`` (None = empty) as a tuple; ValueError unless it is a list-like of items."""
    if values is None:
        return ()
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list, got {type(values).__name__}")
    return tuple(values)


def token_ids(name: str, ids: Sequence[int] | None, vocab_size: int) -> tuple[int, ...]:
    values = sequence(name, ids)
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in values):
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got {list(values)[:8]!r}")
    return values


def sampler(req: Request, device: torch.device, constraint: Constraint | None = None) -> Sampler:
    """Next-token choice: greedy at temperature 0, else sampling through transformers' logits processors; among
    the tokens ``constraint`` allows, which then takes it (or, to finish in time, another one); no stop token
    before ``req.min_new_tokens`` where another token is allowed."""
    choose, n = _chooser(req, device), len(req.input_ids)
    stops = torch.tensor(sorted(req.stop_token_ids), dtype=torch.long, device=device)

    def constrained(ids: torch.Tensor, logits: torch.Tensor) -> int:
        if constraint is not None:
            logits = constraint.mask(logits).to(logits.device)
        if ids.shape[-1] - n < req.min_new_tokens:
            held = logits.index_fill(-1, stops.to(logits.device), -torch.inf)
            logits = held if bool(torch.isfinite(held).any()) else logits
        token = choose(ids, logits)
        return token if constraint is None else constraint.accept(token)

    return constrained


def _chooser(req: Request, device: torch.device) -> Sampler:
    processors = LogitsProcessorList()
    if req.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(req.repetition_penalty))
    if req.temperature == 0:
        return lambda ids, logits: int(processors(ids, logits).argmax(-1))  # type: ignore[arg-type]
    processors.append(TemperatureLogitsWarper(req.temperature))
    if req.top_k:
        processors.append(TopKLogitsWarper(req.top_k))
    if req.top_p < 1.0:
        processors.append(TopPLogitsWarper(req.top_p))
    generator = torch.Generator(device)
    if req.seed is None:
        generator.seed()
    else:
        generator.manual_seed(req.seed)

    def sample(ids: torch.Tensor, logits: torch.Tensor) -> int:
        probs = torch.softmax(processors(ids, logits).float(), dim=-1)  # type: ignore[arg-type]
        return int(torch.multinomial(probs, 1, generator=generator))

    return sample
