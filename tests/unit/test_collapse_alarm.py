"""The collapse alarm's unit behaviour; a real run that trips it is in
tests/integration/test_collapse.py."""

from __future__ import annotations

from lang_jepa.metrics import CollapseAlarm


def test_alarm_needs_patience_and_resets():
    alarm = CollapseAlarm(min_rank=2.0, min_std=0.05, patience=3)
    assert not alarm.check(1.5, 0.5) and not alarm.check(1.5, 0.5)
    assert not alarm.check(10.0, 0.5)  # healthy check resets the count
    assert [alarm.check(10.0, 0.01) for _ in range(3)] == [False, False, True]
    assert alarm.tripped and not alarm.check(1.0, 0.01)  # trips once
    assert not CollapseAlarm(2.0, 0.05, 1).check(
        float("nan"), float("nan")
    )  # MLM: nothing to watch
