"""The precision choice (``train.precision=auto``): bf16 only where the CPU computes it natively."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lang_jepa import engine


@pytest.mark.parametrize(
    "flags,requested,expected",
    [
        ({"avx512_bf16": False, "amx": False}, "auto", "fp32"),
        ({"avx512_bf16": True, "amx": False}, "auto", "bf16"),
        ({"avx512_bf16": False, "amx": True}, "auto", "bf16"),
        ({"avx512_bf16": False, "amx": False}, "fp32", "fp32"),
        ({"avx512_bf16": True, "amx": True}, "fp32", "fp32"),
        ({"avx512_bf16": False, "amx": False}, "bf16", "bf16"),
    ],
)
def test_precision_auto_takes_bf16_only_where_the_cpu_has_it(
    monkeypatch, caplog, flags, requested, expected
):
    monkeypatch.setattr(engine, "cpu_bf16_flags", lambda: flags)
    with caplog.at_level(logging.WARNING, logger="lang_jepa"):
        precision, why = engine.resolve_precision(requested, torch.device("cpu"))
    assert precision == expected
    assert why.startswith("auto" if requested == "auto" else "requested")
    assert "avx512_bf16" in why and "amx" in why
    emulated = requested == "bf16" and not any(flags.values())
    assert ("emulated" in caplog.text) == emulated  # explicit bf16 without it: warned, kept


def test_this_cpus_flags_are_read():
    flags = engine.cpu_bf16_flags()
    assert set(flags) == {"avx512_bf16", "amx"}
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if cpuinfo and "avx512_bf16" not in cpuinfo.split():
        assert flags["avx512_bf16"] is False
