"""Reading XLA's optimized HLO text in tests: computations by name, and what a computation
calls."""

from __future__ import annotations

import re

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_CALLEES = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")


def computations(hlo_text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of an HLO module's text."""
    bodies, name = {}, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            name = m.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)
    return bodies


def called_lines(hlo_text: str, root: str) -> list[str]:
    """The lines of computation ``root`` and of every computation it calls, transitively."""
    bodies = computations(hlo_text)
    seen, todo = set(), [root]
    while todo:
        c = todo.pop()
        if c in seen or c not in bodies:
            continue
        seen.add(c)
        for line in bodies[c]:
            todo += _CALLEES.findall(line)
    return [line for c in seen for line in bodies[c]]
