"""A rank that fails mid-step (or dies while saving) ends the whole torchrun job quickly, names itself, leaves no
process behind, and the last complete checkpoint resumes exactly."""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from transformers.trainer_utils import get_last_checkpoint

from helpers.distributed import free_port

TESTS = os.path.dirname(os.path.abspath(__file__))
# The job is a module of tests/helpers: torchrun runs it with -m from tests/, which puts tests/ on its path.
JOB = ["-m", "helpers.reliability_job"]


def _leftovers(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_failing_rank_ends_job_fast_with_its_rank_named_and_no_orphans(tmp_path, mode):
    marker = f"hfpp-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", *JOB, "--fail-rank", "1",
           "--mode", mode, "--at-step", "2", "--timeout", "30", "--marker", marker, "--output-dir", str(tmp_path)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=TESTS, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    if mode == "raise":
        assert "hf_pp: rank 1 failed in step 2: RuntimeError: deliberate failure" in out, out[-4000:]
    else:
        assert "Signal 9 (SIGKILL)" in out and "rank      : 1" in out, out[-4000:]
    assert elapsed < 60, f"took {elapsed:.0f}s"
    time.sleep(1)
    assert _leftovers(marker) == [], "processes outlived the job"


def _job(output_dir, *args: str, timeout: int = 120) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", *JOB, "--timeout", "30",
           "--max-steps", "6", "--save-steps", "2", "--output-dir", str(output_dir), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=TESTS, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - start


def _losses(output_dir) -> dict[int, float]:
    with open(os.path.join(output_dir, "losses.json")) as f:
        return {int(step): loss for step, loss in json.load(f).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc, _ = _job(out, "--mode", "none")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return _losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode,at_step,last_complete", [("raise", 5, 4), ("kill", 5, 4), ("kill-in-save", 4, 2)])
def test_last_complete_checkpoint_resumes_exactly_after_a_failure(tmp_path, uninterrupted, mode, at_step, last_complete):
    proc, elapsed = _job(tmp_path, "--mode", mode, "--at-step", str(at_step))
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-3000:]
    assert elapsed < 60, f"the failed job took {elapsed:.0f}s"
    # A checkpoint a rank died writing stays a staging directory: resume never picks it.
    assert os.path.basename(get_last_checkpoint(str(tmp_path))) == f"checkpoint-{last_complete}", os.listdir(tmp_path)
    if mode == "kill-in-save":
        assert not (tmp_path / f"checkpoint-{at_step}").exists()
    resumed, _ = _job(tmp_path, "--mode", "none", "--resume")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    losses = _losses(tmp_path)
    later = [step for step in sorted(uninterrupted) if step > last_complete]
    assert [step for step in sorted(losses) if step > last_complete] == later
    for step in later:
        assert losses[step] == pytest.approx(uninterrupted[step], rel=1e-6), f"{mode}: step {step}"
