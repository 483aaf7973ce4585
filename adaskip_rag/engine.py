"""AdaSkipEngine: one model and tokenizer, many concurrent requests, each with its own skip plan.

The phases of a request live in ``request.py`` (checking it, sampling), ``generation.py`` (prefill, decode
step, emission, teacher forcing) and ``streams.py``; they run on the engine's :class:`~adaskip_rag.runtime.Runtime`
(the model in the scheduler's batched steps, prompts, grammars). The engine runs decide -> generate -> learn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import loading
from .constrained import SchemaLimits
from .generation import GenerationResult, generate_steps, teacher_forced
from .learning import Decision, Learner, shipped_profile
from .policies import AdaSkipPolicy
from .prompts import Prompt
from .request import Request, build_request, policy_overrides
from .runtime import Runtime
from .scheduler import ServingLimits
from .skipping import PlanSchedule, SkipPlan
from .stores import ProfileStore, open_store
from .streams import AsyncTextStream, TextStream

__all__ = ["AdaSkipEngine", "AsyncTextStream", "GenerationResult", "TextStream"]

_shared: dict[tuple[str, str | None, str | None], AdaSkipEngine] = {}
_shared_lock = threading.Lock()


class AdaSkipEngine:
    """Skip-aware text generation over a Llama-family causal LM.

    >>> engine = AdaSkipEngine.from_pretrained("default")
    >>> result = engine.generate([{"role": "user", "content": "What is the capital of France?"}],
    ...                          plan=SkipPlan(attn={12: 1.0, 20: 1.0}), max_new_tokens=20)
    >>> result.text, result.stats.to_dict()

    Every request carries its own :class:`SkipPlan`, so one engine serves many threads: concurrent requests run
    together, one batched forward step for all (``serving`` sets the limits, see ``scheduler.py``). With
    ``collection="..."`` instead of a plan, it learns what to skip for that collection (``policy`` or the
    collection's entry in ``collection_policies``) and keeps the profile in ``store``; see ``learning.py``.
    ``schema_limits`` bounds the JSON schemas of constrained decoding (see :class:`SchemaLimits`).
    ``compile_decode``: an answer's decode steps that run every sublayer run as one compiled graph
    (``torch.compile``; see ``compiled.py``), compiled before the engine returns: ``compiled_decode.warmup_seconds``
    says how long that took (about 40 s for the default model on a 2-core CPU, less once inductor's on-disk cache
    has it). Off by default.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str | None = None,
        *,
        policy: AdaSkipPolicy | None = None,
        store: ProfileStore | None = None,
        collection_policies: Mapping[str, AdaSkipPolicy] | None = None,
        serving: ServingLimits | None = None,
        schema_limits: SchemaLimits | None = None,
        compile_decode: bool = False,
    ):
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.runtime = Runtime(model, tokenizer, self.name, serving, schema_limits, compile_decode)
        rt = self.runtime  # what the engine's users read, as attributes of their own
        self.model, self.tokenizer, self.config, self.device = rt.model, rt.tokenizer, rt.config, rt.device
        self.num_layers, self.context_window, self.costs = rt.num_layers, rt.context_window, rt.costs
        self.scheduler, self.eos_token_ids, self.prompts = rt.scheduler, rt.eos_token_ids, rt.prompts
        self.schema_limits, self.compiled_decode = rt.schema_limits, rt.compiled
        self.policy = policy or AdaSkipPolicy()
        self.collection_policies = dict(collection_policies or {})
        self._store = store

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the model's weights in any precision: profiles are only used for the model they were learned
        on (see :func:`~adaskip_rag.loading.fingerprint`)."""
        return loading.fingerprint(self.model)

    @functools.cached_property
    def learner(self) -> Learner:
        store = self._store or open_store(loading.profile_store_url())
        shipped = shipped_profile(self.fingerprint, self.name)
        legacy = loading.legacy_fingerprint(self.model)
        return Learner(
            self.fingerprint, self.num_layers, self.costs, store, self.policy, shipped, self.collection_policies, legacy
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = "default",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        device_map: str | dict | None = None,
        int4_decode: bool = True,
        policy: AdaSkipPolicy | None = None,
        store: ProfileStore | None = None,
        collection_policies: Mapping[str, AdaSkipPolicy] | None = None,
        serving: ServingLimits | None = None,
        schema_limits: SchemaLimits | None = None,
        compile_decode: bool = False,
    ) -> AdaSkipEngine:
        """Load ``"default"`` (SmolLM2-135M-Instruct, bundled) or a local model folder.

        ``dtype``: default bf16 on a GPU and :func:`~adaskip_rag.loading.default_cpu_dtype` on CPU (bf16 where it is
        native and measures faster, else fp32); ``device_map`` is passed to transformers (accelerate); ``int4_decode``:
        a bf16 model on CPU with 4-bit weights (the default model) reads them packed in decode steps;
        ``compile_decode``: see the class.
        """
        model, tokenizer = loading.load(
            name_or_path, device=device, dtype=dtype, device_map=device_map, int4_decode=int4_decode
        )
        name = loading.model_label(name_or_path)
        return cls(
            model,
            tokenizer,
            name,
            policy=policy,
            store=store,
            collection_policies=collection_policies,
            serving=serving,
            schema_limits=schema_limits,
            compile_decode=compile_decode,
        )

    @classmethod
    def shared(
        cls, name_or_path: str | os.PathLike = "default", device: str | None = None, dtype: str | None = None
    ) -> AdaSkipEngine:
        """One engine per (model, device, dtype) in this process, loaded on first use: what the framework adapters
        use, so any number of LLM objects (LangChain or LlamaIndex) share one model and one profile store.
        ``dtype``: "float32", "bfloat16" or "float16" (default: as :meth:`from_pretrained`)."""
        key = (str(name_or_path), device, dtype)
        with _shared_lock:
            if key not in _shared:
                _shared[key] = cls.from_pretrained(name_or_path, device=device, dtype=getattr(torch, dtype or "", None))
            return _shared[key]

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> str:
        """The prompt text of ``{"role": ..., "content": ...}`` messages (and the ``tools`` they may call)."""
        return self.prompts.render(messages, tools)

    def encode(self, prompt: Prompt, tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of a prompt string, chat messages (through the chat template, with ``tools``) or ids."""
        return self.prompts.encode(prompt, tools)

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders tools, assistant ``<tool_call>`` calls and tool results."""
        return self.prompts.supports_tools

    def generate(
        self,
        prompt: Prompt,
        plan: SkipPlan | PlanSchedule | None = None,
        *,
        collection: str | None = None,
        **kwargs: Any,
    ) -> GenerationResult:
        """Generate a completion. ``prompt``: text, chat messages or token ids.

        Keyword arguments: ``max_new_tokens`` (256), ``min_new_tokens`` (0: no stop token before this many new
        tokens, as transformers' option of that name), ``temperature`` (0 = greedy, as is anything below 1e-3),
        ``top_p``, ``top_k``, ``repetition_penalty`` (in [0.01, 100]), ``seed``, ``stop`` (strings; never part of
        the returned text), ``stop_token_ids`` (added to the model's EOS), ``ignore_eos`` (do not stop at the
        model's EOS), ``probe`` (measure every executed sublayer), ``truncation`` ('error' or 'left': keep the
        last tokens of a prompt that does not fit the context window), ``teacher_forced_ids`` (also score these
        tokens under the plan, from the same prefill: ``result.teacher_forced_logits`` as :meth:`teacher_forced`
        gives them).

        Constrained decoding (xgrammar): ``json_schema`` (a dict, JSON text or pydantic model class) makes the
        answer a JSON text that schema accepts; ``tools`` (OpenAI function format, rendered by the chat template)
        lets the answer call them, ``tool_choice`` "auto" (default), "none", "any" or a tool's name, one call per
        answer unless ``parallel_tool_calls``: the calls are parsed into ``result.tool_calls``, not streamed.

        ``collection``: instead of a plan, serve the request for this collection with the learned plan; ``budget``
        and ``quality_target`` override the collection's policy for this request (see :class:`AdaSkipPolicy`).
        ``skip=False``: the full model, nothing skipped or learned.
        """
        stream = self.stream(prompt, plan, collection=collection, **kwargs)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(
        self,
        prompt: Prompt,
        plan: SkipPlan | PlanSchedule | None = None,
        *,
        collection: str | None = None,
        skip: bool = True,
        budget: int | float | None = None,
        quality_target: float | None = None,
        **kwargs: Any,
    ) -> TextStream:
        """Like :meth:`generate`, as an iterator of text deltas (``.result`` is set at the end).

        Invalid arguments raise ValueError here, before any work is done.
        """
        policy = policy_overrides(plan, collection, skip, budget, quality_target)
        if collection is None or not skip:
            return TextStream(generate_steps(self.runtime, build_request(self.runtime, prompt, plan, **kwargs)))
        req = build_request(self.runtime, prompt, None, **kwargs)
        decision = self.learner.decide(collection, len(req.input_ids), **policy)
        return TextStream(self._learning_steps(dataclasses.replace(req, schedule=decision.schedule), decision))

    def _learning_steps(self, req: Request, decision: Decision) -> Iterator[str | GenerationResult]:
        """The steps of a request served for a collection; once it ends the learner records it (a refresh scored
        by teacher forcing the answer under the collection's plan)."""
        for item in generate_steps(self.runtime, req):
            if isinstance(item, GenerationResult):

                def rescore(plan: SkipPlan, result: GenerationResult = item) -> tuple[torch.Tensor, float]:
                    return teacher_forced(self.runtime, req.input_ids, result.token_ids, plan, req.messages)

                item = dataclasses.replace(item, stats=self.learner.learn(decision, item, rescore))
            yield item

    def teacher_forced(
        self,
        prompt_ids: Sequence[int],
        answer_ids: Sequence[int],
        plan: SkipPlan | PlanSchedule,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """See :func:`adaskip_rag.generation.teacher_forced`; ``generate(..., teacher_forced_ids=answer_ids)``
        gives the same logits from the generation's prefill."""
        return teacher_forced(self.runtime, prompt_ids, answer_ids, plan, messages)

    async def agenerate(
        self, prompt: Prompt, plan: SkipPlan | PlanSchedule | None = None, **kwargs: Any
    ) -> GenerationResult:
        """:meth:`generate` in a worker thread, so the event loop keeps running. Cancelling the awaiting task
        stops the generation before its next decode step."""
        # the request is checked and planned in the worker too: a collection's first request loads its profiles
        stream = AsyncTextStream(await asyncio.to_thread(functools.partial(self.stream, prompt, plan, **kwargs)))
        try:
            async for _ in stream:
                pass
        finally:
            stream.cancel()  # a no-op once generation is done; else (cancelled, failed) the worker stops
        assert stream.result is not None
        return stream.result

    def astream(self, prompt: Prompt, plan: SkipPlan | PlanSchedule | None = None, **kwargs: Any) -> AsyncTextStream:
        """:meth:`stream` for asyncio: an async iterator of text deltas, generated in a worker thread.

        Must be called inside a running event loop.
        """
        return AsyncTextStream(self.stream(prompt, plan, **kwargs))
