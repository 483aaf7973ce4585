"""Constrained decoding with xgrammar: answers that follow a JSON schema, and tool calls in the
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` format of ChatML tool templates.

At every step the grammar's matcher masks the logits of the tokens it forbids, and the chosen token advances
it; once the grammar is complete only the end-of-sequence token is allowed, so a finished answer always
parses (an answer cut by ``max_new_tokens`` is reported with ``finish_reason="length"``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import xgrammar as xgr
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase
from xgrammar.structural_tag import (
    AnyTextFormat,
    JSONSchemaFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
    TriggeredTagsFormat,
)

JSONSchema = Mapping[str, Any] | str | type[BaseModel]
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)


def json_schema_dict(schema: JSONSchema) -> dict[str, Any]:
    """A JSON schema as a dict, from a dict, its JSON text or a pydantic model class."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, Mapping):
        raise ValueError(f"json_schema must be a dict, JSON text or a pydantic model class, got {type(schema).__name__}")
    return dict(schema)


def json_grammar(schema: JSONSchema) -> xgr.Grammar:
    """The grammar of the JSON texts ``schema`` accepts, compact (no free whitespace a small model could loop in)."""
    try:
        return xgr.Grammar.from_json_schema(json.dumps(json_schema_dict(schema)), any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"json_schema is not a schema constrained decoding supports: {exc}") from None


def check_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tools in the OpenAI function format (``{"type": "function", "function": {"name", "parameters"}}``),
    checked; ValueError naming the first bad one."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence) or not tools:
        raise ValueError("tools must be a non-empty list of function tools")
    checked = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}] is not a function tool {{'type': 'function', 'function': {{'name': ...}}}}")
        if not isinstance(function.get("parameters", {}), Mapping):
            raise ValueError(f"tools[{i}] ({function['name']}): parameters must be a JSON schema object")
        checked.append({"type": "function", "function": dict(function)})
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
    return checked


def tool_grammar(tools: Sequence[Mapping[str, Any]], choice: str = "auto", parallel: bool = False) -> xgr.Grammar:
    """The grammar of an answer to a prompt offering ``tools`` (checked by :func:`check_tools`).

    ``choice``: "auto" (text, or text and a tool call), "none" (text without tool calls), "any" (a tool call and
    nothing else) or a tool's name (a call of that tool). ``parallel``: several calls instead of one.
    """
    names = [t["function"]["name"] for t in tools]
    if choice == "none":
        return _structural(AnyTextFormat(excludes=[TOOL_CALL_OPEN]))
    if choice not in ("auto", "any") and choice not in names:
        raise ValueError(f"tool_choice must be 'auto', 'none', 'any' or one of the tools {names}, got {choice!r}")
    tags = [
        TagFormat(
            begin=f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
            content=JSONSchemaFormat(json_schema=dict(t["function"].get("parameters") or {"type": "object"}),
                                     max_whitespace_cnt=1),  # a separator's space, no runs to loop in
            end=f"}}\n{TOOL_CALL_CLOSE}",
        )
        for t in tools if choice in ("auto", "any") or t["function"]["name"] == choice
    ]
    if choice == "auto":
        return _structural(TriggeredTagsFormat(triggers=[TOOL_CALL_OPEN], tags=tags, stop_after_first=not parallel))
    return _structural(TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True,
                                               stop_after_first=not parallel))


def _structural(format: Any) -> xgr.Grammar:
    try:
        return xgr.Grammar.from_structural_tag(StructuralTag(format=format))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"tool parameters are not a schema constrained decoding supports: {exc}") from None


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Split an answer into its text and its tool calls: ``(content, calls, invalid_calls)``. ``content`` is the
    text around the calls ("" if only whitespace); each call is ``{"id", "name", "arguments"}`` (a dict), an
    invalid one keeps its raw text and an ``error``."""
    calls, invalid = [], []
    for match in _CALL.finditer(text):
        raw, call_id = match.group(1).strip(), f"call_{uuid.uuid4().hex[:24]}"
        try:
            call = json.loads(raw)
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ValueError("not an object with a name")
            arguments = call.get("arguments", {})
            if not isinstance(arguments, dict):
                raise ValueError("arguments are not an object")
            calls.append({"id": call_id, "name": call["name"], "arguments": arguments})
        except ValueError as exc:
            invalid.append({"id": call_id, "name": None, "arguments": raw, "error": f"unparsable tool call: {exc}"})
    content = _CALL.sub("", text)
    return (content if content.strip() else ""), calls, invalid


class Grammars:
    """Compiles grammars for one tokenizer (xgrammar caches compiled grammars) and starts their matchers."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Sequence[int]):
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    def constraint(self, grammar: xgr.Grammar) -> "Constraint":
        return Constraint(xgr.GrammarMatcher(self.compiler.compile_grammar(grammar)), self.vocab_size)


class Constraint:
    """One request's grammar state."""

    def __init__(self, matcher: xgr.GrammarMatcher, vocab_size: int):
        self.matcher = matcher
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (1, vocab) with the tokens the grammar forbids next set to -inf (a copy)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        logits = logits.float().cpu().clone()
        xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} violates the grammar")  # only if the mask was not applied

