"""The benchmark scripts run end to end in their smallest setting and refuse impossible layouts clearly.

No timing is asserted: benchmarks print figures, tests only check that they do.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--layers", "2", "--hidden", "64", "--vocab", "128", "--seq", "16", "--batch", "2"]


def _run(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_pipeline_efficiency_prints_a_table_and_writes_a_plot(tmp_path):
    done = _run("pipeline_efficiency.py", *TINY, "--pp", "2", "--microbatches", "2", "--schedules", "1f1b",
                "--warmup", "0", "--steps", "1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "| 2 | 1F1B | 2 | 2 |" in done.stdout
    assert "| unsplit, batch |" in done.stdout
    assert "efficiency, same microbatches" in done.stdout  # the pipeline's own losses, apart from microbatch size
    assert (tmp_path / "efficiency.png").stat().st_size > 0
    assert (tmp_path / "efficiency.md").read_text().startswith("# Pipeline efficiency")


@pytest.mark.slow
def test_where_time_goes_splits_every_rank_step():
    done = _run("where_time_goes.py", *TINY, "--microbatches", "2", "--warmup", "0", "--steps", "1")
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2, done.stdout
    for row in rows:
        computing, waiting = (float(cell.rstrip("%")) for cell in row[3:5])
        assert computing > 0 and abs(computing + waiting - 100) < 0.2, row  # the step, split in two


@pytest.mark.slow
def test_memory_benchmark_prints_per_rank_peaks():
    done = _run("memory.py", "--layers", "2", "--hidden", "64", "--vocab", "128", "--seq", "8", "--pp", "2",
                timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| pp=2 |") or line.startswith("| one process |")]
    assert len(rows) == 3, done.stdout


@pytest.mark.slow
def test_memory_benchmark_measures_a_mixture_of_experts_checkpoint():
    done = _run("memory.py", "--model", "mixtral", "--layers", "2", "--hidden", "64", "--vocab", "128", "--seq", "8",
                "--pp", "2", timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| pp=2 |")]
    assert len(rows) == 2 and all(len(row.split("|")) == 14 for row in rows), done.stdout


@pytest.mark.slow
def test_memory_benchmark_compares_lora_with_full_fine_tuning():
    done = _run("memory.py", "--layers", "2", "--hidden", "64", "--vocab", "128", "--seq", "8", "--pp", "2",
                "--peft", "lora", timeout=400)
    assert done.returncode == 0, done.stderr
    assert "LoRA" in done.stdout, done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("| pp=2 |")]
    assert len(rows) >= 2, done.stdout


@pytest.mark.slow
def test_balance_benchmark_prints_every_mode_for_both_models():
    done = _run("balance.py", "--layers", "2", "--hidden", "64", "--vocab", "512", "--uniform-vocab", "128", "--seq", "16",
                "--batch", "2", "--pp", "2", "--warmup", "0", "--steps", "1")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| large vocab") or line.startswith("| uniform")]
    assert [row.split(" | ")[3] for row in rows] == ["layers", "auto", "params", "time"] * 2, done.stdout


def test_microbatch_cost_times_every_variant_and_checks_their_gradients():
    done = _run("microbatch_cost.py", *TINY, "--microbatches", "1", "2", "--warmup", "0", "--steps", "1")
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isalpha()][1:]
    assert [(row[0], row[1]) for row in rows] == [
        (f"| {variant}", m) for variant in ("accumulated", "weight grads deferred", "accumulated in place") for m in "12"
    ], done.stdout
    assert rows[0][4] == "1.000"  # one batch is the reference
    assert "equal plain autograd's (rtol 1e-4): yes" in done.stdout


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("memory.py", ["--layers", "2", "--pp", "4"], "need 2 <= pp <= layers"),
        ("memory.py", ["--hidden", "100"], "multiple of 64"),
        ("pipeline_efficiency.py", ["--layers", "2", "--pp", "4"], "need 2 <= pp <= layers"),
        ("pipeline_efficiency.py", ["--batch", "6", "--microbatches", "4"], "not divisible into 4 microbatches"),
        ("trainer_overhead.py", ["--batch", "6", "--microbatches", "4"], "not divisible into 4 microbatches"),
        ("trainer_overhead.py", ["--layers", "2", "--pp", "3"], "need 2 <= pp <= layers"),
        ("balance.py", ["--layers", "2", "--pp", "4"], "need 2 <= pp <= layers"),
        ("where_time_goes.py", ["--layers", "2", "--pp", "4"], "need 2 <= pp <= layers"),
        ("where_time_goes.py", ["--batch", "6", "--microbatches", "4"], "not divisible into 4 microbatches"),
        ("where_time_goes.py", ["--schedule", "zigzag"], "Unknown pipeline schedule"),
        ("balance.py", ["--batch", "2", "--pp", "4"], "needs at least pp (4) microbatches"),
        ("microbatch_cost.py", ["--batch", "6", "--microbatches", "1", "4"], "not divisible into 4 microbatches"),
    ],
)
def test_impossible_layout_exits_with_a_message(script, args, message):
    done = _run(script, *args, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_peer_compare_refuses_a_missing_peer_venv_and_a_bad_case(tmp_path):
    # The comparison itself needs the peer's own venv (NeMo AutoModel): docs/benchmarks.md; here only its checks.
    done = _run("peer_compare.py", "--peer-venv", str(tmp_path / "none"))
    assert done.returncode == 2 and "--peer-venv must be a virtual environment" in done.stderr
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").write_text("")
    done = _run("peer_compare.py", "--peer-venv", str(tmp_path / "venv"), "--cases", "2,1,1024")
    assert done.returncode == 2 and "microbatches >= pp" in done.stderr
