"""A bounded schemathesis run against /openapi.json with an admin token finds no 5xx.

The run starts with the test session, in the background, on an api, poller and database of its own
(tests/support/schemathesis_run.py, the `schemathesis_run` fixture): this test waits for its outcome.
"""

from __future__ import annotations

from tests.support.schemathesis_run import BackgroundSchemathesis


def test_no_server_errors(schemathesis_run: BackgroundSchemathesis | None) -> None:
    assert schemathesis_run is not None  # the fixture starts it whenever this test is selected
    outcome = schemathesis_run.outcome()
    assert outcome.returncode == 0, outcome.output[-8000:]
    assert "unhandled error" not in outcome.api_log
    # What the `db` fixture checks after every test that uses the session's database.
    assert not outcome.leaks, "enabled checks whose targets would be looked up in DNS:\n" + "\n".join(outcome.leaks)
