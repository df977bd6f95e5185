"""One name per concept: the old names still work for one release, each warning once (a DeprecationWarning that
names its replacement), and giving both the old and the new name is refused."""

import warnings

import pytest

from helpers.distributed import run_distributed
from hf_pp import PipelineConfigError, PipelineMixin
from hf_pp.deprecation import renamed_argument, warn_deprecated


def _caught(fn, *args, **kwargs):
    """(fn's value, the messages of the DeprecationWarnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn(*args, **kwargs)
    return value, [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def test_a_deprecated_name_warns_once_naming_its_replacement():
    _, first = _caught(warn_deprecated, "f(test_once_old=...)", "f(test_once_new=...)")
    _, again = _caught(warn_deprecated, "f(test_once_old=...)", "f(test_once_new=...)")
    assert first == ["f(test_once_old=...) is deprecated and will be removed in hf_pp 0.3; use f(test_once_new=...)."]
    assert again == []


def test_a_renamed_argument_takes_either_name_but_not_both():
    assert _caught(renamed_argument, "g", "test_old", "up", "test_new", None) == (
        "up", ["g(test_old=...) is deprecated and will be removed in hf_pp 0.3; use g(test_new=...)."])
    assert _caught(renamed_argument, "g", "test_old", None, "test_new", "down") == ("down", [])
    with pytest.raises(PipelineConfigError, match="pass test_new only; test_old is its deprecated name"):
        renamed_argument("g", "test_old", "up", "test_new", "down")


def test_trainer_visualize_schedule_is_visualize_current_schedule():
    class Stub:
        def visualize_current_schedule(self, filename):
            return f"drew {filename}"

    value, messages = _caught(PipelineMixin.visualize_schedule, Stub(), "s.png")
    assert value == "drew s.png"
    assert messages == ["PipelineTrainer.visualize_schedule is deprecated and will be removed in hf_pp 0.3; "
                        "use PipelineTrainer.visualize_current_schedule."]


def _old_names_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    from helpers.custom_models import CustomModel, custom_model_fqns
    from hf_pp import AutoPipeline
    from hf_pp.functional import split_model_into_stages

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("pp",))
    ap, on_init = _caught(AutoPipeline, mesh, round_virtual_stages_to_pp_multiple="up", scale_grads_in_schedule=True)
    (old_round, old_scale), on_read = _caught(lambda: (ap.round_virtual_stages_to_pp_multiple, ap.scale_grads_in_schedule))
    new = AutoPipeline(mesh, round_to_pp_multiple="up", scale_grads=True)
    refused = None
    try:
        AutoPipeline(mesh, round_to_pp_multiple="down", round_virtual_stages_to_pp_multiple="up")
    except PipelineConfigError as err:
        refused = str(err)
    model = CustomModel(vocab_size=32, hidden_size=16, num_layers=2)
    (_, parts), on_split = _caught(split_model_into_stages, model, mesh, "pp", "1f1b", "cpu",
                                   module_names_per_stage=custom_model_fqns(1, 2),
                                   patch_inner_model=False, patch_causal_lm_model=False)
    return dict(
        values=(ap.round_to_pp_multiple, ap.scale_grads, old_round, old_scale),
        new=(new.round_to_pp_multiple, new.scale_grads), refused=refused, warned=on_init + on_read + on_split,
        params=sorted(name for name, _ in parts[0].named_parameters()) == sorted(n for n, _ in model.named_parameters()),
    )


@pytest.mark.slow
def test_old_autopipeline_and_functional_names_still_work_and_warn():
    (out,) = run_distributed(_old_names_worker, 1, timeout_s=120)
    assert out["values"] == ("up", True, "up", True) and out["new"] == ("up", True), out
    assert "pass round_to_pp_multiple only" in out["refused"], out
    replacements = [m.split("; use ")[1] for m in out["warned"]]
    assert replacements == [
        "AutoPipeline(round_to_pp_multiple=...).", "AutoPipeline(scale_grads=...).",
        "AutoPipeline.round_to_pp_multiple.", "AutoPipeline.scale_grads.",
        "split_model_into_stages(module_fqns_per_model_part=...).",
    ], out["warned"]
    assert out["params"], "the old name's plan was not used"
