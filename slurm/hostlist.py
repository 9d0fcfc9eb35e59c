"""``python3 slurm/hostlist.py 'node[01-03],gpu[1,4-5]-ib'``: SLURM's node-list syntax, expanded.

What ``scontrol show hostnames`` prints, one host per line, for machines without SLURM (the
``--dry-run`` of ``slurm/pretrain.sh`` on a laptop). Understood: comma-separated entries (commas
inside brackets separate ranges instead), bracket groups of numbers and ranges (``[1,3,5-7]``),
zero padding (``[08-10]`` -> 08 09 10: the width of the range's first bound), several bracket
groups in one entry (the last one varies fastest, as scontrol prints them). Standard library only:
the script runs before any virtual environment exists.
"""

from __future__ import annotations

import re
import sys
from itertools import product

_GROUP = re.compile(r"\[([^\[\]]*)\]")


class HostlistError(ValueError):
    """A node list that is not SLURM syntax (the message quotes it)."""


def _split_top(nodelist: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"nested brackets in node list {nodelist!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unbalanced ']' in node list {nodelist!r}")
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise HostlistError(f"unbalanced '[' in node list {nodelist!r}")
    parts.append(nodelist[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _numbers(group: str, nodelist: str) -> list[str]:
    out: list[str] = []
    for item in group.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise HostlistError(f"bad range {item!r} in node list {nodelist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise HostlistError(f"range {item!r} runs backwards in node list {nodelist!r}")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


def expand(nodelist: str) -> list[str]:
    """The host names of a SLURM node list, in scontrol's order."""
    hosts: list[str] = []
    for entry in _split_top(nodelist):
        pieces = _GROUP.split(entry)  # text, group, text, group, ..., text
        literal, groups = pieces[0::2], [_numbers(g, nodelist) for g in pieces[1::2]]
        if any("[" in t or "]" in t for t in literal):
            raise HostlistError(f"bad brackets in node list {nodelist!r}")
        for combo in product(*groups):
            hosts.append("".join(t + n for t, n in zip(literal, (*combo, ""), strict=True)))
    return hosts


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 slurm/hostlist.py NODELIST", file=sys.stderr)
        return 2
    try:
        print("\n".join(expand(argv[0])))
    except HostlistError as err:
        print(f"hostlist.py: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
