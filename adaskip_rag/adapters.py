"""What the framework adapters (LangChain, LlamaIndex) share: their settings model, a call's generation arguments
from those settings and the call's keywords, its collection, the checks they run at construction, token usage and
tool-call entries."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .checks import check_int
from .policies import budget_count, check_quality_target
from .stats import SkipStats

DEFAULT_COLLECTION = "default"  # the profile key of calls that name no collection and retrieved from none
_warned_stores: set[str] = set()


def call_collection(*named: str | None, retrieval: Callable[[], tuple[str | None, str | None]]) -> str:
    """The profile key of one framework call: the first of ``named`` that is set (the call's ``collection=``, its
    configuration's, the LLM object's setting), else the collection of the vector store the calling chain or query
    retrieved from (``retrieval()``: its name, or None and the type of a store that has none), else
    :data:`DEFAULT_COLLECTION`, with a warning once per store type that had no name to read."""
    chosen = next((name for name in named if name), None)
    if chosen:
        return chosen
    retrieved, unnamed_store = retrieval()
    return retrieved or _default_collection(unnamed_store)


def _default_collection(unnamed_store: str | None) -> str:
    if unnamed_store is not None and unnamed_store not in _warned_stores:
        _warned_stores.add(unnamed_store)
        warnings.warn(
            f"adaskip-rag cannot read a collection name from the {unnamed_store} this answer's context came from: "
            f"answers from it are profiled under {DEFAULT_COLLECTION!r}; pass collection= to give them their own",
            stacklevel=4,
        )
    return DEFAULT_COLLECTION


def usage(stats: SkipStats) -> dict[str, int]:
    """A request's token usage, as OpenAI's API names it."""
    prompt, completion = stats.prompt_tokens, stats.generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def tool_call_entry(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    """An assistant message's tool call, as the chat template (and OpenAI's API) takes it."""
    return {"type": "function", "id": call_id, "function": {"name": name, "arguments": arguments}}


CALL_SETTINGS = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "truncation",
    "budget",
    "quality_target",
    "skip",
)
CALL_OPTIONS = ("json_schema", "tools", "tool_choice", "parallel_tool_calls")  # per call only, no setting


def call_arguments(settings: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Generation arguments of one framework call: per-call ``overrides`` (``max_tokens`` or ``max_new_tokens``,
    :data:`CALL_SETTINGS` and :data:`CALL_OPTIONS`) over the same-named attributes of ``settings`` (the
    framework's LLM object). Anything else in ``overrides`` raises ValueError."""
    rest = dict(overrides)
    for name in ("max_tokens", "max_new_tokens"):
        if name in rest:
            check_int(name, rest[name], 1)
    args = {"max_new_tokens": rest.pop("max_tokens", rest.pop("max_new_tokens", settings.max_tokens))}
    args.update({name: rest.pop(name, getattr(settings, name)) for name in CALL_SETTINGS})
    args.update({name: rest.pop(name) for name in CALL_OPTIONS if name in rest})
    if rest:
        raise ValueError(f"unsupported arguments: {sorted(rest)}")
    return args


def check_model(name_or_path: str | os.PathLike) -> None:
    """ValueError unless ``name_or_path`` is "default" or a local model folder (what an adapter checks at
    construction, before loading anything)."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model must be 'default' or a local model folder, got {name_or_path!r}")
    if str(name_or_path) != "default" and not (Path(name_or_path) / "config.json").is_file():
        raise ValueError(f"model {str(name_or_path)!r} is neither 'default' nor a local model folder (no config.json)")


def check_device(device: str | None) -> None:
    """ValueError unless ``device`` is None (the engine's choice) or names a torch device."""
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"not a torch device: {exc}") from None


def check_stop(stop: list[str] | None) -> None:
    if stop is not None and not all(stop):
        raise ValueError("stop strings must be non-empty")


def check_budget(budget: int | float | None) -> None:
    if budget is not None:
        budget_count(budget, 10**6)  # its type and range; the model's sublayer count is checked per call


SETTING_CHECKS: dict[str, Callable[[Any], None]] = {
    "model": check_model,
    "device": check_device,
    "stop": check_stop,
    "budget": check_budget,
    "quality_target": check_quality_target,
}
"""The checks both adapters run on these settings at construction, before anything loads."""


class AdaSkipSettings(BaseModel):
    """The settings both adapters take at construction, each checked then (a bad value or an unknown keyword is
    a ValueError naming it) and each a default that a call's keyword of the same name overrides."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    model: str = Field(
        default="default",
        validation_alias=AliasChoices("model", "model_name"),
        description='"default" (SmolLM2-135M-Instruct, bundled) or a local model folder (alias model_name).',
    )
    device: str | None = Field(default=None, description="torch device; default: the engine's choice.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None,
        description="The model's precision; default bf16 on a GPU, on CPU bf16 where it is native and measures faster, "
        "else fp32 (see loading.default_cpu_dtype).",
    )
    collection: str | None = Field(
        default=None,
        min_length=1,
        description="Profile key, unless a call passes collection=; else the collection of the vector store the "
        'enclosing chain or query retrieves from; else "default".',
    )
    max_tokens: int = Field(
        default=256,
        gt=0,
        strict=True,
        validation_alias=AliasChoices("max_tokens", "max_new_tokens"),
        description="Most new tokens per answer (alias max_new_tokens).",
    )
    temperature: float = Field(default=0.0, ge=0.0, allow_inf_nan=False, strict=True, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, strict=True)
    top_k: int = Field(default=0, ge=0, strict=True)
    repetition_penalty: float = Field(default=1.0, gt=0.0, allow_inf_nan=False, strict=True)
    seed: int | None = Field(default=None, ge=0, strict=True)
    stop: list[str] | None = Field(default=None, description="Stop strings, not part of the answer.")
    truncation: Literal["error", "left"] = Field(
        default="error", description='"left": keep the last tokens of a prompt longer than the context window.'
    )
    budget: int | float | None = Field(
        default=None,
        description="Sublayers to skip in prefill, a count or a fraction of all sublayers; default: the engine's "
        "policy (8).",
    )
    quality_target: float | None = Field(
        default=None,
        description="Teacher-forced agreement with the full model that the collection's quality guard keeps; "
        "default: the engine's policy (no guard).",
    )
    skip: bool = Field(default=True, strict=True, description="False: the full model, nothing skipped or learned.")

    @field_validator(*SETTING_CHECKS)
    @classmethod
    def _check_setting(cls, value: Any, info: ValidationInfo) -> Any:
        SETTING_CHECKS[info.field_name](value)  # type: ignore[index]
        return value
