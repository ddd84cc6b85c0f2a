"""Attacks on the poller's hot path: a check's timeout without aiohttp's own timers (a server that never answers,
one that trickles its body, a TLS handshake that never ends), on uvloop as the poller runs; ProbeSlots under
cancellation storms; result ids; safe_detail's cache with secrets."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import uvloop

from services.poller.probes import CheckTarget, Prober, probe_session
from shared.events import OUTBOUND_EVENTS, EventModel, encode_cloudevent


class _Server:
    """A local TCP server whose handler runs on its own thread: `mode` never answers, trickles, or stalls TLS."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            if self.mode == "trickle-headers":
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n":
                    if self.stop.wait(0.2):
                        return
                    conn.send(bytes([byte]))
            elif self.mode == "trickle-body":
                conn.recv(65536)
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not self.stop.wait(0.2):
                    conn.send(b"x")
            elif self.mode == "trickle-chunked":
                conn.recv(65536)
                conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                while not self.stop.wait(0.2):
                    conn.send(b"1\r\nx\r\n")
            else:  # silent: accepts (reads the request or the ClientHello) and never answers
                self.stop.wait(60)
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[_Server]:
    running = _Server(request.param)
    yield running
    running.close()


def _target(url: str, timeout: float = 1.0) -> CheckTarget:
    return CheckTarget(
        check_id=uuid.uuid4(), host_id=uuid.uuid4(), check_type="http", timeout_seconds=timeout,
        host_name="127.0.0.1", url=url, expected_body="x",
    )  # fmt: skip


async def _run_bounded(url: str, timeout: float = 1.0) -> tuple[str, float]:
    session = probe_session([])
    try:
        prober = Prober(session, [], None)
        started = time.monotonic()
        # Far beyond the check's timeout: a run that does not end by itself fails here, not by hanging the suite.
        outcome = await asyncio.wait_for(prober.run(_target(url, timeout)), 30)
        return outcome.reason, time.monotonic() - started
    finally:
        await session.close()


@pytest.mark.parametrize(
    ("server", "scheme"),
    [
        ("silent", "http"),
        ("silent", "https"),  # the TLS handshake never completes
        ("trickle-headers", "http"),
        ("trickle-body", "http"),
        ("trickle-chunked", "http"),
    ],
    indirect=["server"],
)
def test_the_checks_timeout_bounds_a_server_that_never_finishes(server: _Server, scheme: str) -> None:
    reason, _ = uvloop.run(_run_bounded(f"{scheme}://127.0.0.1:{server.port}/"))
    assert reason == "timeout"


@pytest.mark.parametrize("seed", range(20))
def test_probe_slots_survive_a_cancellation_storm(seed: int) -> None:
    """Hundreds of waiters, some cancelled at random moments (waiting, just handed a slot, inside): never more than
    `size` inside, no newcomer takes a free slot while an earlier waiter still waits (arrival order; a waiter handed
    its slot may resume after a later newcomer that found one free), and every slot comes back."""
    import random

    from services.poller.worker import ProbeSlots

    async def storm() -> None:
        rng = random.Random(seed)
        size = rng.randint(1, 5)
        slots = ProbeSlots(size)
        inside = 0
        most = 0
        overtaken: list[int] = []

        async def probe(number: int) -> None:
            nonlocal inside, most
            if slots._free > 0 and any(not waiter.done() for waiter in slots._waiting):
                overtaken.append(number)
            async with slots:
                inside += 1
                most = max(most, inside)
                try:
                    for _ in range(rng.randint(0, 3)):
                        await asyncio.sleep(0)
                finally:
                    inside -= 1

        tasks = []
        for number in range(300):
            tasks.append(asyncio.create_task(probe(number)))
            if rng.random() < 0.3:
                await asyncio.sleep(0)
            for _ in range(rng.randint(0, 2)):
                victim = rng.choice(tasks)
                victim.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert most <= size
        assert overtaken == []
        assert slots._free == size
        # Slots still work after the storm, for `size` at once.
        async with slots:
            assert slots._free == size - 1

    uvloop.run(storm())


@pytest.mark.parametrize(
    "detail",
    [
        "redirected to http://admin:hunter2@127.0.0.1:8080/x",
        "body: Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc",
        "GET http://127.0.0.1/?token=s3cr3t-value&x=1 failed",
        "password=hunter2 in the answer",
    ],
)
def test_safe_detail_cache_returns_the_redacted_detail_and_secrets_bypass_it(detail: str) -> None:
    from shared.details import DETAIL_LIMIT, _safe_detail, safe_detail

    first = safe_detail(detail)
    again = safe_detail(detail)
    assert first == again == _safe_detail(detail, (), DETAIL_LIMIT)
    for secret in ("hunter2", "s3cr3t-value", "eyJzdWIiOiIxIn0"):
        assert secret not in first
    # A run whose secrets include part of the same detail is redacted with them, not answered from the cache.
    with_secret = safe_detail(detail, ("127.0.0.1",))
    assert "127.0.0.1" not in with_secret


class _Redirecting:
    """An HTTP server that answers every request with a redirect to `location` (then 200 once `location` is None)."""

    def __init__(self) -> None:
        self.location: str | None = None
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                if self.location is None:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
                else:
                    head = f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\nContent-Length: 0\r\n"
                    conn.sendall(head.encode() + b"Connection: close\r\n\r\n")


def test_the_ip_literal_verdict_is_the_urls_whatever_came_before() -> None:
    """The verdict remembered per URL: the same URL refused every time, a blocked address written another way
    refused too, a redirect to a blocked literal refused after the same URL was allowed as a first hop."""
    import ipaddress

    server = _Redirecting()
    blocked = [ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("::ffff:127.0.0.2/128")]

    async def scenario() -> list[tuple[str, str]]:
        session = probe_session(blocked)
        try:
            prober = Prober(session, blocked, None)
            seen = []
            for url in [
                f"http://127.0.0.2:{server.port}/",
                f"http://127.0.0.2:{server.port}/",
                f"http://[::ffff:127.0.0.2]:{server.port}/",
                f"http://127.0.0.1:{server.port}/",
            ]:
                outcome = await prober.run(_target(url, 5.0))
                seen.append((outcome.reason, outcome.detail))
            server.location = f"http://127.0.0.2:{server.port}/"
            target = CheckTarget(
                check_id=uuid.uuid4(), host_id=uuid.uuid4(), check_type="http", timeout_seconds=5.0,
                host_name="127.0.0.1", url=f"http://127.0.0.1:{server.port}/", follow_redirects=True,
            )  # fmt: skip
            outcome = await prober.run(target)
            seen.append((outcome.reason, outcome.detail))
            return seen
        finally:
            await session.close()

    try:
        seen = uvloop.run(scenario())
    finally:
        server.sock.close()
    reasons = [reason for reason, _ in seen]
    assert reasons[:3] == ["blocked"] * 3, seen
    assert reasons[3] == "ok", seen
    assert reasons[4] == "blocked", seen


def test_result_ids_are_unique_random_uuids_across_batches() -> None:
    from services.poller.results import new_result_ids

    ids = [result_id for _ in range(200) for result_id in new_result_ids(50)]
    assert len(set(ids)) == len(ids) == 10_000
    assert all(result_id.version == 4 and result_id.variant == uuid.RFC_4122 for result_id in ids)
    assert list(new_result_ids(0)) == []


@pytest.mark.parametrize("routing_key", sorted(OUTBOUND_EVENTS))
def test_every_outbound_event_encodes_as_before(routing_key: str) -> None:
    """Every routing key of OUTBOUND_EVENTS (the unit test holds five), data built by hypothesis from the models'
    types (any aware time zone, any floats including NaN and infinities, any text): the spliced encoding is the
    previous one, byte for byte, or the previous one refused it (and fell back to the standard library, as the new
    one does)."""
    import datetime as dt

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from pydantic import AwareDatetime

    from tests.unit.test_shared_events import _encoding_as_before

    st.register_type_strategy(AwareDatetime, st.datetimes(timezones=st.timezones()))  # type: ignore[arg-type]
    at = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)

    @settings(max_examples=60, suppress_health_check=list(HealthCheck), deadline=None)
    @given(st.builds(OUTBOUND_EVENTS[routing_key]))
    def same(event: EventModel) -> None:
        event_id = uuid.uuid4()
        try:
            before = _encoding_as_before(routing_key, event, source="/s", event_id=event_id, time=at)
        except Exception:
            return
        assert encode_cloudevent(routing_key, event, source="/s", event_id=event_id, time=at) == (event_id, before)

    same()
