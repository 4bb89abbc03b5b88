"""``rfc3339_utc`` against strftime, the text it is defined by."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from plugins.insider.values import rfc3339_utc


def _reference(moment: datetime) -> str:
    """What the formatting was written from: strftime, plus milliseconds when nonzero."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    millis = moment.microsecond // 1000
    return text + (f".{millis:03d}" if millis else "") + "Z"


def test_rfc3339_utc_matches_strftime() -> None:
    rng = random.Random(7)
    zones = [None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    moments = [
        datetime(2026, 11, 27, 8, 0, 1, 237000, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 999),  # under a millisecond: none written
        datetime(2026, 1, 2, 3, 4, 5, 1000),
        datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC),  # strftime's %Y is unpadded here
        datetime(5, 6, 7, 8, 9, 10, 11000),
    ]
    for _ in range(2000):
        moments.append(
            datetime(
                rng.randrange(1900, 2100),
                rng.randrange(1, 13),
                rng.randrange(1, 29),
                rng.randrange(24),
                rng.randrange(60),
                rng.randrange(60),
                rng.choice([0, rng.randrange(1_000_000)]),
                tzinfo=rng.choice(zones),
            )
        )
    for moment in moments:
        assert rfc3339_utc(moment) == _reference(moment), moment
    assert rfc3339_utc(moments[0]) == "2026-11-27T08:00:01.237Z"
    assert rfc3339_utc(moments[2]) == "2026-01-02T03:04:05Z"
    assert rfc3339_utc(moments[5]) == "999-01-02T03:04:05Z"
