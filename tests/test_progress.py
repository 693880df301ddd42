"""Progress (`progress`): time left from a moving window, "estimating" until there is one."""

from __future__ import annotations

import pytest

from ptqtp.progress import Eta, format_seconds


def _feed(eta: Eta, durations, works) -> list:
    """Items of the given durations and work, one after another; the estimate after each."""
    now, done, left = 0.0, 0.0, []
    for d, w in zip(durations, works):
        now, done = now + d, done + w
        eta.add(now, done)
        left.append(eta.seconds_left())
    return left


def test_a_slow_start_is_forgotten():
    """100 items of 1 s each, the first three far slower (warm-up): the estimate never counts the warm-up, says
    "estimating" (None) at first, and is exact once the window has moved past the slow items."""
    durations = [30.0, 8.0, 6.0] + [1.0] * 97
    left = _feed(Eta(100), durations, [1] * 100)
    assert left[:3] == [None, None, None]
    for i in range(20, 99):  # the window (10 items) holds only steady items: exact
        assert left[i] == pytest.approx(100 - (i + 1), rel=1e-9), i
    naive = sum(durations[:6]) / 6 * (100 - 6)  # what an average from the start promised after 6 items
    assert naive > 6 * (100 - 6) and (left[5] is None or left[5] < naive / 2)


def test_uneven_items_are_weighed_by_their_work():
    """Layers of a large and a small Linear alternate (work 8 and 1, time proportional): with work as the unit
    the estimate is right whichever item just finished; counted per item it would swing by 8x."""
    works = [8, 1] * 50
    total = sum(works)
    left = _feed(Eta(total), [w * 0.5 for w in works], works)
    done = 0
    for i, w in enumerate(works):
        done += w
        if i >= 30:
            assert left[i] == pytest.approx((total - done) * 0.5, rel=1e-9), i


def test_estimating_until_enough_work_is_seen():
    left = _feed(Eta(1000), [1.0] * 60, [1] * 60)
    assert left[:50] == [None] * 50  # under 5 % of the work past the first item: too little to promise anything
    assert left[-1] == pytest.approx(1000 - 60, rel=1e-9)


def test_a_restart_forgets_time_that_did_no_work():
    """After a resume skipped work done earlier, that work took no time and must not inflate the rate."""
    eta = Eta(100)
    eta.add(0.0, 50.0)  # 50 items skipped at once
    eta.restart()
    left = _feed(eta, [2.0] * 20, [1] * 20)
    assert left[-1] is None or left[-1] == pytest.approx(2.0 * (100 - 20), rel=1e-9)


def test_format_seconds():
    assert [format_seconds(s) for s in (9, 187, 3725)] == ["0:09", "3:07", "1:02:05"]
