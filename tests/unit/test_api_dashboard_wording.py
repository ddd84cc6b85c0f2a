"""services/api/dashboard/wording.py: how the host page says a result's reason, a check's uptime_24h and its
certificate's end of validity. Pure logic: no service."""

from __future__ import annotations

import datetime as dt
import typing

from hypothesis import given
from hypothesis import strategies as st

from services.api.dashboard.wording import REASON_WORDS, cert_validity, reason_phrase, uptime_percent
from shared.events import ResultReason

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def test_every_reason_of_the_contract_has_words_and_ok_needs_none() -> None:
    assert set(REASON_WORDS) == set(typing.get_args(ResultReason))
    assert reason_phrase("ok") == "ok"
    assert reason_phrase("slow") == "slow: answered, but too slowly"
    assert reason_phrase("cert") == "cert: the certificate ends too soon"
    assert reason_phrase("condition") == "condition: the condition was not met"
    assert reason_phrase("protocol") == "protocol: the answer broke the protocol"
    assert reason_phrase("someday") == "someday"  # a reason this dashboard does not know yet: its code


def test_uptime_is_a_percentage_that_never_rounds_up_to_100() -> None:
    assert uptime_percent(None) == "no results"
    assert uptime_percent(1.0) == "100 %"
    assert uptime_percent(0.0) == "0 %"
    assert uptime_percent(0.75) == "75.0 %"
    assert uptime_percent(0.99999) == "99.9 %"  # one failure in 100,000 is not 100 %
    assert uptime_percent(0.00001) == "0.0 %"  # nor one success in 100,000 0 %


@given(st.floats(min_value=0, max_value=1))
def test_uptime_shown_is_at_most_the_share(share: float) -> None:
    shown = uptime_percent(share)
    assert shown.endswith(" %")
    assert float(shown.removesuffix(" %")) <= share * 100 + 1e-9
    assert (shown == "100 %") == (share == 1)


def test_a_certificates_end_in_days_hours_or_minutes_and_once_expired() -> None:
    assert cert_validity(NOW + dt.timedelta(days=41, hours=3), NOW) == "2026-04-11 15:00 UTC (in 41 days)"
    assert cert_validity(NOW + dt.timedelta(hours=30), NOW) == "2026-03-02 18:00 UTC (in 30 h)"
    assert cert_validity(NOW + dt.timedelta(minutes=90), NOW) == "2026-03-01 13:30 UTC (in 90 min)"
    assert cert_validity(NOW - dt.timedelta(days=3), NOW) == "2026-02-26 12:00 UTC (expired 3 days ago)"
    assert cert_validity(NOW, NOW) == "2026-03-01 12:00 UTC (expired just now)"
    assert cert_validity(NOW + dt.timedelta(seconds=20), NOW) == "2026-03-01 12:00 UTC (in 1 min)"
    # In UTC whatever zone the time came in.
    tokyo = dt.timezone(dt.timedelta(hours=9))
    assert cert_validity((NOW + dt.timedelta(days=10)).astimezone(tokyo), NOW).startswith("2026-03-11 12:00 UTC")
