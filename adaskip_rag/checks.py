"""Checks of argument values: ValueErrors that name the argument."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def check_text(name: str, value: Any) -> None:
    """ValueError naming ``name`` unless every string in ``value`` (a string, or mappings and lists holding strings)
    can be written as UTF-8 (a lone surrogate cannot)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{name} is not valid Unicode text: {exc.reason} at character {exc.start}") from None
    elif isinstance(value, Mapping):
        for k, v in value.items():
            check_text(name, k)
            check_text(f"{name}[{k!r}]", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_text(f"{name}[{i}]", v)


def check_real(name: str, value: Any, ok: Callable[[float], bool], what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
