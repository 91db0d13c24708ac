"""The compiled data path's own structures, against the library behaviour they stand in for."""

import random
from collections import deque

import pytest

from shardproxy.datapath._core import Requests


def test_requests_behave_as_a_deque() -> None:
    """Random appends and pops, in runs long enough that the queue both empties (its slots reused) and stays
    non-empty for hundreds of requests (a pipeline: the answered ones are dropped as it goes)."""
    rng = random.Random(7)
    queue, reference = Requests(), deque()
    for step in range(20_000):
        if rng.random() < (0.55 if step % 4000 < 2000 else 0.45):
            queue.append(step)
            reference.append(step)
        elif reference:
            assert queue.popleft() == reference.popleft()
        assert len(queue) == len(reference) and bool(queue) == bool(reference)
        if reference:
            assert queue[0] == reference[0] and queue[len(reference) - 1] == reference[-1]
        if step % 997 == 0:
            assert list(queue) == list(reference)
    while reference:
        assert queue.popleft() == reference.popleft()
    with pytest.raises(IndexError):
        queue.popleft()
    with pytest.raises(IndexError):
        queue[0]
