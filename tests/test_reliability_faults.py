"""A rank that fails mid-step ends the whole torchrun job quickly, names itself, and leaves no process behind."""

import os
import subprocess
import sys
import time
import uuid

import pytest

from distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
           f"--master-port={free_port()}", os.path.join(ROOT, "tests", "reliability_job.py"), "--fail-rank", "1",
           "--mode", mode, "--at-step", "2", "--timeout", "30", "--marker", marker, "--output-dir", str(tmp_path)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
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
