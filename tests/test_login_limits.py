"""The login's bookkeeping, without sockets: the slots of connections authenticating at once, and the turns of
an address after failed logins."""

from __future__ import annotations

import asyncio

import pytest

from shardproxy.datapath import client
from shardproxy.datapath.client import FailedLogins, LoginSlots


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


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(client.time, "monotonic", lambda: now[0])
    return now


def test_past_five_failures_an_address_takes_turns_until_it_is_quiet(clock: list[float]) -> None:
    failed = FailedLogins(delay=2.0)
    for _ in range(5):
        assert failed.turn("10.0.0.1") == 0.0
        failed.failed("10.0.0.1")
    assert failed.turn("10.0.0.1") == 2.0  # two seconds after the last failure
    assert failed.turn("10.0.0.1") == 4.0  # and the next after that one
    assert failed.turn("10.0.0.2") == 0.0
    clock[0] += FailedLogins.FORGET_AFTER + 1
    assert failed.turn("10.0.0.1") == 0.0


def test_no_delay_no_turns(clock: list[float]) -> None:
    failed = FailedLogins(delay=0.0)
    for _ in range(10):
        failed.failed("10.0.0.1")
    assert failed.turn("10.0.0.1") == 0.0


def test_the_records_are_bounded(clock: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FailedLogins, "MAX_ADDRESSES", 3)
    failed = FailedLogins(delay=1.0)
    for i in range(5):
        for _ in range(6):
            failed.failed(f"10.0.0.{i}")
    assert failed.turn("10.0.0.0") == 0.0  # the oldest went
    assert failed.turn("10.0.0.4") > 0.0
