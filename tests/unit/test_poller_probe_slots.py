"""ProbeSlots: at most `size` at once, first come first served, and a cancelled waiter loses no slot."""

from __future__ import annotations

import asyncio

from services.poller.worker import ProbeSlots


async def test_at_most_size_run_at_once_in_arrival_order() -> None:
    slots = ProbeSlots(3)
    running, most, order = 0, 0, []

    async def probe(number: int) -> None:
        nonlocal running, most
        async with slots:
            order.append(number)
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.001 * (number % 4))
            running -= 1

    await asyncio.gather(*(probe(number) for number in range(50)))
    assert most == 3 and order == list(range(50))


async def test_a_cancelled_waiter_loses_no_slot() -> None:
    slots = ProbeSlots(1)
    release = asyncio.Event()

    async def hold() -> None:
        async with slots:
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter.cancel()  # cancelled while it waits
    await asyncio.sleep(0)
    release.set()
    await holder
    async with asyncio.timeout(1):  # the slot is free again
        async with slots:
            pass

    # Handed the slot and cancelled before it ran: the slot goes on to the next waiter.
    release.clear()
    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    first, second = asyncio.create_task(hold()), asyncio.create_task(hold())
    await asyncio.sleep(0)
    release.set()
    await asyncio.sleep(0)  # the holder leaves: `first` is handed the slot, not yet running
    first.cancel()
    async with asyncio.timeout(1):
        await second
    await asyncio.gather(holder, first, return_exceptions=True)
    async with asyncio.timeout(1):
        async with slots:
            pass
