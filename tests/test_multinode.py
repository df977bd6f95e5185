"""Two torchrun agents on this machine stand in for two nodes (c10d rendezvous on 127.0.0.1): pp=2 x dp=2 and
pp=4 across the nodes train exactly as the same world on one node. Catches global-vs-local rank mistakes
(meshes, data sharding by replica, who writes what, the launch checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from helpers.distributed import free_port

TESTS = os.path.dirname(os.path.abspath(__file__))
JOB = ["-m", "helpers.reliability_job", "--mode", "none", "--layers", "4", "--batch", "4", "--max-steps", "4",
       "--timeout", "60"]


def _torchrun(launch: list[str], output_dir: str, pp_size: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, *JOB, "--pp-size", str(pp_size),
           "--output-dir", output_dir]
    return subprocess.Popen(cmd, cwd=TESTS, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


def _losses(output_dir) -> dict:
    with open(os.path.join(output_dir, "losses.json")) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("pp_size", [2, 4])
def test_two_nodes_train_as_one_node(tmp_path, pp_size):
    one = str(tmp_path / "one-node")
    _finish([_torchrun(["--nproc-per-node=4", "--master-addr=127.0.0.1", f"--master-port={free_port()}"], one, pp_size)])
    two, port, run_id = str(tmp_path / "two-nodes"), free_port(), uuid.uuid4().hex[:8]
    agents = [_torchrun(["--nnodes=2", "--nproc-per-node=2", f"--node-rank={node}", "--rdzv-backend=c10d",
                         f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}"], two, pp_size) for node in (0, 1)]
    _finish(agents)
    reference, got = _losses(one), _losses(two)
    assert len(reference) == 4 and got == reference, (got, reference)
