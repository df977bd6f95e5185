"""Every README command block marked runnable runs as written and prints something.

A block is marked by an HTML comment (invisible on GitHub) on the line just above its opening fence:

    <!-- runnable -->
    <!-- runnable: path/to/model=tiny-llama -->      placeholders replaced, in order, before it runs

Mark blocks that are cheap and need nothing but the checkout (no downloads, no GPU). A marked block runs
in ``bash -eo pipefail`` in a temporary directory that links the checkout's ``examples/`` and
``benchmarks/``, with this interpreter's bin directory (python, torchrun) first on PATH: the commands run
as written from the repository root, and the files they write land in the temporary directory.
Blocks that launch ``torchrun`` start several processes and are marked slow, like the other multi-rank tests.
"""

import os
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

from helpers.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT_S = float(os.environ.get("HF_PP_TEST_TIMEOUT", "300"))
MARKER = re.compile(r"^<!--\s*runnable(?::\s*(?P<subs>.*?))?\s*-->$")
SHELL_FENCE = re.compile(r"^```(bash|sh|shell)?\s*$")


class Block(NamedTuple):
    line: int  # of the first command, 1-based
    source: str


def runnable_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        marker = MARKER.match(line.strip())
        if marker is None:
            continue
        if i + 1 >= len(lines) or not SHELL_FENCE.match(lines[i + 1].strip()):
            raise ValueError(f"README.md:{i + 1}: a runnable marker must sit just above a ```bash fence")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{i + 2}: the code block never closes")
        source = "\n".join(lines[i + 2:end])
        for sub in (marker["subs"] or "").split():
            old, new = sub.split("=", 1)
            if old not in source:
                raise ValueError(f"README.md:{i + 1}: placeholder {old!r} is not in the block")
            source = source.replace(old, new)
        blocks.append(Block(i + 3, source))
    return blocks


with open(README) as f:
    BLOCKS = runnable_blocks(f.read())


def test_readme_marks_its_cheap_command_blocks_runnable():
    # The planner blocks (plan, --balance) and the functional-API example; markers must not get lost in edits.
    assert len(BLOCKS) >= 3, BLOCKS
    assert sum("python -m hf_pp plan" in b.source for b in BLOCKS) >= 2, BLOCKS


@pytest.mark.parametrize("block", [
    pytest.param(b, id=f"README.md:{b.line}", marks=[pytest.mark.slow] if "torchrun" in b.source else [])
    for b in BLOCKS
])
def test_readme_block_runs(block, tmp_path):
    for name in ("examples", "benchmarks"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
           "OMP_NUM_THREADS": "1",
           # torchrun reads PET_<option>: a free port, so the block never meets another job on the default one.
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block.source], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"README.md:{block.line} failed:\n{block.source}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.strip(), f"README.md:{block.line} printed nothing"
    plans = block.source.count("python -m hf_pp plan")
    assert proc.stdout.count("expected bubble:") == plans, proc.stdout[-3000:]  # one full report per plan command
    if plans:
        assert (tmp_path / "schedule.png").stat().st_size > 1000  # the planner's picture, written to the cwd
