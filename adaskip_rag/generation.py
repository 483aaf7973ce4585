"""Generation by phase, the way gpt-fast separates them: :func:`prefill` the prompt, :func:`decode_one_token`
step by step, and emit text (:class:`Emitter`: stop strings, held-back text, tool calls kept out);
:func:`generate_steps` runs a request through them. Teacher forcing scores a given answer over the same
forward pass (:func:`teacher_forced`)."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from .attention import layer_types
from .cache import new_cache
from .constrained import TOOL_CALL_OPEN, Constraint, parse_tool_calls
from .costs import CostModel
from .request import Request, sampler
from .runtime import Runtime
from .skipping import PlanSchedule, Probe, SkipPlan, StaticSchedule, Sublayer
from .stats import SkipStats

if TYPE_CHECKING:
    from .scheduler import Ticket


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: SkipStats
    prefill_probes: dict[Sublayer, Probe] | None = None
    decode_probes: list[dict[Sublayer, Probe]] = field(default_factory=list)
    teacher_forced_logits: torch.Tensor | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Tool calls of a request with ``tools``: ``{"id", "name", "arguments"}``; ``text`` is the rest."""
    invalid_tool_calls: list[dict[str, Any]] = field(default_factory=list)


def prefill(
    rt: Runtime,
    ids: torch.Tensor,
    cache: Any,
    plan: SkipPlan,
    tail: int = 0,
    probe: bool = False,
    logits_to_keep: int = 1,
    ticket: Ticket | None = None,
) -> tuple[torch.Tensor, dict[Sublayer, Probe] | None]:
    """Prefill the prompt ``ids`` (1, n) under ``plan``: all but the last ``tail`` tokens with its skips (the
    protected head inside, see :class:`~adaskip_rag.forward.Row`; probed if ``probe``), then the protected tail
    with every sublayer that has a cache. The logits of the last ``logits_to_keep`` tokens (at most the tail's
    when there is one; 0 = all of them) and the probes of the first part. With ``plan.recompute`` the body tokens
    the tail attends to most are recomputed in between (:func:`recompute_evidence`). ``ticket``: the request's
    admission."""
    n = ids.shape[1]
    if plan.is_empty or not tail:
        return rt.forward(ids, 0, cache, plan, "prefill", probe, logits_to_keep, ticket)
    if plan.recompute and "sliding_attention" in layer_types(rt.model):
        raise ValueError("SkipPlan.recompute rewrites cached tokens: it needs a model without sliding-window layers")
    body = n - tail
    _, probes = rt.forward(ids[:, :body], 0, cache, plan, "prefill", probe, ticket=ticket)
    if plan.recompute:
        recompute_evidence(rt, ids, body, cache, plan, ticket)
    logits, _ = rt.forward(ids[:, body:], body, cache, plan.protected_plan(), "prefill", False, logits_to_keep, ticket)
    return logits, probes


def recompute_evidence(
    rt: Runtime, ids: torch.Tensor, body: int, cache: Any, plan: SkipPlan, ticket: Ticket | None = None
) -> list[int]:
    """Question-aware evidence recompute, after the skipped prefill of the first ``body`` tokens of ``ids`` into
    ``cache``: the tail (the rest of ``ids``) looks at the cache once (every sublayer that has a cache, nothing
    stored), and the ``plan.recompute`` fraction of body tokens past the head that it attends to most (summed over
    its tokens, heads and layers) are computed again through the same sublayers, their keys and values replacing
    the skipped prefill's. The positions recomputed."""
    count = plan.recomputed_tokens(body)
    if not count:
        return []
    protected = plan.protected_plan()
    attention = torch.zeros(body, device=rt.device)
    rt.forward(ids[:, body:], body, cache, protected, "prefill", attention=attention, ticket=ticket)
    chosen = (attention[plan.head :].topk(count).indices + plan.head).sort().values
    positions = chosen.cpu()
    rt.forward(ids[:, chosen], int(positions[0]), cache, protected, "prefill", ticket=ticket, positions=positions)
    return positions.tolist()


def decode_one_token(
    rt: Runtime, ids: torch.Tensor, position: int, cache: Any, plan: SkipPlan, probe: bool, ticket: Ticket
) -> tuple[torch.Tensor, dict[Sublayer, Probe] | None]:
    """The logits after the token at ``position`` of ``ids``, fed under ``plan`` into ``cache``."""
    return rt.forward(ids[:, position : position + 1], position, cache, plan, "decode", probe, ticket=ticket)


def _checked(rt: Runtime, answer: tuple[SkipPlan, bool]) -> tuple[SkipPlan, bool]:
    """A schedule's (plan, probe) for one step, its plan checked against the engine's model."""
    plan, probe = answer
    plan.check(rt.num_layers, rt.config.hidden_size)
    return plan, probe


class Emitter:
    """The text of the generated tokens as it may be shown: a stop string ends it (and is never shown), the
    possible start of a stop string or an incomplete character is held back, tool calls are kept out."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], tools: bool):
        self.tokenizer, self.stop = tokenizer, stop
        self.hidden = (TOOL_CALL_OPEN,) if tools else ()
        self.text, self.emitted = "", 0

    def add(self, generated: list[int]) -> tuple[str, bool]:
        """The newly showable text once ``generated`` are the answer's tokens, and whether a stop string ended it."""
        text = str(self.tokenizer.decode(generated, skip_special_tokens=True))
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return "", True
        self.text = text
        visible = text.split(TOOL_CALL_OPEN, 1)[0] if self.hidden else text
        safe = len(visible) - held_back(visible, self.stop + self.hidden)
        if safe <= self.emitted:
            return "", False
        delta, self.emitted = text[self.emitted : safe], safe
        return delta, False

    def finish(self) -> tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]:
        """The answer's text, its part not shown yet, and its tool calls (valid, invalid)."""
        text = self.text
        calls: list[dict[str, Any]] = []
        invalid: list[dict[str, Any]] = []
        if self.hidden:
            text, calls, invalid = parse_tool_calls(text)
        return text, text[self.emitted :], calls, invalid


def generate_steps(rt: Runtime, req: Request) -> Iterator[str | GenerationResult]:
    """Run ``req``: one item per decode step (the new text, "" if none) and finally the GenerationResult. The
    request is admitted to the engine's batched steps first, and leaves them when it ends, fails or is closed:
    the result comes after its place is freed, so whatever follows (learning) never holds a place."""
    n = len(req.input_ids)
    max_new = min(req.max_new_tokens, rt.context_window - n)
    result = None
    # the grammar compiles before admission: a request compiling holds no place in the batched steps
    constraint = None if req.grammar is None else rt.grammars.constraint(req.grammar, max_new, req.closes)
    with rt.scheduler.admitted(n + max_new) as ticket:
        for item in _generate(rt, req, max_new, ticket, constraint):
            if isinstance(item, GenerationResult):
                result = item
            else:
                yield item
    assert result is not None
    yield result


def _generate(
    rt: Runtime, req: Request, max_new: int, ticket: Ticket, constraint: Constraint | None
) -> Iterator[str | GenerationResult]:
    n = len(req.input_ids)
    ids = torch.zeros(1, n + max_new, dtype=torch.long, device=rt.device)  # prompt, then generated tokens
    ids[0, :n] = torch.tensor(req.input_ids)
    cache = new_cache(rt.model, n + max_new)
    choose = sampler(req, rt.device, constraint)
    record, emitter = PlanRecord(rt.costs, n), Emitter(rt.tokenizer, req.stop, req.tools)
    token, prefill_probes, forced, prefill_seconds = _prefill_phase(rt, req, ids, cache, choose, record, ticket)
    decode_start = time.perf_counter()

    generated: list[int] = []
    decode_probes: list[dict[Sublayer, Probe]] = []
    probes, finish = None, "length"
    while True:
        generated.append(token)
        ids[0, n + len(generated) - 1] = token
        delta, stopped = ("", True) if token in req.stop_token_ids else emitter.add(generated)
        if stopped:  # a stop token (its text is not part of the answer) or a stop string
            finish = "stop"
            break
        yield delta  # "" for a step without new text: where a stream can be cancelled
        if len(generated) >= max_new:
            break
        position = n + len(generated) - 1
        plan, probe = _checked(rt, req.schedule.decode(len(generated) - 1, probes))
        record.decode(plan)
        logits, probes = decode_one_token(rt, ids, position, cache, plan, probe, ticket)
        if probes is not None:
            decode_probes.append(probes)
        token = choose(ids[:, : position + 1], logits[:, -1])
    if constraint is not None and constraint.closed_early and finish == "stop":
        finish = "length"  # a complete answer, closed early to fit max_new_tokens
    text, rest, calls, invalid = emitter.finish()
    if rest:
        yield rest
    cached = n + len(generated) - 1  # the last token was never fed back
    stats = record.stats(
        generated=len(generated),
        prefill_seconds=prefill_seconds,
        decode_seconds=time.perf_counter() - decode_start,
        finish_reason=finish,
        max_new_tokens=max_new,
        waited_seconds=ticket.waited,
        batch_sizes=list(ticket.batch_sizes),
        kv_bytes_saved=rt.kv_bytes_per_token() * sum(cached - cache.get_seq_length(i) for i in range(rt.num_layers)),
    )
    yield GenerationResult(
        text=text,
        token_ids=generated,
        stats=stats,
        prefill_probes=prefill_probes,
        decode_probes=decode_probes,
        teacher_forced_logits=forced,
        tool_calls=calls,
        invalid_tool_calls=invalid,
    )


def _prefill_phase(
    rt: Runtime,
    req: Request,
    ids: torch.Tensor,
    cache: Any,
    choose: Any,
    record: PlanRecord,
    ticket: Ticket,
) -> tuple[int, dict[Sublayer, Probe] | None, torch.Tensor | None, float]:
    """Prefill the prompt under the schedule's first plan: the first answer token, the prefill's probes, the
    teacher-forced logits of ``req.teacher_forced_ids`` (scored on copies: the generation goes on untouched),
    and the seconds the prefill took (the forcing left out)."""
    n, start = len(req.input_ids), time.perf_counter()
    plan, probe = _checked(rt, req.schedule.prefill())
    tail = rt.prompts.protected_tail(plan, n, req.messages)
    record.prefill(plan, tail)
    logits, probes = prefill(rt, ids[:, :n], cache, plan, tail, probe, ticket=ticket)
    token = choose(ids[:, :n], logits[:, -1])
    seconds = time.perf_counter() - start
    forced = None
    if req.teacher_forced_ids:
        forcing = req.schedule.plan if isinstance(req.schedule, StaticSchedule) else copy.deepcopy(req.schedule)
        forced = force(rt, copy.deepcopy(cache), n, logits[0, -1:], req.teacher_forced_ids, forcing, ticket)
    return token, probes, forced, seconds


def teacher_forced(
    rt: Runtime,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    plan: SkipPlan | PlanSchedule,
    messages: Sequence[Any] | None = None,
) -> tuple[torch.Tensor, float]:
    """Teacher forcing: the logits under ``plan`` at the positions that predict each token of ``answer_ids``
    (shape (len(answer_ids), vocab)), and the seconds the prompt's prefill took.

    A SkipPlan is fed the answer in one chunk (token by token where decode steps read 4-bit weights, so the logits
    are computed as the answer's were); a PlanSchedule token by token, with each step's plan.
    ``messages``: the chat prompt of ``prompt_ids``, for a plan whose tail is "last_user_turn".
    """
    schedule = StaticSchedule(plan) if isinstance(plan, SkipPlan) else plan
    prefill_plan, _ = _checked(rt, schedule.prefill())
    tail = rt.prompts.protected_tail(prefill_plan, len(prompt_ids), messages)
    tokens = len(prompt_ids) + len(answer_ids)
    cache = new_cache(rt.model, tokens)
    with rt.scheduler.admitted(tokens) as ticket:
        start = time.perf_counter()
        first, _ = prefill(rt, torch.tensor([list(prompt_ids)]), cache, prefill_plan, tail, ticket=ticket)
        prefill_seconds = time.perf_counter() - start
        return force(rt, cache, len(prompt_ids), first[0, -1:], answer_ids, plan, ticket), prefill_seconds


def force(
    rt: Runtime,
    cache: Any,
    n: int,
    first: torch.Tensor,
    answer_ids: Sequence[int],
    plan: SkipPlan | PlanSchedule,
    ticket: Ticket | None = None,
) -> torch.Tensor:
    """Feed ``answer_ids[:-1]`` after a prefill of ``n`` tokens into ``cache`` whose last logits are ``first``;
    the logits that predict each answer token."""
    logits = [first]
    if isinstance(plan, SkipPlan):
        fed = list(answer_ids[:-1])
        step = rt.forced_chunk or max(len(fed), 1)
        for a in range(0, len(fed), step):
            chunk = torch.tensor([fed[a : a + step]])
            rest, _ = rt.forward(chunk, n + a, cache, plan, "decode", logits_to_keep=0, ticket=ticket)
            logits.append(rest[0])
    else:
        probes = None
        for step, token in enumerate(answer_ids[:-1]):
            step_plan, probe = _checked(rt, plan.decode(step, probes))
            rest, probes = rt.forward(torch.tensor([[token]]), n + step, cache, step_plan, "decode", probe, 1, ticket)
            logits.append(rest[0, -1:])
    return torch.cat(logits)


class PlanRecord:
    """What a request skipped, step by step, and the FLOP-estimated speedup of that."""

    def __init__(self, costs: CostModel, n: int):
        self.costs, self.n = costs, n
        self.attn: list[int] = []
        self.kept_kv: list[int] = []
        self.ffn: list[int] = []
        self.tail = self.head = self.recomputed = 0
        self.prefill_plan = SkipPlan()
        self.decode_attn: set[int] = set()
        self.decode_ffn: set[int] = set()
        self.decode_flops: list[float] = []
        self.last = SkipPlan()

    def prefill(self, plan: SkipPlan, tail: int) -> None:
        attn, ffn, kept_kv = plan.skips("prefill")
        self.attn, self.ffn, self.kept_kv, self.last = sorted(attn), sorted(ffn), sorted(kept_kv), plan
        self.tail, self.head = (tail, plan.head) if not plan.is_empty else (0, 0)
        self.recomputed = plan.recomputed_tokens(self.n - tail) if self.tail else 0
        self.prefill_plan = plan

    def decode(self, plan: SkipPlan) -> None:
        attn, ffn, _ = plan.skips("decode")
        self.decode_attn |= set(attn)
        self.decode_ffn |= set(ffn)
        self.decode_flops.append(self.costs.flops(self.n, len(attn), len(ffn), "decode"))
        self.last = plan

    def stats(self, generated: int, **done: Any) -> SkipStats:
        """The request's SkipStats: its plans as recorded, its ``generated`` token count and what else it did
        (``done``: timings, finish reason, limits, batching, KV bytes saved)."""
        if not self.decode_flops:  # a single token: nothing was decoded, estimate with the prefill plan
            self.decode(self.last)
        full = self.costs.flops(self.n, 0, 0, "decode")
        return SkipStats(
            prompt_tokens=self.n,
            generated_tokens=generated,
            skipped_attention=self.attn,
            attention_kv_kept=self.kept_kv,
            protected_tail=self.tail,
            protected_head=self.head,
            recomputed_tokens=self.recomputed,
            skipped_ffn_prefill=self.ffn,
            skipped_attention_decode=sorted(self.decode_attn),
            skipped_ffn_decode=sorted(self.decode_ffn),
            local_attention=list(self.prefill_plan.local),
            local_window=self.prefill_plan.local_window if self.prefill_plan.local else 0,
            estimated_prefill_speedup=self.costs.prefill_speedup(self.prefill_plan, self.n, self.tail),
            estimated_decode_speedup=full * len(self.decode_flops) / sum(self.decode_flops),
            skipped_every_sublayer=len(self.attn) == len(self.ffn) == self.costs.layers,
            **done,
        )


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold back: a possible start of a stop string, or an incomplete character."""
    if text.endswith("\ufffd"):
        return 1
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held
