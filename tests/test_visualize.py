"""Schedule pictures: every schedule (and a CSV one) gives a valid PNG of
sensible size, computed in one process; the simulated timeline is complete
and its bubble matches the textbook formula where one exists."""

import os
from collections import Counter
from unittest import mock

import pytest
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe, ScheduleInterleavedZeroBubble, ScheduleLoopedBFS,
)

from hf_pp.errors import PipelineConfigError
from hf_pp.layout import expected_bubble_fraction
from hf_pp.stage_math import stage_ids_this_rank
from hf_pp.visualize import bubble_of, draw_schedule, ops_from_schedule, schedule_ops, simulate

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("looped_bfs", 2), ("interleaved_zero_bubble", 2),
             ("zbv_zero_bubble", 2), ("dual_pipe_v", 2)]


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _csv(tmp_path, pp_size, m):
    rows = []
    for rank in range(pp_size):
        a, b = rank, rank + pp_size
        rows.append(",".join([f"{a}F{i}" for i in range(m)] + [f"{b}F{i}" for i in range(m)]
                             + [f"{b}B{i}" for i in range(m)] + [f"{a}B{i}" for i in range(m)]))
    path = tmp_path / "looped.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("name,per_rank", SCHEDULES)
@pytest.mark.parametrize("pp_size,m", [(2, 4), (4, 8)])
def test_every_schedule_draws_a_readable_png(tmp_path, name, per_rank, pp_size, m):
    ops = schedule_ops(name, pp_size, m, per_rank)
    num_stages = pp_size * per_rank
    # Every forward and every backward (full, or input + weight halves) of every stage and microbatch, once.
    counts = Counter((op.kind, op.stage, op.microbatch) for row in ops for op in row)
    assert set(counts.values()) == {1}
    for s in range(num_stages):
        for mb in range(m):
            assert ("F", s, mb) in counts
            assert ("B", s, mb) in counts or {("I", s, mb), ("W", s, mb)} <= set(counts)
    path = draw_schedule(ops, str(tmp_path / f"{name}.png"), title=name)
    width, height = _png_size(path)
    assert 600 <= width <= 4000 and 150 <= height <= 1000
    assert os.path.getsize(path) > 5_000


@pytest.mark.parametrize("name,per_rank", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)])
@pytest.mark.parametrize("pp_size,m", [(2, 4), (4, 8), (4, 16)])
def test_simulated_bubble_matches_formula(name, per_rank, pp_size, m):
    bubble = bubble_of(simulate(schedule_ops(name, pp_size, m, per_rank)))
    assert bubble == pytest.approx(expected_bubble_fraction(pp_size, m, per_rank), abs=1e-9)


def test_zero_bubble_schedules_beat_interleaved():
    interleaved = bubble_of(simulate(schedule_ops("interleaved_1f1b", 4, 8, 2)))
    for name in ("interleaved_zero_bubble", "zbv_zero_bubble", "dual_pipe_v"):
        assert bubble_of(simulate(schedule_ops(name, 4, 8, 2))) < interleaved


def test_csv_schedule_draws(tmp_path):
    csv_path = _csv(tmp_path, 2, 4)
    ops = schedule_ops(None, 2, 4, csv_path=csv_path)
    assert [len(row) for row in ops] == [16, 16]
    width, height = _png_size(draw_schedule(ops, str(tmp_path / "csv.png")))
    assert width >= 600 and height >= 150


def test_built_1f1b_schedule_order_is_what_it_runs():
    """ops_from_schedule on a real Schedule1F1B object (mocked stage, no process group)."""
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.num_stages, stage.submod = 0, 4, 4, None
    schedule = Schedule1F1B(stage, n_microbatches=8)
    ops = ops_from_schedule(schedule, 4)
    last = [f"{op.kind}{op.microbatch}" for op in ops[3]]
    assert last[:4] == ["F0", "B0", "F1", "B1"] and last[-1] == "B7"
    first = [f"{op.kind}{op.microbatch}" for op in ops[0]]
    assert first[:5] == ["F0", "F1", "F2", "F3", "B0"]


def _mock_stages(pp_size, num_stages, stage_ids):
    stages = []
    for index in stage_ids:
        stage = mock.create_autospec(PipelineStage, instance=True)
        stage.group_rank, stage.group_size, stage.num_stages, stage.submod, stage.stage_index = (
            0, pp_size, num_stages, None, index)
        stages.append(stage)
    return stages


@pytest.mark.parametrize("name,schedule_class,per_rank,style", [
    ("gpipe", ScheduleGPipe, 1, "loop"), ("looped_bfs", ScheduleLoopedBFS, 2, "loop"),
    ("interleaved_zero_bubble", ScheduleInterleavedZeroBubble, 2, "loop"), ("dual_pipe_v", ScheduleDualPipeV, 2, "v"),
])
@pytest.mark.parametrize("pp_size,m", [(2, 4), (4, 8)])
def test_built_schedule_is_drawn_from_its_own_order(tmp_path, name, schedule_class, per_rank, style, pp_size, m):
    """ops_from_schedule on a real torch schedule object (mocked stages of rank 0, no process group)."""
    num_stages = pp_size * per_rank
    ids = stage_ids_this_rank(0, pp_size, num_stages, style)
    stages = _mock_stages(pp_size, num_stages, ids)
    schedule = schedule_class(stages[0] if per_rank == 1 else stages, n_microbatches=m)
    ops = ops_from_schedule(schedule, pp_size)
    assert len(ops) == pp_size
    # Every forward and backward (full, or input + weight halves) once, each on the rank that owns its stage.
    counts = Counter((op.kind, op.stage, op.microbatch) for row in ops for op in row)
    assert set(counts.values()) == {1}
    for s in range(num_stages):
        for mb in range(m):
            assert ("F", s, mb) in counts
            assert ("B", s, mb) in counts or {("I", s, mb), ("W", s, mb)} <= set(counts)
    for rank, row in enumerate(ops):
        assert {op.stage for op in row} == set(stage_ids_this_rank(rank, pp_size, num_stages, style)), rank
    if name == "gpipe":  # all forwards, then all backwards, on every rank
        assert all([op.kind for op in row] == ["F"] * m + ["B"] * m for row in ops)
    if name == "interleaved_zero_bubble":  # split backward only
        assert {op.kind for row in ops for op in row} == {"F", "I", "W"}
    if name == "dual_pipe_v":  # fused forward+backward cells
        assert any(op.overlap for row in ops for op in row)
    # The picture of the built schedule is the one the planner draws by name.
    assert ops == schedule_ops(name, pp_size, m, per_rank)
    slots = simulate(ops)
    assert sum(len(row) for row in slots) == sum(counts.values())
    assert 0 < bubble_of(slots) < 1
    width, height = _png_size(draw_schedule(ops, str(tmp_path / f"built_{name}.png"), title=name))
    assert 600 <= width <= 4000 and 150 <= height <= 1000


def test_deadlocking_order_is_reported(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("0B0,0F0\n1F0,1B0\n")
    with pytest.raises(PipelineConfigError, match="cannot make progress"):
        simulate(schedule_ops(None, 2, 1, csv_path=str(path)))


def test_built_csv_schedule_is_drawn_from_its_loaded_order(tmp_path):
    """ops_from_schedule on a torch runtime schedule loaded from CSV (mocked stages, no process group)."""
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    stages = []
    for index in (0, 2):
        stage = mock.create_autospec(PipelineStage, instance=True)
        stage.group_rank, stage.group_size, stage.num_stages, stage.submod, stage.stage_index = 0, 2, 4, None, index
        stages.append(stage)
    schedule = _PipelineScheduleRuntime(stages, 4)
    schedule._load_csv(_csv(tmp_path, 2, 4))
    ops = ops_from_schedule(schedule, 2)
    assert ops == schedule_ops(None, 2, 4, csv_path=str(tmp_path / "looped.csv"))
    assert _png_size(draw_schedule(ops, str(tmp_path / "built.png")))[0] >= 600


def test_drawing_leaves_the_pyplot_backend_alone(tmp_path):
    """A notebook's inline backend must survive a schedule picture (no matplotlib.use inside hf_pp)."""
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot\n"
        "from hf_pp.visualize import draw_schedule, schedule_ops\n"
        f"draw_schedule(schedule_ops('1f1b', 2, 4), {str(tmp_path / 's.png')!r})\n"
        "print(matplotlib.get_backend())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
