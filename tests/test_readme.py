"""Every command block of README.md and docs/*.md marked runnable runs as written and prints something, and every
relative link and anchor in them resolves.

A block is marked by an HTML comment (invisible on GitHub) on the line just above its opening fence:

    <!-- runnable -->
    <!-- runnable: path/to/model=tiny-llama -->      placeholders replaced, in order, before it runs

Mark blocks that are cheap and need nothing but the checkout (no downloads, no GPU). A marked block runs
in ``bash -eo pipefail`` in a temporary directory that links the checkout's ``examples/`` and
``benchmarks/``, with this interpreter's bin directory (python, torchrun) first on PATH: the commands run
as written from the repository root, and the files they write land in the temporary directory.
Blocks that launch ``torchrun`` start several processes and are marked slow, like the other multi-rank tests.
"""

import glob
import os
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

from helpers.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
TIMEOUT_S = float(os.environ.get("HF_PP_TEST_TIMEOUT", "300"))
MARKER = re.compile(r"^<!--\s*runnable(?::\s*(?P<subs>.*?))?\s*-->$")
SHELL_FENCE = re.compile(r"^```(bash|sh|shell)?\s*$")
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (?P<title>.+?)\s*#*$")


class Block(NamedTuple):
    page: str
    line: int  # of the first command, 1-based
    source: str


def runnable_blocks(text: str, page: str = "README.md") -> list[Block]:
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        marker = MARKER.match(line.strip())
        if marker is None:
            continue
        if i + 1 >= len(lines) or not SHELL_FENCE.match(lines[i + 1].strip()):
            raise ValueError(f"{page}:{i + 1}: a runnable marker must sit just above a ```bash fence")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{page}:{i + 2}: the code block never closes")
        source = "\n".join(lines[i + 2:end])
        for sub in (marker["subs"] or "").split():
            old, new = sub.split("=", 1)
            if old not in source:
                raise ValueError(f"{page}:{i + 1}: placeholder {old!r} is not in the block")
            source = source.replace(old, new)
        blocks.append(Block(page, i + 3, source))
    return blocks


def _read(page: str) -> str:
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


BLOCKS = [block for page in PAGES for block in runnable_blocks(_read(page), page)]


def test_readme_and_docs_mark_their_cheap_command_blocks_runnable():
    # The planner blocks (plan, --balance) and the functional-API example; markers must not get lost in edits.
    assert len(BLOCKS) >= 6, BLOCKS
    assert sum("python -m hf_pp plan" in b.source for b in BLOCKS) >= 3, BLOCKS
    assert any(b.page == "README.md" for b in BLOCKS), "README.md's planner command should stay runnable"
    assert any("custom_model_pipeline.py" in b.source for b in BLOCKS), BLOCKS


@pytest.mark.parametrize("block", [
    pytest.param(b, id=f"{b.page}:{b.line}", marks=[pytest.mark.slow] if "torchrun" in b.source else [])
    for b in BLOCKS
])
def test_readme_block_runs(block, tmp_path):
    for name in ("examples", "benchmarks"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
           "OMP_NUM_THREADS": "1",
           # torchrun reads PET_<option>: a free port, so the block never meets another job on the default one.
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}
    where = f"{block.page}:{block.line}"
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block.source], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{where} failed:\n{block.source}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.strip(), f"{where} printed nothing"
    plans = block.source.count("python -m hf_pp plan")
    assert proc.stdout.count("expected bubble:") == plans, proc.stdout[-3000:]  # one full report per plan command
    if plans:
        assert (tmp_path / "schedule.png").stat().st_size > 1000  # the planner's picture, written to the cwd


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to dashes, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else HEADING.match(line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading["title"].lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_anchors_follow_githubs_rule():
    assert anchors("# A: `pp_balance` (x.py)\n## Saving, resuming\n## Saving, resuming\n```\n# not a heading\n```") == {
        "a-pp_balance-xpy", "saving-resuming", "saving-resuming-1"}


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_and_anchors_resolve(page):
    text = _read(page)
    broken = []
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))  # links in code are code
    for link in LINK.finditer(prose):
        target = link["target"]
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(resolved):
            broken.append(f"{target}: no file {os.path.relpath(resolved, ROOT)}")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(_read(os.path.relpath(resolved, ROOT))):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(resolved, ROOT)}")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    readme = _read("README.md")
    missing = [p for p in PAGES[1:] if f"]({p})" not in readme and f"]({p}#" not in readme]
    assert not missing, f"README.md links no {missing}"
