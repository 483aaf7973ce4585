"""A way to finish a constrained answer: a short text that completes its grammar from the state it is in.

A JSON answer that ``max_new_tokens`` cuts does not parse. So a request keeps, at every step, a way to finish
that fits the tokens it has left (:class:`~adaskip_rag.constrained.Constraint`). This module finds one: a
depth-first search over single bytes on forks of the grammar's matcher. Where the grammar forces a text (a key's
name, a separator) it is taken whole. Elsewhere the bytes are tried in :data:`ORDER` (what closes strings, arrays
and objects first, then what starts the shortest values). A byte that completes the grammar is taken at once;
otherwise the search prefers a byte that leads to a kind of state not met on the way yet (at the same or a lesser
depth of arrays and objects). Meeting the same kind of state again is how it notices a loop: another digit of a
number, another item of an array, another level of a recursive schema. A way it finds always finishes the
grammar, because the matcher took every byte of it. It need not be the shortest one.
"""

from __future__ import annotations

from collections.abc import Iterator

import xgrammar as xgr

ORDER = [bytes([b]) for b in dict.fromkeys(b'"]}0,[{-.: @' + bytes(range(0x21, 0x7F)) + b"\n\t") if b != ord("\\")] + [
    b"\\"
]
"""The bytes a search tries, in this order: closers and starts of short values, the rest of printable ASCII in
code order, newline and tab, the escape last. Other bytes are tried only where none of these fits."""
OTHER_BYTES = [bytes([b]) for b in range(0x80, 0x100)]
PROBES = [bytes([b]) for b in b'"]},:0a@.-[{ 1A'] + [b"\n"]
"""A state's kind is which of these bytes its grammar takes next, and whether it is complete."""
Kind = tuple[bool, ...]
MET, SCAN = 8, 24  # per state: successors of kinds met on the way tried at most; bytes taken looked at at most


def way_to_finish(matcher: xgr.GrammarMatcher, max_bytes: int, max_states: int) -> bytes | None:
    """A text that completes the grammar from ``matcher``'s state (left unchanged): b"" where it is complete,
    None where none is found within ``max_bytes`` bytes and ``max_states`` states."""
    path: list[bytes] = []
    met: list[tuple[Kind, int]] = []  # the kind and depth of each state on the way
    options = [iter([(b"", matcher.fork(), 0)])]  # per state on the way, its successors not tried yet
    states = 0
    while options:
        step = next(options[-1], None)
        if step is None:  # every successor of this state failed: back up
            options.pop()
            if path:
                path.pop()
                met.pop()
            continue
        text, state, depth = step
        jump = state.find_jump_forward_string().encode()  # forced: no choice to make
        if jump:
            depth += 0 if _in_string(state) else _depth(jump)
            state.accept_string(jump)
        path.append(text + jump)
        if state.is_completed():
            return b"".join(path)
        states += 1
        if states > max_states or sum(map(len, path)) >= max_bytes:
            path.pop()
            continue
        met.append((_kind(state), depth))
        options.append(_successors(state, depth, list(met)))
    return None


def _successors(
    state: xgr.GrammarMatcher, depth: int, met: list[tuple[Kind, int]]
) -> Iterator[tuple[bytes, xgr.GrammarMatcher, int]]:
    """The bytes ``state``'s grammar takes next, each with its successor and that one's depth, best first (lazily:
    the search backs up into the rest): one that completes the grammar if any (and only it); else of the first
    ``SCAN`` bytes it takes in :data:`ORDER`, those leading to a kind of state not ``met`` at the same or a lesser
    depth, then up to ``MET`` others (those that change the kind of state first). Of bytes leading to the same kind
    of state only the first counts."""
    taken = [(byte, after) for byte in ORDER if (after := state.fork()).accept_string(byte)]
    if not taken:
        taken = [(byte, after) for byte in OTHER_BYTES if (after := state.fork()).accept_string(byte)][:1]
    done = [(byte, after) for byte, after in taken if after.is_completed()]
    if done:
        yield done[0][0], done[0][1], depth
        return
    again: list[tuple[bool, bytes, xgr.GrammarMatcher, int]] = []
    kinds: set[Kind] = set()
    in_string, now = _in_string(state), _kind(state)
    for byte, after in taken[:SCAN]:
        deeper = depth + (0 if in_string else _depth(byte))
        kind = _kind(after)
        if kind not in kinds:
            kinds.add(kind)
            if all(k != kind or d > deeper for k, d in met):
                yield byte, after, deeper
            elif len(again) < MET:
                again.append((kind == now, byte, after, deeper))
    for _, byte, after, deeper in sorted(again, key=lambda a: a[0]):  # stable: a change of kind first
        yield byte, after, deeper


def _depth(text: bytes) -> int:
    """How many arrays and objects ``text`` opens, less those it closes (outside strings)."""
    return sum(text.count(b) for b in b"[{") - sum(text.count(b) for b in b"]}")


def _in_string(state: xgr.GrammarMatcher) -> bool:
    """Whether the grammar takes a letter next: inside a string (JSON takes letters elsewhere only in true, false
    and null, which it forces)."""
    return state.fork().accept_string(b"a")


def _kind(state: xgr.GrammarMatcher) -> Kind:
    return (*(state.fork().accept_string(p) for p in PROBES), state.is_completed())
