"""What traced-run reads from a ``Retry-After`` header (RFC 9110 10.2.3): delay-seconds or an
HTTP-date, capped, and nothing from what is neither."""

from __future__ import annotations

import email.utils
import time

import pytest

from traced_run.transport import MAX_RETRY_AFTER, retry_after


@pytest.mark.parametrize(("value", "seconds"), [
    ("7", 7.0), (" 0 ", 0.0), ("100000", MAX_RETRY_AFTER),
    (None, None), ("", None), ("-3", None), ("1.5", None), ("soon", None), ("\uff11\uff12", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date gone by: ask again now
])
def test_delay_seconds_and_dates(value: str | None, seconds: float | None) -> None:
    assert retry_after(value) == seconds


def test_a_date_ahead_is_the_seconds_until_it() -> None:
    ahead = email.utils.formatdate(time.time() + 60, usegmt=True)
    found = retry_after(ahead)
    assert found is not None and 55 <= found <= 60
