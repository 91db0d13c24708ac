"""The login's bookkeeping, without sockets: the slots of connections authenticating at once."""

from __future__ import annotations

import asyncio

from shardproxy.datapath.client import LoginSlots


async def test_logins_over_the_limit_wait_in_line_and_a_timed_out_one_leaves_it() -> None:
    slots = LoginSlots(1)
    await slots.take()
    second = asyncio.ensure_future(slots.take())
    third = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    second.cancel()  # its login timed out while it waited
    await asyncio.sleep(0)
    slots.give_back()
    await asyncio.wait_for(third, 1)
    assert slots.taken == 1
    slots.give_back()
    assert slots.taken == 0 and slots.free()


async def test_a_reload_that_raises_the_limit_lets_those_in_line_in() -> None:
    slots = LoginSlots(1)
    await slots.take()
    waiting = [asyncio.ensure_future(slots.take()) for _ in range(2)]
    await asyncio.sleep(0)
    slots.resize(3)
    await asyncio.wait_for(asyncio.gather(*waiting), 1)
    assert slots.taken == 3
    slots.resize(1)  # lowered: slots given back are freed until it is met
    slots.give_back()
    assert slots.taken == 2 and not slots.free()
