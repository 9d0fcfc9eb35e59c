"""slurm/hostlist.py against the expansions ``scontrol show hostnames`` prints (SLURM's docs)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "hostlist", Path(__file__).resolve().parents[2] / "slurm" / "hostlist.py"
)
hostlist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostlist)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-03]", ["node01", "node02", "node03"]),
        ("tux[0-3,7]", ["tux0", "tux1", "tux2", "tux3", "tux7"]),
        ("lx[08-10]", ["lx08", "lx09", "lx10"]),  # the first bound's width
        ("lx[9-11]", ["lx9", "lx10", "lx11"]),  # no padding
        ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("gpu[1,4-5]-ib", ["gpu1-ib", "gpu4-ib", "gpu5-ib"]),
        ("n[001-002],m[7]", ["n001", "n002", "m7"]),
    ],
)
def test_expansions_match_scontrol(nodelist: str, hosts: list[str]) -> None:
    assert hostlist.expand(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node01-03]", "node[3-1]", "node[a-b]", "n[[1]]"])
def test_bad_node_lists_are_refused_quoting_them(bad: str) -> None:
    with pytest.raises(hostlist.HostlistError, match=re.escape(repr(bad))):
        hostlist.expand(bad)
