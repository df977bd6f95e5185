"""Self-test of the multi-rank harness (tests/helpers/distributed.py): a rank that
raises fails the test with its own traceback, and a rank that hangs is
killed at the deadline, so the test ends instead of hanging."""

import re
import time

import pytest

from helpers.distributed import run_distributed

SLEEP_S, TIMEOUT_S = 300, 20


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("deliberate failure from the harness self-test")
    return rank


def _sleep_on_rank_one(rank, world_size):
    if rank == 1:
        time.sleep(SLEEP_S)  # far past the harness timeout: only killing it ends the test in time
    return rank


def _return_rank_and_size(rank, world_size, extra):
    return rank, world_size, extra


def test_results_come_back_in_rank_order():
    assert run_distributed(_return_rank_and_size, 2, "x") == [(0, 2, "x"), (1, 2, "x")]


def test_raising_rank_fails_with_its_traceback():
    with pytest.raises(AssertionError) as failure:
        run_distributed(_raise_on_rank_one, 2)
    message = str(failure.value)
    assert "rank 1 of 2 raised" in message
    # The failing rank's own traceback: the frame that raised and the exception line.
    assert "Traceback (most recent call last)" in message
    assert "in _raise_on_rank_one" in message
    assert "ValueError: deliberate failure from the harness self-test" in message


def test_hanging_rank_is_killed_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        run_distributed(_sleep_on_rank_one, 2, timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    message = str(failure.value)
    # Rank 1 hangs; rank 0 is listed too only if a busy machine kept it from finishing in time.
    assert re.search(rf"ranks \[(0, )?1\] of 2 did not finish within {TIMEOUT_S}s", message), message
    assert "killed" in message
    # Deadline + process start and teardown, far below the sleep it cut short.
    assert elapsed < TIMEOUT_S + 60 < SLEEP_S, elapsed
