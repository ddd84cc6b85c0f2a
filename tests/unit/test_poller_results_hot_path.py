"""The poller's per-result shortcuts give what the plain code gives: result ids as uuid4 makes them, and a
detail without secrets as safe_detail makes it, cached or not."""

from __future__ import annotations

import uuid

from services.poller.results import new_result_ids
from shared import details
from shared.details import safe_detail


def test_result_ids_are_distinct_version_4_uuids() -> None:
    ids = list(new_result_ids(1000))
    assert len(ids) == len(set(ids)) == 1000
    assert all(value.version == 4 and value.variant == uuid.RFC_4122 for value in ids)
    assert list(new_result_ids(0)) == []


def test_a_cached_detail_is_the_detail_safe_detail_makes() -> None:
    texts = [
        "status 200 OK, body contains 'all good'",
        "cannot connect to https://user:hunter2@db.example.net:8443/x: refused",
        "line\nbreak\x00nul \ud800 " + "x" * 2000,
    ]
    for text in texts:
        expected = details._safe_detail(text, (), details.DETAIL_LIMIT)
        assert safe_detail(text) == expected == safe_detail(text)  # computed, then from the cache
    assert "hunter2" not in safe_detail(texts[1])


def test_a_detail_with_secrets_is_redacted_and_not_cached() -> None:
    details._safe_detail_without_secrets.cache_clear()
    assert "s3cret" not in safe_detail("answer echoed s3cret back", ("s3cret",))
    assert details._safe_detail_without_secrets.cache_info().currsize == 0
