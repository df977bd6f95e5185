from types import SimpleNamespace

import pytest

from helpers.custom_models import CustomModel, custom_model_fqns
from hf_pp.errors import PipelineConfigError
from hf_pp.functional import build_pipeline_schedule, plan_stage_fqns
from hf_pp.mesh import validate_pp_size
from hf_pp.schedules import SCHEDULE_NAMES, read_csv_schedule_stages, resolve_schedule, validate_microbatches


@pytest.mark.parametrize(
    "name,canonical",
    [("1f1b", "1F1B"), ("GPIPE", "GPipe"), ("interleaved_1f1b", "Interleaved1F1B"), ("looped-bfs", "LoopedBFS"),
     ("interleavedzerobubble", "InterleavedZeroBubble"), ("zbv_zero_bubble", "ZBVZeroBubble"), ("DualPipeV", "DualPipeV")],
)
def test_every_torch_schedule_resolves_case_insensitively(name, canonical):
    assert resolve_schedule(name).name == canonical


def test_schedule_facts():
    assert resolve_schedule("1f1b").single_stage and resolve_schedule("gpipe").single_stage
    assert not resolve_schedule("interleaved_1f1b").single_stage
    assert resolve_schedule("zbv_zero_bubble").style == "v" and resolve_schedule("dual_pipe_v").style == "v"
    assert resolve_schedule("interleaved_zero_bubble").splits_backward
    assert not resolve_schedule("1f1b").splits_backward


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(PipelineConfigError) as err:
        resolve_schedule("2f2b")
    assert all(name in str(err.value) for name in SCHEDULE_NAMES)


def test_missing_csv_is_refused(tmp_path):
    with pytest.raises(PipelineConfigError, match="does not exist"):
        resolve_schedule(None, str(tmp_path / "nope.csv"))


def test_csv_stages_are_read_per_rank(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("0F0,2F0,2B0,0B0\n1F0,3F0,3B0,1B0\n")
    assert read_csv_schedule_stages(str(path), 2) == (4, [(0, 2), (1, 3)])
    with pytest.raises(PipelineConfigError, match="one row per rank"):
        read_csv_schedule_stages(str(path), 4)
    path.write_text("0F0,1F0\n1B0,0B0\n")
    with pytest.raises(PipelineConfigError, match="stage 1 on ranks 0 and 1"):
        read_csv_schedule_stages(str(path), 2)


@pytest.mark.parametrize(
    "schedule,batch,mb,pp,per_rank,match",
    [
        ("1f1b", 8, 3, 2, 1, "divisible by the microbatch size"),
        ("1f1b", 2, 1, 4, 1, "at least 4 microbatches"),
        ("dual_pipe_v", 4, 1, 4, 2, "at least 8 microbatches"),
        ("interleaved_1f1b", 7, 1, 2, 2, "multiple of"),
        ("gpipe", 0, 1, 2, 1, "positive"),
    ],
)
def test_microbatch_errors(schedule, batch, mb, pp, per_rank, match):
    with pytest.raises(PipelineConfigError, match=match):
        validate_microbatches(resolve_schedule(schedule), batch, mb, pp, per_rank)


def test_microbatch_count():
    assert validate_microbatches(resolve_schedule("1f1b"), 8, 2, 4, 1) == 4
    assert validate_microbatches(resolve_schedule("gpipe"), 1, 1, 4, 1) == 1


def test_build_schedule_refuses_wrong_stage_counts_before_touching_stages():
    one = [SimpleNamespace(group_size=2)]
    two = one * 2
    with pytest.raises(PipelineConfigError, match="exactly one stage per rank"):
        build_pipeline_schedule(None, "1f1b", 1, 8, two, None)
    with pytest.raises(PipelineConfigError, match="at least 2 stages per rank"):
        build_pipeline_schedule(None, "interleaved_1f1b", 1, 8, one, None)
    with pytest.raises(PipelineConfigError, match="exactly 2 stages per rank"):
        build_pipeline_schedule(None, "zbv_zero_bubble", 1, 8, one * 3, None)
    with pytest.raises(PipelineConfigError, match="divisible"):
        build_pipeline_schedule(None, "1f1b", 3, 8, one, None)


def test_plan_with_explicit_fqns_checks_stage_counts():
    model = CustomModel(50, 16, 4)
    with pytest.raises(PipelineConfigError, match="one stage per rank"):
        plan_stage_fqns(model, 2, resolve_schedule("1f1b"), module_fqns_per_model_part=custom_model_fqns(4, 4))
    with pytest.raises(PipelineConfigError, match="at least 2 stages per rank"):
        plan_stage_fqns(model, 2, resolve_schedule("looped_bfs"), module_fqns_per_model_part=custom_model_fqns(2, 4))
    with pytest.raises(PipelineConfigError, match="not a multiple of pp_size"):
        plan_stage_fqns(model, 2, resolve_schedule("1f1b"), module_fqns_per_model_part=custom_model_fqns(3, 4))
    with pytest.raises(PipelineConfigError, match="pass module_fqns_per_model_part"):
        plan_stage_fqns(model, 2, resolve_schedule("1f1b"))
    fqns, ranks = plan_stage_fqns(model, 2, resolve_schedule("zbv"), module_fqns_per_model_part=custom_model_fqns(4, 4))
    assert ranks == [(0, 3), (1, 2)] and fqns[0][0] == "embedding"


def test_pp_size_must_divide_world_size():
    assert validate_pp_size(2, 4) == 2
    with pytest.raises(PipelineConfigError, match="not divisible by pp_size=3"):
        validate_pp_size(3, 4)
