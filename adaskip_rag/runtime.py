"""The runtime a request's phases run on (``request.py``, ``generation.py``): the model's forward pass in the
scheduler's batched steps, the prompts, the grammars, the cost model, the context window, the EOS ids, the device
and the teacher-forcing chunk. The engine builds one and hands it to the phases, which take nothing else from it."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import int4, loading
from .compiled import CompiledDecode
from .constrained import Grammars, SchemaLimits
from .costs import CostModel
from .forward import forward_rows
from .probes import Phase, Probes
from .prompts import ChatPrompts
from .scheduler import Scheduler, ServingLimits, Ticket
from .skipping import Probe, SkipPlan, Sublayer


class Runtime:
    """One model and tokenizer behind a scheduler of batched steps, with what the phases of a request need;
    ``compile_decode``: its one-token decode steps run compiled (``compiled.py``), compiled here."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        serving: ServingLimits | None = None,
        schema_limits: SchemaLimits | None = None,
        compile_decode: bool = False,
    ):
        loading.check_layers(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.num_layers: int = model.config.num_hidden_layers
        self.context_window: int = model.config.max_position_embeddings
        self.costs = CostModel.from_config(model.config)
        self.device: torch.device = model.get_input_embeddings().weight.device  # type: ignore[assignment]
        self.compiled = CompiledDecode(self.model) if compile_decode else None
        self.scheduler = Scheduler(
            functools.partial(forward_rows, self.model, compiled=self.compiled), serving or ServingLimits()
        )
        self.eos_token_ids = loading.eos_token_ids(model, tokenizer)
        self.prompts = ChatPrompts(tokenizer, name, self.config.vocab_size)
        self.schema_limits = schema_limits or SchemaLimits()
        # teacher forcing computes as decode steps do: token by token where those read 4-bit weights
        self.forced_chunk = 1 if int4.packed(model) else None

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Grammar compiler of this tokenizer, for constrained decoding."""
        return Grammars(self.tokenizer, self.config.vocab_size, sorted(self.eos_token_ids), self.schema_limits)

    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one layer caches per token."""
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_key_value_heads * head_dim * self.model.dtype.itemsize

    def forward(
        self,
        input_ids: torch.Tensor,
        position: int,
        cache: Any,
        plan: SkipPlan,
        phase: Phase,
        probe: bool = False,
        logits_to_keep: int = 1,
        ticket: Ticket | None = None,
        positions: torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[Sublayer, Probe] | None]:
        """:func:`~adaskip_rag.forward.skip_forward` of one sequence's ``input_ids`` (1, q), run in a step together
        with the other requests' (``scheduler.py``); ``ticket``: the request's admission (None: this call's own).
        ``positions`` and ``attention``: a row that recomputes cached tokens or only looks (see
        :class:`~adaskip_rag.forward.Row`)."""
        probes = Probes.of(plan, phase) if probe else None
        ids = input_ids.reshape(-1)
        with contextlib.nullcontext(ticket) if ticket else self.scheduler.admitted(len(ids)) as admitted:
            logits = self.scheduler.forward(
                admitted, ids, position, cache, plan, phase, probes, logits_to_keep, positions, attention
            )
        return logits[None], probes.result() if probes else None
