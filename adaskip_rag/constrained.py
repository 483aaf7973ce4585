"""Constrained decoding with xgrammar: answers that follow a JSON schema, and tool calls in the
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` format of ChatML tool templates.

At every step the grammar's matcher masks the logits of the tokens it forbids, and the chosen token advances
it; once the grammar is complete only the end-of-sequence token is allowed, so a finished answer always
parses, and :class:`Constraint` finishes a JSON answer before ``max_new_tokens`` would cut it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

from .checks import check_int, check_real, check_text
from .closing import way_to_finish

JSONSchema = Mapping[str, Any] | str | type[BaseModel]
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
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
        raise ValueError(
            f"json_schema must be a dict, JSON text or a pydantic model class, got {type(schema).__name__}"
        )
    return dict(schema)


@dataclass(frozen=True)
class SchemaLimits:
    """Bounds on the JSON schemas a request constrains its answer with (``json_schema``, tools' ``parameters``), so
    that no request makes unbounded work: ``max_bytes`` of the schema's JSON text, ``max_depth`` of nested
    subschemas, ``max_properties`` in all its objects together, and ``compile_seconds`` to compile its grammar
    (compiled grammars are cached by schema). Each exceeded is a ValueError naming the limit. Compile time grows
    about with the square of the properties: 400 optional properties took 0.9 s here, 1,000 about 9 s."""

    max_bytes: int = 65_536
    max_depth: int = 32
    max_properties: int = 256
    compile_seconds: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_depth", "max_properties"):
            check_int(f"SchemaLimits.{name}", getattr(self, name), 1)
        check_real("SchemaLimits.compile_seconds", self.compile_seconds, lambda t: t > 0, "a number of seconds > 0")


UNENFORCED = (
    "multipleOf",
    "if",
    "then",
    "else",
    "not",
    "contains",
    "minContains",
    "maxContains",
    "dependentSchemas",
    "dependentRequired",
    "dependencies",
    "patternProperties",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
)
"""Schema keywords the grammar does not enforce: a schema using one is refused rather than silently loosened."""

_SUBSCHEMA = ("items", "additionalProperties", "additionalItems")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def check_schema(schema: Mapping[str, Any], limits: SchemaLimits, name: str = "json_schema") -> None:
    """ValueError naming the limit or keyword unless ``schema`` is within ``limits`` and uses only keywords the
    grammar enforces and local ``$ref`` s (``#/...``)."""
    size = len(json.dumps(schema).encode())
    if size > limits.max_bytes:
        raise ValueError(f"{name} is {size} bytes of JSON; the limit is SchemaLimits.max_bytes = {limits.max_bytes}")
    properties = 0

    def walk(node: Any, depth: int, where: str) -> None:
        nonlocal properties
        if not isinstance(node, Mapping):
            return
        if depth > limits.max_depth:
            raise ValueError(f"{name} nests subschemas deeper than SchemaLimits.max_depth = {limits.max_depth}")
        used = [k for k in UNENFORCED if k in node]
        if used:
            raise ValueError(f"{name} uses {used[0]!r} at {where}, which constrained decoding cannot enforce")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise ValueError(f"{name} refers to {ref!r} at {where}: only references inside the schema ('#/...')")
        if isinstance(node.get("properties"), Mapping):
            properties += len(node["properties"])
            if properties > limits.max_properties:
                raise ValueError(
                    f"{name} has more than SchemaLimits.max_properties = {limits.max_properties} properties"
                )
        children = [(node.get(k), f"{where}/{k}") for k in _SUBSCHEMA]
        for k in _SUBSCHEMA_LISTS:
            if isinstance(node.get(k), list):
                children += [(v, f"{where}/{k}/{i}") for i, v in enumerate(node[k])]
        for k in _SUBSCHEMA_MAPS:
            if isinstance(node.get(k), Mapping):
                children += [(v, f"{where}/{k}/{key}") for key, v in node[k].items()]
        for child, path in children:
            walk(child, depth + 1, path)

    walk(schema, 0, "#")


def json_grammar(schema: JSONSchema, limits: SchemaLimits) -> xgr.Grammar:
    """The grammar of the JSON texts ``schema`` accepts (checked against ``limits``), compact (no free whitespace a
    small model could loop in)."""
    schema = json_schema_dict(schema)
    check_text("json_schema", schema)
    check_schema(schema, limits)
    try:
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"json_schema is not a schema constrained decoding supports: {exc}") from None


def check_tools(tools: Sequence[Mapping[str, Any]], limits: SchemaLimits) -> list[dict[str, Any]]:
    """Tools in the OpenAI function format (``{"type": "function", "function": {"name", "parameters"}}``),
    checked (their parameters against ``limits``); ValueError naming the first bad one."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence) or not tools:
        raise ValueError("tools must be a non-empty list of function tools")
    checked: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        check_text(f"tools[{i}]", tool)
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}] is not a function tool {{'type': 'function', 'function': {{'name': ...}}}}")
        if not TOOL_NAME.fullmatch(function["name"]):
            raise ValueError(
                f"tools[{i}]: the name {function['name'][:80]!r} is not 1-64 letters, digits, '_' or '-' "
                f"(as OpenAI requires)"
            )
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
            raise ValueError(f"tools[{i}] ({function['name']}): parameters must be a JSON schema of type 'object'")
        check_schema(parameters, limits, f"tools[{i}] ({function['name']}) parameters")
        checked.append({"type": "function", "function": dict(function)})
    names = [str(t["function"]["name"]) for t in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
    return checked


def tool_choice(choice: Any) -> str | None:
    """OpenAI's ``tool_choice`` as the engine's: None, "auto", "none", "any" (also "required") or a tool's name
    (also ``{"type": "function", "function": {"name": ...}}``)."""
    if isinstance(choice, Mapping):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, Mapping) or not function.get("name"):
            raise ValueError("tool_choice as an object must be {'type': 'function', 'function': {'name': ...}}")
        choice = function["name"]
    if choice is not None and not isinstance(choice, str):
        raise ValueError(f"tool_choice must be 'auto', 'none', 'any', 'required' or a tool's name, got {choice!r}")
    return "any" if choice == "required" else choice


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
            content=JSONSchemaFormat(
                json_schema=dict(t["function"].get("parameters") or {"type": "object"}), max_whitespace_cnt=1
            ),  # a separator's space, no runs to loop in
            end=f"}}\n{TOOL_CALL_CLOSE}",
        )
        for t in tools
        if choice in ("auto", "any") or t["function"]["name"] == choice
    ]
    if choice == "auto":
        return _structural(TriggeredTagsFormat(triggers=[TOOL_CALL_OPEN], tags=tags, stop_after_first=not parallel))
    return _structural(
        TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel)
    )


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
            call = json.JSONDecoder().raw_decode(raw)[0]  # a cut closing tag may follow
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

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        limits: SchemaLimits = SchemaLimits(),
    ):
        self.vocab_size, self.limits = vocab_size, limits
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)

    @functools.cached_property
    def texts(self) -> list[bytes]:
        """Each token's text (the tokenizer info builds it anew on each read)."""
        return list(self.info.decoded_vocab[: self.vocab_size])

    @functools.cached_property
    def pieces(self) -> dict[bytes, int]:
        """The tokens an answer can take, by their text (special tokens are never a piece of text)."""
        special = set(self.info.special_token_ids)
        pieces: dict[bytes, int] = {}
        for i, piece in enumerate(self.texts):
            if piece and i not in special:
                pieces.setdefault(piece, i)
        return pieces

    @functools.cached_property
    def longest_piece(self) -> int:
        return max(map(len, self.pieces))

    def tokens(self, text: bytes, matcher: xgr.GrammarMatcher) -> list[int] | None:
        """``text``, which ``matcher``'s grammar takes next, as few tokens as the longest pieces at each point give
        (None if the vocabulary cannot spell it)."""
        state, tokens, i = matcher.fork(), [], 0
        while i < len(text):
            for n in range(min(self.longest_piece, len(text) - i), 0, -1):
                token = self.pieces.get(text[i : i + n])
                if token is not None and (after := state.fork()).accept_token(token):
                    state, i = after, i + n
                    tokens.append(token)
                    break
            else:
                return None
        return tokens

    def constraint(self, grammar: xgr.Grammar, budget: int, closes: bool) -> Constraint:
        """A request's constraint for an answer of at most ``budget`` tokens; with ``closes``, the answer finishes
        within it (ValueError if no way to is found)."""
        return Constraint(xgr.GrammarMatcher(self.compile(grammar)), self, budget, closes)

    def compile(self, grammar: xgr.Grammar) -> xgr.CompiledGrammar:
        """``grammar`` compiled (from the cache if it was before), or ValueError once that takes longer than
        ``limits.compile_seconds`` (the compile goes on in its own thread, and is cached when it ends; the interpreter
        waits for it at exit, which the other limits bound)."""
        done: concurrent.futures.Future[xgr.CompiledGrammar] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(self.compiler.compile_grammar(grammar))
            except BaseException as exc:  # handed to the waiting request
                done.set_exception(exc)

        threading.Thread(target=run, name="adaskip-grammar").start()  # not a daemon: C++ must not be cut off
        try:
            return done.result(timeout=self.limits.compile_seconds)
        except concurrent.futures.TimeoutError:
            raise ValueError(
                f"the answer's grammar took longer than SchemaLimits.compile_seconds = {self.limits.compile_seconds} s "
                "to compile; simplify the schema or raise the limit"
            ) from None


class Constraint:
    """One request's grammar state.

    With ``closes`` (an answer that is JSON all through), the answer fits its budget of tokens: the constraint keeps
    a way to finish (:func:`~adaskip_rag.closing.way_to_finish`) that fits the tokens left. A token the model
    chooses is taken where a way to finish still fits after it; elsewhere the answer takes the next token of the
    way it has, and ``closed_early`` says so. So an answer that fits is left as the model makes it, an answer
    that would not fit ends complete, and a budget too small for any answer found is a ValueError up front.
    """

    MAX_STATES = 256  # states a search after a chosen token looks at, at most

    def __init__(self, matcher: xgr.GrammarMatcher, grammars: Grammars, budget: int, closes: bool):
        self.matcher, self.grammars, self.budget = matcher, grammars, budget
        self.bitmask = xgr.allocate_token_bitmask(1, grammars.vocab_size)
        self.steps = 0
        self.closed_early = False  # a token the model chose was replaced to finish in time
        self.way: tuple[list[int], bytes] | None = None  # the tokens and text of a way to finish from here
        if closes:
            self.way = self._way(matcher, 16 * budget + 64, 16 * self.MAX_STATES)
            if self.way is None or len(self.way[0]) > budget:
                shortest = "" if self.way is None else f" (the shortest found takes {len(self.way[0])})"
                raise ValueError(
                    f"no constrained answer of at most max_new_tokens={budget} tokens was found{shortest}: "
                    "raise max_new_tokens"
                )

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (1, vocab) with the tokens the grammar forbids next set to -inf (a copy)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        logits = logits.float().cpu().clone()
        xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        return logits

    def accept(self, token: int) -> int:
        """Advance the grammar by the model's choice ``token`` (one the mask allowed), or by the way to finish
        where no way fits after it; returns the token taken."""
        if self.way is not None and token not in self.matcher.stop_token_ids:
            tokens, text = self.way
            way = (
                self._rest(token) if tokens and token == tokens[0] else self._after(token, self.budget - self.steps - 1)
            )
            if way is None:  # the way it has finishes in time
                token = tokens[0] if tokens else self.matcher.stop_token_ids[0]
                way = self._rest(token) if tokens else self.way
                self.closed_early = True
            self.way = way
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} violates the grammar")  # only if the mask was not applied
        self.steps += 1
        return token

    def _rest(self, token: int) -> tuple[list[int], bytes]:
        """The way to finish after its own first token, ``token``."""
        assert self.way is not None
        return self.way[0][1:], self.way[1][len(self.grammars.texts[token]) :]

    def _after(self, token: int, left: int) -> tuple[list[int], bytes] | None:
        """A way to finish within ``left`` tokens after ``token``: the way the constraint has if it still finishes
        (as it does after more of a string or a number), else a new one, or None."""
        after = self.matcher.fork()
        if not after.accept_token(token):
            raise RuntimeError(f"token {token} violates the grammar")  # only if the mask was not applied
        assert self.way is not None
        tokens, text = self.way
        still = after.fork()
        if len(tokens) <= left and still.accept_string(text) and still.is_completed():
            return self.way
        way = self._way(after, 8 * left + 16, self.MAX_STATES) if left >= 0 else None
        return way if way is not None and len(way[0]) <= left else None

    def _way(self, matcher: xgr.GrammarMatcher, max_bytes: int, max_states: int) -> tuple[list[int], bytes] | None:
        """The tokens and text of a way to finish from ``matcher``'s state (see :func:`way_to_finish`), or None."""
        text = way_to_finish(matcher, max_bytes, max_states)
        tokens = None if text is None else self.grammars.tokens(text, matcher)
        return None if tokens is None or text is None else (tokens, text)
