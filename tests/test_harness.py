"""Self-test of the multi-rank harness (tests/helpers/distributed.py): a rank that
raises fails the test with its own traceback, and a rank that hangs is
killed at the deadline, so the test ends instead of hanging."""

import os
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


def _where_the_rank_runs(rank, world_size, variable):
    print(f"rank {rank} of {world_size} prints", flush=True)
    parent_threads = len(os.listdir(f"/proc/{os.getppid()}/task"))
    return {"cwd": os.getcwd(), "variable": os.environ.get(variable), "parent": os.getppid(),
            "parent_threads": parent_threads}


def test_ranks_fork_from_the_server_in_the_tests_directory_and_print_to_its_capture(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    per_rank = run_distributed(_where_the_rank_runs, 2, "HF_PP_HARNESS_PROBE")
    # Forked from the fork server (whose imports they reuse), not started by this process.
    assert all(r["parent"] != os.getpid() for r in per_rank), per_rank
    # The server forks with one thread: a lock held by another thread would stay held in every rank.
    assert all(r["parent_threads"] == 1 for r in per_rank), per_rank
    assert [r["cwd"] for r in per_rank] == [str(tmp_path)] * 2
    out = capfd.readouterr().out
    assert "rank 0 of 2 prints" in out and "rank 1 of 2 prints" in out


def test_a_test_that_changes_the_environment_gets_spawned_ranks_that_see_it(monkeypatch):
    monkeypatch.setenv("HF_PP_HARNESS_PROBE", "42")
    per_rank = run_distributed(_where_the_rank_runs, 2, "HF_PP_HARNESS_PROBE")
    # Preloaded libraries read some variables at import: such a test's ranks are spawned by this process.
    assert [(r["variable"], r["parent"]) for r in per_rank] == [("42", os.getpid())] * 2
