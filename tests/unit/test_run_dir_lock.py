"""One training per run directory: a second start is refused naming the holder."""

from __future__ import annotations

import os
import socket

import pytest

from lang_jepa.runinfo import RunDirBusy, RunDirLock


def test_second_holder_is_refused_naming_host_and_pid(tmp_path):
    first = RunDirLock(tmp_path / "run")
    with pytest.raises(
        RunDirBusy,
        match=rf"in use by another training \(host {socket.gethostname()} pid {os.getpid()}\)",
    ):
        RunDirLock(tmp_path / "run")
    first.release()
    RunDirLock(tmp_path / "run").release()  # free again once released
