"""The change-log poll's failure lines (`CheckCache.run`), what an operator reads.

Driven through the real `CheckCache.run` loop, with `refresh` replaced by one that fails as a
database in trouble does, poll by poll: a database failing every other poll cannot be made
for real on cue. The real outage is `tests/test_check_cache.py`'s (found by review, helper-40).
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError

from koolbase_ota.sdk.cache import RECOVERED_AFTER_POLLS, CheckCache

POLL_SECONDS = 0.001


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "koolbase_ota.sdk.cache"]


async def _poll(outcomes: list[BaseException | None]) -> None:
    """`CheckCache.run` for as many polls as `outcomes` (None: the poll works)."""
    left = list(outcomes)
    done = asyncio.Event()

    async def refresh() -> None:
        outcome = left.pop(0)
        if not left:
            done.set()
        if outcome is not None:
            raise outcome

    fake = SimpleNamespace(flush_tallies=lambda: None, refresh=refresh)
    task = asyncio.create_task(CheckCache.run(fake, every_seconds=POLL_SECONDS))  # type: ignore[arg-type]
    await done.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _down() -> OperationalError:
    return OperationalError("SELECT", {}, Exception("connection refused"))


def test_a_flapping_database_is_not_logged_on_every_poll(caplog: pytest.LogCaptureFixture) -> None:
    """A database that fails every other poll (an overloaded one hitting its statement
    timeout, a pooler dropping some connections): every failure is "the first" again after
    the success before it, and every success is a recovery line, so 100 polls log 100 lines,
    more than before the throttle (50)."""
    caplog.set_level(logging.WARNING, logger="koolbase_ota.sdk.cache")
    asyncio.run(_poll([_down() if i % 2 == 0 else None for i in range(100)]))
    lines = _lines(caplog)
    # Each failure was logged as the first again after the success before it, and each
    # success as a recovery: 100 lines.
    assert len(lines) <= 4, (len(lines), lines[:4])


def test_a_different_failure_during_an_outage_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The database is down (OperationalError), then the poll starts failing for another
    reason (a bug: TypeError): the new kind is not logged for up to a minute, and the line
    that finally comes names only the kind of that poll."""
    caplog.set_level(logging.WARNING, logger="koolbase_ota.sdk.cache")
    asyncio.run(_poll([_down(), _down(), TypeError("a bug"), TypeError("a bug")]))
    lines = _lines(caplog)
    assert any("OperationalError" in line for line in lines), lines
    assert any("TypeError" in line for line in lines), lines


def test_works_again_is_said_once_it_has_worked_a_while_and_a_failure_after_it_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A database failing every other poll logged "works again" at its first good poll, then
    nothing for a minute while it went on failing: the log ended on "works again"."""
    caplog.set_level(logging.WARNING, logger="koolbase_ota.sdk.cache")
    flapping = [_down() if i % 2 == 0 else None for i in range(100)]
    steady = [None] * RECOVERED_AFTER_POLLS
    asyncio.run(_poll([*flapping, *steady, _down(), None]))
    lines = _lines(caplog)
    assert lines == [
        "cache refresh failed, serving cached answers: OperationalError (1 failed)",
        "cache refresh works again, after 50 failed",
        # A new outage after the recovery line: at once, not a minute after the first line.
        "cache refresh failed, serving cached answers: OperationalError (1 failed)",
    ]
