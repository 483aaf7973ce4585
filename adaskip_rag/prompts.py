"""Prompts as token ids: plain text, chat messages through the model's chat template (with tools), or ids.

Chat messages and tools are untrusted text (retrieved documents, tool results, specs from other programs): a
special token's text inside them (``<|im_end|>``) stays text, as the plain-text tokens of its characters, so only
the template's own special tokens are control tokens. A prompt string is the opt-out: it is tokenized as it is,
special tokens included, for callers who build raw prompts.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from transformers import PreTrainedTokenizerBase

from .checks import check_text
from .constrained import TOOL_CALL_OPEN

if TYPE_CHECKING:
    from .skipping import SkipPlan

Prompt = str | Sequence[Mapping[str, Any]] | Sequence[int]
Messages = Sequence[Mapping[str, Any]]
Tools = Sequence[Mapping[str, Any]]


class _Rendered(NamedTuple):
    """A template's text whose ``sentinels`` stand for the added tokens' texts ``found`` in the content."""

    text: str
    sentinels: re.Pattern[str]
    found: list[str]


class ChatPrompts:
    """The prompt side of an engine: its tokenizer and chat template. ``name`` (the model's) is for error
    messages, ``vocab_size`` bounds prompts given as token ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, name: str, vocab_size: int):
        self.tokenizer, self.name, self.vocab_size = tokenizer, name, vocab_size

    def render(self, messages: Messages, tools: Tools | None = None) -> str:
        """The prompt text of ``{"role": ..., "content": ...}`` messages (and the ``tools`` they may call, rendered by
        the template)."""
        if tools:
            self.check_tool_support()
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.name} has no chat template; pass a plain prompt string")
        if not messages:
            raise ValueError("messages is empty")
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content", ""), str | None):
                raise ValueError(f"messages[{i}] needs a string 'role' and a string 'content', got {dict(m)!r}")
        if not any((m.get("content") or "").strip() or m.get("tool_calls") for m in messages):
            raise ValueError("prompt is empty: every message's content is empty")
        chat: list[dict[str, Any]] = [dict(m) for m in messages]
        return str(
            self.tokenizer.apply_chat_template(
                chat,
                tools=[dict(t) for t in tools] if tools else None,  # type: ignore[arg-type]
                tokenize=False,
                add_generation_prompt=True,
            )
        )

    @functools.cached_property
    def supports_tools(self) -> bool:
        """Whether the chat template renders tools, assistant ``<tool_call>`` calls (the format constrained tool calling
        generates) and tool results."""
        tool = {"type": "function", "function": {"name": "adaskip_probe", "parameters": {"type": "object"}}}
        call = {"type": "function", "function": {"name": "adaskip_probe", "arguments": {}}}
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "adaskip-result"},
        ]
        if not getattr(self.tokenizer, "chat_template", None):
            return False
        try:
            text = str(self.tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False))  # type: ignore[arg-type]
        except Exception:  # a template that cannot render tool turns
            return False
        return text.count("adaskip_probe") >= 2 and TOOL_CALL_OPEN in text and "adaskip-result" in text

    def check_tool_support(self) -> None:
        """ValueError naming the model unless its template supports tools (:attr:`supports_tools`)."""
        if not self.supports_tools:
            raise ValueError(
                f"{self.name}'s chat template does not support tool calling in the <tool_call> format "
                "(tools, assistant tool calls and tool results)"
            )

    def encode(self, prompt: Prompt, tools: Tools | None = None) -> list[int]:
        """Token ids of a prompt string, a message list (through the chat template, with ``tools``) or a list of ids."""
        if tools:
            self.check_tool_support()
        check_text("tools", tools)
        if isinstance(prompt, str):
            check_text("prompt", prompt)
            if not prompt.strip():
                raise ValueError("prompt is empty")
            if tools:
                raise ValueError("tools need a prompt of chat messages")
            return self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, (bytes, Mapping)) or not isinstance(prompt, Sequence):
            raise ValueError(
                f"prompt must be a string, a list of chat messages or a list of token ids, got {type(prompt).__name__}"
            )
        items: list[Any] = list(prompt)
        if not items:
            raise ValueError("prompt is empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            bad = [t for t in items if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} out of range for vocabulary size {self.vocab_size}")
            if tools:
                raise ValueError("tools need a prompt of chat messages")
            return items
        if all(isinstance(m, Mapping) for m in items):
            check_text("messages", items)
            return self._tokens(self._render_as_text(items, tools))[0]
        raise ValueError("prompt must be a string, a list of chat messages (dicts) or a list of token ids")

    @functools.cached_property
    def _added_tokens(self) -> tuple[set[int], re.Pattern[str] | None]:
        """The ids of the tokenizer's added tokens (special or not: the tokenizer matches them whole, before its
        model) and a pattern matching their texts, longest first."""
        added = self.tokenizer.added_tokens_decoder
        texts = sorted({t.content for t in added.values() if t.content}, key=len, reverse=True)
        return set(added), re.compile("|".join(map(re.escape, texts))) if texts else None

    def _render_as_text(self, messages: Messages, tools: Tools | None, nonce: str = "") -> _Rendered:
        """The template's text of ``messages`` and ``tools`` with every added token's text inside any of their strings
        replaced by a sentinel, ``\ue000<nonce><index>\ue001``, where the nonce (random unless given) is one no
        content can know."""
        _, pattern = self._added_tokens
        nonce = nonce or secrets.token_hex(8)
        found: list[str] = []

        def sentinel(m: re.Match[str]) -> str:
            found.append(m.group())
            return f"\ue000{nonce}{len(found) - 1}\ue001"

        def neutral(value: Any) -> Any:
            if isinstance(value, str):
                return pattern.sub(sentinel, value) if pattern else value
            if isinstance(value, Mapping):
                return {neutral(k): neutral(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [neutral(v) for v in value]
            return value

        text = self.render([neutral(m) for m in messages], [neutral(t) for t in tools] if tools else None)
        return _Rendered(text, re.compile(f"\ue000{nonce}(\\d+)\ue001"), found)

    def _tokens(self, rendered: _Rendered) -> tuple[list[int], list[int]]:
        """Token ids of a rendered template and the character offset in its text where each ends: the text between
        sentinels as the tokenizer reads it, each sentinel as the plain-text tokens of the token text it stands
        for."""
        ids: list[int] = []
        ends: list[int] = []
        start, text = 0, rendered.text
        for m in [*(rendered.sentinels.finditer(text) if rendered.found else []), None]:
            piece = text[start : m.start() if m else len(text)]
            if piece:
                enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                ids += enc["input_ids"]
                ends += [start + end for _, end in enc["offset_mapping"]]
            if m:
                plain = self._plain(rendered.found[int(m.group(1))])
                ids += plain
                ends += [m.end()] * len(plain)
                start = m.end()
        return ids, ends

    def _plain(self, text: str) -> list[int]:
        """``text`` (an added token's) as plain-text tokens: no added token's id, halved until none is left."""
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if len(text) < 2 or not set(ids) & self._added_tokens[0]:
            return ids
        return self._plain(text[: len(text) // 2]) + self._plain(text[len(text) // 2 :])

    def user_turn_tokens(self, messages: Messages) -> int:
        """How many prompt tokens of ``messages`` run from the start of the last user message's content to the end
        (what ``SkipPlan.tail="last_user_turn"`` protects): found with a marker only this call knows."""
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last is None:
            raise ValueError("SkipPlan.tail='last_user_turn': the prompt has no user message")
        nonce = secrets.token_hex(8)
        marker = f"\u2063adaskip-user-turn-{nonce}\u2063"
        marked = [dict(m, content=marker) if i == last else m for i, m in enumerate(messages)]
        start = self._render_as_text(marked, None, nonce).text.find(marker)  # the content's place, verbatim
        if start < 0:
            raise ValueError(
                f"SkipPlan.tail='last_user_turn': cannot find the last user turn in {self.name}'s template"
            )
        _, ends = self._tokens(self._render_as_text(messages, None, nonce))  # the same text up to ``start``
        return len(ends) - next((i for i, end in enumerate(ends) if end > start), len(ends))

    def protected_tail(self, plan: SkipPlan, n: int, messages: Messages | None = None) -> int:
        """How many of the ``n`` prompt tokens ``plan``'s tail protects (for "last_user_turn", from the chat
        ``messages``); ValueError if its head and tail leave nothing of the prompt to skip in."""
        tail = plan.tail
        if tail == "last_user_turn":
            if messages is None:
                raise ValueError("SkipPlan.tail='last_user_turn' needs a prompt of chat messages")
            tail = self.user_turn_tokens(messages)
        plan.check_protected(n, tail)
        return tail
